from __future__ import annotations

import pytest

from medanomaly import get_model, list_models
from medanomaly.config import apply_overrides, build_detector
from medanomaly.errors import ConfigError
from medanomaly.models.cae import CAE


def test_registry_lists_the_foundation_models():
    assert {"cae", "vae"} <= set(list_models())


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'cae'"):
        get_model("caee")


def test_params_round_trip_through_a_config():
    detector = get_model("cae", latent_channels=4, engine={"epochs": 3})
    config = detector.config()
    assert config["model"]["name"] == "cae"
    assert config["model"]["latent_channels"] == 4
    assert config["engine"]["epochs"] == 3
    rebuilt = build_detector(config)
    assert isinstance(rebuilt, CAE)
    assert rebuilt.config() == config


def test_unknown_constructor_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="latent_size"):
        build_detector({"model": {"name": "cae", "latent_size": 3}})


def test_overrides_parse_yaml_values():
    config = apply_overrides(
        {"model": {"name": "cae"}}, ["engine.epochs=5", "model.channels=[8,16]"]
    )
    assert config["engine"]["epochs"] == 5
    assert config["model"]["channels"] == [8, 16]
    with pytest.raises(ConfigError):
        apply_overrides(config, ["epochs=5"])

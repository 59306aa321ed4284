"""YAML configs whose blocks map one-to-one onto Python arguments.

``model:`` maps onto a detector's constructor, ``postprocess:`` onto
:class:`~medanomaly.postprocess.chain.PostProcess` (map steps saved with the run), ``engine:`` onto
:class:`~medanomaly.training.engine.EngineConfig`, ``data:`` onto
:func:`medanomaly.data.loading.load_dataset` and the optional ``evaluation:`` onto
:class:`~medanomaly.model_selection.cv.CVSettings` (``threshold``, ``alpha``, ``val_fraction``,
...).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import yaml

from medanomaly.builtin import resolve
from medanomaly.detectors.arguments import check_arguments
from medanomaly.detectors.base import RESOLVED_KEY, BaseDetector
from medanomaly.detectors.registry import get_model
from medanomaly.errors import ConfigError, did_you_mean
from medanomaly.postprocess import PostProcessed
from medanomaly.training.engine import EngineConfig

SECTIONS = ("model", "engine", "data", "evaluation", "postprocess")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with ``model`` (required), ``engine`` and ``data`` blocks.

    Args:
        path: A YAML file, or the name of a built-in config (``dae_lgg_2d``; see
            :mod:`medanomaly.builtin`). A file wins over a name.

    Raises:
        MissingFileError: ``path`` is neither a file nor a built-in name (did-you-mean).
        ConfigError: The file is not a config.
    """
    source = resolve("config", path)
    try:
        config = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{path}: a config needs a 'model:' block with at least 'name:'")
    # a run's config.yaml also holds its version and what ``auto`` settings resolved to
    unknown = sorted(set(config) - set(SECTIONS) - {"version", RESOLVED_KEY})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {unknown}; use {', '.join(SECTIONS)}")
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with ``section.key=value`` overrides (values parsed as YAML).

    Example: ``engine.epochs=5`` or ``model.channels=[16,32,64,128]``.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(
                f"override {item!r}: use section.key=value with section in {SECTIONS}"
            )
        target = config.setdefault(parts[0], {})
        for part in parts[1:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(raw)
    return config


def check_data_block(data: Any) -> None:
    """Refuse a ``data:`` block key that ``load_dataset`` does not take (did-you-mean).

    The keys are the arguments of :func:`~medanomaly.data.loading.load_dataset`.

    Raises:
        ConfigError: ``data`` is not a mapping or holds an unknown key.
    """
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"data: must be a mapping of load_dataset arguments, got {data!r}")
    from medanomaly.data.loading import load_dataset

    known = [p for p in inspect.signature(load_dataset).parameters if p != "source"]
    for key in data:
        if key not in known:
            raise ConfigError(
                f"data: unknown key {key!r}.{did_you_mean(key, known)} Valid keys: "
                + ", ".join(known)
            )


def build_detector(config: dict[str, Any]) -> BaseDetector:
    """Make the detector a config describes (``model`` + ``engine`` blocks).

    A non-empty ``postprocess`` list wraps the detector in
    :class:`~medanomaly.postprocess.PostProcessed`.

    Raises:
        ConfigError: If the model name is unknown (with suggestions) or an argument is not
            one of the model's constructor arguments.
    """
    params = dict(config["model"])
    name = params.pop("name", None)
    if not name:
        raise ConfigError("model: 'name' is missing (see `medanomaly models`)")
    engine = config.get("engine")
    if isinstance(engine, dict):
        check_arguments(EngineConfig, engine, "engine")
    check_data_block(config.get("data"))
    if config.get("postprocess"):
        return PostProcessed(
            {"name": name, **params}, config["postprocess"], engine=config.get("engine")
        )
    try:
        return get_model(name, **params, engine=config.get("engine"))
    except TypeError as error:
        raise ConfigError(f"model {name!r}: {error}") from error

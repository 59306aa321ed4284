"""The training engine: history, checkpoints, early stopping and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly import EngineConfig, get_model
from medanomaly.engine import Engine, read_history
from medanomaly.errors import ConfigError


def _weights(detector) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in detector.network_.state_dict().items()}


def test_history_has_the_seed000_curves(tmp_path, tiny2d):
    engine = {"epochs": 3, "batch_size": 8, "progress": False}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal, val=tiny2d, run_dir=tmp_path)
    history = read_history(tmp_path)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_score_normal", "val_score_abnormal"):
        assert all(np.isfinite(row[key]) for row in history), key
    assert len(detector.history_) == 3
    for name in ("checkpoint.pt", "history.csv", "model.pt", "config.yaml"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny2d, monkeypatch):
    engine = {"epochs": 4, "batch_size": 4, "progress": False, "seed": 3}
    full = get_model("cae", engine=engine).fit(tiny2d.normal, run_dir=tmp_path / "full")

    original = Engine._run_epoch
    calls = {"n": 0}

    def crash_on_third_epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run_epoch", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        get_model("cae", engine=engine).fit(tiny2d.normal, run_dir=tmp_path / "resumed")
    monkeypatch.setattr(Engine, "_run_epoch", original)
    assert len(read_history(tmp_path / "resumed")) == 2
    resumed = get_model("cae", engine=engine).fit(
        tiny2d.normal, run_dir=tmp_path / "resumed", resume=True
    )
    for key, value in _weights(full).items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=0)
    assert [r["train_loss"] for r in resumed.history_] == [r["train_loss"] for r in full.history_]


def test_resume_refuses_a_different_config(tmp_path, tiny2d):
    get_model("cae", engine={"epochs": 1, "progress": False}).fit(tiny2d.normal, run_dir=tmp_path)
    other = get_model("cae", latent_channels=4, engine={"epochs": 2, "progress": False})
    with pytest.raises(ConfigError, match="different configuration"):
        other.fit(tiny2d.normal, run_dir=tmp_path, resume=True)


def test_early_stopping_restores_the_best_epoch(tiny2d):
    engine = {"epochs": 30, "patience": 1, "lr": 0.5, "progress": False}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal)
    history = detector.history_
    assert len(history) < 30
    best = min(row["val_loss"] for row in history)
    assert history[-1]["val_loss"] > best or len(history) == 1


def test_engine_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown keys"):
        EngineConfig.from_any({"epoch": 3})
    with pytest.raises(ConfigError, match="val_fraction"):
        EngineConfig(val_fraction=1.5)


def test_labelled_abnormal_training_images_are_left_out(tiny2d, fast_engine):
    detector = get_model("cae", engine=fast_engine).fit(tiny2d)
    n_val = round(len(tiny2d.normal) * 0.1)
    assert len(detector.val_scores_) == n_val

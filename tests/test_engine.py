"""The training engine: history, checkpoints, early stopping and exact resume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medanomaly import BaseDetector, EngineConfig, get_model
from medanomaly.data.loading import ArrayAugment
from medanomaly.errors import ConfigError
from medanomaly.io.safe_files import load_state, save_state
from medanomaly.training.engine import Engine, read_history, same_configuration, split_indices
from medanomaly.transforms import build_transforms


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
    for name in ("checkpoint.safetensors", "history.csv", "model.safetensors", "config.yaml"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    tmp_path, tiny2d, interrupt_training
):
    engine = {"epochs": 4, "batch_size": 4, "progress": False, "seed": 3}
    full = get_model("cae", engine=engine).fit(tiny2d.normal, run_dir=tmp_path / "full")

    restore = interrupt_training(3)
    with pytest.raises(KeyboardInterrupt):
        get_model("cae", engine=engine).fit(tiny2d.normal, run_dir=tmp_path / "resumed")
    restore()
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


@pytest.mark.parametrize("compile_now", [False, True])
def test_resume_accepts_a_checkpoint_without_settings_added_later(tmp_path, tiny2d, compile_now):
    """An older checkpoint lacks memory_format and compile: at their defaults it resumes."""
    engine = {"epochs": 2, "progress": False}
    get_model("cae", engine=engine).fit(tiny2d.normal, run_dir=tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    saved = load_state(path)
    for key in ("memory_format", "compile"):
        del saved["extra_state"]["engine"][key]
    save_state(saved, path)
    detector = get_model("cae", engine={**engine, "compile": compile_now})
    if compile_now:
        with pytest.raises(ConfigError, match="different configuration"):
            detector.fit(tiny2d.normal, run_dir=tmp_path, resume=True)
    else:
        detector.fit(tiny2d.normal, run_dir=tmp_path, resume=True)
        assert [row["epoch"] for row in read_history(tmp_path)] == [1, 2]


def test_same_configuration_ignores_only_added_settings_at_their_default():
    current = get_model("cae", engine={"epochs": 2}).config()
    older = {**current, "engine": dict(current["engine"])}
    del older["engine"]["memory_format"]
    assert same_configuration(older, current)
    older["engine"]["epochs"] = 3
    assert not same_configuration(older, current)


def test_early_stopping_keeps_the_weights_of_the_best_epoch(tiny2d, monkeypatch):
    """The kept network is the one of the epoch with the lowest validation loss, not the last."""
    snapshots = []
    original = Engine._run_epoch

    def run_and_snapshot(self, fabric, model, *args, **kwargs):
        row = original(self, fabric, model, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return row

    monkeypatch.setattr(Engine, "_run_epoch", run_and_snapshot)
    engine = {"epochs": 30, "patience": 2, "lr": 0.05, "progress": False, "seed": 1}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal)
    losses = [row["val_loss"] for row in detector.history_]
    best = int(np.argmin(losses))
    assert len(losses) == len(snapshots) and best < len(losses) - 1, "no epoch after the best"
    kept = _weights(detector)
    for key, value in snapshots[best].items():
        torch.testing.assert_close(kept[key], value, rtol=0, atol=0)
    last_differs = any(not torch.equal(kept[k], v) for k, v in snapshots[-1].items())
    assert last_differs, "the last epoch's weights were kept"


def test_monitor_val_auroc_keeps_the_epoch_with_the_best_validation_auroc(tiny2d, tiny2d_val20):
    engine = {"epochs": 6, "patience": None, "monitor": "val_auroc", "progress": False}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal, val=tiny2d_val20)
    aurocs = [row["val_auroc"] for row in detector.history_]
    kept = roc_auc_score(tiny2d_val20.labels, detector.score(tiny2d_val20))
    assert kept == pytest.approx(max(aurocs), abs=1e-9)
    assert len(set(aurocs)) > 1, "AUROC constant over epochs: the test shows nothing"
    assert detector.epoch_monitor_ == "val_auroc on 20 abnormal validation images"


def test_monitor_val_auroc_without_abnormal_images_falls_back_to_the_loss(tiny2d, caplog):
    engine = {"epochs": 2, "monitor": "val_auroc", "progress": False}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal)
    assert "val_auroc asked, but 0 abnormal validation images" in caplog.text
    assert all("val_auroc" not in row for row in detector.history_)


def test_a_handful_of_abnormal_images_ranks_epochs_by_the_loss_and_the_run_says_so(
    tiny2d, tmp_path, caplog
):
    engine = {"epochs": 6, "patience": None, "monitor": "val_auroc", "progress": False}
    detector = get_model("cae", engine=engine).fit(tiny2d.normal, val=tiny2d, run_dir=tmp_path)
    assert "6 abnormal validation images are fewer than 20" in caplog.text
    losses = [row["val_loss"] for row in detector.history_]
    aurocs = [row["val_auroc"] for row in detector.history_]  # still drawn, never ranked by
    kept = roc_auc_score(tiny2d.labels, detector.score(tiny2d))
    assert int(np.argmin(losses)) != int(np.argmax(aurocs)) or len(set(aurocs)) == 1
    assert kept == pytest.approx(aurocs[int(np.argmin(losses))], abs=1e-9)
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())["resolved"]
    assert resolved["epoch_monitor"].startswith("val_loss (val_auroc asked, but 6 abnormal")
    assert BaseDetector.load(tmp_path).run_config_["resolved"] == resolved


def test_engine_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown keys"):
        EngineConfig.from_any({"epoch": 3})
    with pytest.raises(ConfigError, match="val_fraction"):
        EngineConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="Did you mean 'val_auroc'"):
        EngineConfig(monitor="val_aurc")


def test_labelled_abnormal_training_images_are_left_out(tiny2d, fast_engine):
    detector = get_model("cae", engine=fast_engine).fit(tiny2d)
    # 12 normals cannot spare val_min = 20: val_fraction 0.1 holds out one
    assert len(detector.val_scores_) == round(len(tiny2d.normal) * 0.1)


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "held"),
    [
        (70, 0.1, 20, 20),
        (60, 0.1, 20, 20),
        (59, 0.1, 20, 6),
        (12, 0.1, 20, 1),
        (300, 0.1, 20, 30),
        (70, 0.1, 0, 7),
        (5, 0.0, 20, 0),
    ],
)
def test_split_holds_out_enough_normals_for_a_threshold(n, fraction, minimum, held):
    keep, out = split_indices(n, fraction, seed=0, minimum=minimum)
    assert len(out) == held and len(keep) == n - held
    assert not set(keep) & set(out)


def _augmented(data):
    transforms = [{"rand_flip": {"axes": [1], "prob": 0.5}}, "rand_affine"]
    return replace(data.normal, augment=ArrayAugment(build_transforms(transforms)))


def test_augmented_runs_with_the_same_seed_are_identical(tiny2d):
    engine = {"epochs": 3, "batch_size": 4, "progress": False, "seed": 5}
    first = get_model("cae", engine=engine).fit(_augmented(tiny2d))
    second = get_model("cae", engine=engine).fit(_augmented(tiny2d))
    for key, value in _weights(first).items():
        torch.testing.assert_close(_weights(second)[key], value, rtol=0, atol=0)


def test_augmentation_draws_differ_between_epochs_and_workers(tiny2d):
    data = _augmented(tiny2d)
    data.reseed(1)
    one = data[0]
    data.reseed(2)
    assert not torch.equal(one, data[0])
    data.reseed(1)
    assert torch.equal(one, data[0])

"""``medanomaly cv``: grouped splits, normal-only training, validation thresholds, resume."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_evaluate_cli import write_config, write_phantom_manifest

from medanomaly.cli import main
from medanomaly.config import load_config
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.thresholds import choose_threshold
from medanomaly.errors import ConfigError
from medanomaly.model_selection.cv import cross_validate, make_splits, read_splits
from medanomaly.model_selection.runs import summarise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fit_calls(monkeypatch):
    """Record the labels of every training set passed to ``fit`` (and count the calls)."""
    calls: list[np.ndarray] = []
    original = DeepDetector.fit

    def recording_fit(self, train, val=None, **kwargs):
        calls.append(np.asarray(train.labels).copy())
        return original(self, train, val, **kwargs)

    monkeypatch.setattr(DeepDetector, "fit", recording_fit)
    return calls


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """A 2 x 3-fold cv through the command line on 16 normal + 8 abnormal phantoms."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cv")
    manifest = write_phantom_manifest(root / "data", n_normal=16, n_abnormal=8)
    config = write_config(root / "cae.yaml", epochs=1)
    out = root / "out"
    argv = ["cv", "--config", str(config), "--data", str(manifest), "--out", str(out)]
    argv += ["--folds", "3", "--repeats", "2", "--set", "model.channels=[8,16]"]
    assert main(argv) == 0
    return root, manifest, config, out


def _parts(out) -> dict[tuple[str, str], dict[str, list[dict[str, str]]]]:
    parts: dict = defaultdict(lambda: defaultdict(list))
    for row in read_splits(out):
        parts[(row["repeat"], row["fold"])][row["part"]].append(row)
    return parts


def test_cv_writes_mean_sd_metrics_and_a_report(cv_run):
    out = cv_run[3]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("auroc", "auprc", "sensitivity", "specificity", "accuracy", "precision", "f1"):
        block = metrics["image"][key]
        assert set(block) >= {"mean", "sd", "folds"} and len(block["folds"]) == 6, key
    auroc = metrics["image"]["auroc"]
    assert auroc["mean"] == pytest.approx(np.mean(auroc["folds"]))
    assert auroc["sd"] == pytest.approx(np.std(auroc["folds"], ddof=1))
    assert metrics["pixel"]["auroc"]["n"] == 6 and metrics["cv"]["threshold_rule"] == "f1"
    assert metrics["n_cases"] == 24 and metrics["cv"]["n_groups"] == 12
    page = (out / "report.html").read_text()
    assert (out / "figures" / "fold_boxplot.png").is_file() and "Per-fold results" in page
    assert page.count("data:image/png;base64,") == 5
    assert len(list((out / "folds").glob("r*_f*/fold.json"))) == 6


def test_no_group_on_both_sides_and_every_case_tested_once_per_repeat(cv_run):
    parts = _parts(cv_run[3])
    assert len(parts) == 6
    tested = defaultdict(list)
    for (repeat, _), fold in parts.items():
        groups = {part: {r["group"] for r in rows} for part, rows in fold.items()}
        assert not groups["test"] & (groups["train"] | groups["val"])
        assert not groups["train"] & groups["val"]
        assert {r["label"] for r in fold["val"]} == {"0", "1"}  # stratified when possible
        tested[repeat] += [r["id"] for r in fold["test"]]
        assert sum(len(rows) for rows in fold.values()) == 24
    for ids in tested.values():
        assert len(ids) == len(set(ids)) == 24
    first, second = ([r["id"] for r in parts[(rep, "1")]["test"]] for rep in ("1", "2"))
    assert first != second  # repeats shuffle differently


def test_threshold_comes_from_the_validation_part_only(cv_run):
    out = cv_run[3]
    fold = json.loads((out / "folds" / "r1_f2" / "fold.json").read_text())
    val = _parts(out)[("1", "2")]["val"]
    detector = BaseDetector.load(fold["run_dir"])
    from medanomaly.data.loading import load_dataset

    images, _ = load_dataset(cv_run[1], **load_config(cv_run[2])["data"])
    index = [int(r["index"]) for r in val]
    scores = detector.score(images.subset(index))
    expected = choose_threshold("f1", scores, images.labels[index])
    assert fold["image"]["threshold"] == pytest.approx(expected, rel=1e-5)
    assert fold["image"]["threshold_source"] == "validation part of the training folds"


def _set(n_normal=12, n_abnormal=6):
    data = make_phantoms(n_normal, n_abnormal, (32, 32), seed=3)
    data.groups = np.array([f"p{i // 2}" for i in range(len(data))])
    return data


def _config():
    return {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
        "engine": {"epochs": 1, "batch_size": 8, "progress": False},
    }


def test_training_sets_hold_normal_images_only(tmp_path, fit_calls):
    cross_validate(_config(), _set(), tmp_path, folds=2, repeats=1)
    assert len(fit_calls) == 2
    for labels in fit_calls:
        assert labels.size and set(labels.tolist()) == {0}


def test_resume_skips_finished_folds(tmp_path, fit_calls, monkeypatch):
    data = _set()
    first = cross_validate(_config(), data, tmp_path, folds=2, repeats=2)
    assert len(fit_calls) == 4
    again = cross_validate(_config(), data, tmp_path, folds=2, repeats=2)
    assert len(fit_calls) == 4  # nothing recomputed
    assert again["image"]["auroc"] == first["image"]["auroc"]
    (tmp_path / "folds" / "r2_f1" / "fold.json").unlink()
    cross_validate(_config(), data, tmp_path, folds=2, repeats=2)
    assert len(fit_calls) == 5  # only the fold without its result


def test_an_interrupted_cv_keeps_its_finished_folds(tmp_path, fit_calls, monkeypatch):
    import medanomaly.model_selection.cv as cv

    original = cv.run_fold

    def crash_on_third(split, *args, **kwargs):
        if split.repeat == 1 and split.fold == 0:
            raise KeyboardInterrupt("simulated interruption")
        return original(split, *args, **kwargs)

    monkeypatch.setattr(cv, "run_fold", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(_config(), _set(), tmp_path, folds=2, repeats=2)
    assert sorted(p.parent.name for p in tmp_path.glob("folds/*/fold.json")) == ["r1_f1", "r1_f2"]
    monkeypatch.setattr(cv, "run_fold", original)
    metrics = cross_validate(_config(), _set(), tmp_path, folds=2, repeats=2)
    assert len(fit_calls) == 4 and len(metrics["image"]["auroc"]["folds"]) == 4


def test_resume_with_other_settings_is_refused(tmp_path):
    cross_validate(_config(), _set(), tmp_path, folds=2, repeats=1)
    with pytest.raises(ConfigError, match="different settings"):
        cross_validate(_config(), _set(), tmp_path, folds=2, repeats=1, threshold="youden")


def test_make_splits_respects_groups_with_uneven_group_sizes():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), rng.integers(1, 6, 30)).astype(str)
    labels = np.array([int(g) % 3 == 0 for g in groups.astype(int)], dtype=int)
    splits = make_splits(labels, groups, folds=5, repeats=3, val_fraction=0.2, seed=1)
    assert len(splits) == 15
    for split in splits:
        sides = [set(groups[part]) for part in (split.train, split.val, split.test)]
        assert not (sides[0] & sides[1]) and not (sides[2] & (sides[0] | sides[1]))
        assert len(split.train) + len(split.val) + len(split.test) == len(labels)


def test_make_splits_needs_enough_groups():
    with pytest.raises(ConfigError, match="too few"):
        make_splits(np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "b"]), 5, 1, 0.2)


def test_summarise_skips_undefined_values():
    summary = summarise([0.5, None, 0.7])
    assert summary["mean"] == pytest.approx(0.6) and summary["n"] == 2
    assert summary["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["folds"] == [0.5, None, 0.7]
    assert summarise([None])["mean"] is None and summarise([0.3])["sd"] == 0.0


def test_unknown_evaluation_keys_are_rejected(tmp_path):
    config = {**_config(), "evaluation": {"treshold": "f1"}}
    with pytest.raises(ConfigError, match="unknown keys"):
        cross_validate(config, _set(), tmp_path)


def test_cli_help_lists_evaluate_and_cv(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "evaluate" in out and "cv" in out


def test_splits_file_is_plain_csv(cv_run):
    with open(cv_run[3] / "splits.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["repeat", "fold", "part", "index", "id", "group", "label"]


def test_cv_report_renders_in_headless_chromium(cv_run, tmp_path):
    from test_report import check_renders

    dom = check_renders(cv_run[3] / "report.html", tmp_path)
    assert "Per-fold results" in dom and "r2" not in dom.split("<h1>")[0]

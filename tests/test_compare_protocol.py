"""Protocols that cannot leak: groups, the split column, label names, failures, OUT/best."""

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml
from test_evaluate_cli import write_config, write_phantom_manifest

from medanomaly.cli import main
from medanomaly.detectors.base import BaseDetector
from medanomaly.errors import ConfigError
from medanomaly.model_selection import compare as compare_module
from medanomaly.model_selection.compare import compare
from medanomaly.model_selection.spec import parse_spec

INTENSITY = {"model": {"name": "intensity", "spatial_dims": 2}}
VOXEL = {"model": {"name": "intensity", "spatial_dims": 2, "per_voxel": True}}


def _rewrite(manifest: Path, change) -> Path:
    """Rewrite a manifest row by row (``change(row_dict, index) -> row_dict``)."""
    with open(manifest, newline="") as handle:
        rows = [change(dict(r), i) for i, r in enumerate(csv.DictReader(handle))]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _split_manifest(folder: Path, n_normal=16, n_abnormal=16) -> Path:
    """Phantoms with a split column: per group, train / val / test in turn (normals and
    abnormal cases alike), so every part holds both classes."""
    manifest = write_phantom_manifest(folder, n_normal, n_abnormal, per_group=2)
    parts = ["train", "train", "val", "test"]

    def change(row, i):
        return {**row, "split": parts[int(row["group"][1:]) % len(parts)]}

    return _rewrite(manifest, change)


def _spec(manifest, kind="split_column", **extra):
    return {
        "data": {"path": str(manifest), "transforms": [{"min_max": {}}]},
        "protocol": {"kind": kind, **extra},
        "level": "image",
        "threshold": "youden",
        "candidates": {"intensity": INTENSITY, "voxel": VOXEL},
    }


def _write_spec(tmp_path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_group_in_train_and_test_of_the_split_column_exits_2_naming_it(tmp_path, capsys):
    manifest = _split_manifest(tmp_path / "data")
    _rewrite(manifest, lambda r, i: {**r, "split": "test"} if i == 0 else r)  # p0: train + test
    spec = _write_spec(tmp_path, _spec(manifest))
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "patient group 'p0' has cases in both train and test" in err[0]
    assert not (tmp_path / "out" / "folds").exists()


def test_fit_trains_on_the_train_rows_validates_on_the_val_rows_and_never_reads_test(tmp_path):
    manifest = _split_manifest(tmp_path / "data")
    # test rows that cannot be read: fit must not even try
    _rewrite(manifest, lambda r, i: {**r, "path": "missing.npy"} if r["split"] == "test" else r)
    config = write_config(tmp_path / "cae.yaml", epochs=1)
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--data", str(manifest), "--out", str(out)]) == 0
    assert not (out / "skipped.txt").exists()
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    val_normals = sum(r["split"] == "val" and r["label"] == "0" for r in rows)
    assert len(BaseDetector.load(out).val_scores_) == val_normals


def test_fit_refuses_a_split_column_that_puts_a_patient_in_two_parts(tmp_path, capsys):
    manifest = _split_manifest(tmp_path / "data")
    _rewrite(manifest, lambda r, i: {**r, "split": "val"} if i == 0 else r)  # p0: train + val
    config = write_config(tmp_path / "cae.yaml", epochs=1)
    args = ["fit", "--config", str(config), "--data", str(manifest), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "group 'p0' has cases in both train and val" in capsys.readouterr().err


def test_cv_and_kfold_specs_refuse_a_split_column_they_would_ignore(tmp_path, capsys):
    manifest = _split_manifest(tmp_path / "data")
    config = write_config(tmp_path / "cae.yaml", epochs=1)
    args = ["cv", "--config", str(config), "--data", str(manifest), "--out", str(tmp_path / "cv")]
    assert main(args) == 2
    assert "split column" in capsys.readouterr().err
    spec = parse_spec(_spec(manifest, kind="kfold", folds=2), tmp_path)
    with pytest.raises(ConfigError, match="use protocol kind: split_column"):
        compare(spec, tmp_path / "out", progress=False)


def test_the_split_column_protocol_reads_the_specs_label_names(tmp_path):
    manifest = _split_manifest(tmp_path / "data")
    names = {"0": "healthy", "1": "bleed"}
    _rewrite(manifest, lambda r, i: {**r, "label": names[r["label"]]})
    raw = _spec(manifest)
    raw["data"]["label_names"] = {"healthy": 0, "bleed": 1}
    results = compare(parse_spec(raw, tmp_path), tmp_path / "out", progress=False)
    assert results["n_normal"] == 16 and results["n_abnormal"] == 16
    assert results["rows"]["intensity"]["errors"] == []


def test_data_without_groups_warns_once_and_says_so_in_the_results(tmp_path, caplog):
    manifest = write_phantom_manifest(tmp_path / "data", 32, 16, per_group=2)
    _rewrite(manifest, lambda r, i: {k: v for k, v in r.items() if k != "group"})
    raw = _spec(manifest, kind="kfold", folds=2, val_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="medanomaly.model_selection.compare"):
        results = compare(parse_spec(raw, tmp_path), tmp_path / "out", progress=False)
    warnings = [r for r in caplog.records if "names no patient" in r.getMessage()]
    assert len(warnings) == 1
    assert results["grouped"] is False
    assert "**Not grouped**" in (tmp_path / "out" / "results.md").read_text()


def test_compare_exits_1_when_no_candidate_finishes(tmp_path, monkeypatch, capsys):
    manifest = _split_manifest(tmp_path / "data")

    def failing(*args, **kwargs):
        raise FloatingPointError("loss is NaN")

    monkeypatch.setattr(compare_module, "fit_candidate", failing)
    spec = _write_spec(tmp_path, _spec(manifest))
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "no candidate finished" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["chosen"] is None and "best" not in results


def test_an_encoder_run_from_outside_the_folds_is_refused(tmp_path):
    raw = _spec(tmp_path / "m.csv")
    raw["candidates"]["density"] = {
        "model": {"name": "latent_density", "spatial_dims": 2, "encoder_run": "runs/vae"}
    }
    with pytest.raises(ConfigError, match="encoder_run reuses an encoder fitted outside"):
        parse_spec(raw, tmp_path)


def test_a_validation_half_without_abnormal_cases_fails_before_training(tmp_path):
    manifest = _split_manifest(tmp_path / "data", n_normal=16, n_abnormal=2)
    with pytest.raises(ConfigError, match="fold r1_f1: the .* half of its validation part holds"):
        compare(parse_spec(_spec(manifest), tmp_path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_score_with_best_flags_the_last_folds_test_cases_as_results_record(tmp_path):
    manifest = write_phantom_manifest(tmp_path / "data", 32, 16, per_group=2)
    raw = _spec(manifest, kind="kfold", folds=3, val_fraction=0.5)
    spec = _write_spec(tmp_path, raw)
    out = tmp_path / "out"
    assert main(["compare", "--spec", str(spec), "--out", str(out), "--quiet"]) == 0
    best = json.loads((out / "results.json").read_text())["best"]
    assert best["threshold_rule"].startswith("youden on ")
    test = tmp_path / "last_fold.csv"
    with open(test, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([[case] for case in best["flags"]["id"]])
    scores = tmp_path / "scores.csv"
    assert (
        main(["score", "--run", str(out / "best"), "--data", str(test), "--out", str(scores)]) == 0
    )
    with open(scores, newline="") as handle:
        flags = {r["id"]: int(r["prediction"]) for r in csv.DictReader(handle)}
    assert [flags[case] for case in best["flags"]["id"]] == best["flags"]["flag"]
    assert 0 < sum(best["flags"]["flag"]) < len(best["flags"]["flag"])  # both kinds of call

"""``medanomaly compare``: spec, validation-only choices, outputs, best run, resume, bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_evaluate_cli import write_phantom_manifest

from medanomaly import builtin
from medanomaly.cli import main
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import MODEL_FILE
from medanomaly.errors import ConfigError
from medanomaly.model_selection import compare as compare_module
from medanomaly.model_selection.compare import compare, load_labelled, protocol_splits
from medanomaly.model_selection.selection import decide_overall
from medanomaly.model_selection.spec import parse_spec
from medanomaly.models.baselines import IntensityBaseline
from medanomaly.models.ensemble import Ensemble

CAE = {
    "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
    "engine": {"epochs": 2, "batch_size": 8, "progress": False},
}
CHOICES = [[], [{"smooth": {"sigma": 1.0}}], [{"rim": {"width": 2, "threshold": 0.05}}]]


def _spec(manifest, candidates, level="both", folds=3, **protocol):
    return {
        "data": {"path": str(manifest), "transforms": [{"min_max": {}}]},
        "protocol": {
            "kind": "kfold",
            "folds": folds,
            "repeats": 1,
            "val_fraction": 0.5,
            **protocol,
        },
        "level": level,
        "candidates": candidates,
        "postprocess": CHOICES,
    }


def _baselines():
    return {
        "intensity": {"model": {"name": "intensity", "spatial_dims": 2}},
        "intensity_voxel": {"model": {"name": "intensity", "spatial_dims": 2, "per_voxel": True}},
        "fused": {"fusion": ["intensity", "intensity_voxel"]},
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    manifest = write_phantom_manifest(root / "data", n_normal=32, n_abnormal=16, per_group=2)
    candidates = {
        "cae": CAE,
        "cae_ssim": {**CAE, "model": {**CAE["model"], "residual": "ssim"}},
        "intensity": {"model": {"name": "intensity", "spatial_dims": 2}},
        "cae+intensity": {"fusion": ["cae", "intensity"]},
    }
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(manifest, candidates)))
    out = root / "out"
    assert main(["compare", "--spec", str(spec), "--out", str(out), "--quiet"]) == 0
    return root, manifest, spec, out


def test_compare_writes_table_report_and_a_best_run_that_score_reads(compared):
    root, manifest, _, out = compared
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"cae", "cae_ssim", "intensity", "cae+intensity"}
    assert rows["intensity"]["baseline"] is True and rows["cae"]["baseline"] is False
    for row in rows.values():
        assert len(row["auroc"]["folds"]) == 3 and row["auroc"]["mean"] is not None
        assert row["pixel_ap"]["n"] == 3 and "pooled_dice_at_val_threshold" in row
        assert row["seconds"] >= 0 and row["errors"] == []
    weights = rows["cae+intensity"]["weights"]
    assert all(sum(w.values()) == pytest.approx(1.0) for w in weights)
    records = {
        name: [
            json.loads((out / "folds" / f / name.replace("+", "_") / "record.json").read_text())
            for f in results["folds"]
        ]
        for name in rows
    }
    levels = {"cae": 1, "cae_ssim": 1, "intensity": 0, "cae+intensity": 2}
    assert results["chosen"] == decide_overall(records, levels)[0]
    for row in rows.values():  # the gap is selection minus test, fold by fold
        gaps = np.subtract(row["selection_metric"]["folds"], row["test_metric"]["folds"])
        np.testing.assert_allclose(row["gap"]["folds"], gaps)
        assert row["test_metric"]["folds"] == row["pixel_ap"]["folds"]  # level both: pixel AP
    assert [d["fold"] for d in results["decisions"]] == ["r1_f1", "r1_f2", "r1_f3"]
    assert "| row | baseline |" in (out / "results.md").read_text()
    html = (out / "report.html").read_text()
    assert "Leaderboard" in html and "ROC" in html and "Precision-recall" in html
    best = out / "best"
    assert (best / MODEL_FILE).exists() and (best / "config.yaml").exists()
    scores = root / "scores.csv"
    assert main(["score", "--run", str(best), "--data", str(manifest), "--out", str(scores)]) == 0
    with open(scores, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 48


def test_rerunning_resumes_without_refitting(compared):
    _, _, spec, out = compared
    record = out / "folds" / "r1_f1" / "cae" / "record.json"
    before = record.stat().st_mtime_ns, (out / "results.json").read_text()
    results = compare(spec, out, refit=False, progress=False)
    assert record.stat().st_mtime_ns == before[0]
    old = json.loads(before[1])["rows"]
    assert {n: r["auroc"] for n, r in results["rows"].items()} == {
        n: r["auroc"] for n, r in old.items()
    }
    changed = yaml.safe_load(spec.read_text())
    changed["postprocess"] = [[]]
    with pytest.raises(ConfigError, match="different postprocess"):
        compare(parse_spec(changed, spec.parent), out, refit=False, progress=False)


def _poisoned_manifest(root, manifest, test_ids):
    """The same manifest with the images of ``test_ids`` replaced by noise."""
    rng = np.random.default_rng(9)
    for case in test_ids:
        path = root / "data" / case
        np.save(path, rng.random(np.load(path).shape).astype(np.float32) * 5)
    return manifest


def _poisonable_candidates():
    """No-model rows, a model that stops early, and a fusion whose weights are tuned."""
    stopping = {**CAE, "engine": {**CAE["engine"], "epochs": 8, "patience": 1, "lr": 0.05}}
    return {**_baselines(), "cae": stopping, "cae+intensity": {"fusion": ["cae", "intensity"]}}


def test_a_poisoned_test_fold_changes_no_choice(tmp_path):
    torch.set_num_threads(1)
    clean = write_phantom_manifest(tmp_path / "clean" / "data", 32, 16, per_group=2)
    spec = _spec(clean, _poisonable_candidates())
    first = compare(parse_spec(spec, tmp_path), tmp_path / "clean_out", refit=False, progress=False)
    # fold 1's test cases, from the splits the protocol makes
    parsed = parse_spec(spec, tmp_path)
    data = load_labelled(parsed)
    test_cases = [data.images.ids[i] for i in protocol_splits(parsed, data)[0].test]
    poisoned = write_phantom_manifest(tmp_path / "bad" / "data", 32, 16, per_group=2)
    names = {c.rsplit("/", 1)[-1] for c in test_cases}
    _poisoned_manifest(tmp_path / "bad", poisoned, sorted(names))
    second = compare(
        parse_spec(_spec(poisoned, _poisonable_candidates()), tmp_path),
        tmp_path / "bad_out",
        refit=False,
        progress=False,
    )
    choice_keys = (
        "postprocess",
        "threshold",
        "pixel_cutoff",
        "tune_metric",
        "selection_metric",
        "selection_boot",
        "weights",
        "choice",
        "epochs",
    )
    for name in ("intensity", "intensity_voxel", "fused", "cae", "cae_intensity"):
        a = json.loads((tmp_path / "clean_out/folds/r1_f1" / name / "record.json").read_text())
        b = json.loads((tmp_path / "bad_out/folds/r1_f1" / name / "record.json").read_text())
        assert {k: a.get(k) for k in choice_keys} == {k: b.get(k) for k in choice_keys}, name
        assert a["cases"]["score"] != b["cases"]["score"]  # the poison did reach the test fold
    cae = json.loads((tmp_path / "clean_out/folds/r1_f1/cae/record.json").read_text())
    assert cae["epochs"] < 8  # early stopping did choose, on the tuning half
    assert first["decisions"][0] == second["decisions"][0]  # fold 1 chose alike


def test_a_candidate_failing_in_one_fold_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    manifest = write_phantom_manifest(tmp_path / "data", 32, 16, per_group=2)
    real = compare_module.fit_candidate

    def failing(candidate, data, split, folder, spec, parts=None):
        if candidate.name == "intensity_voxel" and split.name == "r1_f2":
            raise FloatingPointError("loss is NaN")
        return real(candidate, data, split, folder, spec, parts)

    monkeypatch.setattr(compare_module, "fit_candidate", failing)
    results = compare(
        parse_spec(_spec(manifest, _baselines()), tmp_path), tmp_path / "out", progress=False
    )
    errors = results["rows"]["intensity_voxel"]["errors"]
    assert errors == [{"fold": "r1_f2", "error": "FloatingPointError: loss is NaN"}]
    assert results["rows"]["fused"]["errors"][0]["fold"] == "r1_f2"  # its member failed
    assert results["rows"]["intensity"]["errors"] == []
    assert results["rows"]["intensity"]["auroc"]["n"] == 3
    assert results["chosen"] == "intensity"


def test_bad_specs_fail_before_anything_trains(tmp_path):
    manifest = write_phantom_manifest(tmp_path / "data", 8, 4, per_group=2)
    with pytest.raises(ConfigError, match="Did you mean 'cae'"):
        parse_spec(_spec(manifest, {"x": {"model": {"name": "caee"}}}), tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'min_max'"):
        spec = _spec(manifest, _baselines())
        spec["data"]["transforms"] = ["min_maxx"]
        parse_spec(spec, tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'smooth'"):
        spec = _spec(manifest, _baselines())
        spec["postprocess"] = [[{"smoth": {}}]]
        parse_spec(spec, tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'intensity'"):
        parse_spec(
            _spec(manifest, {**_baselines(), "f": {"fusion": ["intensty", "fused"]}}), tmp_path
        )
    with pytest.raises(ConfigError, match="6 patient groups are too few for 8 folds"):
        compare(parse_spec(_spec(manifest, _baselines(), folds=8), tmp_path), tmp_path / "o1")
    no_masks = tmp_path / "nomask.csv"
    with open(manifest, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(no_masks, "w", newline="") as handle:
        csv.writer(handle).writerows([[r[0], r[1], r[3]] for r in rows])
    (tmp_path / "data" / "nomask.csv").write_text(no_masks.read_text())
    with pytest.raises(ConfigError, match="4 abnormal case\\(s\\), 0 with a lesion mask"):
        compare(
            parse_spec(_spec(tmp_path / "data" / "nomask.csv", _baselines()), tmp_path),
            tmp_path / "o2",
        )
    assert not (tmp_path / "o1" / "folds").exists() and not (tmp_path / "o2" / "folds").exists()


def test_bad_spec_on_the_command_line_is_one_line_and_exit_code_2(tmp_path, capsys):
    manifest = write_phantom_manifest(tmp_path / "data", 8, 4, per_group=2)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(manifest, {"x": {"model": {"name": "vea"}}})))
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean 'vae'" in err[0]


def test_fusion_with_a_zero_weight_equals_the_other_member_alone():
    data = make_phantoms(30, 9, (32, 32), seed=2)
    normal = data.subset(np.flatnonzero(data.labels == 0)[:20])
    val = data.subset(
        np.concatenate(
            [np.flatnonzero(data.labels == 0)[20:], np.flatnonzero(data.labels == 1)[:4]]
        )
    )
    a = IntensityBaseline(spatial_dims=2).fit(normal, val)
    b = IntensityBaseline(spatial_dims=2, per_voxel=True).fit(normal, val)
    fused = Ensemble.from_fitted([a, b], val, weights=[1.0, 0.0])
    normal_val = val.subset(val.labels == 0)
    mean, sd = a.score(normal_val).mean(), a.score(normal_val).std(ddof=1)
    np.testing.assert_allclose(fused.score(data), (a.score(data) - mean) / sd, rtol=1e-6)
    chosen = Ensemble.from_fitted([a, b], val, weights="validation")
    assert sum(chosen.weights_) == pytest.approx(1.0) and len(chosen.weights_) == 2


SPECS = builtin.names("spec")


@pytest.mark.parametrize("name", SPECS)
def test_every_benchmark_spec_parses_and_has_a_no_model_row(name):
    from medanomaly.model_selection.spec import load_spec

    spec = load_spec(name)
    plain = [c for c in spec.candidates if not c.is_fusion]
    assert any(compare_module._is_baseline(spec, c, []) for c in plain)


QUICK = [name for name in SPECS if name.endswith("_quick")]


@pytest.mark.parametrize("name", QUICK)
def test_a_quick_spec_is_its_full_spec_made_smaller(name):
    """Same protocol, level, threshold and data; its rows are rows of the full spec."""
    from medanomaly.model_selection.spec import load_spec

    quick, full = load_spec(name), load_spec(name.removesuffix("_quick"))
    assert {c.name for c in quick.candidates} <= {c.name for c in full.candidates}
    assert (quick.protocol.kind, quick.level, quick.threshold, quick.data) == (
        full.protocol.kind,
        full.level,
        full.threshold,
        full.data,
    )
    for candidate in quick.candidates:
        if not candidate.is_fusion:
            model = full.candidate(candidate.name).config["model"]["name"]
            assert candidate.config["model"]["name"] == model, candidate.name


def test_a_postprocessed_model_is_no_baseline_and_a_postprocessed_baseline_is():
    spec = parse_spec(
        {
            "data": "unused.csv",
            "protocol": {"kind": "kfold", "folds": 2},
            "candidates": {
                "dae_pp": {"model": {"name": "postprocessed", "model": {"name": "dae"}}},
                "intensity_pp": {"model": {"name": "postprocessed"}},
            },
        },
        Path("."),
    )
    assert [c.baseline for c in spec.candidates] == [False, True]


def test_results_table_shows_only_the_protocol_settings_in_use_and_no_spread_for_one_split():
    from medanomaly.reports.compare import protocol_line, results_table

    line = protocol_line({"kind": "split_column", "folds": 5, "n_val": 4, "level": "image"})
    assert line == "split_column (level image)"
    line = protocol_line({"kind": "val_groups", "folds": 5, "repeats": 1, "n_val": 4, "seed": 0})
    assert line == "val_groups (folds 5, repeats 1, n_val 4, seed 0)"
    one = {"mean": 0.9, "sd": 0.0, "n": 1, "folds": [0.9]}
    gap = {"mean": 0.05, "sd": 0.0, "n": 1, "folds": [0.05]}
    row = {"baseline": True, "auroc": one, "selection_metric": one, "test_metric": one}
    row.update(gap=gap, seconds=1.0, errors=[])
    step = {"challenger": "dae", "incumbent": "intensity", "advantage": 0.01, "se": 0.02}
    results = {
        "rows": {"intensity": row},
        "data": "d.csv",
        "protocol": {"kind": "split_column"},
        "grouped": False,
        "n_cases": 3,
        "n_normal": 2,
        "n_abnormal": 1,
        "n_groups": 3,
        "folds": ["split"],
        "chosen": "intensity",
        "selection": {
            "metric": "image AUROC",
            "rule": "one SE",
            "steps": [{**step, "replaced": False}],
        },
        "decisions": [{"fold": "split", "chosen": "intensity", "steps": []}],
        "per_fold_choice": {"chosen": ["intensity"], "test_metric": one},
    }
    table = results_table(results)
    leaderboard = table.split("|---")[-1]
    assert "| 0.900 | 0.900 | 0.050 |" in leaderboard and "±" not in leaderboard
    assert "Not grouped" in table
    assert "dae did not replace intensity: advantage +0.010, one SE 0.020" in table

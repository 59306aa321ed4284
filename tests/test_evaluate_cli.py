"""``medanomaly evaluate``: metrics.json schema, scores.csv with p-values, report.html."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from test_report import check_renders

from medanomaly.cli import main
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.thresholds import conformal_pvalues, conformal_threshold
from medanomaly.outputs.writers import read_scores_csv

IMAGE_KEYS = {
    "auroc",
    "auroc_ci95",
    "auprc",
    "sensitivity",
    "specificity",
    "accuracy",
    "precision",
    "f1",
    "confusion_matrix",
    "threshold",
    "threshold_rule",
}
PIXEL_KEYS = {"auroc", "average_precision", "best_dice", "foreground_rule"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_phantom_manifest(folder, n_normal=12, n_abnormal=6, seed=0, per_group=2):
    """32x32 phantoms as .npy files with lesion masks and a manifest ``path,label,mask,group``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = make_phantoms(n_normal, n_abnormal, (32, 32), seed=seed)
    rows = []
    cases = zip(data.images, data.labels, data.masks, strict=True)
    for i, (image, label, mask) in enumerate(cases):
        np.save(folder / f"case{i:03d}.npy", image[0])
        np.save(folder / f"case{i:03d}_mask.npy", mask.astype(np.uint8))
        rows.append([f"case{i:03d}.npy", int(label), f"case{i:03d}_mask.npy", f"p{i // per_group}"])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "group"])
        writer.writerows(rows)
    return manifest


def write_config(path, epochs=2):
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
        "engine": {"epochs": epochs, "batch_size": 8, "progress": False, "val_fraction": 0.25},
        "data": {"transforms": [{"min_max": {}}]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_phantom_manifest(root / "data")
    with open(manifest, "a") as handle:
        handle.write("broken.npy,1,,p99\n")
    (root / "data" / "broken.npy").write_bytes(b"not an array")
    config = write_config(root / "cae.yaml")
    train = write_phantom_manifest(root / "train", n_normal=12, n_abnormal=0, seed=5)
    run = root / "run"
    assert main(["fit", "--config", str(config), "--data", str(train), "--out", str(run)]) == 0
    return root, manifest, run


def _evaluate(fitted, name, *extra):
    root, manifest, run = fitted
    out = root / name
    code = main(["evaluate", "--run", str(run), "--data", str(manifest), "--out", str(out), *extra])
    return code, out


@pytest.fixture(scope="module")
def evaluated(fitted):
    torch.set_num_threads(1)
    code, out = _evaluate(fitted, "eval_default")
    assert code == 0
    return out


def test_metrics_json_has_the_documented_schema(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics["image"]) >= IMAGE_KEYS
    assert set(metrics["pixel"]) >= PIXEL_KEYS
    assert metrics["n_cases"] == 18
    assert set(metrics["image"]["confusion_matrix"]) == {"tn", "fp", "fn", "tp"}
    assert sum(metrics["image"]["confusion_matrix"].values()) == 18
    low, high = metrics["image"]["auroc_ci95"]
    assert 0.0 <= low <= metrics["image"]["auroc"] <= high <= 1.0
    assert metrics["image"]["threshold_rule"] == "run"
    assert "image minimum" in metrics["pixel"]["foreground_rule"]  # the rule is stated
    assert [s["case"].endswith("broken.npy") for s in metrics["skipped"]] == [True]


def test_pixel_metrics_match_an_independent_computation(evaluated, fitted):
    from medanomaly.data.loading import load_dataset
    from medanomaly.metrics.blocks import foreground_masks, known_masks
    from medanomaly.metrics.pixel import pixel_metrics

    _, manifest, run = fitted
    metrics = json.loads((evaluated / "metrics.json").read_text())
    detector = BaseDetector.load(run)
    images, _ = load_dataset(manifest, **detector.run_config_["data"])
    keep = known_masks(manifest, None, images)
    maps = detector.anomaly_map(images)[keep]
    expected = pixel_metrics(
        maps, images.masks[keep], foreground_masks(images)[0][keep], per_image=False
    )
    for key in ("auroc", "average_precision", "best_dice"):
        assert metrics["pixel"][key] == pytest.approx(expected[key], abs=2e-3), key
    assert metrics["pixel"]["n_images"] == int(keep.sum())


def test_scores_csv_carries_conformal_p_values(evaluated, fitted):
    rows = read_scores_csv(evaluated / "scores.csv")
    assert len(rows) == 18
    detector = BaseDetector.load(fitted[2])
    scores = np.array([float(r["score"]) for r in rows])
    expected = conformal_pvalues(detector.val_scores_, scores)
    np.testing.assert_allclose([float(r["p_value"]) for r in rows], expected, rtol=1e-5)
    threshold = detector.threshold_
    assert all(int(r["prediction"]) == int(float(r["score"]) > threshold) for r in rows)
    assert {"pixel_auroc", "pixel_best_dice"} <= set(rows[0])


def test_report_and_figures_are_written(evaluated):
    for name in ("roc", "score_histogram", "confusion_matrix", "training_curves"):
        assert (evaluated / "figures" / f"{name}.png").is_file(), name
    assert len(list((evaluated / "figures" / "gallery").glob("*.png"))) == 12
    page = (evaluated / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 16
    assert "table class='sortable'" in page and "broken.npy" in page


def test_the_viewer_holds_every_case_flagged_first_with_its_outline(evaluated, fitted):
    cases = evaluated / "viewer" / "cases"
    assert len(list(cases.glob("*_scan.nii.gz"))) == 18 == len(list(cases.glob("*_map.nii.gz")))
    assert len(list(cases.glob("*_outline.nii.gz"))) == 6  # the abnormal cases' lesion masks
    page = (evaluated / "report.html").read_text()
    entries = json.loads(page.split("id='mv-cases'>")[1].split("</script>")[0])
    threshold = BaseDetector.load(fitted[2]).threshold_
    assert [e["flagged"] for e in entries] == [e["score"] > threshold for e in entries]
    flags = [e["flagged"] for e in entries]
    assert flags == sorted(flags, reverse=True)  # flagged first
    for flagged in (True, False):
        scores = [e["score"] for e in entries if e["flagged"] == flagged]
        assert scores == sorted(scores, reverse=True)
    assert all(e["grid"] == "source" for e in entries)  # as read from the .npy files
    assert (evaluated / "viewer" / "niivue.umd.js").stat().st_size > 1_000_000


def test_no_viewer_writes_none(fitted):
    code, out = _evaluate(fitted, "eval_no_viewer", "--no-viewer")
    assert code == 0 and not (out / "viewer").exists()
    assert "id='mv'" not in (out / "report.html").read_text()


def test_evaluate_report_renders_in_headless_chromium(evaluated, tmp_path):
    check_renders(evaluated / "report.html", tmp_path)


def test_conformal_threshold_comes_from_the_runs_validation_scores(fitted):
    code, out = _evaluate(fitted, "eval_conformal", "--threshold", "conformal", "--alpha", "0.5")
    assert code == 0
    image = json.loads((out / "metrics.json").read_text())["image"]
    detector = BaseDetector.load(fitted[2])
    assert image["threshold"] == pytest.approx(conformal_threshold(detector.val_scores_, 0.5))
    assert image["threshold_rule"] == "conformal(alpha=0.5)"


def test_too_few_calibration_scores_give_an_infinite_threshold(fitted, capsys):
    code, out = _evaluate(fitted, "eval_inf", "--threshold", "conformal:alpha=0.01")
    assert code == 0
    image = json.loads((out / "metrics.json").read_text())["image"]
    assert image["threshold"] is None and image["sensitivity"] == 0.0
    assert any("+inf" in note for note in image["notes"])
    assert "+inf" in capsys.readouterr().out


def test_labelled_rules_are_marked_optimistic(fitted):
    code, out = _evaluate(fitted, "eval_youden", "--threshold", "youden")
    assert code == 0
    image = json.loads((out / "metrics.json").read_text())["image"]
    assert image["threshold_rule"] == "youden" and "optimistic" in image["threshold_source"]


def test_an_unknown_rule_is_a_clear_error(fitted, capsys):
    code, _ = _evaluate(fitted, "eval_bad", "--threshold", "yuden")
    assert code == 2
    assert "unknown threshold rule" in capsys.readouterr().err


def test_strict_stops_on_the_unreadable_case(fitted, capsys):
    code, out = _evaluate(fitted, "eval_strict", "--strict")
    assert code == 2
    assert "broken.npy" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()

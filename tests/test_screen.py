"""`medanomaly screen`: unlabelled outlier screening of a folder of 3D NIfTI volumes."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medanomaly import get_model
from medanomaly.cli import main
from medanomaly.data.loading import load_dataset
from medanomaly.data.phantoms import make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import CONFIG_FILE, BaseDetector
from medanomaly.errors import ConfigError
from medanomaly.models.cae import CAE
from medanomaly.screening import (
    CSV_COLUMNS,
    RawFacts,
    folder_oddities,
    foreground_masks,
    latent_clusters,
    raw_facts,
    reconstruction_errors,
    screen,
    size_bias,
)

# HU = 2000 * phantom - 1000: background -1000 HU (air), brain about -100 HU, skull 800 HU.
DATA_CFG = {
    "transforms": [
        {"foreground_mask": {"threshold": -500}},
        {"hu_window": {"center": 0, "width": 2000}},
        {"resize": {"shape": [16, 16, 16]}},
    ]
}
OUTLIERS = ("outlier_metal", "outlier_zeroed", "outlier_noise")
SIZES = ((32, 32, 32), (40, 40, 40), (48, 48, 48), (32, 40, 48))


def _to_hu(phantom: np.ndarray) -> np.ndarray:
    return (phantom * 2000.0 - 1000.0).astype(np.float32)


def _write(folder, name, volume, affine=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4) if affine is None else affine), path)
    return path


def _write_normals(folder, n, seed, prefix="normal"):
    for i in range(n):
        shape = SIZES[i % len(SIZES)]
        phantom = make_phantoms(1, 0, shape, seed=seed + i).images[0, 0]
        _write(folder, f"{prefix}_{i:02d}", _to_hu(phantom))


def _write_outliers(folder, seed):
    rng = np.random.default_rng(seed)
    base = [_to_hu(make_phantoms(1, 0, (32, 32, 32), seed=seed + i).images[0, 0]) for i in range(3)]
    metal = base[0].copy()
    metal[:, 13:19, 13:19] = 4000.0  # a bright metal-like bar through the head
    zeroed = base[1].copy()
    zeroed[:, :, 10:22] = -1000.0  # a block of slices lost (air)
    noisy = base[2] + rng.normal(0.0, 500.0, base[2].shape).astype(np.float32)
    for name, volume in zip(OUTLIERS, (metal, zeroed, noisy), strict=True):
        _write(folder, name, volume)


@pytest.fixture(scope="module")
def screen_setup(tmp_path_factory):
    """A 3D cae trained on HU phantoms, and an unlabelled folder with planted outliers."""
    root = tmp_path_factory.mktemp("screen")
    _write_normals(root / "train", 32, seed=100)
    _write_normals(root / "val", 10, seed=300)
    unlabelled = root / "unlabelled"
    _write_normals(unlabelled, 10, seed=500, prefix="case")
    _write(
        unlabelled,
        "case_lps",
        _to_hu(make_phantoms(1, 0, (32, 32, 32), seed=900).images[0, 0]),
        affine=np.diag([-1.0, -1.0, 1.0, 1.0]),
    )
    _write_outliers(unlabelled, seed=700)
    (unlabelled / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage, not a NIfTI file" * 10)

    torch.manual_seed(0)
    detector = get_model(
        "cae",
        spatial_dims=3,
        channels=[8, 16],
        latent_channels=4,
        dropout=0.0,
        engine={"epochs": 60, "batch_size": 8, "progress": False, "seed": 0, "lr": 3e-3},
    )
    run = root / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(yaml.safe_dump({**detector.config(), "data": DATA_CFG}))
    train, _ = load_dataset(root / "train", **DATA_CFG)
    val, _ = load_dataset(root / "val", **DATA_CFG)
    detector.fit(train, val, run_dir=run)
    return root, run, unlabelled


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_screen_flags_planted_outliers(screen_setup, tmp_path, monkeypatch, capsys):
    _, run, unlabelled = screen_setup
    out = tmp_path / "screen"
    args = ["screen", "--run", str(run), "--data", str(unlabelled), "--out", str(out)]
    assert main([*args, "--batch", "4"]) == 0
    captured = capsys.readouterr()
    assert "corrupt.nii.gz" in captured.err
    assert "flagged" in captured.out and str(out) in captured.out

    rows = _read_csv(out / "screen.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 14 and [int(r["rank"]) for r in rows] == list(range(1, 15))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    top = {r["id"].split("/")[-1].removesuffix(".nii.gz") for r in rows[:3]}
    assert top == set(OUTLIERS), [(r["id"], r["score"]) for r in rows]
    by_name = {r["id"].split("/")[-1].removesuffix(".nii.gz"): r for r in rows}
    assert all(by_name[name]["flagged"] == "1" for name in OUTLIERS)
    assert float(by_name["outlier_metal"]["metal_fraction"]) > 0
    assert float(by_name["case_00"]["metal_fraction"]) == 0
    assert by_name["case_01"]["voxel_count"] == str(40**3)
    assert "orientation LPS" in by_name["case_lps"]["oddities"]
    assert all(0 < float(r["p_value"]) <= 1 for r in rows)
    assert all(float(r["masked_mse"]) > 0 and int(r["foreground_voxels"]) > 0 for r in rows)
    assert all(r["cluster"].lstrip("-").isdigit() for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 14 and summary["threshold_rule"] == "mean_sd(k=3)"
    assert set(OUTLIERS) <= {
        i.split("/")[-1].removesuffix(".nii.gz") for i in summary["flagged_ids"]
    }
    assert summary["n_flagged"] == len(summary["flagged_ids"])
    assert [s["case"].split("/")[-1] for s in summary["skipped"]] == ["corrupt.nii.gz"]
    for error in ("mse", "masked_mse"):
        for size in ("voxel_count", "foreground_voxels"):
            found = summary["spearman"][error][size]
            assert math.isfinite(found["rho"]) and math.isfinite(found["p"]), found
    assert summary["dbscan"]["min_samples"] == 5 and summary["dbscan"]["eps"] > 0
    assert sum(summary["dbscan"]["cluster_sizes"].values()) == 14

    gallery = sorted((out / "gallery").glob("*.png"))
    assert len(gallery) == summary["n_flagged"]
    for name in ("umap_score.png", "umap_size.png", "size_bias.png", "skipped.txt"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 + len(gallery)
    assert "DBSCAN" in report and "corrupt.nii.gz" in report and "src='http" not in report


def test_screen_without_latent_and_strict(screen_setup, tmp_path, monkeypatch):
    """A model without a latent says so; --strict stops before any output (exit 2)."""
    monkeypatch.setattr(CAE, "has_latent", False)
    _, run, unlabelled = screen_setup
    out = tmp_path / "screen"
    args = ["screen", "--run", str(run), "--data", str(unlabelled), "--out", str(out)]
    assert main([*args, "--strict", "--k", "2"]) == 2
    assert not (out / "screen.csv").exists()
    assert main([*args, "--k", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dbscan"] is None and summary["umap"] is None
    assert summary["threshold_rule"] == "mean_sd(k=2)"
    assert any("no latent space" in note for note in summary["notes"])
    assert not (out / "umap_score.png").exists() and (out / "size_bias.png").exists()
    assert all(r["cluster"] == "" for r in _read_csv(out / "screen.csv"))
    assert "No latent-space analysis" in (out / "report.html").read_text()


class _NoEmbed:
    """A detector without a latent space (and optionally without validation scores)."""

    name = "wrapped"
    has_latent = False
    foreground_threshold = None

    def __init__(self, inner, val_scores):
        self.inner, self.val_scores_ = inner, val_scores
        self.threshold_, self.threshold_rule_ = inner.threshold_, inner.threshold_rule_

    def detect(self, x):
        return self.inner.detect(x)


def test_screen_api_with_a_detector_without_embed(screen_setup):
    _, run, unlabelled = screen_setup
    detector = BaseDetector.load(run)
    images, report = load_dataset(unlabelled, **DATA_CFG)
    result = screen(_NoEmbed(detector, detector.val_scores_), images, batch=5)
    assert len(result) == 14 and result.latent is None
    assert any("no latent space" in note for note in result.notes)
    assert result.threshold == pytest.approx(detector.threshold_)
    ranked = [result.ids[i].split("/")[-1] for i in result.flagged_order[:3]]
    assert {name.removesuffix(".nii.gz") for name in ranked} == set(OUTLIERS)
    with pytest.raises(ConfigError, match="no held-out normal validation scores"):
        screen(_NoEmbed(detector, []), images)


def test_screen_spells_threshold_rules_as_evaluate_does(screen_setup, tmp_path, capsys):
    _, run, unlabelled = screen_setup
    detector = BaseDetector.load(run)
    images, _ = load_dataset(unlabelled, **DATA_CFG)
    own = screen(_NoEmbed(detector, detector.val_scores_), images, threshold="run")
    assert own.threshold == detector.threshold_ and own.threshold_rule == "run"
    high = screen(_NoEmbed(detector, detector.val_scores_), images, threshold="percentile:q=50")
    assert high.threshold == pytest.approx(np.percentile(detector.val_scores_, 50))
    assert high.threshold_rule == "percentile(q=50)"
    args = ["screen", "--run", str(run), "--data", str(unlabelled), "--out", str(tmp_path / "o")]
    assert main([*args, "--threshold", "f1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs labelled cases" in err[0]


def test_screen_refuses_bad_settings(screen_setup, tmp_path, capsys):
    _, run, unlabelled = screen_setup
    args = ["screen", "--run", str(run), "--data", str(unlabelled), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:  # argparse's range check: exit 2, one line
        main([*args, "--batch", "0"])
    assert exit_info.value.code == 2
    assert "--batch: 0 is below the minimum 1" in capsys.readouterr().err


def test_screen_help_documents_options_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["screen", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--k", "--metal-level", "--eps", "--min-samples", "--batch", "--strict"):
        assert word in text
    for name in ("screen.csv", "summary.json", "report.html", "gallery", "umap_size.png"):
        assert name in text


def test_raw_facts_of_a_good_and_a_broken_file(tmp_path):
    volume = np.full((8, 8, 4), -1000.0, np.float32)
    volume[2:4, 2:4, :] = 3500.0
    good = _write(tmp_path, "metal", volume, affine=np.diag([0.5, 0.5, 3.0, 1.0]))
    facts = raw_facts(good, metal_level=3000)
    assert facts.shape == (8, 8, 4) and facts.voxel_count == 256 and facts.channels == 1
    assert facts.spacing == (0.5, 0.5, 3.0) and facts.orientation == "RAS"
    assert facts.max_intensity == 3500 and facts.metal_fraction == pytest.approx(16 / 256)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"nonsense")
    failed = raw_facts(broken)
    assert failed.error and "broken.nii.gz" in failed.error and failed.voxel_count is None
    notes = folder_oddities([facts, failed])
    assert any("anisotropic" in n for n in notes[0]) and "raw read failed" in notes[1][0]


def test_folder_oddities_compare_with_the_folder():
    usual = RawFacts(shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0), orientation="RAS")
    odd = RawFacts(shape=(4, 4, 4), spacing=(1.0, 1.0, 1.5), orientation="LPS", problems=["gap"])
    notes = folder_oddities([usual, usual, usual, odd])
    assert notes[:3] == [[], [], []]
    text = "; ".join(notes[3])
    assert "orientation LPS" in text and "RAS" in text
    assert "axis 2: +50%" in text and "reader: gap" in text


def test_foreground_rules_and_masked_error():
    images = np.zeros((2, 1, 4, 4), np.float32)
    images[:, :, 1:3, 1:3] = 0.5
    fg, rule = foreground_masks(ImageSet(images))
    assert fg.sum() == 8 and "minimum" in rule
    fg, rule = foreground_masks(ImageSet(images), threshold=0.6)
    assert fg.sum() == 0 and "0.6" in rule
    given = np.ones((2, 4, 4), bool)
    assert foreground_masks(ImageSet(images, foreground=given))[0].sum() == 32
    recon = images.copy()
    recon[0, 0, 1, 1] = 0.0  # one foreground voxel off by 0.5
    mse, masked = reconstruction_errors(images, recon, foreground_masks(ImageSet(images))[0])
    assert mse[0] == pytest.approx(0.25 / 16) and masked[0] == pytest.approx(0.25 / 4)
    assert mse[1] == 0 and np.isnan(reconstruction_errors(images, None, given)[0]).all()


def test_size_bias_is_undefined_not_an_error_for_constant_sizes():
    errors = np.array([0.1, 0.2, 0.3, 0.4])
    found = size_bias(errors, errors, np.full(4, 1000.0), np.array([1.0, 2.0, 3.0, 4.0]))
    assert (
        math.isnan(found["mse"]["voxel_count"]["rho"])
        and "same" in found["mse"]["voxel_count"]["note"]
    )
    assert found["masked_mse"]["foreground_voxels"]["rho"] == pytest.approx(1.0)


def test_latent_clusters_call_a_far_case_noise():
    rng = np.random.default_rng(0)
    vectors = rng.normal(0.0, 1.0, (30, 6))
    vectors[-1] += 25.0
    found = latent_clusters(vectors)
    assert found.labels[-1] == -1 and (found.labels[:-1] >= 0).mean() > 0.8
    assert found.eps_source.startswith("auto") and found.min_samples == 5
    assert latent_clusters(vectors, eps=1e6, min_samples=3).counts == {0: 30}

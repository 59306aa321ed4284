"""``compare`` with a re-scored candidate, the split column and a mean + 3 SD threshold (3D).

What the 3D screening spec (the built-in screen3d spec) relies on, on 1x16^3 phantoms:
one network trained once and scored two ways, counts at the threshold, and ``OUT/best`` as
the split column's own run (its test part never trains).
"""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medanomaly.cli import main
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import BaseDetector
from medanomaly.errors import ConfigError
from medanomaly.model_selection.spec import parse_spec

SMALL = {
    "name": "resnet_ae",
    "spatial_dims": 3,
    "depth": 10,
    "channels": [4, 8, 8, 16],
    "latent_dim": 32,
    "output_activation": "sigmoid",
    "foreground_threshold": 0.05,
}
ENGINE = {"epochs": 2, "batch_size": 4, "progress": False, "seed": 0}
SPLITS = ["train"] * 8 + ["val"] * 4 + ["test"] * 4 + ["val"] * 2 + ["test"] * 4


def write_volumes(folder):
    """16 normal + 6 abnormal 1x16^3 phantoms as NIfTI, with a split column."""
    folder.mkdir(parents=True, exist_ok=True)
    data = make_phantoms(16, 6, (16, 16, 16), seed=2)
    rows = []
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        path = folder / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(image[0].astype(np.float32), np.eye(4)), path)
        rows.append([path.name, "abnormal" if label else "normal", f"p{i}", SPLITS[i]])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "split"])
        writer.writerows(rows)
    return manifest


def _spec(manifest):
    return {
        "data": {"path": str(manifest)},
        "protocol": {"kind": "split_column"},
        "level": "image",
        "threshold": "mean_sd:k=3",
        "candidates": {
            "intensity": {"model": {"name": "intensity", "spatial_dims": 3, "per_voxel": True}},
            "masked": {"model": SMALL, "engine": ENGINE},
            "mse": {"rescore": "masked", "set": ["model.foreground_threshold=null"]},
        },
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rescore")
    manifest = write_volumes(root / "data")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(manifest)))
    out = root / "out"
    assert main(["compare", "--spec", str(spec), "--out", str(out), "--quiet"]) == 0
    return root, manifest, out, json.loads((out / "results.json").read_text())


def test_rescore_scores_the_same_network_another_way_without_training(compared):
    root, manifest, out, results = compared
    fold = out / "folds" / "r1_f1"
    masked = BaseDetector.load(fold / "masked")
    mse = BaseDetector.load(fold / "mse")
    assert mse.foreground_threshold is None and masked.foreground_threshold == 0.05
    weights = zip(
        masked.network_.state_dict().values(), mse.network_.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in weights)
    assert not list((fold / "mse").glob("checkpoint*"))  # never trained
    rows = results["rows"]
    assert rows["mse"]["baseline"] is False and rows["mse"]["errors"] == []
    assert rows["mse"]["auroc"]["folds"] != rows["masked"]["auroc"]["folds"]
    record = json.loads((fold / "mse" / "record.json").read_text())
    voxels = np.stack([nib.load(root / "data" / p).get_fdata() for p in _test_paths(manifest)])
    recon = masked.detect(voxels[:, None].astype(np.float32)).reconstructions
    expected = np.mean((recon[:, 0] - voxels) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(record["cases"]["score"], expected, rtol=1e-4)


def _test_paths(manifest):
    with open(manifest, newline="") as handle:
        return [r["path"] for r in csv.DictReader(handle) if r["split"] == "test"]


def _part_paths(manifest, part):
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(r["path"], r["label"]) for r in rows if r["split"] == part]


def _volumes(root, paths):
    arrays = [nib.load(root / "data" / p).get_fdata() for p in paths]
    return np.stack(arrays)[:, None].astype(np.float32)


def test_counts_at_the_mean_3sd_threshold_of_all_validation_normals(compared):
    root, manifest, out, results = compared
    fold = out / "folds" / "r1_f1"
    normal_val = [p for p, label in _part_paths(manifest, "val") if label == "normal"]
    for name in ("intensity", "masked", "mse"):
        record = json.loads((fold / name / "record.json").read_text())
        normal = BaseDetector.load(fold / name).score(_volumes(root, normal_val))
        assert normal.size == 4  # both halves of the validation part
        assert record["threshold"] == pytest.approx(normal.mean() + 3 * normal.std(ddof=1))
        counts = results["rows"][name]["confusion"][0]
        assert counts["tp"] + counts["fn"] == 4 and counts["tn"] + counts["fp"] == 4
        assert len(record["cases"]["id"]) == 8
        assert all(c.endswith(tuple(_test_paths(manifest))) for c in record["cases"]["id"])


def test_best_is_the_split_columns_own_run_and_flags_what_the_record_says(compared):
    root, manifest, out, results = compared
    chosen = results["chosen"]
    best = out / "best"
    record = json.loads((out / "folds" / "r1_f1" / chosen / "record.json").read_text())
    saved = BaseDetector.load(best)
    assert saved.threshold_ == pytest.approx(record["threshold"])
    assert saved.threshold_rule_ == "mean_sd:k=3 on 6 validation cases"
    assert results["best"]["flags"]["flag"] == record["cases"]["flag"]
    test = root / "test.csv"
    with open(test, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(
            [[str(root / "data" / p), label] for p, label in _part_paths(manifest, "test")]
        )
    scores = root / "best_scores.csv"
    assert main(["score", "--run", str(best), "--data", str(test), "--out", str(scores)]) == 0
    with open(scores, newline="") as handle:
        flags = {Path(r["id"]).name: int(r["prediction"]) for r in csv.DictReader(handle)}
    assert [flags[Path(i).name] for i in record["cases"]["id"]] == record["cases"]["flag"]
    screened = root / "screen"
    code = main(
        ["screen", "--run", str(best), "--data", str(root / "data"), "--out", str(screened)]
    )
    assert code == 0  # screen exits 0 whether or not it flags anything
    with open(screened / "screen.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(SPLITS)


def test_rescore_needs_a_plain_source_and_model_settings(tmp_path):
    spec = _spec(tmp_path / "manifest.csv")
    spec["candidates"]["mse"] = {"rescore": "maskd", "set": ["model.foreground_threshold=null"]}
    with pytest.raises(ConfigError, match="Did you mean .masked."):
        parse_spec(spec, tmp_path)
    spec["candidates"]["mse"] = {"rescore": "masked", "set": ["engine.epochs=3"]}
    with pytest.raises(ConfigError, match="model.NAME=VALUE"):
        parse_spec(spec, tmp_path)
    spec["candidates"]["mse"] = {"rescore": "masked", "set": ["model.foreground_treshold=1"]}
    with pytest.raises(ConfigError, match="foreground_threshold"):
        parse_spec(spec, tmp_path)

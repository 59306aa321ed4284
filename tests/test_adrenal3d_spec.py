"""The AdrenalMNIST3D benchmark as a spec: data preparation, ``ci: bootstrap``, Youden cut-off.

The compare run uses the spec's shape (the manifest's ``split`` column, Youden's J on
validation, bootstrap CI, distance-map input, the repo's adrenal configs, fusions) on tiny
synthetic 16³ blobs; the real data only in the ``slow``/``realdata`` test.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml

from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.thresholds import youden_threshold
from medanomaly.errors import ConfigError
from medanomaly.model_selection.compare import auroc_ci, compare, load_labelled, protocol_splits
from medanomaly.model_selection.spec import load_spec, parse_spec
from medanomaly.postprocess import PostProcess

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "adrenal3d" / "adrenalmnist3d_64.npz"
TRANSFORMS = [{"distance_transform": {"threshold": 0.5, "scale_mm": 10.0, "clip": 1.0}}]


def _prepare() -> ModuleType:
    """``benchmarks/prepare_adrenal3d.py`` as a module."""
    path = ROOT / "benchmarks" / "prepare_adrenal3d.py"
    spec = importlib.util.spec_from_file_location("prepare_adrenal3d", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_npz(path: Path, side: int = 16, counts: tuple[int, ...] = (24, 12, 12)) -> Path:
    """Binary blobs (0/255) in the MedMNIST layout; abnormal ones are thicker."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"))
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        labels = (np.arange(n) % 3 == 0).astype(np.uint8)
        radius = np.where(labels == 1, 5.0, 3.0) + rng.uniform(-0.5, 0.5, n)
        centre = side / 2 + rng.uniform(-1, 1, (n, 3))
        dist = np.sqrt(((grid[None] - centre[:, :, None, None, None]) ** 2).sum(axis=1))
        arrays[f"{split}_images"] = ((dist <= radius[:, None, None, None]) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def test_prepare_writes_volumes_and_a_split_manifest(tmp_path):
    manifest = _prepare().write_volumes(_fake_npz(tmp_path / "fake.npz"), tmp_path / "out")
    rows = _rows(manifest)
    assert list(rows[0]) == ["path", "label", "group", "split"]
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [24, 12, 12]
    assert len({r["group"] for r in rows}) == len(rows)  # each volume its own group
    assert {r["label"] for r in rows} == {"0", "1"}
    with np.load(rows[0]["path"]) as saved:
        volume = saved["image"]
    assert volume.dtype == np.float32 and volume.shape == (16, 16, 16)
    assert set(np.unique(volume)) <= {0.0, 1.0}


def test_prepare_names_the_missing_key(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 4, 4, 4), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"bad\.npz.*val_images"):
        _prepare().write_volumes(bad, tmp_path / "out")


def test_prepare_skips_without_data(tmp_path, capsys):
    assert _prepare().main(["--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 0
    assert "not found" in capsys.readouterr().out


def test_unknown_ci_gets_a_hint(tmp_path):
    raw = {
        "data": {"path": str(tmp_path / "m.csv")},
        "ci": "bootsrap",
        "candidates": {"v": {"model": {"name": "volume"}}},
    }
    with pytest.raises(ConfigError, match="bootstrap"):
        parse_spec(raw, tmp_path)


@pytest.fixture(scope="module")
def adrenal_like(tmp_path_factory):
    """``compare`` over a spec shaped like the built-in adrenal3d spec, on 16³ blobs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adrenal")
    manifest = _prepare().write_volumes(_fake_npz(root / "fake.npz"), root / "data")
    vae_set = ["engine.epochs=1", "model.channels=[4,8,8,8]", "model.hidden_dim=16"]
    spec = {
        "data": {"path": str(manifest), "transforms": TRANSFORMS},
        "protocol": {"kind": "split_column"},
        "level": "image",
        "threshold": "youden",
        "ci": "bootstrap",
        "candidates": {
            "volume": {"config": "volume_adrenal_3d"},
            "thickness": {"config": "thickness_adrenal_3d"},
            "vae": {"config": "vae_dt_adrenal_3d", "set": vae_set},
            "thickness+volume": {"fusion": ["thickness", "volume"]},
            "vae+thickness": {"fusion": ["vae", "thickness"]},
        },
        "postprocess": [[], [{"score": {"reduce": "percentile", "value": 90.0}}]],
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = root / "out"
    results = compare(path, out, refit=False, progress=False)
    return root, manifest, out, results


def test_compare_reports_bootstrap_ci_for_the_single_split(adrenal_like):
    _, _, out, results = adrenal_like
    assert results["folds"] == ["r1_f1"] and results["protocol"]["threshold"] == "youden"
    for name, row in results["rows"].items():
        assert row["errors"] == [], name
        (low, high), auroc = row["auroc_ci"][0], row["auroc"]["mean"]
        assert low <= auroc <= high
    assert results["rows"]["thickness"]["auroc"]["mean"] > 0.9  # thicker blobs are abnormal
    assert results["rows"]["thickness+volume"]["baseline"] is True
    assert "test AUROC 95 % CI" in (out / "results.md").read_text()


def test_the_cut_off_is_youden_on_validation(adrenal_like):
    root, _, out, _ = adrenal_like
    spec = load_spec(root / "spec.yaml")
    data = load_labelled(spec)
    val = data.images.subset(protocol_splits(spec, data)[0].val)
    for name in ("volume", "thickness"):
        record = json.loads((out / "folds" / "r1_f1" / name / "record.json").read_text())
        result = BaseDetector.load(out / "folds" / "r1_f1" / name).detect(val)
        scores = PostProcess(record["postprocess"]).apply(result, val.images).scores
        assert record["threshold"] == pytest.approx(youden_threshold(val.labels, scores))


def test_auroc_ci_of_a_record():
    record = {"cases": {"label": [0, 0, 0, 1, 1, 1], "score": [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]}}
    assert auroc_ci(record) == [1.0, 1.0]
    assert auroc_ci({"cases": {"label": [0, 0], "score": [0.1, 0.2]}}) == [None, None]


@pytest.mark.slow
@pytest.mark.realdata
def test_prepare_on_the_real_archive(tmp_path):
    if not REAL_DATA.exists():
        pytest.skip(f"{REAL_DATA} not found (needs ../shared/data)")
    rows = _rows(_prepare().write_volumes(REAL_DATA, tmp_path))
    counts = [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")]
    assert counts == [1188, 98, 298]
    test = [r for r in rows if r["split"] == "test"]
    assert sum(r["label"] == "1" for r in test) == 69

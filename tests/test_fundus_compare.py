"""The fundus benchmark as data preparation + a compare spec: the manifest, ``subgroups``.

Replaces the tests of the old ``benchmarks/fundus_quality.py``: its folds, metrics and
fusion are now compare's (``tests/test_compare.py``); what is fundus-specific is the
manifest of ``benchmarks/prepare_fundus.py``, the per-kind AUROC (``subgroups: kind``) and
the spec itself.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark, real_data
from PIL import Image
from scipy import ndimage

from medanomaly.errors import ConfigError
from medanomaly.model_selection.compare import compare, subgroup_aurocs
from medanomaly.model_selection.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
KIND_COUNTS = {"good": 16, "bad": 8, "outlier": 4}


def _picture(kind: str, seed: int) -> np.ndarray:
    """A 32x32 RGB picture: a textured disc (good), the same blurred (bad), or noise."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:32, :32]
    disc = (y - 16) ** 2 + (x - 16) ** 2 <= 13**2
    texture = ndimage.gaussian_filter(rng.normal(0, 40, (32, 32)), 0.7)
    if kind == "bad":
        texture = ndimage.gaussian_filter(texture, 2.0)
    image = np.stack([170 + texture, 90 + 0.5 * texture, 30 + 0.2 * texture]) * disc
    if kind == "outlier":
        image = rng.uniform(0, 255, (3, 32, 32))
    return np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _drimdb_like(folder: Path) -> Path:
    for kind, count in KIND_COUNTS.items():
        (folder / kind).mkdir(parents=True)
        for i in range(count):
            seed = 100 * len(kind) + i
            Image.fromarray(_picture(kind, seed)).save(folder / kind / f"{kind}_{i:03d}.jpg")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fundus")
    prepare = load_benchmark("prepare_fundus")
    data = _drimdb_like(root / "drimdb")
    assert prepare.main(["--data", str(data), "--out", str(root / "prepared")]) == 0
    return root, root / "prepared" / "manifest.csv"


def test_prepare_writes_one_group_per_image_and_the_kind(prepared):
    _, manifest = prepared
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "group", "kind"]
    assert len(rows) == sum(KIND_COUNTS.values()) == len({r["group"] for r in rows})
    for row in rows:
        assert row["label"] == str(int(row["kind"] != "good")) and Path(row["path"]).is_file()


def test_prepare_refuses_a_folder_without_good_images(tmp_path):
    prepare = load_benchmark("prepare_fundus")
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="no good"):
        prepare.write_manifest(tmp_path, tmp_path / "out")


def test_subgroup_aurocs_compare_the_normals_with_each_kind():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kinds = np.array(["good"] * 4 + ["bad"] * 2 + ["outlier"] * 2)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.9, 0.8, 0.7])
    result = subgroup_aurocs(labels, scores, kinds)
    assert result == {"bad": pytest.approx(0.875), "outlier": 1.0}
    assert subgroup_aurocs(labels[4:], scores[4:], kinds[4:]) == {"bad": None, "outlier": None}


def _spec(manifest: Path) -> dict:
    base = {"name": "quality", "spatial_dims": 2, "in_channels": 3, "foreground_threshold": 0.02}
    return {
        "data": {
            "path": str(manifest),
            "read_options": {"keep_channels": True},
            "transforms": [{"z_score": {"mean": 0.0, "std": 255.0}}],
        },
        "protocol": {"kind": "kfold", "folds": 2, "repeats": 1, "val_fraction": 0.5},
        "threshold": "mean_sd:k=3",
        "subgroups": "kind",
        "candidates": {
            "quality": {"model": base, "engine": {"seed": 0}},
            "sharpness": {"model": {**base, "features": ["sharpness_c1"]}},
            "intensity": {"model": {"name": "intensity", "spatial_dims": 2, "in_channels": 3}},
            "quality+intensity": {"fusion": ["quality", "intensity"]},
        },
    }


def test_compare_on_rgb_pictures_reports_auroc_per_kind(prepared):
    torch.set_num_threads(1)
    root, manifest = prepared
    out = root / "compared"
    results = compare(parse_spec(_spec(manifest), root), out, refit=False, progress=False)
    rows = results["rows"]
    assert set(rows) == {"quality", "sharpness", "intensity", "quality+intensity"}
    for row in rows.values():
        assert row["errors"] == [] and row["auroc_bad"]["n"] == 2
        assert row["auroc_outlier"]["mean"] is not None
    assert rows["sharpness"]["auroc_bad"]["mean"] > 0.9  # blur is what sharpness sees
    record = json.loads((out / "folds" / "r1_f1" / "sharpness" / "record.json").read_text())
    assert set(record["subgroup_auroc"]) == {"bad", "outlier"}
    header = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith("| row"))
    assert "| selection | test | gap | auroc | auroc_bad | auroc_outlier | auprc |" in header


def test_subgroups_need_a_manifest_column(prepared, tmp_path):
    _, manifest = prepared
    spec = _spec(manifest)
    with pytest.raises(ConfigError, match="names one manifest column"):
        parse_spec({**spec, "subgroups": ["kind"]}, tmp_path)
    with pytest.raises(ConfigError, match="no column 'grade'"):
        compare(parse_spec({**spec, "subgroups": "grade"}, tmp_path), tmp_path / "out")


@pytest.mark.realdata
@pytest.mark.slow
def test_prepare_lists_all_of_drimdb(tmp_path):
    data = real_data("fundus_quality_drimdb")
    prepare = load_benchmark("prepare_fundus")
    with open(prepare.write_manifest(data, tmp_path), newline="") as handle:
        kinds = [row["kind"] for row in csv.DictReader(handle)]
    assert {k: kinds.count(k) for k in set(kinds)} == {"good": 125, "bad": 69, "outlier": 22}

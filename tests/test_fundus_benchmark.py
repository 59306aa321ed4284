"""benchmarks/fundus_quality.py: folds, metrics, fusion (synthetic); a quick real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_benchmark, real_data  # noqa: I001


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fundus_quality")


KINDS = np.array(["good"] * 20 + ["bad"] * 8 + ["outlier"] * 4)


def test_folds_split_only_the_good_images(bench):
    splits = bench.folds(KINDS, repeats=2, k=5)
    assert len(splits) == 10
    for repeat in (splits[:5], splits[5:]):
        masks = np.stack([mask for _, mask in repeat])
        assert np.all(masks.sum(axis=0)[KINDS == "good"] == 1)  # each good image tested once
        assert not masks[:, KINDS != "good"].any()
    assert not np.array_equal(splits[0][1], splits[5][1])


def test_fold_metrics_separate_bad_and_outliers(bench):
    kinds = np.array(["good"] * 4 + ["bad"] * 2 + ["outlier"] * 2)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.9, 0.8, 0.7])
    metrics = bench.fold_metrics(scores, kinds, threshold=0.5)
    assert metrics["auroc_outlier"] == 1.0 and metrics["outliers_above_good"] == 1.0
    assert metrics["auroc_bad"] == pytest.approx(0.875)
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == 1.0


def test_supervised_split_is_60_20_20_by_kind(bench):
    split = bench.supervised_split(np.array(["good"] * 125 + ["bad"] * 69 + ["outlier"] * 22))
    assert [(split == part).sum() for part in ("train", "val", "test")] == [129, 43, 44]


@pytest.mark.realdata
@pytest.mark.slow
def test_benchmark_runs_on_a_subset_of_drimdb(bench, tmp_path):
    data = real_data("fundus_quality_drimdb")
    args = ["--data", str(data), "--subset", "10", "--repeats", "1", "--folds", "2"]
    models = ["--models", "quality", "sharpness"]
    assert bench.main([*args, *models, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert set(rows) == {"quality", "sharpness"}
    for row in rows.values():
        assert row["baseline"] is True
        assert {"auroc", "auroc_bad", "auroc_outlier"} <= set(row)
        assert 0.0 <= row["auroc"]["mean"] <= 1.0 and row["input_shape"][1:] == [128, 128]
    assert rows["quality"]["auroc_outlier"]["mean"] > 0.9
    assert "| *quality (no model)* |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "gallery.png").exists()

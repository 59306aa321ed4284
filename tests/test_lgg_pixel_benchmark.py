"""benchmarks/lgg_pixel.py: split, region masks, scaling, metrics (synthetic); a quick real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_benchmark, real_data  # noqa: I001

from medanomaly.data.sets import ImageSet


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lgg_pixel")


def _groups(n_patients: int = 30, rng_seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(rng_seed)
    sizes = rng.integers(5, 40, n_patients)
    return np.repeat([f"TCGA_{i:02d}" for i in range(n_patients)], sizes)


def test_split_is_patient_grouped_and_seeded(bench):
    groups = _groups()
    split = bench.split_patients(list(groups), n_val=4, n_test=6, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [20, 4, 6]
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert set.union(*parts) == set(groups)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split == bench.split_patients(list(groups[::-1]), n_val=4, n_test=6, seed=0)
    assert split != bench.split_patients(list(groups), n_val=4, n_test=6, seed=1)
    index = bench.split_index(groups, split)
    assert sorted(np.concatenate(list(index.values())).tolist()) == list(range(len(groups)))
    for name, idx in index.items():
        assert set(groups[idx]) == set(split[name])  # every slice of a patient on one side
    assert not set(groups[index["train"]]) & set(split["test"])


def test_split_needs_training_patients(bench):
    with pytest.raises(ValueError):
        bench.split_patients(["a", "b", "c"], n_val=1, n_test=2)


def test_head_mask_and_volume_scaling(bench):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    head = (yy - 16) ** 2 + (xx - 16) ** 2 < 12**2
    volume = rng.uniform(0, 3, (4, 1, 32, 32))  # background noise
    volume[:, 0][:, head] += 100.0
    volume[1, 0, 14:18, 14:18] = 40.0  # a dark lesion inside: holes are filled
    masks = bench.head_masks(volume[:, 0])
    assert masks.shape == (4, 32, 32)
    assert (masks == head).mean() > 0.97
    assert masks[1, 15, 15]
    for scale, tissue in (("median", -1 / 3), ("p99.5", 1.0)):
        scaled = bench.normalise_volume(volume, masks, scale)
        assert scaled.min() >= -1.0 and scaled.max() <= 1.0
        assert np.all(scaled[:, 0][~masks] == -1.0)
        # median: tissue at a third of the range (3 x median = 1); p99.5: tissue near the top
        assert np.median(scaled[:, 0][masks]) == pytest.approx(tissue, abs=0.05)


def test_region_masks_per_patient_at_the_model_size(bench):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(yy - 64, xx - 64)
    slices = rng.uniform(0, 4, (4, 128, 128)).astype(np.float32)
    slices[:, (radius >= 44) & (radius < 56)] = 150.0  # scalp
    slices[:, (radius >= 38) & (radius < 44)] = 20.0  # skull
    slices[:, radius < 38] = 100.0  # brain
    head, brain = bench.region_masks(slices, np.array(["a", "a", "b", "b"]), 32)
    assert head.shape == brain.shape == (4, 32, 32)
    small = np.hypot(*(np.mgrid[:32, :32] + 0.5 - 16))  # pixel centres at 32^2
    assert (head == (small < 14)).mean() > 0.97
    assert (brain == (small < 9.5)).mean() > 0.97
    assert not (brain & ~head).any()


def test_cv_folds_test_every_patient_once(bench):
    groups = _groups()
    folds = bench.cv_folds(list(groups), folds=5, n_val=4, seed=0)
    assert len(folds) == 5
    tested = [p for fold in folds for p in fold["test"]]
    assert sorted(tested) == sorted(set(groups)) and len(tested) == len(set(tested))
    for fold in folds:
        parts = [set(fold[k]) for k in ("train", "val", "test")]
        assert len(fold["val"]) == 4 and len(fold["test"]) == 6
        assert set.union(*parts) == set(groups)
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert folds == bench.cv_folds(list(groups[::-1]), folds=5, n_val=4, seed=0)
    with pytest.raises(ValueError):
        bench.cv_folds(["a", "b"], folds=5)


def test_evaluate_and_dice_at_threshold(bench):
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    head = np.zeros_like(masks)
    head[:, 2:14, 2:14] = True
    maps = masks.astype(np.float32) + 0.1 * np.random.default_rng(0).random(masks.shape)
    data = ImageSet(np.zeros((3, 1, 16, 16)), np.array([1, 0, 0]), masks=masks, foreground=head)
    result = bench.evaluate(maps, data, scores=np.array([1.0, 0.0, 0.1]), threshold=0.5)
    assert result["pixel_auroc"] == pytest.approx(1.0, abs=1e-3)
    assert result["best_dice"] == pytest.approx(1.0, abs=1e-3)
    assert result["dice_at_val_threshold"] == pytest.approx(1.0)
    assert result["dice_counts"] == {"overlap": 16, "called": 16, "lesion": 16}
    assert result["image_auroc"] == 1.0
    assert bench.dice_at(maps, masks, head, 2.0) == 0.0
    # pooled Dice sums the overlaps of the folds, each at its own cut-off
    pooled = {"overlap": 10, "called": 30, "lesion": 10}
    assert bench.dice_from(pooled) == pytest.approx(0.5)


def test_patient_scaling_and_transfer_dice(bench):
    masks = np.zeros((4, 8, 8), bool)
    masks[:, 2:4, 2:4] = True
    foreground = np.ones_like(masks)
    groups = np.array(["a", "a", "b", "b"])
    maps = masks.astype(np.float32) + 0.1
    maps[2:] *= 10.0  # patient b's maps are on another scale
    data = ImageSet(np.zeros((4, 1, 8, 8)), np.ones(4), masks=masks, foreground=foreground,
                    groups=groups)  # fmt: skip
    scaled = bench.patient_scaled(maps, data)
    np.testing.assert_allclose(scaled[:2], scaled[2:])  # one scale for both patients
    assert bench.transfer_dice(scaled, data) == pytest.approx(1.0)
    # on the raw maps a cut-off that suits one patient calls all or nothing in the other
    assert bench.transfer_dice(maps, data) < 0.9
    assert bench.transfer_dice(maps[:2], data.subset([0, 1])) is None


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_cv_on_real_lgg_writes_rows_with_baselines(bench, tmp_path):
    data = real_data("lgg_mri_2d", "kaggle_3m")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quick", "--figures", "1", "--threads", "1"]
    argv += ["--data", str(data), "--rows", "intensity", "dae", "vae_residual"]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "cv" and len(results["folds"]) == 3
    tested = [p for split in results["folds"].values() for p in split["test"]]
    assert len(tested) == len(set(tested)) == 6  # every patient of the quick run tested once
    rows = results["rows"]
    assert set(rows) == {"intensity", "dae", "vae_residual"}
    assert rows["intensity"]["baseline"] is True and rows["dae"]["baseline"] is False
    for row in rows.values():
        for metric in ("pixel_auroc", "pixel_ap", "best_dice", "dice_at_val_threshold"):
            assert 0.0 <= row[metric] <= 1.0
        assert row["per_fold"]["pixel_ap"]["n"] == 3
    assert rows["dae"]["speed"]["scoring"]["images_per_second"] > 0
    markdown = (out / "results.md").read_text()
    assert "Dice @ val cut-off" in markdown and "⌈Dice⌉" in markdown
    assert results["figures"] and (out / results["figures"][0]).exists()

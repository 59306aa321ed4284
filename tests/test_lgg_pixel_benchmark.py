"""benchmarks/lgg_pixel.py: patient-grouped split, head masks, scaling and metrics (synthetic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medanomaly.data import ImageSet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lgg_pixel.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lgg_pixel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    scaled = bench.normalise_volume(volume, masks)
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0
    assert np.all(scaled[:, 0][~masks] == -1.0)
    assert scaled[:, 0][masks].mean() > 0.5


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
    assert result["image_auroc"] == 1.0
    assert bench.dice_at(maps, masks, head, 2.0) == 0.0

"""benchmarks/prepare_lgg.py: the LGG slices compare reads (synthetic kaggle_3m folder)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
from conftest import load_benchmark  # noqa: I001

from medanomaly.data.loading import load_dataset


@pytest.fixture(scope="module")
def prepare():
    return load_benchmark("prepare_lgg")


def _head(rng: np.random.Generator, brightness: float) -> np.ndarray:
    """A 128^2 RGB slice: scalp ring, skull ring and brain disc; FLAIR is channel 1."""
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(yy - 64, xx - 64)
    flair = rng.uniform(0, 4, (128, 128)).astype(np.float32)
    flair[(radius >= 44) & (radius < 56)] = 150.0
    flair[(radius >= 38) & (radius < 44)] = 20.0
    flair[radius < 38] = brightness
    return np.stack([flair * 0.5, flair, flair * 0.2], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def kaggle_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle_3m")
    rng = np.random.default_rng(0)
    for patient, brightness in (("TCGA_A", 60.0), ("TCGA_B", 120.0)):
        (root / patient).mkdir()
        for n in (1, 2, 10):  # slice 10 sorts after 2 by number, not by name
            image = _head(rng, brightness)
            mask = np.zeros((128, 128), np.uint8)
            if n == 2:
                image[60:68, 60:68, 1] = 250
                mask[60:68, 60:68] = 255
            tifffile.imwrite(root / patient / f"{patient}_{n}.tif", image)
            tifffile.imwrite(root / patient / f"{patient}_{n}_mask.tif", mask)
    return root


def test_manifest_lists_slices_by_number_with_labels_and_patients(prepare, kaggle_folder, tmp_path):
    manifest = prepare.source_manifest(kaggle_folder, tmp_path)
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"].rsplit("/", 1)[1] for r in rows[:3]] == [
        "TCGA_A_1.tif",
        "TCGA_A_2.tif",
        "TCGA_A_10.tif",
    ]
    assert [int(r["label"]) for r in rows] == [0, 1, 0, 0, 1, 0]
    assert [r["group"] for r in rows] == ["TCGA_A"] * 3 + ["TCGA_B"] * 3


def test_a_folder_without_kaggle_layout_is_refused_by_name(prepare, tmp_path):
    with pytest.raises(FileNotFoundError, match="laid out like kaggle_3m"):
        prepare.source_manifest(tmp_path, tmp_path)


def test_prepared_slices_are_stripped_and_scaled_per_patient(prepare, kaggle_folder, tmp_path):
    manifest = prepare.prepare(kaggle_folder, tmp_path / "out", size=32)
    data, report = load_dataset(manifest, [], strict=True)
    assert data.images.shape == (6, 1, 32, 32) and not report.skipped
    assert list(data.labels) == [0, 1, 0, 0, 1, 0]
    assert data.masks[1].sum() > 0 and data.masks[0].sum() == 0
    brain = data.images[:, 0] > -1.0
    small = np.hypot(*(np.mgrid[:32, :32] + 0.5 - 16))
    assert (brain[0] == (small < 9.5)).mean() > 0.95  # skull and scalp are stripped
    # one scale per patient: brain tissue sits at a third of the range in both patients,
    # whatever their brightness (3 x the median maps to 1)
    for index in ([0, 2], [3, 5]):
        tissue = data.images[index, 0][brain[index]]
        assert np.median(tissue) == pytest.approx(-1 / 3, abs=0.05)
    assert data.images[1, 0, 15, 15] > np.median(data.images[0, 0][brain[0]])  # lesion brighter


def test_scale_patient_is_robust_to_a_bright_lesion(prepare):
    images = np.full((2, 8, 8), 50.0, np.float32)
    images[1, 2:4, 2:4] = 400.0
    region = np.ones((2, 8, 8), bool)
    region[:, 0] = False
    scaled = prepare.scale_patient(images, region)
    assert np.all(scaled[:, 0] == -1.0) and scaled.max() == 1.0
    assert scaled[0, 4, 4] == pytest.approx(-1 / 3)

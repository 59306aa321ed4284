"""Folder layouts people have: a series folder, a folder of series, patient folders, manifests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medanomaly.cli import main
from medanomaly.data.listing import list_cases, read_manifest, write_manifest
from medanomaly.data.loading import load_dataset
from medanomaly.data.phantoms import write_dicom_slice
from medanomaly.errors import ImageReadError
from medanomaly.io import inspect_path

RESIZE = [{"resize": {"shape": [8, 8, 8]}}]


def _series(folder: Path, uid: str, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k in range(n):
        pixels = rng.integers(0, 400, (8, 8)).astype(np.int16)
        write_dicom_slice(folder / f"im{k:03d}.dcm", pixels, (0.0, 0.0, 2.0 * k),
                          series_uid=uid, instance=k + 1)  # fmt: skip
    (folder / "SOURCE.txt").write_text("where the series came from\n")
    return folder


def _nifti(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((8, 8, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    assert list(a.groups) == list(b.groups)


def test_a_series_folder_is_one_case_as_inspect_reads_it(tmp_path: Path) -> None:
    series = _series(tmp_path / "ct", "1.2.3.9")
    assert [c.path for c in list_cases(series)] == [series]
    assert "shape (C, X, Y, Z): (1, 8, 8, 4)" in inspect_path(series)
    folder, _ = load_dataset(series, RESIZE)
    (tmp_path / "m.csv").write_text("path\nct\n")
    manifest, _ = load_dataset(tmp_path / "m.csv", RESIZE)
    assert len(folder) == 1
    np.testing.assert_array_equal(folder.images, manifest.images)


def test_a_folder_of_series_keeps_one_case_per_series(tmp_path: Path) -> None:
    _series(tmp_path / "a", "1.2.3.1")
    _series(tmp_path / "b", "1.2.3.2", seed=1)
    cases = list_cases(tmp_path)
    assert [c.path.name for c in cases] == ["a", "b"] and all(c.group is None for c in cases)


def test_patient_folders_give_grouped_cases_with_their_masks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for patient, seed in (("p1", 0), ("p2", 2)):
        _nifti(data / patient / "t1.nii.gz", seed)
        _nifti(data / patient / "flair.nii.gz", seed + 1)
        _nifti(data / patient / "tumour_seg.nii.gz", seed + 10)
    _series(data / "p3" / "series1", "1.2.3.4")  # a patient folder holding a DICOM series
    cases = list_cases(data)
    assert [(c.path.relative_to(data).as_posix(), c.group) for c in cases] == [
        ("p1/flair.nii.gz", "p1"), ("p1/t1.nii.gz", "p1"),
        ("p2/flair.nii.gz", "p2"), ("p2/t1.nii.gz", "p2"),
        ("p3/series1", "p3"),
    ]  # fmt: skip
    assert cases[0].mask == data / "p1" / "tumour_seg.nii.gz" and cases[4].mask is None

    assert main(["manifest", str(data), "--out", str(tmp_path / "manifest.csv")]) == 0
    listed = read_manifest(tmp_path / "manifest.csv")
    assert [(c.path.resolve(), c.group, c.mask and c.mask.resolve()) for c in listed] == [
        (c.path.resolve(), c.group, c.mask and c.mask.resolve()) for c in cases
    ]
    from_folder, _ = load_dataset(data, RESIZE)
    from_manifest, _ = load_dataset(tmp_path / "manifest.csv", RESIZE)
    _same(from_folder, from_manifest)
    assert sorted(set(from_folder.groups)) == ["p1", "p2", "p3"]


def test_kaggle_style_masks_pair_by_name(tmp_path: Path) -> None:
    from PIL import Image

    for patient in ("TCGA_A", "TCGA_B"):
        (tmp_path / patient).mkdir()
        for k in (1, 2):
            image = np.full((16, 16), 40 * k, np.uint8)
            Image.fromarray(image).save(tmp_path / patient / f"{patient}_{k}.tif")
            Image.fromarray(image * 0).save(tmp_path / patient / f"{patient}_{k}_mask.tif")
    cases = list_cases(tmp_path)
    assert len(cases) == 4 and {c.group for c in cases} == {"TCGA_A", "TCGA_B"}
    assert all(c.mask.name == c.path.name.replace(".tif", "_mask.tif") for c in cases)


def test_duplicate_manifest_rows_are_named_and_fatal_with_strict(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 1)):
        _nifti(tmp_path / f"{name}.nii.gz", seed)
    (tmp_path / "m.csv").write_text("path\na.nii.gz\nb.nii.gz\n./a.nii.gz\n")
    images, report = load_dataset(tmp_path / "m.csv", RESIZE)
    assert len(images) == 2
    assert report.lines() == [
        f"{tmp_path / 'a.nii.gz'}: m.csv row 4 repeats row 2 (the same image)"
    ]
    with pytest.raises(ImageReadError, match="row 4 repeats row 2"):
        load_dataset(tmp_path / "m.csv", RESIZE, strict=True)


def test_write_manifest_round_trips_labels(tmp_path: Path) -> None:
    for label, seed in (("normal", 0), ("abnormal", 1)):
        _nifti(tmp_path / "data" / label / "x.nii.gz", seed)
    cases = list_cases(tmp_path / "data")
    write_manifest(tmp_path / "m.csv", cases)
    back = read_manifest(tmp_path / "m.csv")
    assert [(c.path.resolve(), c.label) for c in back] == [(c.path, c.label) for c in cases]

"""medanomaly.io on the real images in ../shared/data (skipped when that folder is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medanomaly.image import MedicalImage
from medanomaly.io import inspect_path, list_dicom_series, read_image

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.realdata


def data_path(relative: str) -> Path:
    """Return ``DATA_ROOT / relative``, skipping the test when it is absent."""
    path = DATA_ROOT / relative
    if not path.exists():
        pytest.skip(f"real data not found: {path} is missing")
    return path


@pytest.fixture(scope="module")
def head_ct() -> MedicalImage:
    return read_image(data_path("dicom_head_ct"))


@pytest.fixture(scope="module")
def body_ct() -> MedicalImage:
    return read_image(data_path("totalseg_ct/example_ct_dicom"))


def test_head_ct_in_hounsfield_units(head_ct: MedicalImage) -> None:
    array = head_ct.array
    assert array.shape == (1, 512, 512, 123)
    assert head_ct.spacing == pytest.approx((1.0, 1.0, 2.0))
    assert array.min() == pytest.approx(-1024.0)
    assert array.max() > 1000.0
    corner_air = array[0, :20, :20, :]
    assert abs(float(np.median(corner_air)) + 1000.0) < 50.0
    assert head_ct.meta["intensity_unit"] == "HU"
    assert head_ct.meta["modality"] == "CT"
    assert any("SOURCE.txt" in p for p in head_ct.problems)


def test_head_ct_is_ras_with_superior_last(head_ct: MedicalImage) -> None:
    import nibabel as nib

    assert nib.aff2axcodes(head_ct.affine) == ("R", "A", "S")
    # superior end of the volume (top of the head) holds less tissue than the middle
    body = (head_ct.array[0] > -500).sum(axis=(0, 1))
    assert body[-1] < body[len(body) // 2]


def test_head_ct_resampled_to_3mm_isotropic(head_ct: MedicalImage) -> None:
    from medanomaly.transforms import build_transforms

    resampled = build_transforms([{"resample": {"spacing": [3.0, 3.0, 3.0]}}])(head_ct)
    # 512 x 1 mm -> 511 / 3 + 1 = 171 voxels; 123 x 2 mm -> 122 * 2 / 3 + 1 = 82 voxels
    assert resampled.array.shape == (1, 171, 171, 82)
    assert resampled.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert resampled.array.min() == pytest.approx(-1024.0, abs=1.0)


def test_head_ct_inspect_report(head_ct: MedicalImage) -> None:
    report = inspect_path(data_path("dicom_head_ct"))
    assert "spacing (mm): (1.0, 1.0, 2.0)" in report
    assert "intensity range: -1024 .. " in report and " HU" in report


def test_jpeg2000_ct_spacing_from_positions(body_ct: MedicalImage) -> None:
    folder = data_path("totalseg_ct/example_ct_dicom")
    first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert float(first.SliceThickness) == 3.0
    assert body_ct.array.shape == (1, 512, 512, 20)
    assert body_ct.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert body_ct.meta["slice_thickness"] == 3.0
    assert body_ct.array.min() == pytest.approx(-1024.0)
    assert body_ct.array.max() > 1000.0
    assert not any("gap" in p or "uneven" in p for p in body_ct.problems)
    assert "step 2.0 mm, SliceThickness 3.0 mm" in inspect_path(folder)


def test_totalseg_nifti_in_hu() -> None:
    image = read_image(data_path("totalseg_ct/example_ct.nii.gz"))
    assert image.array.shape == (1, 122, 101, 112)
    assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert image.array.min() < -1000.0
    assert image.array.max() > 1000.0


def test_mr_oblique_reads_and_reports_gap() -> None:
    folder = data_path("dicom_mr_oblique")
    image = read_image(folder)
    assert image.array.shape[0] == 1
    assert sorted(image.spatial_shape) == [20, 256, 256]
    assert image.spacing[2] == pytest.approx(7.0, abs=0.1)
    assert any("exceeds SliceThickness 5.0" in p for p in image.problems)
    assert [s["n_slices"] for s in list_dicom_series(folder)] == [20]


def test_ixi_t1_one_volume() -> None:
    path = next(iter(sorted(data_path("ixi_t1_3d/t1").glob("*.nii.gz"))))
    image = read_image(path)
    assert image.spatial_dims == 3
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert sorted(image.spatial_shape) == [90, 120, 120]
    assert image.meta["orientation_original"] == "PSR"
    assert image.array.max() > 100.0


def test_lgg_tiff_and_mask() -> None:
    patient = sorted(p for p in data_path("lgg_mri_2d/kaggle_3m").iterdir() if p.is_dir())[0]
    mask_path = sorted(patient.glob("*_mask.tif"))[0]
    image_path = mask_path.with_name(mask_path.name.replace("_mask", ""))
    gray = read_image(image_path)
    assert gray.array.shape == (1, 256, 256)
    assert read_image(image_path, keep_channels=True).array.shape == (3, 256, 256)
    flair = read_image(image_path, channel=1)
    assert flair.array.shape == (1, 256, 256)
    mask = read_image(mask_path)
    assert mask.array.shape == (1, 256, 256)
    assert set(np.unique(mask.array)) <= {0.0, 255.0}


def test_head_ct_png_rgb_or_rgba_to_gray() -> None:
    folder = data_path("head_ct_hemorrhage")
    for name in ("000.png", "188.png"):  # 188 is RGBA
        image = read_image(folder / name)
        assert image.spatial_dims == 2
        assert image.array.shape[0] == 1
        assert image.meta["converted_from"] in {"rgb", "rgba"}
        assert image.array.min() >= 0.0 and image.array.max() <= 255.0

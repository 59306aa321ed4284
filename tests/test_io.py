"""Synthetic tests of medanomaly.io: DICOM, NIfTI, pictures, arrays and validation."""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medanomaly.data.phantoms import write_dicom_slice
from medanomaly.errors import ImageReadError, InvalidImageError
from medanomaly.io import IMAGE_SUFFIXES, inspect_path, list_dicom_series, read_image

ROWS, COLS = 4, 3
PIXEL_SPACING = (0.5, 0.8)  # DICOM order: (between rows, between columns)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------- DICOM helpers


def stored_pixels(index: int) -> np.ndarray:
    """A distinct (ROWS, COLS) int16 slice: value = 100 * index + 10 * row + col."""
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    return (100 * index + 10 * rows + cols).astype(np.int16)


def write_slice(
    path: Path,
    position: tuple[float, float, float],
    pixels: np.ndarray,
    *,
    series_uid: str = "1.2.3.4.1",
    description: str = "head",
    orientation: tuple[float, ...] = AXIAL,
    slope: float = 1.0,
    intercept: float = 0.0,
    thickness: float = 2.0,
    instance: int = 1,
) -> None:
    """Write one CT slice with the given geometry and stored pixels."""
    write_dicom_slice(
        path,
        pixels,
        position,
        orientation=orientation,
        pixel_spacing=PIXEL_SPACING,
        thickness=thickness,
        slope=slope,
        intercept=intercept,
        series_uid=series_uid,
        description=description,
        patient_id="P042",
        instance=instance,
        window=(40, 400),
    )


def write_series(
    folder: Path,
    z_positions: list[float],
    *,
    prefix: str = "slice",
    shuffle_seed: int | None = 0,
    **kwargs: object,
) -> None:
    """Write one axial slice per z position; file names and instance numbers are shuffled."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(range(len(z_positions)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    for index, z in enumerate(z_positions):
        write_slice(
            folder / f"{prefix}{names[index]:03d}.dcm",
            (10.0, 20.0, z),
            stored_pixels(index),
            instance=names[index] + 1,
            **kwargs,
        )


def expected_axial(stored: np.ndarray) -> np.ndarray:
    """Where stored pixel [row, col] of an axial LPS slice lands in RAS+: flipped (col, row)."""
    return stored.T[::-1, ::-1]


# --------------------------------------------------------------------------- DICOM tests


def test_dicom_series_sorted_by_position_and_rescaled(tmp_path: Path) -> None:
    write_series(tmp_path, [4.0, 0.0, 8.0, 2.0, 6.0], slope=2.0, intercept=-1024.0)
    image = read_image(tmp_path)
    assert image.array.shape == (1, COLS, ROWS, 5)
    assert image.array.dtype == np.float32
    assert image.spacing == pytest.approx((0.8, 0.5, 2.0))
    # write order index i sits at z = [4, 0, 8, 2, 6][i]; sorted by z the order is 1, 3, 0, 4, 2
    for z_index, written in enumerate([1, 3, 0, 4, 2]):
        want = expected_axial(stored_pixels(written)) * 2.0 - 1024.0
        np.testing.assert_allclose(image.array[0, :, :, z_index], want)
    assert image.meta["modality"] == "CT"
    assert image.meta["intensity_unit"] == "HU"
    assert image.meta["group"] == "P042"
    assert image.meta["window_center"] == 40.0
    assert image.meta["window_width"] == 400.0
    assert image.meta["rescale_intercept"] == -1024.0
    assert image.problems == []


def test_dicom_affine_maps_voxels_to_patient_position(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0])
    image = read_image(tmp_path)
    # canonical voxel (0, 0, 0) is stored row ROWS-1, col COLS-1 of the lowest slice
    lps = np.array([10.0 + (COLS - 1) * 0.8, 20.0 + (ROWS - 1) * 0.5, 0.0])
    ras = image.affine @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1])
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), [0.8, 0.5, 2.0])
    assert image.meta["orientation_original"] == "LPS"


def test_dicom_sagittal_spacing_follows_canonical_axes(tmp_path: Path) -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # along a row: P; down a column: I; normal: R
    for index, x in enumerate([0.0, -3.0, -6.0]):
        write_slice(
            tmp_path / f"s{index}.dcm",
            (x, 0.0, 0.0),
            stored_pixels(index),
            orientation=sagittal,
            thickness=3.0,
        )
    image = read_image(tmp_path)
    assert image.spatial_shape == (3, COLS, ROWS)
    assert image.spacing == pytest.approx((3.0, 0.8, 0.5))
    assert image.meta["orientation_original"] == "PIR"


def test_dicom_oblique_series_sorted_along_normal(tmp_path: Path) -> None:
    angle = np.deg2rad(20)
    oblique = (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle)))
    normal = np.cross(oblique[:3], oblique[3:])
    for index, k in enumerate([2, 0, 1]):
        write_slice(
            tmp_path / f"o{index}.dcm",
            tuple(normal * 5.0 * k),
            stored_pixels(k),
            orientation=oblique,
            thickness=5.0,
        )
    image = read_image(tmp_path)
    assert image.spacing[2] == pytest.approx(5.0)
    assert image.problems == []


def test_dicom_missing_slice_reported_with_gap(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0, 8.0, 10.0])
    image = read_image(tmp_path)
    assert image.spacing[2] == pytest.approx(2.0)
    gap = [p for p in image.problems if "gap of 4.0 mm" in p]
    assert gap and "1 slice(s) missing" in gap[0]


def test_dicom_step_larger_than_thickness_reported(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 7.0, 14.0], thickness=5.0)
    image = read_image(tmp_path)
    assert image.spacing[2] == pytest.approx(7.0)
    assert any("SliceThickness 5.0" in p and "2.0 mm" in p for p in image.problems)


def test_dicom_two_series_need_a_uid(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0], series_uid="1.2.3.4.1", description="soft tissue")
    write_series(tmp_path, [0.0, 1.0], series_uid="1.2.3.4.2", description="bone", prefix="b")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "2 DICOM series" in message
    assert "1.2.3.4.1 (CT, 3 slices, 'soft tissue')" in message
    assert "1.2.3.4.2 (CT, 2 slices, 'bone')" in message
    image = read_image(tmp_path, series_uid="1.2.3.4.2")
    assert image.spatial_shape == (COLS, ROWS, 2)
    assert image.spacing[2] == pytest.approx(1.0)
    with pytest.raises(ImageReadError, match="no series with SeriesInstanceUID 9.9"):
        read_image(tmp_path, series_uid="9.9")


def test_list_dicom_series(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0], series_uid="1.2.3.4.1", description="soft")
    write_series(tmp_path, [0.0, 1.0], series_uid="1.2.3.4.2", description="bone", prefix="b")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list_dicom_series(tmp_path)
    assert [(s["uid"], s["n_slices"], s["description"], s["modality"]) for s in found] == [
        ("1.2.3.4.1", 3, "soft", "CT"),
        ("1.2.3.4.2", 2, "bone", "CT"),
    ]
    assert all(Path(f).suffix == ".dcm" for f in found[0]["files"])


def test_dicom_non_dicom_and_garbage_files_skipped_and_listed(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0])
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x13\x37" * 50)
    image = read_image(tmp_path)
    assert image.spatial_shape == (COLS, ROWS, 3)
    assert any("README.txt" in p and "not a DICOM file" in p for p in image.problems)
    assert any("broken.dcm" in p and "no image" in p for p in image.problems)


def test_dicom_truncated_pixel_data_names_the_file(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0], shuffle_seed=None)
    victim = tmp_path / "slice001.dcm"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path)
    assert info.value.path == str(victim)
    assert "cannot decode pixel data" in info.value.problem


def test_dicom_single_file_and_any_name(tmp_path: Path) -> None:
    write_slice(tmp_path / "one.dcm", (0.0, 0.0, 5.0), stored_pixels(0), thickness=1.5)
    image = read_image(tmp_path / "one.dcm")
    assert image.spatial_shape == (COLS, ROWS, 1)
    assert image.spacing == pytest.approx((0.8, 0.5, 1.5))
    (tmp_path / "one.dcm").rename(tmp_path / "CT.1.2.840.99")
    assert read_image(tmp_path / "CT.1.2.840.99").spatial_shape == (COLS, ROWS, 1)


def test_dicom_duplicate_positions_dropped(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 2.0, 4.0])
    image = read_image(tmp_path)
    assert image.spatial_shape == (COLS, ROWS, 3)
    assert any("1 slice(s) share a position" in p for p in image.problems)


def test_dicom_without_geometry_is_2d(tmp_path: Path) -> None:
    from pydicom import dcmread

    path = tmp_path / "xray.dcm"
    write_slice(path, (0.0, 0.0, 0.0), stored_pixels(1))
    ds = dcmread(path)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    image = read_image(path)
    assert image.array.shape == (1, ROWS, COLS)
    assert image.spacing == pytest.approx(PIXEL_SPACING)
    np.testing.assert_array_equal(image.array[0], stored_pixels(1))
    assert any("read as a 2D image" in p for p in image.problems)
    assert any("MONOCHROME1" in p for p in image.problems)


def test_dicom_jpeg2000_round_trip(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless

    slices = [np.arange(32 * 32, dtype=np.int16).reshape(32, 32) - 500 + 7 * k for k in range(2)]
    for k, pixels in enumerate(slices):
        path = tmp_path / f"j{k}.dcm"
        write_slice(path, (0.0, 0.0, 2.0 * k), pixels, intercept=-1024.0)
        ds = dcmread(path)
        try:
            ds.compress(JPEG2000Lossless)
        except (RuntimeError, ValueError) as exc:
            pytest.skip(f"no JPEG 2000 encoder: {exc}")
        ds.save_as(path)
    image = read_image(tmp_path)
    assert image.meta["transfer_syntax"].startswith("JPEG 2000")
    np.testing.assert_allclose(image.array[0, :, :, 1], expected_axial(slices[1]) - 1024.0)


def test_dicom_empty_folder_and_folder_without_dicom(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="folder is empty") as info:
        read_image(empty)
    assert info.value.path == str(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match="no DICOM image files found.*notes.txt"):
        read_image(other)


# --------------------------------------------------------------------------- NIfTI


def test_nifti_reoriented_to_ras_with_spacing(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    # voxel axis i runs Anterior (2 mm), j Superior (1 mm), k Right (3 mm)
    affine = np.array([[0, 0, 3, 0], [2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    image = read_image(path)
    assert image.spatial_shape == (4, 2, 3)
    assert image.spacing == pytest.approx((3.0, 2.0, 1.0))
    np.testing.assert_array_equal(image.array[0], data.transpose(2, 0, 1))
    assert image.meta["orientation_original"] == "ASR"
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")


def test_nifti_flipped_axes_and_scaling(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([-1.5, -1.5, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, tmp_path / "vol.nii")
    image = read_image(tmp_path / "vol.nii")
    assert image.spacing == pytest.approx((1.5, 1.5, 2.0))
    np.testing.assert_allclose(image.array[0], data[::-1, ::-1, :] * 2.0 + 10.0)


def test_nifti_4d_becomes_channels(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((5, 6, 7, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "two.nii.gz")
    image = read_image(tmp_path / "two.nii.gz")
    assert image.array.shape == (2, 5, 6, 7)
    assert read_image(tmp_path / "two.nii.gz", channel=1).array.shape == (1, 5, 6, 7)


def test_nifti_nan_rejected_with_count(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InvalidImageError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert "3 NaN and 1 infinite" in info.value.problem


# --------------------------------------------------------------------------- pictures


RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [100, 100, 100]]], dtype=np.uint8)
LUMA = np.array([[76.245, 149.685], [29.07, 100.0]], dtype=np.float32)


def test_png_rgb_to_gray_and_channels(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(RGB, "RGB").save(path)
    gray = read_image(path)
    assert gray.array.shape == (1, 2, 2)
    assert gray.spacing == (1.0, 1.0)
    assert gray.affine is None
    np.testing.assert_allclose(gray.array[0], LUMA, atol=1e-3)
    kept = read_image(path, keep_channels=True)
    np.testing.assert_array_equal(kept.array, RGB.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_image(path, channel=1).array[0], RGB[..., 1])


def test_png_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.full((2, 2, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(image.array[0], LUMA, atol=1e-3)
    assert image.meta["converted_from"] == "rgba"


def test_png_palette_to_gray(tmp_path: Path) -> None:
    palette_img = Image.fromarray(RGB, "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    palette_img.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    np.testing.assert_allclose(read_image(tmp_path / "pal.png").array[0], LUMA, atol=1e-3)


def test_png_16_bit_kept(tmp_path: Path) -> None:
    data = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png").array[0], data)


def test_jpeg_gray(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 6), 90, np.uint8)).save(tmp_path / "g.jpg")
    image = read_image(tmp_path / "g.jpg")
    assert image.array.shape == (1, 8, 6)
    assert abs(float(image.array.mean()) - 90) < 2


def test_tiff_multichannel(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 255, (5, 4, 3), dtype=np.uint8)
    path = tmp_path / "mri.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    assert read_image(path).array.shape == (1, 5, 4)
    np.testing.assert_array_equal(
        read_image(path, keep_channels=True).array, data.transpose(2, 0, 1)
    )
    np.testing.assert_array_equal(read_image(path, channel=1).array[0], data[..., 1])
    with pytest.raises(InvalidImageError) as info:
        read_image(path, channel=3)
    assert info.value.path == str(path)
    assert "channel=3 is out of range" in info.value.problem


def test_tiff_metric_resolution_gives_spacing(tmp_path: Path) -> None:
    path = tmp_path / "res.tif"
    tifffile.imwrite(
        path, np.zeros((4, 4), np.uint16), resolution=(20.0, 10.0), resolutionunit="CENTIMETER"
    )
    assert read_image(path).spacing == pytest.approx((1.0, 0.5))


def test_tiff_stack_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 4), np.uint8), photometric="minisblack")
    with pytest.raises(InvalidImageError, match="TIFF holds a stack") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_corrupt_png_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="cannot decode picture") as info:
        read_image(path)
    assert info.value.path == str(path)


# --------------------------------------------------------------------------- arrays


def test_npy_2d_3d_4d_layouts(tmp_path: Path) -> None:
    for shape, want in [
        ((4, 5), (1, 4, 5)),
        ((4, 5, 6), (1, 4, 5, 6)),
        ((2, 4, 5, 6), (2, 4, 5, 6)),
    ]:
        path = tmp_path / f"a{len(shape)}.npy"
        np.save(path, np.ones(shape, dtype=np.int16))
        image = read_image(path)
        assert image.array.shape == want
        assert len(image.spacing) == len(want) - 1
    assert read_image(tmp_path / "a3.npy").affine is not None
    assert read_image(tmp_path / "a2.npy").affine is None


def test_npz_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "single.npz", volume=np.ones((3, 3)))
    assert read_image(tmp_path / "single.npz").meta["npz_key"] == "volume"
    np.savez(tmp_path / "named.npz", image=np.ones((3, 3)), mask=np.zeros((3, 3)))
    assert read_image(tmp_path / "named.npz").meta["npz_key"] == "image"
    np.savez(tmp_path / "many.npz", a=np.ones(3), b=np.ones(3))
    with pytest.raises(ImageReadError, match="several arrays \\(a, b\\)") as info:
        read_image(tmp_path / "many.npz")
    assert info.value.path == str(tmp_path / "many.npz")


@pytest.mark.parametrize("shape", [(7,), (1, 2, 3, 4, 5)])
def test_wrong_dimensionality_rejected(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(InvalidImageError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert f"array has {len(shape)} dimensions" in info.value.problem


def test_npy_nan_and_zero_size_rejected(tmp_path: Path) -> None:
    data = np.zeros((4, 4), np.float64)
    data[0, :2] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(InvalidImageError, match="2 NaN and 0 infinite") as info:
        read_image(tmp_path / "nan.npy")
    assert info.value.path == str(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(InvalidImageError, match="image is empty"):
        read_image(tmp_path / "empty.npy")


# --------------------------------------------------------------------------- dispatch


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "scan.xyz"
    path.write_text("data")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert "unsupported file type '.xyz'" in info.value.problem
    assert all(suffix in info.value.problem for suffix in IMAGE_SUFFIXES)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file or folder"):
        read_image(tmp_path / "nothing.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="file is empty") as info:
        read_image(tmp_path / "zero.png")
    assert info.value.path == str(tmp_path / "zero.png")


def test_conflicting_channel_arguments(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((3, 3)))
    with pytest.raises(ValueError, match="either keep_channels"):
        read_image(tmp_path / "a.npy", keep_channels=True, channel=0)
    with pytest.raises(ValueError, match="series_uid applies to DICOM only"):
        read_image(tmp_path / "a.npy", series_uid="1.2")


# --------------------------------------------------------------------------- inspect


def test_inspect_dicom_series(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0, 4.0, 8.0], slope=1.0, intercept=-1024.0)
    report = inspect_path(tmp_path)
    assert "spacing (mm): (0.8, 0.5, 2.0)" in report
    assert "orientation: file LPS -> returned RAS" in report
    assert "HU" in report and "intercept -1024" in report
    assert "gap of 4.0 mm" in report


def test_inspect_lists_series_and_errors(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 2.0], series_uid="1.2.3.4.1")
    write_series(tmp_path, [0.0, 2.0], series_uid="1.2.3.4.2", prefix="b")
    report = inspect_path(tmp_path)
    assert "DICOM series found: 2" in report and "1.2.3.4.2" in report
    assert "spacing (mm): (0.8, 0.5, 2.0)" in inspect_path(tmp_path, series_uid="1.2.3.4.1")
    assert "cannot read" in inspect_path(tmp_path / "missing.nii")

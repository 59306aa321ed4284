"""DICOM layouts and codecs: enhanced multi-frame, no preamble, compressed transfer syntaxes.

The decoder tests read pydicom's own bundled test files (installed with pydicom, never
downloaded: ``get_testdata_file`` would fetch missing ones, so the folder is used directly).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medanomaly.data.loading import load_dataset
from medanomaly.data.phantoms import write_dicom_slice
from medanomaly.errors import ImageReadError
from medanomaly.io import inspect_path, read_image

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
OBLIQUE = (0.9063, 0.4226, 0.0, -0.4226, 0.9063, 0.0)  # 25° about the slice normal


def single_frame_series(folder: Path, n: int = 5, orientation=OBLIQUE) -> list[Path]:
    """CT slices with a distinct pattern per slice, slope/intercept that vary per slice."""
    rows, cols = np.mgrid[0:6, 0:7]
    paths = []
    for k in range(n):
        path = write_dicom_slice(
            folder / f"{(3 * k) % n:02d}.dcm",
            (100 * k + 10 * rows + cols).astype(np.int16),
            (5.0, -2.0, 3.0 * k),
            orientation=orientation,
            pixel_spacing=(0.7, 0.9),
            slope=1.0 + 0.5 * k,
            intercept=-1000.0 + k,
            series_uid="1.2.826.0.1.3680043.10.2.1",
            patient_id="MF1",
            instance=k + 1,
        )
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.2.2"
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "medanomaly tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.save_as(path)
        paths.append(path)
    return paths


def enhanced_from(paths: list[Path], out: Path) -> Path:
    """highdicom's Legacy Converted Enhanced CT of a single-frame series (frames per file)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    enhanced.save_as(out)
    return out


def test_enhanced_multi_frame_reads_to_the_volume_of_its_single_frame_series(
    tmp_path: Path,
) -> None:
    paths = single_frame_series(tmp_path / "series")
    enhanced = enhanced_from(paths, tmp_path / "enhanced.dcm")
    assert int(pydicom.dcmread(enhanced).NumberOfFrames) == 5
    series = read_image(tmp_path / "series")
    multi = read_image(enhanced)
    np.testing.assert_array_equal(multi.array, series.array)  # values in HU, slope per frame
    np.testing.assert_allclose(multi.affine, series.affine, atol=1e-4)
    assert multi.spacing == pytest.approx(series.spacing)
    assert multi.meta["n_frames"] == 5 and multi.source_grid.dicom_frames


def test_frames_of_another_orientation_are_reported_like_a_mixed_series(tmp_path: Path) -> None:
    paths = single_frame_series(tmp_path / "series")
    enhanced = pydicom.dcmread(enhanced_from(paths, tmp_path / "enhanced.dcm"))
    frame = enhanced.PerFrameFunctionalGroupsSequence[3]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal
    frame.PlaneOrientationSequence = [orientation]
    enhanced.save_as(tmp_path / "mixed.dcm")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "mixed.dcm")
    message = str(info.value)
    assert "frame 4: ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 0.0, -1.0] differs" in message
    assert "cannot stack" in message and message.count("mixed.dcm") == 1


def test_a_file_without_preamble_is_read_with_force(tmp_path: Path) -> None:
    path = write_dicom_slice(
        tmp_path / "a.dcm", np.arange(12, dtype=np.int16).reshape(3, 4), (0, 0, 0)
    )
    ds = pydicom.dcmread(path)
    bare = tmp_path / "IM0001"  # old archives: no suffix, no preamble, no File Meta
    pydicom.dcmwrite(bare, ds, enforce_file_format=False)
    raw = bare.read_bytes()
    bare.write_bytes(raw[raw.index(b"\x08\x00") :] if raw[128:132] == b"DICM" else raw)
    assert not pydicom.misc.is_dicom(bare)
    image = read_image(bare)
    np.testing.assert_array_equal(image.array, read_image(path).array)
    np.testing.assert_allclose(image.affine, read_image(path).affine)
    assert any("force=True" in p for p in image.problems)
    (tmp_path / "archive").mkdir()
    bare.rename(tmp_path / "archive" / "IM0001")
    images, report = load_dataset(tmp_path / "archive")  # found in a folder, too
    assert len(images) == 1 and not report


def test_bad_integer_value_names_the_file_and_the_tag() -> None:
    report = inspect_path(TEST_FILES / "badVR.dcm")
    assert "cannot read: NumberOfFrames (0028,0008) has an invalid value '1A'" in report
    assert report.count("badVR.dcm") == 1


# --------------------------------------------------------------- one real file per decoder


def _pixels(name: str) -> np.ndarray:
    return read_image(TEST_FILES / name, keep_channels=True).array


@pytest.mark.parametrize(
    ("compressed", "reference", "syntax"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "JPEG Lossless"),  # imagecodecs
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "JPEG-LS Lossless"),  # pyjpegls
        ("MR_small_RLE.dcm", "MR_small.dcm", "RLE Lossless"),  # pydicom's own
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", "JPEG 2000"),  # pylibjpeg-openjpeg
    ],
)
def test_lossless_codecs_give_the_uncompressed_values(compressed, reference, syntax) -> None:
    assert syntax in pydicom.dcmread(TEST_FILES / compressed).file_meta.TransferSyntaxUID.name
    np.testing.assert_array_equal(_pixels(compressed), _pixels(reference))


def test_twelve_bit_jpeg_extended_is_decoded() -> None:
    # NEMA WG04 NM1_JPLY; pydicom's own tests expect 244 at row 420, column 140
    ds = pydicom.dcmread(TEST_FILES / "JPGExtended.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51" and ds.BitsStored == 12
    image = read_image(TEST_FILES / "JPGExtended.dcm")
    assert image.array.shape == (1, 1024, 256)
    assert image.array[0, 420, 140] == 244 and image.array.max() <= 4095


def test_jpeg_ls_near_lossless_is_close_to_the_original() -> None:
    lossy = _pixels("JPEGLSNearLossless_16.dcm")
    assert lossy.shape[0] == 1 and np.isfinite(lossy).all() and lossy.std() > 0


def test_rle_multi_frame_reads_as_a_frame_stack() -> None:
    image = read_image(TEST_FILES / "SC_rgb_rle_2frame.dcm", keep_channels=True)
    assert image.array.shape == (3, 100, 100, 2)
    assert "stacked along the third axis" in " ".join(image.problems)


def test_an_undecodable_file_is_refused_on_one_line_naming_the_codec() -> None:
    report = inspect_path(TEST_FILES / "JPEG2000-embedded-sequence-delimiter.dcm")
    [line] = [line for line in report.splitlines() if line.startswith("cannot read")]
    assert "cannot decode pixel data (JPEG 2000 Image Compression)" in line
    assert "pylibjpeg" in line and ExplicitVRLittleEndian not in line

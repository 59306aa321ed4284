"""Maps written in the scan's own geometry: NIfTI, DICOM series (Parametric Map) and 2D."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from scipy.spatial.transform import Rotation

from medanomaly.data.loading import load_dataset
from medanomaly.data.phantoms import write_dicom_slice
from medanomaly.detectors.base import AnomalyResult
from medanomaly.errors import ImageReadError
from medanomaly.outputs.source_maps import MapInfo, to_source_grid
from medanomaly.outputs.writers import save_maps

SHAPE = (40, 36, 30)
LESION = (22, 12, 9)
# crop away part of the scan, resample, resize and pad: every step moves the grid
PIPELINE = [
    {"crop": {"box": [[2, -3], [1, -2], [0, 28]]}},
    {"resample": {"spacing": 1.5}},
    {"resize": {"shape": [32, 32, 32], "mode": "trilinear"}},
    {"pad": {"shape": [40, 36, 34]}},
]


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, mirrored voxel-to-world matrix."""
    affine = np.eye(4)
    rotation = Rotation.from_euler("xyz", [20, -15, 35], degrees=True).as_matrix()
    affine[:3, :3] = rotation @ np.diag([-1.2, 0.9, 2.0])
    affine[:3, 3] = [-20.0, 15.0, 40.0]
    return affine


def phantom_volume(shape: tuple[int, ...] = SHAPE, lesion: tuple[int, ...] = LESION) -> np.ndarray:
    """A noisy block with a bright Gaussian lesion at voxel ``lesion``."""
    rng = np.random.default_rng(0)
    volume = np.zeros(shape, np.float32)
    block = tuple(slice(n // 8, n - n // 8) for n in shape)
    volume[block] = 1.0 + 0.05 * rng.standard_normal(volume[block].shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    distance2 = sum((grid[i] - lesion[i]) ** 2 for i in range(3))
    return volume + 3.0 * np.exp(-distance2 / (2 * 2.0**2)).astype(np.float32)


def map_equal_to_input(images) -> AnomalyResult:
    """A stand-in detector whose map is the preprocessed image (the lesion is its peak)."""
    maps = images.images[:, 0]
    scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    return AnomalyResult(scores, (scores > 2.0).astype(np.int64), maps, None, 2.0)


def peak(values: np.ndarray) -> np.ndarray:
    return np.array(np.unravel_index(np.argmax(values), values.shape))


def test_nifti_map_has_the_source_grid_and_its_lesion_where_the_source_has_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").mkdir()
    nib.save(nib.Nifti1Image(phantom_volume(), oblique_affine()), tmp_path / "data" / "x.nii.gz")
    images, _ = load_dataset(tmp_path / "data", PIPELINE)
    assert images.images.shape[2:] == (40, 36, 34)  # the model's grid
    written = save_maps(
        tmp_path / "maps",
        images.ids,
        images.images,
        map_equal_to_input(images),
        images.grids,
        model="stand-in",
    )
    assert not written.problems
    out = nib.load(tmp_path / "maps" / "00000_x_map.nii.gz")
    values = np.asarray(out.dataobj)
    assert values.shape == SHAPE and values.dtype == np.float32
    np.testing.assert_allclose(out.affine, oblique_affine(), atol=1e-5)
    assert np.abs(peak(values) - LESION).max() <= 1
    assert np.all(values[:, :, 28:] == 0)  # cropped away: the model never saw it
    sidecar = json.loads((tmp_path / "maps" / "00000_x_map.json").read_text())
    assert sidecar["model"] == "stand-in" and sidecar["threshold"] == 2.0
    assert sidecar["flagged"] is True and sidecar["score"] == pytest.approx(values.max(), rel=0.2)
    assert b"score=" in out.header["descrip"].tobytes()


def oblique_series(folder: Path, n_slices: int = 12) -> np.ndarray:
    """A CT series with oblique slices (rows along a tilted axis) and a planted lesion.

    Returns:
        The stored volume, ``(columns, rows, slices)`` in the order of the slice positions.
    """
    rotation = Rotation.from_euler("zx", [25, 10], degrees=True).as_matrix()
    row_dir, col_dir, normal = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    volume = phantom_volume((20, 16, n_slices), lesion=(12, 5, 7))
    spacing, step = (0.8, 1.1), 2.5  # (between rows, between columns), slice step
    for k in range(n_slices):
        position = np.array([-30.0, 20.0, 5.0]) + k * step * normal
        pixels = np.round(volume[:, :, k].T * 200).astype(np.int16)  # (rows, columns)
        path = write_dicom_slice(
            folder / f"slice{(k * 7) % n_slices:03d}.dcm",  # file names out of order
            pixels,
            tuple(position),
            orientation=(*row_dir, *col_dir),
            pixel_spacing=spacing,
            series_uid="1.2.826.0.1.3680043.10.1.7",
            patient_id="P7",
            instance=k + 1,
        )
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1.8"
        ds.save_as(path)
    return volume


def test_dicom_series_map_is_on_the_series_grid_and_a_parametric_map_references_it(
    tmp_path: Path,
) -> None:
    oblique_series(tmp_path / "data" / "series")
    images, _ = load_dataset(tmp_path / "data", PIPELINE[1:])  # resample, resize, pad
    written = save_maps(
        tmp_path / "maps",
        images.ids,
        images.images,
        map_equal_to_input(images),
        images.grids,
        model="stand-in",
        dicom=True,
    )
    assert not written.problems
    nifti = nib.load(tmp_path / "maps" / "00000_series_map.nii.gz")
    values = np.asarray(nifti.dataobj)
    assert values.shape == (20, 16, 12)  # columns, rows, slices: the series as stacked
    assert np.abs(peak(values) - (12, 5, 7)).max() <= 1
    sources = sorted((tmp_path / "data" / "series").iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    first = min(headers, key=lambda h: h.InstanceNumber)  # slice k = 0
    origin_ras = np.diag([-1, -1, 1]) @ np.array(first.ImagePositionPatient, float)
    np.testing.assert_allclose(nifti.affine[:3, 3], origin_ras, atol=1e-4)

    pm_path = tmp_path / "maps" / "00000_series_map.dcm"
    pm = pydicom.dcmread(pm_path)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert pm.FrameOfReferenceUID == "1.2.826.0.1.3680043.10.1.8"
    assert pm.NumberOfFrames == 12 and (pm.Rows, pm.Columns) == (16, 20)
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in pm.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {h.SOPInstanceUID for h in headers}
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    # highdicom's own reader puts the map back into patient space: its peak is the lesion's
    volume = hd.imread(pm_path).get_volume()
    lesion_lps = _world_of_voxel(headers, (12, 5, 7))
    peak_lps = volume.affine @ np.array([*peak(volume.array), 1.0])
    assert np.linalg.norm(peak_lps[:3] - lesion_lps) <= 2.6  # within one voxel (2.5 mm slices)
    assert all(p.exists() for p in sources)  # the sources are untouched


def _world_of_voxel(headers: list, voxel: tuple[int, int, int]) -> np.ndarray:
    """LPS position of (column, row, slice) in a series sorted by InstanceNumber."""
    ordered = sorted(headers, key=lambda h: h.InstanceNumber)
    column, row, k = voxel
    header = ordered[k]
    iop = np.array(header.ImageOrientationPatient, float)
    spacing = np.array(header.PixelSpacing, float)
    origin = np.array(header.ImagePositionPatient, float)
    return origin + iop[:3] * spacing[1] * column + iop[3:] * spacing[0] * row


def test_parametric_map_is_refused_for_a_source_without_frame_of_reference(
    tmp_path: Path,
) -> None:
    for k in range(4):
        write_dicom_slice(tmp_path / "data" / "s" / f"{k}.dcm", np.zeros((8, 8)), (0, 0, 2.0 * k))
    images, _ = load_dataset(tmp_path / "data", [{"resize": {"shape": [8, 8, 8]}}])
    written = save_maps(
        tmp_path / "maps",
        images.ids,
        images.images,
        map_equal_to_input(images),
        images.grids,
        dicom=True,
    )
    assert (tmp_path / "maps" / "00000_s_map.nii.gz").exists()  # the NIfTI is still written
    assert not (tmp_path / "maps" / "00000_s_map.dcm").exists()
    [line] = written.problems
    assert "FrameOfReferenceUID (0020,0052)" in line and line.count(str(images.ids[0])) == 1


def test_picture_map_is_a_float_tiff_and_an_overlay_at_the_pictures_size(tmp_path: Path) -> None:
    picture = np.zeros((50, 70), np.uint8)
    picture[10:40, 5:60] = 100
    picture[30, 20] = 255  # the "lesion"
    (tmp_path / "data").mkdir()
    Image.fromarray(picture).save(tmp_path / "data" / "p.png")
    transforms = [
        {"crop": {"foreground": True, "threshold": 10.0, "margin": 2}},
        {"resize": {"shape": [32, 32], "mode": "area"}},
    ]
    images, _ = load_dataset(tmp_path / "data", transforms)
    save_maps(
        tmp_path / "maps", images.ids, images.images, map_equal_to_input(images), images.grids
    )
    values = tifffile.imread(tmp_path / "maps" / "00000_p_map.tiff")
    assert values.shape == (50, 70) and values.dtype == np.float32
    assert tuple(peak(values)) == (30, 20)
    assert values[0, 0] == 0  # cropped away as background
    overlay = np.asarray(Image.open(tmp_path / "maps" / "00000_p_overlay.png"))
    assert overlay.shape == (50, 70, 3)


def test_map_and_grid_dimensionality_must_agree() -> None:
    from medanomaly.image import SourceGrid

    with pytest.raises(ValueError, match="2-D map"):
        to_source_grid(np.zeros((4, 4)), SourceGrid.of_array((4, 4, 4), np.eye(4)))


def test_parametric_map_never_overwrites_its_source(tmp_path: Path) -> None:
    from medanomaly.outputs.dicom_maps import write_parametric_map

    oblique_series(tmp_path / "series", n_slices=4)
    images, _ = load_dataset(tmp_path, [{"resize": {"shape": [8, 8, 8]}}])
    grid = images.grids[0]
    source = Path(grid.dicom_files[0])
    before = source.read_bytes()
    info = MapInfo(case="series", score=1.0, threshold=0.5, flagged=True, model="m")
    with pytest.raises(ImageReadError, match="overwrite a source"):
        write_parametric_map(source, np.zeros(grid.shape, np.float32), grid, info)
    assert source.read_bytes() == before


@pytest.mark.realdata
def test_brats_map_has_the_shape_and_affine_of_its_source(tmp_path: Path) -> None:
    from conftest import real_data

    source = real_data("brats_3d", "test", "brats_2013_pat0001_1", "Flair_subtrMeanDivStd.nii.gz")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "flair.nii.gz").symlink_to(source)
    transforms = [{"resample": {"spacing": 4.0}}, {"resize": {"shape": [32, 32, 32]}}]
    images, _ = load_dataset(tmp_path / "data", transforms)
    save_maps(
        tmp_path / "maps", images.ids, images.images, map_equal_to_input(images), images.grids
    )
    written, original = nib.load(tmp_path / "maps" / "00000_flair_map.nii.gz"), nib.load(source)
    assert written.shape == original.shape == (240, 240, 155)
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)

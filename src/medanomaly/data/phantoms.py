"""Synthetic head-like phantoms in 2D and 3D for the demo and the tests.

A normal phantom is a skull (bright ellipse/ellipsoid shell), brain tissue inside it and two
ventricles, with random variation of size, position, rotation-free shape and intensity.
An abnormal phantom adds one of: a bright lesion (haemorrhage-like), a dark lesion
(infarct-like) or enlarged ventricles. Each abnormal phantom carries a lesion mask.
Everything is deterministic by seed and scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medanomaly.data.sets import ImageSet

ABNORMALITIES = ("bright", "dark", "enlarged")


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] for each axis."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(grid: list[np.ndarray], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def _phantom(
    shape: tuple[int, ...], rng: np.random.Generator, abnormality: str | None, variation: float
) -> tuple[np.ndarray, np.ndarray]:
    grid = _grid(shape)
    d = len(shape)
    centre = rng.uniform(-0.03, 0.03, d) * variation
    radii = 0.785 + rng.uniform(-0.035, 0.035, d) * variation
    image = np.zeros(shape, dtype=np.float32)
    head = _ellipsoid(grid, centre, radii)
    brain = _ellipsoid(grid, centre, radii * rng.uniform(0.84, 0.87))
    image[head] = rng.uniform(0.85, 0.95)
    image[brain] = rng.uniform(0.42, 0.5)
    vent_radii = radii * rng.uniform(0.12, 0.16, d)
    vent_radii[0] *= 1.8
    enlarged = abnormality == "enlarged"
    if enlarged:
        vent_radii = vent_radii * rng.uniform(1.8, 2.2)
    mask = np.zeros(shape, dtype=bool)
    offset = radii[-1] * 0.25
    for side in (-1.0, 1.0):
        c = centre.copy()
        c[-1] += side * offset
        ventricle = _ellipsoid(grid, c, vent_radii)
        image[ventricle] = rng.uniform(0.18, 0.24)
        if enlarged:
            mask |= ventricle
    lesion_scale = 1.0 if d == 2 else 1.8  # keep the lesion share of the brain similar in 3D
    if abnormality in ("bright", "dark"):
        lesion_centre = centre + rng.uniform(-0.35, 0.35, d) * radii
        lesion_centre[-1] = centre[-1] + rng.choice([-1, 1]) * rng.uniform(0.45, 0.6) * radii[-1]
        lesion = _ellipsoid(grid, lesion_centre, rng.uniform(0.16, 0.24, d) * lesion_scale) & brain
        image[lesion] = (
            rng.uniform(0.75, 0.85) if abnormality == "bright" else rng.uniform(0.02, 0.08)
        )
        mask |= lesion
    image += rng.normal(0.0, 0.02, shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), mask


def make_phantoms(
    n_normal: int,
    n_abnormal: int = 0,
    shape: tuple[int, ...] = (64, 64),
    seed: int = 0,
    variation: float = 1.0,
) -> ImageSet:
    """Make a labelled set of phantoms.

    Args:
        n_normal: Number of normal phantoms (label 0).
        n_abnormal: Number of abnormal phantoms (label 1), cycling through bright lesion,
            dark lesion and enlarged ventricles.
        shape: Spatial shape, 2D ``(H, W)`` or 3D ``(X, Y, Z)``.
        seed: Seed of every random choice.
        variation: Scale of the normal anatomical variation (head position and size);
            0 gives identical anatomy up to intensity and noise.

    Returns:
        An :class:`ImageSet` with images ``(N, 1, *shape)`` in [0, 1], labels and lesion
        masks (all-false for normal phantoms).
    """
    if len(shape) not in (2, 3):
        raise ValueError(f"phantom shape must be 2D or 3D, got {shape}")
    rng = np.random.default_rng(seed)
    kinds = [None] * n_normal + [ABNORMALITIES[i % 3] for i in range(n_abnormal)]
    images, masks, ids = [], [], []
    for i, kind in enumerate(kinds):
        image, mask = _phantom(tuple(shape), rng, kind, variation)
        images.append(image[None])
        masks.append(mask)
        ids.append(f"phantom_{i:04d}_{kind or 'normal'}")
    return ImageSet(
        images=np.stack(images),
        labels=np.array([0] * n_normal + [1] * n_abnormal),
        ids=ids,
        masks=np.stack(masks),
    )


def write_phantom_scans(
    folder: str | Path,
    n_train: int = 60,
    n_test: int = 12,
    shape: tuple[int, int, int] = (32, 32, 32),
    spacing_mm: float = 4.0,
    seed: int = 0,
) -> dict[str, Path]:
    """Write phantom volumes as NIfTI scans laid out as a user's folder would be.

    ``train/`` holds normal scans, ``test/`` normal and abnormal ones (with their lesion
    masks in ``test_masks/``), and ``test.csv`` is a manifest ``path,label,mask`` of the test
    scans, so that ``fit``, ``score`` and ``evaluate`` run on files, not arrays.

    Args:
        folder: Where to write (created).
        n_train: Normal training scans.
        n_test: Test scans, half of them abnormal.
        shape: Voxels per axis.
        spacing_mm: Isotropic voxel size written into each file's affine.
        seed: Seed of the phantoms.

    Returns:
        ``{"train": ..., "test": ..., "manifest": ...}``.
    """
    import nibabel as nib

    folder = Path(folder)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    parts = {
        "train": make_phantoms(n_train, 0, shape, seed=seed),
        "test": make_phantoms(n_test - n_test // 2, n_test // 2, shape, seed=seed + 1),
    }
    rows = ["path,label,mask"]
    for part, images in parts.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        for image, mask, label, case in zip(
            images.images, images.masks, images.labels, images.ids, strict=True
        ):
            nib.save(nib.Nifti1Image(image[0], affine), folder / part / f"{case}.nii.gz")
            if part == "test":
                (folder / "test_masks").mkdir(exist_ok=True)
                mask_file = folder / "test_masks" / f"{case}.nii.gz"
                nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_file)
                rows.append(f"test/{case}.nii.gz,{int(label)},test_masks/{case}.nii.gz")
    manifest = folder / "test.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return {"train": folder / "train", "test": folder / "test", "manifest": manifest}


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_dicom_slice(
    path: str | Path,
    pixels: np.ndarray,
    position: tuple[float, float, float],
    *,
    orientation: tuple[float, ...] = AXIAL,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    thickness: float = 2.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str = "1.2.3.1",
    description: str = "phantom",
    patient_id: str | None = None,
    instance: int = 1,
    window: tuple[float, float] | None = None,
    study_uid: str = "1.2.3.4",
    frame_of_reference_uid: str | None = None,
) -> Path:
    """Write one uncompressed CT slice (stored int16 ``pixels``) as a DICOM file.

    Used to make synthetic DICOM series for tests and demos: real-world value =
    ``pixels * slope + intercept`` (Hounsfield units with the defaults).

    Args:
        path: The file to write (its folder is created).
        pixels: Stored values ``(rows, columns)``.
        position: ImagePositionPatient of the first pixel (mm, LPS).
        orientation: ImageOrientationPatient (row and column direction cosines).
        pixel_spacing: PixelSpacing (between rows, between columns) in mm.
        thickness: SliceThickness in mm (readers must not trust it for spacing).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        series_uid: SeriesInstanceUID.
        description: SeriesDescription.
        patient_id: PatientID, if any.
        instance: InstanceNumber.
        window: (WindowCenter, WindowWidth), if any.
        study_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID, if any (maps on the series need one).

    Returns:
        ``path`` as a :class:`Path`.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    if frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.asarray(pixels).astype("<i2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(
    folder: str | Path,
    volume: np.ndarray,
    *,
    series_uid: str,
    study_uid: str,
    patient_id: str = "PHANTOM",
    step: float = 2.0,
) -> list[Path]:
    """Write a volume of Hounsfield units ``(slices, rows, columns)`` as an axial CT series.

    Every slice has the same study, series and frame-of-reference UIDs (the frame's is
    derived from the series'), so an archive files them as one series and maps can be
    placed on it.

    Returns:
        The files, one per slice (``slice_00000.dcm``, ...).
    """
    frame = f"{series_uid}.1"
    return [
        write_dicom_slice(
            Path(folder) / f"slice_{k:05d}.dcm",
            np.round(plane + 1024.0).astype(np.int16),
            (0.0, 0.0, k * step),
            series_uid=series_uid,
            study_uid=study_uid,
            patient_id=patient_id,
            instance=k + 1,
            frame_of_reference_uid=frame,
        )
        for k, plane in enumerate(np.asarray(volume))
    ]

"""MRI-specific steps: N4 bias-field correction, histogram matching (SimpleITK), brain masks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the customary SimpleITK alias

from medanomaly.errors import ConfigError
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    FOREGROUND_KEY,
    Transform,
    as_bool,
    as_float,
    as_int,
    as_sequence,
    channel_of,
    check_image,
    config_error,
    get_foreground,
    per_slice,
    slice_axis,
    with_values,
)
from medanomaly.transforms.mask import brain_masks


def _to_sitk(values: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """Wrap a spatial array so that SimpleITK index ``(i, j, k)`` is ``values[i, j, k]``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.T, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    return image


def _from_sitk(image: sitk.Image) -> np.ndarray:
    """Inverse of :func:`_to_sitk`."""
    return sitk.GetArrayFromImage(image).T


class N4BiasCorrection(Transform):
    """Remove a smooth multiplicative bias field from MRI with SimpleITK N4 (Lin et al. 2021).

    The field is fitted on a ``shrink_factor``-times smaller copy (fast) inside an Otsu mask,
    or inside ``meta["foreground"]`` (else everywhere) when ``mask_otsu`` is false, and the
    full-resolution image is divided by it. Each channel is corrected on its own. Values
    should be positive inside the mask (raw MRI intensities; run it before normalisation).

    Args:
        shrink_factor: Downsampling factor for the fit (1 = none).
        iterations: Maximum iterations per fitting level (its length is the number of levels).
        mask_otsu: Fit inside an Otsu-threshold mask of the image.
    """

    name = "n4_bias_correction"

    def __init__(
        self,
        shrink_factor: int = 2,
        iterations: Sequence[int] = (50, 50, 30, 20),
        mask_otsu: bool = True,
    ) -> None:
        self.shrink_factor = as_int(self.name, "shrink_factor", shrink_factor, minimum=1)
        levels = as_sequence(self.name, "iterations", iterations)
        if not levels:
            raise config_error(self.name, "iterations", "needs at least one level")
        self.iterations = tuple(as_int(self.name, "iterations", v, minimum=1) for v in levels)
        self.mask_otsu = as_bool(self.name, "mask_otsu", mask_otsu)

    def _mask(self, image: sitk.Image, foreground: np.ndarray | None) -> sitk.Image:
        if self.mask_otsu:
            return sitk.OtsuThreshold(image, 0, 1, 200)
        values = np.ones(image.GetSize()[::-1], np.uint8) if foreground is None else foreground.T
        mask = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.uint8))
        mask.CopyInformation(image)
        return mask

    def _correct(self, values: np.ndarray, image: MedicalImage) -> np.ndarray:
        full = _to_sitk(values, image.spacing)
        mask = self._mask(full, get_foreground(self.name, image))
        factors = [min(self.shrink_factor, n) for n in full.GetSize()]
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(self.iterations))
        corrector.Execute(sitk.Shrink(full, factors), sitk.Shrink(mask, factors))
        log_bias = corrector.GetLogBiasFieldAsImage(full)
        return _from_sitk(full / sitk.Exp(log_bias))

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the bias-corrected image."""
        check_image(self.name, image)
        return with_values(image, np.stack([self._correct(c, image) for c in image.array]))


def _read_reference(path: Path) -> np.ndarray:
    """Read the values of a reference image from ``.npy`` or NIfTI (``.nii``/``.nii.gz``)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if not path.is_file():
        raise ConfigError(f"transform 'histogram_match': reference file {path} does not exist")
    if suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix.lower() in (".nii", ".nii.gz"):
        import nibabel

        return np.asarray(nibabel.load(str(path)).get_fdata(dtype=np.float32))
    raise ConfigError(
        f"transform 'histogram_match': reference {path} must be .npy, .nii or .nii.gz"
    )


def _flat_sitk(values: np.ndarray) -> sitk.Image:
    """Return ``values`` as a 1-row 2D SimpleITK image (matching only needs the histogram)."""
    return sitk.GetImageFromArray(np.asarray(values, dtype=np.float32).reshape(1, -1))


class HistogramMatch(Transform):
    """Match the intensity histogram to a reference image (Kobayashi et al. 2020) with SimpleITK.

    The reference is a path (``.npy``, ``.nii``, ``.nii.gz``; read once, at construction) or
    an array; only its values matter, so its shape and dimensionality are free. With an array
    ``to_config`` reports ``"array:sha1:<digest>"``, which identifies it for caching but can
    not be rebuilt from a config; use a file in configs. Each channel is matched on its own.

    Args:
        reference: Path of the reference image, or its values.
        histogram_levels: Number of histogram bins.
        match_points: Number of quantiles matched between the two histograms.
        threshold_at_mean: Ignore values below the mean (the background) in both images.
    """

    name = "histogram_match"

    def __init__(
        self,
        reference: str | Path | np.ndarray,
        histogram_levels: int = 256,
        match_points: int = 7,
        threshold_at_mean: bool = True,
    ) -> None:
        if isinstance(reference, np.ndarray):
            values = np.asarray(reference, dtype=np.float32)
            digest = hashlib.sha1(values.tobytes()).hexdigest()
            self.reference: str = f"array:sha1:{digest}"
        elif isinstance(reference, (str, Path)):
            values = _read_reference(Path(reference))
            self.reference = str(reference)
        else:
            raise config_error(
                self.name,
                "reference",
                f"must be a file path or an array (got {type(reference).__name__})",
            )
        if values.size < 2 or not np.isfinite(values).all():
            raise config_error(self.name, "reference", "must hold at least two finite values")
        self._reference = _flat_sitk(values)
        self.histogram_levels = as_int(self.name, "histogram_levels", histogram_levels, minimum=2)
        self.match_points = as_int(self.name, "match_points", match_points, minimum=1)
        self.threshold_at_mean = as_bool(self.name, "threshold_at_mean", threshold_at_mean)

    def _match(self, values: np.ndarray) -> np.ndarray:
        matcher = sitk.HistogramMatchingImageFilter()
        matcher.SetNumberOfHistogramLevels(self.histogram_levels)
        matcher.SetNumberOfMatchPoints(self.match_points)
        matcher.SetThresholdAtMeanIntensity(self.threshold_at_mean)
        matched = matcher.Execute(_flat_sitk(values), self._reference)
        return sitk.GetArrayFromImage(matched).reshape(values.shape)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the histogram-matched image."""
        check_image(self.name, image)
        return with_values(image, np.stack([self._match(c) for c in image.array]))


class BrainMask(Transform):
    """Morphological brain mask of head MRI (T1, T2, FLAIR) in ``meta["foreground"]``.

    Wraps :func:`medanomaly.transforms.mask.brain_masks` (no network or atlas: a dark skull
    band separates scalp from brain). A 3D volume is cut into slices along ``axis`` (the
    axial axis; 2 for RAS-ordered arrays) which share one intensity threshold and are kept
    consistent from the middle outwards; a 2D image is one slice. The radii are in
    millimetres, converted with the in-plane spacing. Run it on raw intensities, before
    normalisation; with ``strip`` the voxels outside the brain are set to ``background``
    (skull stripping), so a later normalisation sees brain only.

    Args:
        channel: Channel whose intensities define the mask (e.g. FLAIR).
        axis: Spatial axis of the slices of a 3D volume.
        erode_mm: Scalp margin removed from the head.
        opening_mm: Radius that separates brain from scalp.
        closing_mm: Radius that smooths the brain outline.
        grow_mm: Largest outward step of the outline between neighbouring slices (3D).
        strip: Set every channel outside the brain to ``background``.
        background: The value outside the brain when stripping.
    """

    name = "brain_mask"

    def __init__(
        self,
        channel: int = 0,
        axis: int = 2,
        erode_mm: float = 8.0,
        opening_mm: float = 4.0,
        closing_mm: float = 6.0,
        grow_mm: float = 8.0,
        strip: bool = False,
        background: float = 0.0,
    ) -> None:
        self.channel = as_int(self.name, "channel", channel, minimum=0)
        self.axis = as_int(self.name, "axis", axis, minimum=0)
        self.erode_mm = as_float(self.name, "erode_mm", erode_mm, positive=True)
        self.opening_mm = as_float(self.name, "opening_mm", opening_mm, positive=True)
        self.closing_mm = as_float(self.name, "closing_mm", closing_mm, positive=True)
        self.grow_mm = as_float(self.name, "grow_mm", grow_mm, positive=True)
        self.strip = as_bool(self.name, "strip", strip)
        self.background = as_float(self.name, "background", background)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the image with ``meta["foreground"]`` = brain (and stripped if asked)."""
        values = channel_of(self.name, image, self.channel)
        brain = self._mask(values, image.spacing, slice_axis(self.name, image, self.axis))
        array = image.array
        if self.strip:
            array = np.where(brain[None], array, np.asarray(self.background, array.dtype))
        return image.with_array(array, meta={**image.meta, FOREGROUND_KEY: brain})

    def _mask(self, values: np.ndarray, spacing: Sequence[float], axis: int | None) -> np.ndarray:
        in_plane = [s for i, s in enumerate(spacing) if i != axis]
        mm = float(np.mean(in_plane)) or 1.0

        def pixels(radius: float) -> int:
            return max(1, round(radius / mm))

        def masks(slices: np.ndarray) -> np.ndarray:
            return brain_masks(
                slices,
                erode=pixels(self.erode_mm),
                opening=pixels(self.opening_mm),
                closing=pixels(self.closing_mm),
                grow=pixels(self.grow_mm) if axis is not None else None,
            )

        return per_slice(values, axis, masks)

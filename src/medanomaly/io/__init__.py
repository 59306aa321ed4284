"""Medical image readers: DICOM, NIfTI, PNG/JPEG/TIFF and NumPy, all to :class:`MedicalImage`.

:func:`read_image` picks the reader from the path (a folder is a DICOM series), converts
colour pictures to gray unless asked otherwise, and refuses images that are empty, have the
wrong number of dimensions, or hold NaN/inf values.

May import: ``image``, ``errors``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medanomaly.errors import ImageReadError, InvalidImageError, MedanomalyError
from medanomaly.image import MedicalImage
from medanomaly.io.dicom import is_dicom_file, list_dicom_series, read_dicom
from medanomaly.io.inspect import inspect_path
from medanomaly.io.nifti import read_nifti
from medanomaly.io.raster import read_array, read_picture

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "image_suffix", "inspect_path", "list_dicom_series", "read_image"]

_READERS: dict[str, Callable[[Path], MedicalImage]] = {
    ".nii": read_nifti,
    ".nii.gz": read_nifti,
    ".png": read_picture,
    ".jpg": read_picture,
    ".jpeg": read_picture,
    ".tif": read_picture,
    ".tiff": read_picture,
    ".npy": read_array,
    ".npz": read_array,
}

#: File suffixes :func:`read_image` reads (lower case). A DICOM file is also recognised by its
#: content whatever its name, and a folder is read as a DICOM series.
IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", *_READERS)

#: ITU-R BT.601 luma weights, as used by Pillow's ``convert('L')``.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_suffix(path: str | Path) -> str:
    """Return the lower-case suffix that selects the reader (``'.nii.gz'`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def read_image(
    path: str | Path,
    *,
    series_uid: str | None = None,
    keep_channels: bool = False,
    channel: int | None = None,
) -> MedicalImage:
    """Read one image or volume from a file or a DICOM series folder.

    Args:
        path: A DICOM series folder, a DICOM file, or a file whose suffix is in
            :data:`IMAGE_SUFFIXES`.
        series_uid: For a DICOM folder holding several series, the ``SeriesInstanceUID`` to read.
        keep_channels: Keep every channel of a colour / multichannel picture instead of
            converting it to gray (RGB/RGBA by luminance, gray+alpha by dropping alpha, other
            multi-sample pictures by the channel mean). NIfTI 4D and NumPy 4D data always keep
            their channels.
        channel: Keep only this channel (negative counts from the end); overrides the gray
            conversion.

    Returns:
        A float32, channel-first :class:`MedicalImage` (3D volumes in RAS+ orientation).

    Raises:
        ImageReadError: The path is missing, unsupported or cannot be decoded.
        InvalidImageError: The image is empty, has the wrong dimensionality or holds NaN/inf.
        ValueError: Both ``keep_channels`` and ``channel`` are given, or ``series_uid`` is
            given for a non-DICOM file.
    """
    if keep_channels and channel is not None:
        raise ValueError("give either keep_channels=True or channel=..., not both")
    path = Path(path)
    if series_uid is not None and path.is_file() and image_suffix(path) in _READERS:
        raise ValueError(f"series_uid applies to DICOM only, not to {path}")
    try:
        image = _dispatch(path, series_uid)
    except MedanomalyError:
        raise
    except Exception as exc:  # a library failed on odd input: name the file, keep the cause
        log.debug("reading %s failed", path, exc_info=True)
        raise ImageReadError(path, f"cannot read ({type(exc).__name__}: {exc})") from exc
    image = _choose_channels(image, path, keep_channels=keep_channels, channel=channel)
    return _validated(image, path)


def _dispatch(path: Path, series_uid: str | None) -> MedicalImage:
    """Call the reader that fits ``path``."""
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if path.is_dir():
        return read_dicom(path, series_uid=series_uid)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    suffix = image_suffix(path)
    if suffix == ".dcm" or (suffix not in _READERS and is_dicom_file(path, force=True)):
        return read_dicom(path, series_uid=series_uid)
    reader = _READERS.get(suffix)
    if reader is None:
        raise ImageReadError(
            path,
            f"unsupported file type '{suffix or '(no suffix)'}'; supported: "
            f"{', '.join(IMAGE_SUFFIXES)}, DICOM files of any name and DICOM "
            "series folders",
        )
    return reader(path)


def _choose_channels(
    image: MedicalImage, path: Path, *, keep_channels: bool, channel: int | None
) -> MedicalImage:
    """Pick one channel, keep them all, or merge colour to gray."""
    n_channels = image.array.shape[0]
    if channel is not None:
        if not -n_channels <= channel < n_channels:
            raise InvalidImageError(
                path, f"channel={channel} is out of range: the image has {n_channels} channel(s)"
            )
        index = channel % n_channels
        meta = {**image.meta, "channel": index, "channel_kind": "gray"}
        return image.with_array(image.array[index : index + 1], meta=meta)
    kind = image.meta.get("channel_kind", "gray")
    if keep_channels or n_channels == 1 or kind == "volumes":
        return image
    gray = _to_gray(image.array, kind)
    meta = {**image.meta, "channel_kind": "gray", "converted_from": kind}
    return image.with_array(gray, meta=meta)


def _to_gray(array: np.ndarray, kind: str) -> np.ndarray:
    """Merge channels to one gray channel: luminance for RGB(A), first for gray+alpha, else mean."""
    if kind in {"rgb", "rgba"} and array.shape[0] >= 3:
        return np.tensordot(_LUMA, array[:3], axes=1)[None].astype(np.float32)
    if kind == "gray+alpha":
        return array[:1]
    return array.mean(axis=0, keepdims=True, dtype=np.float32)


def _validated(image: MedicalImage, path: Path) -> MedicalImage:
    """Check shape and values; return the image with a contiguous float32 array."""
    array = np.ascontiguousarray(image.array, dtype=np.float32)
    if array.ndim not in (3, 4):
        raise InvalidImageError(
            path, f"expected a 2D or 3D image with a channel axis, got shape {array.shape}"
        )
    if array.size == 0:
        raise InvalidImageError(path, f"image is empty (shape {array.shape})")
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(array.size - finite.sum()) - n_nan
        raise InvalidImageError(
            path,
            f"image holds {n_nan} NaN and {n_inf} infinite value(s) "
            f"among {array.size} (after conversion to float32)",
        )
    return image.with_array(array)

"""Readers for 2D pictures (PNG, JPEG, TIFF) and NumPy arrays (.npy, .npz).

These readers return every channel of the file; ``meta['channel_kind']`` says what the
channels are (``'gray'``, ``'rgb'``, ``'rgba'``, ``'gray+alpha'``, ``'samples'`` or
``'volumes'``) so that :func:`medanomaly.io.read_image` can turn colour into gray.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from medanomaly.errors import ImageReadError, InvalidImageError
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage, SourceGrid

#: PIL modes whose pixels are one gray value.
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
#: PIL modes read as they are, with the channel kind they give.
_COLOR_MODES = {"RGB": "rgb", "RGBA": "rgba", "LA": "gray+alpha"}
#: NPZ keys tried, in order, when the archive holds several arrays.
_NPZ_KEYS = ("image", "arr_0")
#: Spatial dimensions of an array file -> (spacing, channel axis added?).
_ARRAY_LAYOUTS = {2: ((1.0, 1.0), True), 3: ((1.0, 1.0, 1.0), True), 4: ((1.0, 1.0, 1.0), False)}


def read_picture(path: Path) -> MedicalImage:
    """Read a PNG, JPEG or TIFF file as a 2D image with all its channels.

    Args:
        path: The picture file.

    Returns:
        A ``(C, H, W)`` image; spacing ``(1.0, 1.0)`` unless a TIFF gives a metric resolution.

    Raises:
        ImageReadError: The file cannot be decoded.
        InvalidImageError: It holds a stack of pages rather than one 2D image.
    """
    if path.suffix.lower() in {".tif", ".tiff"}:
        array, kind, spacing, problems = _read_tiff(path)
    else:
        array, kind, problems = _read_with_pil(path)
        spacing = (1.0, 1.0)
    meta = {
        "format": path.suffix.lower().lstrip("."),
        "channel_kind": kind,
        "file_shape": tuple(int(n) for n in array.shape[1:]),
        SOURCE_GRID_KEY: SourceGrid.of_array(array.shape[1:]),
    }
    return MedicalImage(
        array=array, spacing=spacing, source=str(path), meta=meta, problems=problems
    )


def _read_with_pil(path: Path) -> tuple[np.ndarray, str, list[str]]:
    """Decode with Pillow; return ``(C, H, W)`` pixels, their channel kind and problems."""
    problems = []
    try:
        with Image.open(path) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                problems.append(f"only the first of {img.n_frames} frames was read")
            img, kind = _normalise_mode(img)
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot decode picture: {exc}") from exc
    pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return pixels.astype(np.float32), kind, problems


def _normalise_mode(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert palette and exotic PIL modes to gray, RGB or RGBA."""
    if img.mode in _GRAY_MODES:
        return img, "gray"
    if img.mode in _COLOR_MODES:
        return img, _COLOR_MODES[img.mode]
    has_alpha = img.mode in {"PA", "RGBa", "La"} or "transparency" in img.info
    target = "RGBA" if has_alpha else "RGB"
    return img.convert(target), _COLOR_MODES[target]


def _read_tiff(path: Path) -> tuple[np.ndarray, str, tuple[float, float], list[str]]:
    """Decode a TIFF with tifffile (Pillow when tifffile lacks the codec)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pixels, axes = series.asarray(), series.axes
            page = tif.pages[0]
            kind = _tiff_kind(page, axes)
            spacing = _tiff_spacing(page)
    except Exception as exc:
        try:
            pixels, kind, problems = _read_with_pil(path)
        except ImageReadError:
            raise ImageReadError(path, f"cannot decode TIFF: {exc}") from exc
        return pixels, kind, (1.0, 1.0), problems
    return _tiff_channels_first(path, pixels, axes), kind, spacing, []


def _tiff_channels_first(path: Path, pixels: np.ndarray, axes: str) -> np.ndarray:
    """Bring tifffile's array to ``(C, H, W)``; only Y, X and sample/channel axes are allowed."""
    keep = [
        i for i, (ax, n) in enumerate(zip(axes, pixels.shape, strict=True)) if n > 1 or ax in "YX"
    ]
    pixels = pixels.reshape([pixels.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if set(axes) - set("YXSC") or len(axes) > 3 or "Y" not in axes or "X" not in axes:
        raise InvalidImageError(
            path,
            f"TIFF holds a stack (axes '{axes}', shape "
            f"{pixels.shape}); only single 2D images are read, store "
            "volumes as NIfTI",
        )
    channel_axes = [i for i, ax in enumerate(axes) if ax in "SC"]
    if not channel_axes:
        return pixels[None].astype(np.float32)
    return np.moveaxis(pixels, channel_axes[0], 0).astype(np.float32)


def _tiff_kind(page: tifffile.TiffPage, axes: str) -> str:
    """Channel kind from the photometric interpretation and extra samples."""
    samples = page.samplesperpixel
    if "S" not in axes or samples == 1:
        return "gray"
    if page.photometric == tifffile.PHOTOMETRIC.RGB and samples in (3, 4):
        return "rgb" if samples == 3 else "rgba"
    if samples == 2 and len(page.extrasamples) == 1:
        return "gray+alpha"
    return "samples"


def _tiff_spacing(page: tifffile.TiffPage) -> tuple[float, float]:
    """Pixel spacing in mm when the TIFF resolution is metric, else ``(1.0, 1.0)``."""
    unit = page.tags.get("ResolutionUnit")
    if unit is None or unit.value != tifffile.RESUNIT.CENTIMETER:
        return (1.0, 1.0)
    spacing = []
    for name in ("YResolution", "XResolution"):
        numerator, denominator = page.tags[name].value
        if numerator <= 0 or denominator <= 0:
            return (1.0, 1.0)
        spacing.append(10.0 * denominator / numerator)
    return spacing[0], spacing[1]


def read_array(path: Path) -> MedicalImage:
    """Read a ``.npy`` or ``.npz`` file.

    Layout: a 2D array ``(H, W)`` becomes ``(1, H, W)``; a 3D array ``(X, Y, Z)`` becomes
    ``(1, X, Y, Z)`` and is taken to be RAS+ already with 1 mm voxels (identity affine); a 4D
    array is channel-first ``(C, X, Y, Z)`` as it is. An ``.npz`` must hold one array or an
    array named ``image`` or ``arr_0``.

    Args:
        path: The array file.

    Returns:
        The image; spacing is 1.0 mm per axis (array files carry no geometry).

    Raises:
        ImageReadError: The file cannot be loaded or the archive key is ambiguous.
        InvalidImageError: The array is not numeric or not 2D to 4D.
    """
    array, key = _load_array(path)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(
        array
    ):
        raise InvalidImageError(path, f"array dtype {array.dtype} is not a real number type")
    layout = _ARRAY_LAYOUTS.get(array.ndim)
    if layout is None:
        raise InvalidImageError(
            path,
            f"array has {array.ndim} dimensions (shape {array.shape}); "
            "expected 2D (H, W), 3D (X, Y, Z) or 4D (C, X, Y, Z)",
        )
    spacing, add_channel = layout
    array = array.astype(np.float32)
    if add_channel:
        array = array[None]
    meta = {
        "format": path.suffix.lower().lstrip("."),
        "channel_kind": "volumes" if array.shape[0] > 1 else "gray",
    }
    if key is not None:
        meta["npz_key"] = key
    if len(spacing) == 3:
        meta["geometry"] = "none in file: identity affine, assumed RAS+ with 1 mm voxels"
    affine = np.eye(4) if len(spacing) == 3 else None
    meta["file_shape"] = tuple(int(n) for n in array.shape[1:])
    meta[SOURCE_GRID_KEY] = SourceGrid.of_array(array.shape[1:], affine)
    return MedicalImage(array=array, spacing=spacing, affine=affine, source=str(path), meta=meta)


def _load_array(path: Path) -> tuple[np.ndarray, str | None]:
    """Load the array of a .npy file or pick the image array of a .npz archive."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded, None
        with loaded:
            key = _npz_key(path, list(loaded.files))
            return loaded[key], key
    except ImageReadError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ImageReadError(path, f"cannot load NumPy file: {exc}") from exc


def _npz_key(path: Path, keys: list[str]) -> str:
    """Choose the archive member that holds the image."""
    if len(keys) == 1:
        return keys[0]
    for key in _NPZ_KEYS:
        if key in keys:
            return key
    if not keys:
        raise InvalidImageError(path, "the .npz archive is empty")
    raise ImageReadError(
        path,
        f".npz holds several arrays ({', '.join(keys)}) and none is "
        f"named {' or '.join(_NPZ_KEYS)}; save the image under 'image'",
    )

"""Shared plumbing of the transforms: base classes, argument checks, geometry bookkeeping.

Everything here is private to :mod:`medanomaly.transforms`. The public names are re-exported
from the package ``__init__``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor

from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage

FOREGROUND_KEY = "foreground"
"""``image.meta`` key of the bool foreground mask (spatial shape) that transforms keep in step."""
LESION_KEY = "lesion"
"""``image.meta`` key of a ground-truth lesion mask (from a manifest's ``mask`` column)."""
MASK_KEYS = (FOREGROUND_KEY, LESION_KEY)
"""Every bool mask in ``image.meta`` that geometric transforms move with the image."""

# A geometric operation: (tensor, is_mask) -> transformed tensor. It is run once on the image and,
# when the image has a foreground mask, once more on the mask with nearest-neighbour sampling.
GeometricOp = Callable[[torch.Tensor, bool], torch.Tensor]


class Transform:
    """Base class of every transform.

    A subclass sets :attr:`name` (its YAML key), stores each constructor argument under an
    attribute of the same name (already validated and normalised) and implements
    :meth:`__call__`. :meth:`to_config` is then derived from the constructor signature.
    """

    name: ClassVar[str] = ""
    is_random: bool = False
    """True when the output depends on a random draw (not cacheable)."""

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the transformed image (the input is never modified in place)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, dict[str, Any]]:
        """Return ``{name: {argument: value}}`` with every argument, JSON/YAML serialisable."""
        params = inspect.signature(type(self).__init__).parameters
        args = {key: jsonable(getattr(self, key)) for key in params if key != "self"}
        return {self.name: args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config()[self.name].items())
        return f"{type(self).__name__}({args})"


class RandomTransform(Transform):
    """Base class of transforms that draw random numbers from their own seedable RNG.

    Args:
        seed: Seed of the transform's RNG; ``None`` draws fresh entropy.
    """

    is_random: bool = True

    def __init__(self, seed: int | None = None) -> None:
        self.seed = as_seed(self.name, "seed", seed)
        self._rng = np.random.RandomState(self.seed)

    def set_random_state(self, seed: int | None) -> RandomTransform:
        """Reset the RNG to ``seed`` (the configured ``seed`` argument is left as it was).

        Returns:
            The transform itself, so that calls can be chained.
        """
        self._rng = np.random.RandomState(as_seed(self.name, "seed", seed))
        self._rng_changed()
        return self

    def _rng_changed(self) -> None:
        """Hook for subclasses that hand ``self._rng`` to MONAI transforms they hold."""


# ----------------------------------------------------------------------------- argument checks


def config_error(name: str, arg: str, problem: str) -> ConfigError:
    """Build the ConfigError for a bad argument ``arg`` of transform ``name``."""
    return ConfigError(f"transform {name!r}: argument {arg!r} {problem}")


def as_float(name: str, arg: str, value: Any, *, positive: bool = False) -> float:
    """Return ``value`` as a finite float, else raise ConfigError naming the transform/argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise config_error(name, arg, f"must be a number (got {value!r})")
    number = float(value)
    if not math.isfinite(number):
        raise config_error(name, arg, f"must be finite (got {value!r})")
    if positive and number <= 0:
        raise config_error(name, arg, f"must be > 0 (got {value!r})")
    return number


def as_optional_float(name: str, arg: str, value: Any) -> float | None:
    """Like :func:`as_float` but ``None`` passes through."""
    return None if value is None else as_float(name, arg, value)


def as_int(name: str, arg: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int (no bools, no fractions), optionally ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise config_error(name, arg, f"must be an integer (got {value!r})")
    if minimum is not None and value < minimum:
        raise config_error(name, arg, f"must be >= {minimum} (got {value!r})")
    return int(value)


def as_bool(name: str, arg: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ConfigError."""
    if not isinstance(value, (bool, np.bool_)):
        raise config_error(name, arg, f"must be true or false (got {value!r})")
    return bool(value)


def as_probability(name: str, arg: str, value: Any) -> float:
    """Return ``value`` as a float in [0, 1]."""
    prob = as_float(name, arg, value)
    if not 0.0 <= prob <= 1.0:
        raise config_error(name, arg, f"must be between 0 and 1 (got {value!r})")
    return prob


def as_seed(name: str, arg: str, value: Any) -> int | None:
    """Return ``value`` as a non-negative int seed, or ``None``."""
    return None if value is None else as_int(name, arg, value, minimum=0)


def as_sequence(name: str, arg: str, value: Any) -> list[Any]:
    """Return ``value`` (a list or tuple) as a list, else raise ConfigError."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise config_error(name, arg, f"must be a list (got {value!r})")
    return list(value)


def as_range(name: str, arg: str, value: Any) -> tuple[float, float]:
    """Return ``value`` as an increasing pair ``(low, high)`` of floats."""
    items = as_sequence(name, arg, value)
    if len(items) != 2:
        raise config_error(name, arg, f"must be a pair [low, high] (got {value!r})")
    low, high = (as_float(name, arg, v) for v in items)
    if low >= high:
        raise config_error(name, arg, f"must have low < high (got {value!r})")
    return low, high


def as_shape(name: str, arg: str, value: Any) -> tuple[int, ...]:
    """Return ``value`` as a 2- or 3-element tuple of positive ints."""
    items = as_sequence(name, arg, value)
    if len(items) not in (2, 3):
        raise config_error(name, arg, f"must have 2 (2D) or 3 (3D) sizes (got {value!r})")
    return tuple(as_int(name, arg, v, minimum=1) for v in items)


def as_axes(name: str, arg: str, value: Any) -> tuple[int, ...]:
    """Return ``value`` (an int or a list of ints) as a tuple of distinct spatial axes 0..2."""
    items = [value] if isinstance(value, (int, np.integer)) else as_sequence(name, arg, value)
    axes = tuple(as_int(name, arg, v, minimum=0) for v in items)
    if not axes or len(set(axes)) != len(axes) or max(axes) > 2:
        raise config_error(
            name, arg, f"must be distinct spatial axes 0, 1 or 2, channel excluded (got {value!r})"
        )
    return axes


def as_choice(name: str, arg: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError listing them."""
    if value not in choices:
        raise config_error(name, arg, f"must be one of {', '.join(choices)} (got {value!r})")
    return str(value)


def jsonable(value: Any) -> Any:
    """Convert tuples, numpy scalars/arrays and paths into plain JSON/YAML values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- image checks


def source_of(image: MedicalImage) -> str:
    """Return the name used for ``image`` in error messages."""
    return image.source or "<in-memory image>"


def check_image(name: str, image: MedicalImage) -> None:
    """Raise InvalidImageError unless ``image.array`` is channel-first 2D or 3D."""
    array = image.array
    if not isinstance(array, np.ndarray) or array.ndim not in (3, 4):
        shape = getattr(array, "shape", type(array).__name__)
        raise InvalidImageError(
            source_of(image),
            f"{name}: expected a channel-first (C, H, W) or (C, X, Y, Z) array, got {shape}",
        )


def check_length(name: str, image: MedicalImage, arg: str, values: Sequence[Any]) -> None:
    """Raise InvalidImageError if ``values`` has not one entry per spatial axis of ``image``."""
    dims = image.spatial_dims
    if len(values) != dims:
        raise InvalidImageError(
            source_of(image),
            f"{name}: {arg} has {len(values)} values but the image is {dims}D "
            f"(spatial shape {image.spatial_shape})",
        )


def check_axes(name: str, image: MedicalImage, axes: Sequence[int]) -> None:
    """Raise InvalidImageError if an axis in ``axes`` does not exist in ``image``."""
    if max(axes) >= image.spatial_dims:
        raise InvalidImageError(
            source_of(image),
            f"{name}: axes {list(axes)} do not fit a {image.spatial_dims}D image "
            f"(spatial axes are 0..{image.spatial_dims - 1})",
        )


def channel_of(name: str, image: MedicalImage, channel: int) -> np.ndarray:
    """The values of one channel of ``image``; InvalidImageError if there is no such channel."""
    check_image(name, image)
    if channel >= image.array.shape[0]:
        raise InvalidImageError(
            source_of(image),
            f"{name}: channel {channel} does not exist ({image.array.shape[0]} channel(s))",
        )
    return image.array[channel]


def slice_axis(name: str, image: MedicalImage, axis: int) -> int | None:
    """The axis a 3D image is cut into 2D slices along (``None`` for a 2D image)."""
    if image.spatial_dims == 2:
        return None
    if axis > 2:
        raise config_error(name, "axis", f"must be 0, 1 or 2 (got {axis})")
    return axis


def per_slice(
    values: np.ndarray, axis: int | None, function: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply ``function`` (slices ``(n, H, W)`` -> masks alike) to a 2D or 3D array.

    A 2D array is one slice; a 3D array is cut along ``axis`` and put back together.
    """
    if axis is None:
        return function(values[None])[0]
    return np.moveaxis(function(np.moveaxis(values, axis, 0)), 0, axis)


def get_mask(name: str, image: MedicalImage, key: str = FOREGROUND_KEY) -> np.ndarray | None:
    """Return ``image.meta[key]`` as a bool array, ``None`` if absent.

    Raises:
        InvalidImageError: If the mask does not have the image's spatial shape.
    """
    mask = image.meta.get(key)
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.spatial_shape:
        raise InvalidImageError(
            source_of(image),
            f"{name}: meta['{key}'] has shape {mask.shape} but the image's spatial "
            f"shape is {image.spatial_shape}",
        )
    return mask


def get_foreground(name: str, image: MedicalImage) -> np.ndarray | None:
    """Return ``image.meta['foreground']`` as a bool array, ``None`` if absent."""
    return get_mask(name, image, FOREGROUND_KEY)


def move_masks(name: str, image: MedicalImage, move: Callable[[torch.Tensor], Any]) -> dict:
    """Return ``image.meta`` with every mask of :data:`MASK_KEYS` passed through ``move``.

    ``move`` receives a float tensor ``(1, *spatial)`` and must sample nearest-neighbour; the
    result is thresholded at 0.5.
    """
    meta = dict(image.meta)
    for key in MASK_KEYS:
        mask = get_mask(name, image, key)
        if mask is not None:
            meta[key] = to_numpy(move(torch.as_tensor(mask[None].astype(np.float32))))[0] > 0.5
    return meta


# ----------------------------------------------------------------------------- array plumbing


def to_numpy(data: Any) -> np.ndarray:
    """Return MONAI/torch/numpy output as a contiguous float32 numpy array."""
    if isinstance(data, MetaTensor):
        data = data.as_tensor()
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    return np.ascontiguousarray(data, dtype=np.float32)


def with_values(image: MedicalImage, array: Any) -> MedicalImage:
    """Return a copy of ``image`` holding new values on the same grid."""
    return image.with_array(to_numpy(array))


def _affine4(image: MedicalImage) -> np.ndarray:
    """Return the image's 4x4 voxel-to-world matrix (a scaling by ``spacing`` if it has none)."""
    dims = image.spatial_dims
    if image.affine is None:
        diagonal = list(image.spacing[:dims]) + [1.0] * (4 - dims)
        return np.diag(np.asarray(diagonal, dtype=np.float64))
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape == (dims + 1, dims + 1) and dims == 2:
        full = np.eye(4)
        full[:2, :2] = affine[:2, :2]
        full[:2, 3] = affine[:2, 2]
        return full
    return affine


def _restore_affine(image: MedicalImage, affine4: np.ndarray) -> np.ndarray | None:
    """Return ``affine4`` in the form of the image's own affine (None, 3x3 or 4x4)."""
    if image.affine is None:
        return None
    if np.shape(image.affine) == (3, 3) and image.spatial_dims == 2:
        small = np.eye(3)
        small[:2, :2] = affine4[:2, :2]
        small[:2, 2] = affine4[:2, 3]
        return small
    return affine4


def apply_geometric(name: str, image: MedicalImage, op: GeometricOp) -> MedicalImage:
    """Run a MONAI spatial operation on the image and its foreground mask, tracking geometry.

    The image goes in as a MONAI ``MetaTensor`` carrying its voxel-to-world matrix; MONAI
    updates that matrix, and the new ``spacing`` is read back from it (column norms). A
    foreground mask in ``meta`` is transformed with ``op(mask, True)`` (the op must then sample
    nearest-neighbour) and thresholded at 0.5. The image's :class:`~medanomaly.image.SourceGrid`
    learns the index mapping, so that maps can be put back onto the file's own grid.

    Raises:
        RuntimeError: If MONAI returned no geometry (``monai.data.set_track_meta(False)``).
    """
    affine = torch.as_tensor(_affine4(image))
    out = op(MetaTensor(torch.as_tensor(image.array), affine=affine), False)
    if not isinstance(out, MetaTensor):
        raise RuntimeError(
            f"{name}: MONAI returned no geometry; medanomaly needs monai.data.set_track_meta(True)"
        )
    new_affine = out.affine.detach().cpu().numpy().astype(np.float64)
    meta = move_masks(name, image, lambda mask: op(MetaTensor(mask, affine=affine), True))
    grid = meta.get(SOURCE_GRID_KEY)
    if grid is not None:  # output index -> input index, whatever world frame the affines use
        meta[SOURCE_GRID_KEY] = grid.moved(np.linalg.inv(_affine4(image)) @ new_affine)
    dims = image.spatial_dims
    spacing = tuple(round(float(s), 9) for s in np.linalg.norm(new_affine[:3, :dims], axis=0))
    array = to_numpy(out)
    if np.shares_memory(array, image.array):  # a crop can be a view of the input
        array = array.copy()
    return image.with_array(
        array, spacing=spacing, affine=_restore_affine(image, new_affine), meta=meta
    )

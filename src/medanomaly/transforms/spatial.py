"""Geometric transforms: resample, resize, pad, crop and (laterality) flip.

Each keeps ``spacing``/``affine`` right (MONAI updates the voxel-to-world matrix of the
``MetaTensor`` it works on) and moves ``meta["foreground"]`` in step, nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Flip as MonaiFlip
from monai.transforms import Pad as MonaiPad
from monai.transforms import Resize as MonaiResize
from monai.transforms import Spacing, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box

from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    RandomTransform,
    Transform,
    apply_geometric,
    as_axes,
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_optional_float,
    as_sequence,
    as_shape,
    check_axes,
    check_image,
    check_length,
    config_error,
    get_foreground,
    source_of,
)

_LINEAR = ("linear", "bilinear", "trilinear")


class Resample(Transform):
    """Resample to a target voxel spacing (Hjohlman 2022: 3 mm isotropic) with MONAI ``Spacing``.

    The first voxel centre stays where it is and the output covers the input's voxel-centre
    extent: along each axis ``n_out = round((n_in - 1) * spacing_in / spacing_out + 1)``,
    halves rounded to even as ``numpy.round`` does (16 voxels of 2 mm -> 3 mm gives 11; 16 of
    0.5 mm -> 1 mm gives 8). Direction cosines are kept.

    Args:
        spacing: Target spacing in mm, one per spatial axis or a single number for isotropic.
        mode: ``"bilinear"`` (linear in 3D too), ``"nearest"``, or a spline order 0-5 (e.g. 3
            for cubic, Kobayashi et al. 2020).
        padding_mode: How samples outside the input are filled: border, zeros or reflection.
    """

    name = "resample"

    def __init__(
        self,
        spacing: float | Sequence[float] = (3.0, 3.0, 3.0),
        mode: str | int = "bilinear",
        padding_mode: str = "border",
    ) -> None:
        if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
            self.spacing: float | tuple[float, ...] = as_float(
                self.name, "spacing", spacing, positive=True
            )
        else:
            items = as_sequence(self.name, "spacing", spacing)
            if len(items) not in (2, 3):
                raise config_error(self.name, "spacing", f"needs 2 or 3 values (got {spacing!r})")
            self.spacing = tuple(as_float(self.name, "spacing", v, positive=True) for v in items)
        if isinstance(mode, int) and not isinstance(mode, bool):
            if not 0 <= mode <= 5:
                raise config_error(self.name, "mode", f"spline order must be 0-5 (got {mode})")
            self.mode: str | int = mode
        else:
            self.mode = as_choice(self.name, "mode", mode, ("bilinear", "nearest"))
        self.padding_mode = as_choice(
            self.name, "padding_mode", padding_mode, ("border", "zeros", "reflection")
        )

    def _target(self, image: MedicalImage) -> tuple[float, ...]:
        if isinstance(self.spacing, float):
            return (self.spacing,) * image.spatial_dims
        check_length(self.name, image, "spacing", self.spacing)
        return self.spacing

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Resample the image (and its foreground mask, nearest-neighbour)."""
        check_image(self.name, image)
        spacing = Spacing(pixdim=self._target(image), padding_mode=self.padding_mode)

        def op(data: torch.Tensor, is_mask: bool) -> torch.Tensor:
            return spacing(data, mode="nearest" if is_mask else self.mode)

        return apply_geometric(self.name, image, op)


class Resize(Transform):
    """Resize to a fixed grid (Chung & Choi 2023: 64³; UAD slides: 64×64; Kobayashi 2020: 256×256).

    The physical extent is kept: ``spacing_out = spacing_in * n_in / n_out``.

    Args:
        shape: Output spatial shape, one size per spatial axis.
        mode: ``"area"`` (averaging; best for shrinking), ``"nearest"``, ``"nearest-exact"``,
            ``"linear"``/``"bilinear"``/``"trilinear"`` (all mean linear in the image's
            dimensionality) or ``"bicubic"`` (2D only).
    """

    name = "resize"

    def __init__(self, shape: Sequence[int] = (64, 64, 64), mode: str = "area") -> None:
        self.shape = as_shape(self.name, "shape", shape)
        self.mode = as_choice(
            self.name, "mode", mode, ("area", "nearest", "nearest-exact", *_LINEAR, "bicubic")
        )

    def _torch_mode(self, image: MedicalImage) -> str:
        if self.mode in _LINEAR:
            return "bilinear" if image.spatial_dims == 2 else "trilinear"
        if self.mode == "bicubic" and image.spatial_dims != 2:
            raise InvalidImageError(source_of(image), "resize: mode 'bicubic' works on 2D only")
        return self.mode

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Resize the image (and its foreground mask, nearest-neighbour)."""
        check_image(self.name, image)
        check_length(self.name, image, "shape", self.shape)
        mode = self._torch_mode(image)
        resize = MonaiResize(spatial_size=self.shape)

        def op(data: torch.Tensor, is_mask: bool) -> torch.Tensor:
            return resize(data, mode="nearest-exact" if is_mask else mode)

        return apply_geometric(self.name, image, op)


class Pad(RandomTransform):
    """Pad with a constant to a fixed spatial shape, centred or at a random position.

    Hjohlman 2022 places each volume at a random position in an 87×87×273 zero volume so that the
    network also learns to reconstruct borders. ``position="random"`` makes the transform
    random (``is_random``), reproducible through ``seed``. An image larger than ``shape``
    along an axis is an error unless ``crop`` is true; it is then cropped along that axis
    (centred, or at a random position).

    Args:
        shape: Output spatial shape.
        position: ``"center"`` or ``"random"``.
        value: Fill value (mind the intensity scale: 0 after ``min_max``, -1024 in raw HU).
        seed: RNG seed used for ``position="random"``.
        crop: Crop axes longer than ``shape`` instead of raising.
    """

    name = "pad"

    def __init__(
        self,
        shape: Sequence[int],
        position: str = "center",
        value: float = 0.0,
        seed: int | None = None,
        crop: bool = False,
    ) -> None:
        super().__init__(seed)
        self.shape = as_shape(self.name, "shape", shape)
        self.position = as_choice(self.name, "position", position, ("center", "random"))
        self.value = as_float(self.name, "value", value)
        self.crop = as_bool(self.name, "crop", crop)

    @property
    def is_random(self) -> bool:  # type: ignore[override]
        """True for ``position="random"``."""
        return self.position == "random"

    def _offset(self, room: int) -> int:
        """Return where the smaller extent starts inside the larger one (room = difference)."""
        if self.position == "center":
            return room // 2
        return int(self._rng.randint(0, room + 1))

    def _plan(self, image: MedicalImage) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Return per-axis ``(start, stop)`` crops and ``(before, after)`` pads."""
        crops, pads = [], []
        for axis, (size, target) in enumerate(zip(image.spatial_shape, self.shape, strict=True)):
            if size > target and not self.crop:
                raise InvalidImageError(
                    source_of(image),
                    f"pad: spatial shape {image.spatial_shape} is larger than {self.shape} along "
                    f"axis {axis}; use a larger shape or crop: true",
                )
            start = self._offset(size - target) if size > target else 0
            crops.append((start, start + min(size, target)))
            before = self._offset(target - size) if target > size else 0
            pads.append((before, max(target - size, 0) - before))
        return crops, pads

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Pad (and, with ``crop``, crop) the image and its foreground mask."""
        check_image(self.name, image)
        check_length(self.name, image, "shape", self.shape)
        crops, pads = self._plan(image)
        cropper = SpatialCrop(roi_start=[c[0] for c in crops], roi_end=[c[1] for c in crops])
        to_pad = [(0, 0), *pads]

        def op(data: torch.Tensor, is_mask: bool) -> torch.Tensor:
            value = 0.0 if is_mask else self.value
            return MonaiPad(to_pad=to_pad, mode="constant", value=value)(cropper(data))

        return apply_geometric(self.name, image, op)


class Crop(Transform):
    """Crop to a box, or to the bounding box of the foreground plus a margin.

    ``box`` gives ``[start, stop]`` per spatial axis with Python slice meaning (``stop`` may be
    ``null`` for the end; negative values count from the end). With ``foreground: true`` the
    box is the bounding box of ``meta["foreground"]`` (run ``foreground_mask`` first) or, when
    ``threshold`` is given (it then wins over the mask), of voxels above it in any channel,
    grown by ``margin`` voxels on each side.

    Args:
        box: ``[[start, stop], ...]`` per spatial axis.
        foreground: Crop to the foreground bounding box instead.
        margin: Voxels added around the foreground box (clipped at the image border).
        threshold: Threshold defining the foreground when no mask is in ``meta``.
    """

    name = "crop"

    def __init__(
        self,
        box: Sequence[Sequence[int | None]] | None = None,
        foreground: bool = False,
        margin: int = 0,
        threshold: float | None = None,
    ) -> None:
        self.box = None if box is None else self._check_box(box)
        self.foreground = as_bool(self.name, "foreground", foreground)
        self.margin = as_int(self.name, "margin", margin, minimum=0)
        self.threshold = as_optional_float(self.name, "threshold", threshold)
        if (self.box is not None) == self.foreground:
            raise ConfigError("transform 'crop': give either 'box' or 'foreground: true'")

    def _check_box(self, box: Any) -> tuple[tuple[int | None, int | None], ...]:
        rows = as_sequence(self.name, "box", box)
        if len(rows) not in (2, 3):
            raise config_error(self.name, "box", f"needs [start, stop] per axis (got {box!r})")
        checked = []
        for row in rows:
            pair = as_sequence(self.name, "box", row)
            if len(pair) != 2:
                raise config_error(self.name, "box", f"rows must be [start, stop] (got {row!r})")
            checked.append(tuple(None if v is None else as_int(self.name, "box", v) for v in pair))
        return tuple(checked)  # type: ignore[return-value]

    def _bounds(self, image: MedicalImage) -> tuple[list[int], list[int]]:
        if self.box is not None:
            check_length(self.name, image, "box", self.box)
            ranges = [
                slice(*pair).indices(n)[:2]
                for pair, n in zip(self.box, image.spatial_shape, strict=True)
            ]
            return [r[0] for r in ranges], [r[1] for r in ranges]
        mask = get_foreground(self.name, image)
        if self.threshold is not None:
            mask = (image.array > self.threshold).any(axis=0)
        if mask is None:
            raise InvalidImageError(
                source_of(image),
                "crop: foreground needs meta['foreground'] (run foreground_mask first) or a "
                "threshold",
            )
        start, end = generate_spatial_bounding_box(mask[None], margin=self.margin)
        return [int(s) for s in start], [int(e) for e in end]

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Crop the image and its foreground mask."""
        check_image(self.name, image)
        start, end = self._bounds(image)
        if any(e <= s for s, e in zip(start, end, strict=True)):
            raise InvalidImageError(
                source_of(image),
                f"crop: the crop box {list(zip(start, end, strict=True))} is empty",
            )
        cropper = SpatialCrop(roi_start=start, roi_end=end)
        return apply_geometric(self.name, image, lambda data, _is_mask: cropper(data))


def _matches(meta: Mapping[str, Any], when: Mapping[str, Any]) -> bool:
    """Return True if every ``meta[key]`` equals ``when[key]`` (or is in it, for a list)."""
    for key, wanted in when.items():
        if key not in meta:
            return False
        accepted = wanted if isinstance(wanted, list) else [wanted]
        if meta[key] not in accepted:
            return False
    return True


class Flip(Transform):
    """Mirror the image along spatial axes, optionally only when ``meta`` matches ``when``.

    Chung & Choi 2023 flips left orbits to look like right ones: ``flip: {axes: [0], when:
    {laterality: L}}`` flips images whose ``meta["laterality"] == "L"`` and leaves the others
    (and images without that key) alone. A list value means "any of these". The affine is
    updated, so world coordinates stay right (in 3D, axis 0 then runs towards the Left).

    Args:
        axes: Spatial axes to flip (0-based, channel excluded).
        when: ``{meta_key: value}`` conditions that must all hold; ``None`` flips always.
    """

    name = "flip"

    def __init__(self, axes: int | Sequence[int], when: Mapping[str, Any] | None = None) -> None:
        self.axes = as_axes(self.name, "axes", axes)
        if when is not None and (not isinstance(when, Mapping) or not when):
            problem = f"must be a mapping meta_key: value (got {when!r})"
            raise config_error(self.name, "when", problem)
        self.when = None if when is None else dict(when)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Flip the image and its foreground mask when the condition holds."""
        check_image(self.name, image)
        check_axes(self.name, image, self.axes)
        if self.when is not None and not _matches(image.meta, self.when):
            return image
        flipper = MonaiFlip(spatial_axis=list(self.axes))
        return apply_geometric(self.name, image, lambda data, _is_mask: flipper(data))

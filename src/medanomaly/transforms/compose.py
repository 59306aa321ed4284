"""``Compose``, the name -> class table and ``build_transforms`` for YAML transform lists."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from medanomaly.errors import ConfigError, did_you_mean
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import RandomTransform, Transform
from medanomaly.transforms.augment import RandAffine, RandFlip, RandIntensity
from medanomaly.transforms.channels import SelectChannels
from medanomaly.transforms.fundus import FundusFOVMask
from medanomaly.transforms.intensity import Clip, HUWindow, MinMax, PercentileRescale, ZScore
from medanomaly.transforms.mask import DistanceTransform, ForegroundMask, HeadCTBrainMask
from medanomaly.transforms.mri import BrainMask, HistogramMatch, N4BiasCorrection
from medanomaly.transforms.spatial import Crop, Flip, Pad, Resample, Resize

TRANSFORMS: dict[str, type[Transform]] = {
    "hu_window": HUWindow,
    "clip": Clip,
    "min_max": MinMax,
    "z_score": ZScore,
    "percentile_rescale": PercentileRescale,
    "resample": Resample,
    "resize": Resize,
    "pad": Pad,
    "crop": Crop,
    "flip": Flip,
    "foreground_mask": ForegroundMask,
    "n4_bias_correction": N4BiasCorrection,
    "histogram_match": HistogramMatch,
    "brain_mask": BrainMask,
    "head_ct_brain_mask": HeadCTBrainMask,
    "distance_transform": DistanceTransform,
    "fundus_fov_mask": FundusFOVMask,
    "select_channels": SelectChannels,
    "rand_flip": RandFlip,
    "rand_affine": RandAffine,
    "rand_intensity": RandIntensity,
}
"""YAML name -> transform class. Every transform is listed here and nowhere else."""


class Compose:
    """Apply transforms in order.

    Args:
        transforms: The transforms, first applied first.
    """

    def __init__(self, transforms: Sequence[Transform] = ()) -> None:
        self.transforms: list[Transform] = list(transforms)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return ``image`` passed through every transform."""
        for transform in self.transforms:
            image = transform(image)
        return image

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"

    @property
    def is_random(self) -> bool:
        """True if any transform is random."""
        return any(t.is_random for t in self.transforms)

    def to_config(self) -> list[dict[str, dict[str, Any]]]:
        """Return the YAML list form with every argument spelled out (JSON serialisable)."""
        return [t.to_config() for t in self.transforms]

    def cache_key(self) -> str:
        """Return a SHA-256 hex digest of :meth:`to_config` (for caching preprocessed arrays)."""
        text = json.dumps(self.to_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def split_deterministic(self) -> tuple[Compose, Compose]:
        """Split at the first random transform.

        Returns:
            ``(prefix, rest)``: the deterministic (cacheable) prefix and everything after it.
        """
        cut = next((i for i, t in enumerate(self.transforms) if t.is_random), len(self))
        return Compose(self.transforms[:cut]), Compose(self.transforms[cut:])

    def set_random_state(self, seed: int | None) -> Compose:
        """Seed every transform with an RNG: the i-th gets ``seed + i`` (``None``: fresh).

        Returns:
            The Compose itself.
        """
        for index, transform in enumerate(self.transforms):
            if isinstance(transform, RandomTransform):
                transform.set_random_state(None if seed is None else seed + index)
        return self


def get_transform_class(name: str) -> type[Transform]:
    """Return the transform class called ``name``.

    Raises:
        ConfigError: For an unknown name, suggesting the closest ones.
    """
    if name in TRANSFORMS:
        return TRANSFORMS[name]
    raise ConfigError(
        f"unknown transform {name!r}.{did_you_mean(str(name), list(TRANSFORMS))} "
        f"Available: {', '.join(TRANSFORMS)}."
    )


def _split_item(item: Any, index: int) -> tuple[str, dict[str, Any]]:
    """Return ``(name, arguments)`` of one list entry (``name`` or ``{name: {args}}``)."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping) and len(item) == 1:
        name, args = next(iter(item.items()))
        if args is None:
            return str(name), {}
        if isinstance(args, Mapping):
            return str(name), dict(args)
        raise ConfigError(
            f"transform {name!r} (entry {index}): arguments must be a mapping, got {args!r}"
        )
    raise ConfigError(
        f"transforms entry {index} must be a name or a one-key mapping name: {{arguments}}, "
        f"got {item!r}"
    )


def _check_arguments(name: str, cls: type[Transform], args: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the transform and argument if ``args`` do not fit ``cls``."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    for arg in args:
        if arg not in params:
            raise ConfigError(
                f"transform {name!r}: unknown argument {arg!r}.{did_you_mean(arg, list(params))}"
                f" Arguments: {', '.join(params)}."
            )
    for arg, param in params.items():
        if param.default is inspect.Parameter.empty and arg not in args:
            raise ConfigError(f"transform {name!r}: missing required argument {arg!r}")


def build_transform(name: str, args: Mapping[str, Any] | None = None) -> Transform:
    """Build one transform from its name and arguments, checking both.

    Raises:
        ConfigError: Unknown name, unknown/missing argument or a bad value.
    """
    cls = get_transform_class(name)
    args = dict(args or {})
    _check_arguments(name, cls, args)
    try:
        return cls(**args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"transform {name!r}: {exc}") from exc


def build_transforms(config: Sequence[Any] | None) -> Compose:
    """Build a :class:`Compose` from the YAML list form.

    Example:
        ``[{"hu_window": {"center": 40, "width": 400}}, {"resize": {"shape": [64, 64, 64]}}]``

    Args:
        config: List of ``{name: {arguments}}`` (or bare names); ``None`` or ``[]`` for none.

    Raises:
        ConfigError: If the list, a name or an argument is invalid (the message says which).
    """
    if config is None:
        return Compose()
    if isinstance(config, (str, bytes, Mapping)) or not isinstance(config, Sequence):
        raise ConfigError(f"transforms must be a list of name: {{arguments}} items, got {config!r}")
    return Compose([build_transform(*_split_item(item, i)) for i, item in enumerate(config)])

"""In-memory image sets and the conversions every detector accepts as input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medanomaly.errors import InvalidImageError

NORMAL, ABNORMAL, UNKNOWN = 0, 1, -1


@dataclass
class ImageSet(Dataset):
    """Images of one grid with optional labels, masks and patient groups.

    Attributes:
        images: float32 array ``(N, C, *spatial)``.
        labels: int array ``(N,)``: 0 normal, 1 abnormal, -1 unknown.
        ids: One name per image (file path or phantom id), used in reports and errors.
        masks: Optional lesion masks ``(N, *spatial)`` (bool).
        foreground: Optional body/brain masks ``(N, *spatial)`` (bool), e.g. from the
            ``foreground_mask`` transform; pixel metrics count only voxels inside them.
        groups: Optional patient ids ``(N,)``; splitters keep a group on one side.
        augment: Optional random augmentation applied to each image as it is drawn
            (training only; ``subset`` drops it unless asked to keep it).
        grids: Optional :class:`~medanomaly.image.SourceGrid` per image (``None`` for images
            made in memory): where each image lies on its file's own voxel grid, so that
            maps can be written in the scan's geometry.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)
    masks: np.ndarray | None = None
    foreground: np.ndarray | None = None
    groups: np.ndarray | None = None
    augment: Callable[[np.ndarray], np.ndarray] | None = None
    grids: list[Any] | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=np.float32)
        n = len(self.images)
        if self.labels is None:
            self.labels = np.full(n, UNKNOWN, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.ids:
            self.ids = [f"image_{i:05d}" for i in range(n)]
        named = [("labels", self.labels), ("ids", self.ids)]
        if self.grids is not None:
            named.append(("grids", self.grids))
        for name, value in named:
            if len(value) != n:
                raise ValueError(f"ImageSet: {name} has {len(value)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def reseed(self, seed: int) -> None:
        """Reset the augmentation's random state (the engine does so every epoch)."""
        set_random_state = getattr(self.augment, "set_random_state", None)
        if set_random_state is not None:
            set_random_state(seed)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.augment is not None:
            image = np.ascontiguousarray(self.augment(image), dtype=np.float32)
        return torch.from_numpy(image)

    def subset(self, index: np.ndarray | list[int], keep_augment: bool = False) -> ImageSet:
        """Return the images at ``index`` (integer indices or a boolean mask)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            ids=[self.ids[i] for i in index],
            masks=None if self.masks is None else self.masks[index],
            foreground=None if self.foreground is None else self.foreground[index],
            groups=None if self.groups is None else np.asarray(self.groups)[index],
            augment=self.augment if keep_augment else None,
            grids=None if self.grids is None else [self.grids[i] for i in index],
        )

    @property
    def normal(self) -> ImageSet:
        """The images labelled normal."""
        return self.subset(self.labels == NORMAL)

    @property
    def abnormal(self) -> ImageSet:
        """The images labelled abnormal."""
        return self.subset(self.labels == ABNORMAL)

    @property
    def has_labels(self) -> bool:
        """True if every image is labelled normal or abnormal."""
        return bool(len(self)) and bool(np.all(self.labels != UNKNOWN))


def as_image_set(x: ImageSet | np.ndarray | torch.Tensor, spatial_dims: int) -> ImageSet:
    """Accept an ``ImageSet``, a NumPy array or a tensor ``(N, C, *spatial)``.

    A single image without batch axis ``(C, *spatial)`` is accepted as a batch of one.

    Raises:
        InvalidImageError: If the array has the wrong number of axes or is not finite.
    """
    if isinstance(x, ImageSet):
        images, result = x.images, x
    else:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        images = np.asarray(x, dtype=np.float32)
        if images.ndim == spatial_dims + 1:
            images = images[None]
        result = ImageSet(images)
    if images.ndim != spatial_dims + 2:
        raise InvalidImageError(
            "<input>",
            f"expected an array (N, C, {', '.join('XYZ'[:spatial_dims])}) for a "
            f"{spatial_dims}D model, got shape {tuple(images.shape)}",
        )
    bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if bad.any():
        names = ", ".join(result.ids[i] for i in np.flatnonzero(bad)[:5])
        raise InvalidImageError(names, "image contains NaN or infinite values")
    return result

"""Image sets: the in-memory :class:`ImageSet`, the protocol it shares with the streamed form.

Two forms of a set of cases follow one protocol (:class:`Cases`), so that detectors, the
training engine and the batch jobs take either:

* :class:`ImageSet` holds every image in one array: arrays made in Python, small sets.
* :class:`~medanomaly.data.streaming.StreamedSet` reads each preprocessed case from the cache when
  it is used (memory-mapped ``.npy`` files); its cases may differ in shape.

Code that needs whole arrays asks for them in chunks (:meth:`Cases.chunks`, then
``subset(index).to_image_set()``), so that memory holds one chunk, never the set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shape ``(C, *spatial)`` of each image (one grid for the whole set)."""
        return [tuple(self.images.shape[1:])] * len(self)

    @property
    def has_masks(self) -> bool:
        """True when the set carries lesion masks."""
        return self.masks is not None

    @property
    def has_foreground(self) -> bool:
        """True when the set carries foreground (body/brain) masks."""
        return self.foreground is not None

    def batch(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``index`` without augmentation, as one array ``(B, C, *spatial)``."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and np.all(np.diff(index) == 1):  # a run of cases: a view, no copy
            return self.images[index[0] : index[-1] + 1]
        return self.images[index]

    def chunks(self, size: int | Callable[[tuple[int, ...]], int]) -> list[np.ndarray]:
        """Index arrays of at most ``size`` cases each, in order (see :func:`shape_chunks`)."""
        return shape_chunks(self.shapes, size)

    def to_image_set(self) -> ImageSet:
        """The set as one array in memory: itself."""
        return self

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


@runtime_checkable
class Cases(Protocol):
    """What every form of a set of cases offers (:class:`ImageSet`, ``StreamedSet``).

    Attributes:
        labels: ``(N,)`` 0 normal, 1 abnormal, -1 unknown.
        ids: One name per case (its source path).
        groups: Patient ids ``(N,)`` or ``None``.
        grids: One :class:`~medanomaly.image.SourceGrid` (or ``None``) per case, or ``None``.
    """

    labels: np.ndarray
    ids: list[str]
    groups: np.ndarray | None
    grids: Sequence[Any] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor:
        """Case ``index`` as a tensor ``(C, *spatial)``, augmented if the set augments."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shape ``(C, *spatial)`` of each case."""

    @property
    def has_masks(self) -> bool:
        """True when cases carry lesion masks."""

    @property
    def has_foreground(self) -> bool:
        """True when cases carry foreground masks."""

    def batch(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """The unaugmented cases at ``index`` (one shape) as ``(B, C, *spatial)``."""

    def chunks(self, size: int | Callable[[tuple[int, ...]], int]) -> list[np.ndarray]:
        """Index arrays of at most ``size`` cases of one shape (:func:`shape_chunks`)."""

    def subset(self, index: np.ndarray | list[int], keep_augment: bool = False) -> Cases:
        """The cases at ``index`` (integers or a boolean mask), in the same form."""

    def to_image_set(self) -> ImageSet:
        """The cases in memory as one :class:`ImageSet` (one shape only)."""

    def reseed(self, seed: int) -> None:
        """Reset the augmentation's random state."""


def shape_chunks(
    shapes: Sequence[tuple[int, ...]], size: int | Callable[[tuple[int, ...]], int]
) -> list[np.ndarray]:
    """Split case indices into chunks whose cases share one shape, in input order.

    A set on one grid gives the runs ``[0, size)``, ``[size, 2 size)``, ...; cases of another
    shape go into chunks of their own (shapes in order of first appearance).

    Args:
        shapes: Shape of each case.
        size: Cases per chunk, or a function of the shape giving it (e.g. by voxel count).

    Returns:
        Index arrays (int64) that together hold every index once.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    chunks = []
    for shape, members in groups.items():
        step = max(1, int(size(shape) if callable(size) else size))
        chunks += [
            np.asarray(members[start : start + step], dtype=np.int64)
            for start in range(0, len(members), step)
        ]
    return chunks


def ready_chunks(
    shapes: Sequence[tuple[int, ...]],
    size: int | Callable[[tuple[int, ...]], int],
    complete: bool,
) -> list[np.ndarray]:
    """The leading chunks of :func:`shape_chunks` that cases still to come cannot change.

    While cases are still being added (``complete`` false), only the full chunks of the first
    shape are settled: a later case of that shape fills its last chunk, and the chunks of the
    other shapes come after all of the first shape's.

    Args:
        shapes: Shape of each case known so far, in input order.
        size: As in :func:`shape_chunks`.
        complete: No case comes after these.
    """
    if complete or not shapes:
        return shape_chunks(shapes, size) if complete else []
    first = tuple(shapes[0])
    step = max(1, int(size(first) if callable(size) else size))
    members = [index for index, shape in enumerate(shapes) if tuple(shape) == first]
    full = len(members) - len(members) % step
    return [np.asarray(members[start : start + step], np.int64) for start in range(0, full, step)]


def as_cases(x: Any, spatial_dims: int) -> Cases:
    """Accept any form of a set of cases without loading a streamed one into memory.

    Args:
        x: An :class:`ImageSet`, a streamed set, or an array / tensor (see
            :func:`as_image_set`).
        spatial_dims: The model's spatial dimensions.

    Raises:
        InvalidImageError: If the cases have the wrong number of axes.
    """
    if isinstance(x, ImageSet) or not isinstance(x, Cases):
        return as_image_set(x, spatial_dims)
    bad = [i for i, shape in enumerate(x.shapes) if len(shape) != spatial_dims + 1]
    if bad:
        raise InvalidImageError(
            x.ids[bad[0]],
            f"preprocessed to shape {x.shapes[bad[0]]}, not (C, {', '.join('XYZ'[:spatial_dims])}) "
            f"for a {spatial_dims}D model",
        )
    return x


def as_image_set(x: ImageSet | np.ndarray | torch.Tensor, spatial_dims: int) -> ImageSet:
    """Accept an ``ImageSet``, a NumPy array or a tensor ``(N, C, *spatial)``.

    A single image without batch axis ``(C, *spatial)`` is accepted as a batch of one; a
    streamed set is read into memory (models that need every image at once).

    Raises:
        InvalidImageError: If the array has the wrong number of axes or is not finite.
    """
    if not isinstance(x, ImageSet) and isinstance(x, Cases):
        x = x.to_image_set()
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

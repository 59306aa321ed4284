"""The streaming form of a set of cases: preprocessed arrays read from the cache when used.

:func:`medanomaly.data.loading.load_dataset` with ``stream=True`` prepares every case once (in
worker processes, see :mod:`medanomaly.data.workers`) into the content-keyed cache
(:mod:`medanomaly.data.cache`) and returns a :class:`StreamedSet`: a torch ``Dataset`` that holds
only each case's key, shape and labels. An image is read when it is used, from a
memory-mapped ``.npy`` file, so that training, validation, scoring and screening hold one
batch at a time, never the set. Cases keep their own shapes; the detectors and the engine
group them into batches of one shape.

Without a cache folder the arrays go into a temporary folder that lives as long as the set
(and any subset of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medanomaly.data.cache import CacheEntry, PreprocessCache
from medanomaly.data.sets import ABNORMAL, NORMAL, UNKNOWN, ImageSet, shape_chunks
from medanomaly.errors import ConfigError, ImageReadError
from medanomaly.image import SourceGrid
from medanomaly.transforms import FOREGROUND_KEY, LESION_KEY


class StreamedSet(Dataset):
    """Cases stored in a preprocessing cache, read lazily; the same protocol as ``ImageSet``.

    Args:
        store: The cache the cases were prepared into.
        entries: One :class:`~medanomaly.data.cache.CacheEntry` per case.
        labels: ``(N,)`` 0 normal, 1 abnormal, -1 unknown (default: unknown).
        ids: One name per case (default ``image_00000``, ...).
        groups: Patient ids ``(N,)`` or ``None``.
        augment: Random augmentation applied to each image as it is drawn (training only).
        owner: An object that must live as long as the set (the temporary folder holding
            ``store``, which is removed when the last set using it is gone).
        with_masks: Whether the set has lesion masks (default: any of ``entries`` has one);
            given for a part of a set whose other cases are not known yet.
        with_foreground: Whether the set has foreground masks, likewise.

    Attributes:
        keys: The cache key of each case.
        labels, ids, groups, augment: As given.
    """

    def __init__(
        self,
        store: PreprocessCache,
        entries: Sequence[CacheEntry],
        labels: np.ndarray | None = None,
        ids: Sequence[str] | None = None,
        groups: np.ndarray | None = None,
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
        owner: Any = None,
        with_masks: bool | None = None,
        with_foreground: bool | None = None,
    ) -> None:
        n = len(entries)
        self.store = store
        self.keys = [entry.key for entry in entries]
        self._shapes = [tuple(int(s) for s in entry.shape) for entry in entries]
        self._masks = [frozenset(entry.masks) for entry in entries]
        self.labels = np.asarray(
            np.full(n, UNKNOWN) if labels is None else labels, dtype=np.int64
        ).reshape(n)
        self.ids = list(ids) if ids else [f"image_{i:05d}" for i in range(n)]
        self.groups = None if groups is None else np.asarray(groups)
        self.augment = augment
        self._owner = owner
        found_masks = any(LESION_KEY in m for m in self._masks)
        found_foreground = any(FOREGROUND_KEY in m for m in self._masks)
        self._with_masks = found_masks if with_masks is None else with_masks
        self._with_foreground = found_foreground if with_foreground is None else with_foreground
        if len(self.ids) != n:
            raise ValueError(f"StreamedSet: ids has {len(self.ids)} entries for {n} cases")

    # -- the Dataset ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.image(index)
        if self.augment is not None:
            image = np.ascontiguousarray(self.augment(image), dtype=np.float32)
        return torch.from_numpy(image)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy; the temporary folder stays owned by this process
        return {**self.__dict__, "_owner": None}

    def reseed(self, seed: int) -> None:
        """Reset the augmentation's random state (the engine does so every epoch)."""
        set_random_state = getattr(self.augment, "set_random_state", None)
        if set_random_state is not None:
            set_random_state(seed)

    # -- reading --------------------------------------------------------------------------
    def image(self, index: int) -> np.ndarray:
        """The preprocessed image ``(C, *spatial)`` of case ``index`` (no augmentation)."""
        return self._read(index, "", np.float32)

    def lesion_mask(self, index: int) -> np.ndarray | None:
        """The lesion mask ``(*spatial)``: empty for a case without one, ``None`` if none has."""
        if LESION_KEY in self._masks[index]:
            return self._read(index, LESION_KEY, bool)
        return np.zeros(self._shapes[index][1:], bool) if self._with_masks else None

    def foreground_mask(self, index: int) -> np.ndarray | None:
        """The foreground mask ``(*spatial)``: full for a case without one, ``None`` if none has."""
        if FOREGROUND_KEY in self._masks[index]:
            return self._read(index, FOREGROUND_KEY, bool)
        return np.ones(self._shapes[index][1:], bool) if self._with_foreground else None

    def _read(self, index: int, part: str, dtype: type) -> np.ndarray:
        """Copy one stored array out of its memory map (which is then closed)."""
        key = self.keys[index]
        try:
            array = np.array(self.store.open_array(key, part), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ImageReadError(
                self.ids[index],
                f"its preprocessed entry {self.store.array_path(key, part)} cannot be read "
                f"({exc}); run again to rebuild it",
            ) from exc
        expected = self._shapes[index] if not part else self._shapes[index][1:]
        if array.shape != expected:
            raise ImageReadError(
                self.ids[index],
                f"its preprocessed entry {self.store.array_path(key, part)} has shape "
                f"{array.shape}, its index says {expected}; run again to rebuild it",
            )
        return array

    def batch(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at ``index`` (one shape) without augmentation, ``(B, C, *spatial)``."""
        return np.stack([self.image(int(i)) for i in index])

    @property
    def grids(self) -> Sequence[SourceGrid | None]:
        """Each case's source grid, read from its cache index when asked for."""
        return _LazyGrids(self.store, self.keys)

    # -- the protocol shared with ImageSet -------------------------------------------------
    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shape ``(C, *spatial)`` of each case."""
        return list(self._shapes)

    @property
    def has_masks(self) -> bool:
        """True when any case carries a lesion mask."""
        return self._with_masks

    @property
    def has_foreground(self) -> bool:
        """True when any case carries a foreground mask."""
        return self._with_foreground

    @property
    def has_labels(self) -> bool:
        """True if every case is labelled normal or abnormal."""
        return bool(len(self)) and bool(np.all(self.labels != UNKNOWN))

    @property
    def normal(self) -> StreamedSet:
        """The cases labelled normal."""
        return self.subset(self.labels == NORMAL)

    @property
    def abnormal(self) -> StreamedSet:
        """The cases labelled abnormal."""
        return self.subset(self.labels == ABNORMAL)

    def chunks(self, size: int | Callable[[tuple[int, ...]], int]) -> list[np.ndarray]:
        """Index arrays of at most ``size`` cases of one shape (see ``shape_chunks``)."""
        return shape_chunks(self._shapes, size)

    def subset(self, index: np.ndarray | list[int], keep_augment: bool = False) -> StreamedSet:
        """The cases at ``index`` (integer indices or a boolean mask); nothing is read."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        part = StreamedSet.__new__(StreamedSet)
        part.__dict__.update(self.__dict__)
        part.keys = [self.keys[i] for i in index]
        part._shapes = [self._shapes[i] for i in index]
        part._masks = [self._masks[i] for i in index]
        part.labels = self.labels[index]
        part.ids = [self.ids[i] for i in index]
        part.groups = None if self.groups is None else self.groups[index]
        part.augment = self.augment if keep_augment else None
        return part

    def to_image_set(self) -> ImageSet:
        """Read every case into one in-memory :class:`ImageSet` (cases of one shape only).

        Use it on chunks (:meth:`chunks`), or for models that need the whole set at once.

        Raises:
            ConfigError: The cases differ in shape.
        """
        shapes = set(self._shapes)
        if len(shapes) > 1:
            raise ConfigError(
                f"these {len(self)} cases have {len(shapes)} different shapes "
                f"({', '.join(str(s) for s in sorted(shapes)[:4])}); they can only be read into "
                "one array after a 'resize' (or 'pad') step in data.transforms"
            )
        n = len(self)
        return ImageSet(
            images=self.batch(range(n)) if n else np.zeros((0, 1), np.float32),
            labels=self.labels.copy(),
            ids=list(self.ids),
            masks=self._stack(self.lesion_mask) if self._with_masks else None,
            foreground=self._stack(self.foreground_mask) if self._with_foreground else None,
            groups=None if self.groups is None else self.groups.copy(),
            augment=self.augment,
            grids=list(self.grids),
        )

    def _stack(self, read: Callable[[int], np.ndarray | None]) -> np.ndarray:
        return np.stack([read(i) for i in range(len(self))])


class _LazyGrids(Sequence):
    """The source grids of a streamed set, each read from the cache index on access."""

    def __init__(self, store: PreprocessCache, keys: list[str]) -> None:
        self.store = store
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int | slice) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self.store.entry(self.keys[index])
        return None if entry is None else entry.grid

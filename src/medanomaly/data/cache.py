"""Preprocessing cache: each case is decoded and transformed once, later runs read arrays.

The key of a case is the SHA-256 of a small JSON record of everything its preprocessed
arrays depend on:

* the bytes of the image source (a file's content; for a DICOM series folder the name and
  content of every file directly inside it, in name order, since the reader reads exactly
  those) and of the lesion mask file, if any;
* the deterministic transforms (:meth:`medanomaly.transforms.Compose.cache_key`);
* the read options (keyword arguments of :func:`medanomaly.io.read_image`);
* the cache format and medanomaly versions.

Paths and modification times are not part of the key: a renamed or touched file still hits
the cache, an edited one never does. Random transforms (augmentation) are never cached.

Layout under the cache folder (``<kk>`` = first two hex digits of the key)::

    <root>/<kk>/<key>.npy              image, float32, channel-first (C, *spatial)
    <root>/<kk>/<key>.<mask>.npy       each bool mask the transforms produced (lesion, foreground)
    <root>/dicomweb/<dd>/<digest>/     a series retrieved from a DICOMweb archive, one file per
                                       instance (:mod:`medanomaly.io.dicomweb`), kept so that
                                       a rerun retrieves nothing and maps can reference it
    <root>/<kk>/<key>.json             written last, so it marks a complete entry: masks,
                                       shape, the byte size of every array file, problems
                                       found while reading, the source grid (for maps in the
                                       scan's geometry), source, transforms

The arrays are plain ``.npy`` files, so that the streaming data layer
(:mod:`medanomaly.data.streaming`) maps them into memory (``np.load(mmap_mode="r")``) instead of
reading whole sets into RAM.

Every file is written atomically (a temporary file renamed into place), so a crash or two
processes filling the same cache never leave a half-written entry behind. An entry whose
files are missing, shorter or longer than the index says (a copy cut short, a full disk, a
file written by hand), or that cannot be parsed is never read as data: it is recomputed and
written again. A cache that cannot be written only costs speed (a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly._version import __version__
from medanomaly.errors import ImageReadError
from medanomaly.image import SourceGrid
from medanomaly.io.atomic import atomic_path, atomic_write_text
from medanomaly.transforms import Compose

log = logging.getLogger(__name__)

#: Bumped whenever the stored layout or the meaning of a key changes.
CACHE_FORMAT = 3
#: Environment variable naming the default cache folder.
CACHE_ENV = "MEDANOMALY_CACHE"
_CHUNK = 1 << 20


@dataclass
class Preprocessed:
    """The cacheable result of reading and preprocessing one case.

    Attributes:
        array: float32 image ``(C, *spatial)`` after the deterministic transforms.
        masks: Bool masks by ``image.meta`` key (e.g. ``lesion``, ``foreground``).
        problems: Non-fatal problems the reader found (e.g. uneven slice spacing).
        grid: The case's :class:`~medanomaly.image.SourceGrid` after the transforms.
        facts: Small facts about the case as read (``file_shape``, ``format``, modality).
    """

    array: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    grid: SourceGrid | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """The image's shape ``(C, *spatial)``."""
        return tuple(int(n) for n in self.array.shape)


@dataclass
class CacheEntry:
    """What the index of a stored case says, without its arrays.

    Attributes:
        key: The entry's key (:meth:`PreprocessCache.key`).
        shape: The image's shape ``(C, *spatial)``.
        masks: Names of the stored bool masks (e.g. ``foreground``, ``lesion``).
        problems: Non-fatal problems the reader found.
        grid: The case's :class:`~medanomaly.image.SourceGrid` after the transforms.
        facts: Small facts about the case as read (see :class:`Preprocessed`).
    """

    key: str
    shape: tuple[int, ...]
    masks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    grid: SourceGrid | None = None
    facts: dict[str, Any] = field(default_factory=dict)


class TruncatedEntryError(OSError):
    """A stored array file does not have the size its index records."""


def default_cache_dir() -> Path:
    """Return ``$MEDANOMALY_CACHE`` if set, else ``~/.cache/medanomaly``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medanomaly"


def content_digest(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes, or of a folder's files (names and bytes).

    For a folder only the regular files directly inside it count, in name order: these are
    what the DICOM series reader looks at.

    Raises:
        ImageReadError: The path is missing or cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.is_file()):
                digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
                _update_from_file(digest, file)
        elif path.exists():
            _update_from_file(digest, path)
        else:
            raise ImageReadError(path, "no such file or folder")
    except OSError as exc:
        raise ImageReadError(path, f"cannot read for the cache key: {exc}") from exc
    return digest.hexdigest()


def _update_from_file(digest: Any, file: Path) -> None:
    """Feed a file's bytes into ``digest`` in chunks."""
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


class PreprocessCache:
    """A folder of preprocessed cases keyed by content, transforms and read options.

    Args:
        root: The cache folder (created on the first write).

    Attributes:
        hits: Cases served from the cache since this object was made.
        misses: Cases computed (and stored) since this object was made.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_option(cls, option: bool | str | Path | None) -> PreprocessCache | None:
        """Turn the ``cache`` option of ``load_dataset`` into a cache (``None``: off).

        ``None``/``False``: no cache; ``True``: :func:`default_cache_dir`; a string or path:
        that folder.
        """
        if option is None or option is False:
            return None
        if option is True:
            return cls(default_cache_dir())
        if isinstance(option, (str, Path)) and str(option):
            return cls(option)
        raise ValueError(f"cache must be true, false or a folder, got {option!r}")

    def key(
        self,
        source: str | Path,
        transforms: Compose,
        read_options: Mapping[str, Any] | None = None,
        mask: str | Path | None = None,
        source_digest: str | None = None,
    ) -> str:
        """Return the cache key of one case (reads the source and mask bytes).

        Args:
            source: The image file or DICOM series folder.
            transforms: The deterministic transforms applied after reading.
            read_options: Keyword arguments given to ``read_image``.
            mask: The case's lesion mask file, if any.
            source_digest: The source's content digest when it is known without reading
                ``source`` (a series in a DICOMweb archive).

        Raises:
            ImageReadError: The source or mask is missing or unreadable.
        """
        record = {
            "format": CACHE_FORMAT,
            "version": __version__,
            "source": source_digest or content_digest(source),
            "mask": None if mask is None else content_digest(mask),
            "transforms": transforms.cache_key(),
            "read_options": dict(read_options or {}),
        }
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def series_folder(self, digest: str) -> Path:
        """Where the instances of an archive's series with content ``digest`` are kept."""
        return self.root / "dicomweb" / digest[:2] / digest

    def _path(self, key: str, part: str = "") -> Path:
        """Path of one file of an entry: the image (``part=''``), a mask, or ``'json'``."""
        suffix = ".json" if part == "json" else (f".{part}.npy" if part else ".npy")
        return self.root / key[:2] / f"{key}{suffix}"

    def array_path(self, key: str, part: str = "") -> Path:
        """The ``.npy`` file of an entry's image (``part=''``) or of one of its masks."""
        return self._path(key, part)

    def entry(self, key: str) -> CacheEntry | None:
        """The index of the entry under ``key`` after checking its files; ``None`` if unusable.

        Each array file must exist with exactly the byte size the index records: a file cut
        short (or grown) is never handed out as data, and the entry is then treated as
        absent, so that :meth:`fetch` and :meth:`ensure` rebuild it.
        """
        index = self._path(key, "json")
        if not index.exists():
            return None
        try:
            info = json.loads(index.read_text())
            for part in ("", *info["masks"]):
                self._check_size(key, part, info["bytes"][part or "image"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache entry %s is unreadable (%s); recomputing", index, exc)
            return None
        grid = info.get("grid")
        return CacheEntry(
            key=key,
            shape=tuple(int(n) for n in info["shape"]),
            masks=list(info["masks"]),
            problems=list(info.get("problems", [])),
            grid=None if grid is None else SourceGrid.from_dict(grid),
            facts=dict(info.get("facts", {})),
        )

    def _check_size(self, key: str, part: str, expected: int) -> None:
        """Raise :class:`TruncatedEntryError` unless the array file has ``expected`` bytes."""
        size = self._path(key, part).stat().st_size
        if size != int(expected):
            raise TruncatedEntryError(
                f"{self._path(key, part).name} holds {size} bytes, its index says {expected}: "
                "truncated or overwritten"
            )

    def open_array(self, key: str, part: str = "", mmap: bool = True) -> np.ndarray:
        """An entry's image (or mask) array, memory-mapped read-only unless ``mmap`` is off.

        Raises:
            OSError: The file is missing or unreadable.
            ValueError: The file is not a complete ``.npy`` array.
        """
        return np.load(self._path(key, part), mmap_mode="r" if mmap else None, allow_pickle=False)

    def load(self, key: str) -> Preprocessed | None:
        """Return the entry stored under ``key``, or ``None`` when absent or unreadable."""
        entry = self.entry(key)
        if entry is None:
            return None
        try:
            array = self.open_array(key, mmap=False)
            masks = {name: self.open_array(key, name, mmap=False) for name in entry.masks}
        except (OSError, ValueError) as exc:
            log.warning("cache entry %s is unreadable (%s); recomputing", key, exc)
            return None
        return Preprocessed(
            array=array,
            masks=masks,
            problems=entry.problems,
            grid=entry.grid,
            facts=entry.facts,
        )

    def save(
        self, key: str, result: Preprocessed, details: Mapping[str, Any] | None = None
    ) -> CacheEntry | None:
        """Store ``result`` under ``key``; a failed write is logged, not raised.

        Args:
            key: From :meth:`key`.
            result: The preprocessed case.
            details: Extra facts for the human reader of the ``.json`` (source, transforms).

        Returns:
            The stored entry's index, or ``None`` when it could not be written.
        """
        info = {
            "masks": sorted(result.masks),
            "shape": list(result.array.shape),
            "problems": list(result.problems),
            "grid": None if result.grid is None else result.grid.to_dict(),
            "facts": result.facts,
            **dict(details or {}),
        }
        try:
            image = np.asarray(result.array, dtype=np.float32)
            sizes = {"image": self._write_array(self._path(key), image)}
            for name, mask in result.masks.items():
                sizes[name] = self._write_array(self._path(key, name), np.asarray(mask, bool))
            info["bytes"] = sizes
            atomic_write_text(
                self._path(key, "json"), json.dumps(info, indent=1, default=str) + "\n"
            )
        except OSError as exc:
            log.warning("cannot write the preprocessing cache in %s: %s", self.root, exc)
            return None
        return CacheEntry(
            key=key,
            shape=tuple(int(n) for n in result.array.shape),
            masks=sorted(result.masks),
            problems=list(result.problems),
            grid=result.grid,
            facts=dict(result.facts),
        )

    @staticmethod
    def _write_array(path: Path, array: np.ndarray) -> int:
        """``np.save`` through a temporary file renamed into place; returns the file's size."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            return tmp.stat().st_size

    def fetch(
        self,
        key: str,
        compute: Callable[[], Preprocessed],
        details: Mapping[str, Any] | None = None,
    ) -> Preprocessed:
        """Return the entry under ``key``; on a miss, compute it, store it and return it."""
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            return cached
        result = compute()
        self.misses += 1
        self.save(key, result, details)
        return result

    def ensure(
        self,
        key: str,
        compute: Callable[[], Preprocessed],
        details: Mapping[str, Any] | None = None,
    ) -> CacheEntry:
        """Make sure ``key`` is stored (computing it on a miss) and return its index.

        A hit reads only the small index, never the arrays: this is what the streaming first
        pass and its worker processes call.

        Raises:
            OSError: The entry was computed but could not be stored (the arrays would be lost).
        """
        entry = self.entry(key)
        if entry is not None:
            self.hits += 1
            return entry
        result = compute()
        self.misses += 1
        entry = self.save(key, result, details)
        if entry is None:
            raise OSError(f"cannot write the preprocessing cache in {self.root}")
        return entry

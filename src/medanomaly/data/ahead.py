"""The first pass in the background: score a chunk of cases while the next ones are prepared.

:func:`prepare_ahead` starts the first pass of :func:`~medanomaly.data.loading.load_cases`
(listing, retrieval from an archive, reading and preprocessing into the cache, in this
process or in worker processes) in one background thread, and returns a
:class:`PreparingSet`. Its :meth:`~PreparingSet.chunks` hands out each chunk of cases as soon
as every case in it is prepared, so that the caller scores (and writes the maps of) chunk
``k`` while the cases of chunk ``k + 1`` are retrieved and prepared.

This is the only place where the first pass and its use overlap, and the overlap is bounded:
once the cases of the next chunk are ready and the caller has not taken them yet, the first
pass waits (at most one chunk ahead, plus the series :class:`~medanomaly.data.loading`
retrieves one ahead and the tasks queued in the worker processes). What comes out is what
:func:`~medanomaly.data.loading.load_cases` gives: the same chunks in the same order (those of
:func:`~medanomaly.data.sets.shape_chunks`; with cases of several shapes only the first
shape's full chunks can come before the pass ends), the same arrays, the same skipped cases
with the same reasons (:meth:`PreparingSet.finish`). An error in the background is raised in
the caller's thread at its next chunk; :meth:`PreparingSet.close` (also on leaving the
``with`` block, an error or Ctrl-C included) stops the pass after the case in hand and waits
for its thread, the retrieval ahead and the worker processes to end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.cache import PreprocessCache
from medanomaly.data.listing import Case
from medanomaly.data.loading import (
    MIN_SIZE,
    ArrayAugment,
    CaseOutcome,
    FirstPass,
    InputSpec,
    LoadReport,
    build_first_pass,
    gather_loaded,
    streamed_set,
)
from medanomaly.data.sets import ready_chunks
from medanomaly.data.streaming import StreamedSet
from medanomaly.transforms import FOREGROUND_KEY, LESION_KEY

#: Kept cases prepared ahead before the caller first asks for a chunk.
DEFAULT_AHEAD = 16


def prepare_ahead(
    cases: Sequence[Case],
    source: str | Path,
    transforms: list[dict[str, Any]] | None = None,
    read_options: dict[str, Any] | None = None,
    cache: bool | str | Path | None = None,
    min_size: int = MIN_SIZE,
    expect: InputSpec | None = None,
    num_workers: int | None = None,
    augment: bool = False,
) -> PreparingSet:
    """Start preparing ``cases`` in the background, streamed (see the module's text).

    The arguments are those of :func:`~medanomaly.data.loading.load_cases` with ``stream``
    on; there is no ``strict`` (a strict load finds every unreadable case before the caller
    uses any: use ``load_cases``). The chunks are read without augmentation, as the
    scoring's chunks of a loaded set are; ``augment`` goes to the finished set.

    Returns:
        The set being prepared; use it in a ``with`` block.
    """
    first_pass, augmentation = build_first_pass(
        transforms, read_options, cache, min_size, expect, True, num_workers
    )
    augment_fn = ArrayAugment(augmentation) if augment and len(augmentation) else None
    return PreparingSet(cases, source, first_pass, augment_fn)


class PreparingSet:
    """A streamed set whose first pass runs in a background thread; chunks come when ready.

    Args:
        cases: The cases, in the order of the set.
        source: Where they were listed from (for messages).
        first_pass: The first pass that prepares them (streamed).
        augment: The finished set's augmentation (``None``: none).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        source: str | Path,
        first_pass: FirstPass,
        augment: ArrayAugment | None = None,
    ) -> None:
        self.cases = list(cases)
        self.source = source
        self._first_pass = first_pass
        self._augment = augment
        self._store = PreprocessCache(first_pass.job.store)  # type: ignore[arg-type]
        self._outcomes: list[CaseOutcome | None] = [None] * len(self.cases)
        self._prefix = 0  # every case before it has its outcome
        self._kept: list[int] = []  # positions of the kept cases among the first _prefix
        self._size: int | Callable[[tuple[int, ...]], int] | None = None
        self._handed = 0  # chunks handed out
        self._taken = 0  # kept cases in them
        self._unbounded = False  # someone waits for the whole set: no more waiting for chunks
        self._stop = False
        self._ended = False  # every case has its outcome
        self._failure: BaseException | None = None
        self._result: tuple[StreamedSet, LoadReport] | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="first-pass", daemon=True)
        self._thread.start()

    @property
    def listed(self) -> int:
        """Cases listed (kept or not): the most the set can hold."""
        return len(self.cases)

    # -- the background thread -------------------------------------------------------------
    def _run(self) -> None:
        outcomes = self._first_pass.run(self.cases)
        try:
            for index, outcome in outcomes:
                with self._changed:
                    self._record(index, outcome)
                    self._changed.notify_all()
                    while not self._stop and self._far_enough():
                        self._changed.wait()
                    if self._stop:
                        return
            with self._changed:
                self._ended = True
        except BaseException as error:  # raised in the caller's thread at its next chunk
            with self._changed:
                self._failure = error
        finally:
            outcomes.close()
            with self._changed:
                self._stop = True
                self._changed.notify_all()

    def _record(self, index: int, outcome: CaseOutcome) -> None:
        """Keep a case's outcome; extend the prepared prefix as far as it now goes."""
        self._outcomes[index] = outcome
        while self._prefix < len(self.cases) and self._outcomes[self._prefix] is not None:
            if self._outcomes[self._prefix].error is None:  # type: ignore[union-attr]
                self._kept.append(self._prefix)
            self._prefix += 1

    def _far_enough(self) -> bool:
        """The next chunk is ready and a chunk's worth of cases waits to be taken."""
        if self._unbounded:
            return False
        waiting = len(self._kept) - self._taken
        if self._size is None:
            return waiting >= DEFAULT_AHEAD
        ready = len(self._ready_chunks()) > self._handed
        return ready and waiting >= self._step()

    def _step(self) -> int:
        size = self._size
        if not callable(size):
            return max(1, int(size or DEFAULT_AHEAD))
        return max(1, int(size(self._shape(self._kept[0])))) if self._kept else 1

    # -- what the caller sees --------------------------------------------------------------
    def _shape(self, position: int) -> tuple[int, ...]:
        return tuple(int(n) for n in self._outcomes[position].value.shape)  # type: ignore[union-attr]

    def _flags(self) -> dict[str, bool] | None:
        """Whether the whole set has lesion / foreground masks, once that is settled.

        A foreground mask comes from the run's transforms, so every case has one or none;
        a lesion mask comes from the case list, so a case still to come may add one.
        """
        if not self._kept:
            return None
        masks = self._outcomes[self._kept[0]].value.masks  # type: ignore[union-attr]
        lesion = any(LESION_KEY in self._outcomes[i].value.masks for i in self._kept)  # type: ignore[union-attr]
        coming = any(case.mask is not None for case in self.cases[self._prefix :])
        if not lesion and coming and not self._ended:
            return None
        return {"with_masks": lesion, "with_foreground": FOREGROUND_KEY in masks}

    def _ready_chunks(self) -> list[np.ndarray]:
        if self._size is None or (self._flags() is None and not self._ended):
            return []
        shapes = [self._shape(i) for i in self._kept]
        return ready_chunks(shapes, self._size, complete=self._ended)

    def chunks(self, size: int | Callable[[tuple[int, ...]], int]) -> Iterator[np.ndarray]:
        """Index arrays (among the kept cases) of chunks of one shape, each once it is ready.

        The chunks are those of :meth:`StreamedSet.chunks` on the finished set, in the same
        order. Take them once; the first pass then runs at most one chunk ahead of the caller.

        Raises:
            ImageReadError: No case is readable (at the end).
            Exception: Whatever stopped the first pass, at the next chunk.
        """
        with self._changed:
            if self._size is not None:
                raise RuntimeError("the chunks of a set being prepared are taken once")
            self._size = size
            self._changed.notify_all()
        while True:
            with self._changed:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                self._handed += 1
                self._taken += len(chunk)
                self._changed.notify_all()
            yield chunk
        self.finish()  # an error of the whole load (no readable case) is raised here

    def _next_chunk(self) -> np.ndarray | None:
        """Wait until the next chunk is ready (``None``: there is none)."""
        while True:
            if self._failure is not None:
                raise self._failure
            ready = self._ready_chunks()
            if len(ready) > self._handed:
                return ready[self._handed]
            if self._ended or self._stop:
                return None
            self._changed.wait()

    def subset(self, index: Sequence[int] | np.ndarray) -> StreamedSet:
        """The ready kept cases at ``index`` as a streamed set (as the finished set's subset)."""
        with self._changed:
            positions = [self._kept[int(i)] for i in index]
            flags = self._flags()
        values = [self._outcomes[p].value for p in positions]  # type: ignore[union-attr]
        cases = [self.cases[p] for p in positions]
        return streamed_set(self._store, values, cases, None, self._first_pass.owner, flags)  # type: ignore[arg-type]

    def finish(self) -> tuple[StreamedSet, LoadReport]:
        """Wait for the first pass to end; the whole set and its report, as ``load_cases``'s.

        Raises:
            ImageReadError: No case is readable.
            Exception: Whatever stopped the first pass.
        """
        with self._changed:
            self._unbounded = True
            self._changed.notify_all()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        if not self._ended:
            raise RuntimeError("the first pass of this set was stopped before its end")
        if self._result is None:
            outcomes, first_pass = self._outcomes, self._first_pass
            found = gather_loaded(
                self.source, self.cases, outcomes, first_pass, self._augment, True, False
            )
            self._result = found  # type: ignore[assignment]
        return self._result  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the first pass after the case in hand and wait until its work has ended."""
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        self._thread.join()

    def __enter__(self) -> PreparingSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Run one function over many items in worker processes, and survive workers that die.

The first pass over a dataset (decode and preprocess every case) is CPU-bound and runs one
case per task in a :class:`~concurrent.futures.ProcessPoolExecutor`. A worker that dies (a
decoder that segfaults, the kernel's out-of-memory killer, ``kill -9``) breaks the whole
pool: every task in flight then fails with ``BrokenProcessPool`` and nothing says which one
killed it. :func:`map_in_workers` never hangs on that and never loses a case: it runs the
tasks that were in flight again, one at a time in a fresh single-worker pool, so that the
case whose worker dies again is the one reported (as :class:`WorkerDied`), and then carries
on with a full pool.

Workers start from a fork server on Linux (a clean single-threaded process that imports
the readers once; forking a process that already runs torch threads is not safe) and by
spawning elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

#: Modules the fork server imports once, so that each worker starts without importing them.
PRELOAD = ("medanomaly.data.loading",)
#: Tasks queued per worker: enough to keep every worker busy, few enough that a broken pool
#: leaves only a handful of suspects to run again.
TASKS_PER_WORKER = 2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkerDied:
    """The result of a task whose worker process died twice running it (once alone)."""

    message: str = (
        "the worker process preparing it died (killed, out of memory or a crash in a decoder)"
    )


def _init_worker() -> None:
    """One thread per worker: the workers are the parallelism."""
    import torch

    torch.set_num_threads(1)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of the workers: a fork server on Linux, spawning elsewhere."""
    if sys.platform.startswith("linux"):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))
        return context
    return multiprocessing.get_context("spawn")


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_init_worker)


def map_in_workers(
    function: Callable[[Any], Any], items: Sequence[Any], workers: int
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, function(items[index]))`` for every item, in completion order.

    Args:
        function: A picklable (module-level) function of one item.
        items: Picklable items.
        workers: Worker processes (at least 1).

    Yields:
        ``(index, result)``; ``result`` is a :class:`WorkerDied` for an item whose worker
        died when it ran alone. An exception raised by ``function`` is raised here.
    """
    queue = deque(range(len(items)))
    suspects: deque[int] = deque()
    while queue or suspects:
        if suspects:
            yield _run_alone(function, items, suspects.popleft())
            continue
        broken: list[int] = []
        yield from _run_pool(function, items, queue, max(1, workers), broken)
        suspects.extend(sorted(broken))


def _run_alone(function: Callable[[Any], Any], items: Sequence[Any], index: int) -> tuple[int, Any]:
    """Run one suspect in its own single-worker pool."""
    pool = _pool(1)
    try:
        return index, pool.submit(function, items[index]).result()
    except BrokenProcessPool:
        return index, WorkerDied()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_pool(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    queue: deque[int],
    workers: int,
    broken: list[int],
) -> Iterator[tuple[int, Any]]:
    """Run queued items on one pool until the queue is empty or the pool breaks.

    On a break, the items that were in flight are put into ``broken`` and the generator
    ends; items finished before the break are yielded as usual.
    """
    pool = _pool(workers)
    running: dict[Future, int] = {}
    try:
        while queue or running:
            while queue and len(running) < workers * TASKS_PER_WORKER:
                index = queue.popleft()
                running[pool.submit(function, items[index])] = index
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):
                    broken.append(index)
                    continue
                yield index, future.result()
            if broken:
                wait(running)  # the rest fail quickly once the pool is broken
                for future, index in running.items():
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken.append(index)
                    else:
                        yield index, future.result()
                running.clear()
                return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

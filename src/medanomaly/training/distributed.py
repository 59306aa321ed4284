"""Batch jobs over several processes: each rank prepares and scores its share of the cases.

``score``, ``evaluate`` and ``screen`` run on the engine training uses (Lightning Fabric):
``--devices N [--num-nodes M]`` starts N processes per machine (or takes them from
``torchrun``), each with its own device. The case list is split like torch's
``DistributedSampler`` without shuffling (rank ``r`` of ``W`` takes cases ``r, r + W, ...``)
but without its padding, so that no case is scored twice. Each rank decodes, preprocesses and
scores its share and writes the maps it made; the small per-case results travel to rank 0,
which writes the tables in input order.

A single process (the default) takes the same path with a world of one, without
``torch.distributed``. There ``score`` and ``screen`` need not wait for the whole share:
``load_share(ahead=True)`` returns a :class:`ShareAhead` whose first pass runs in the
background while the job scores the chunks already prepared (:mod:`medanomaly.data.ahead`).
Several ranks prepare their whole share first: a case's place in the job's table depends on
the cases every rank kept.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from medanomaly.data.workers import available_cores
from medanomaly.errors import ImageReadError, MedanomalyError

T = TypeVar("T")


class RankFailedError(MedanomalyError):
    """Another rank of a distributed job failed; its error is in the message."""


@dataclass
class Ranks:
    """The processes of one job, and what they exchange.

    Args:
        fabric: The launched Fabric of a distributed job; ``None`` for a single process.
        device: This process's device.
        local_world_size: Processes on this machine (``--devices``).
    """

    fabric: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_world_size: int = 1

    @property
    def world_size(self) -> int:
        """Processes in the job."""
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def rank(self) -> int:
        """This process's global rank (0 writes the tables)."""
        return 0 if self.fabric is None else int(self.fabric.global_rank)

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def share(self, n: int) -> np.ndarray:
        """Positions of this rank's cases among ``n``: ``rank, rank + world, ...``."""
        return np.arange(self.rank, n, self.world_size, dtype=np.int64)

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), on every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` on rank 0 (``None`` elsewhere), in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def checked(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank and return this rank's result once every rank has one.

        A rank whose step raises does not leave the others waiting forever in the next
        exchange: the ranks share whether their step worked, and if one did not every rank
        raises (the failing one its own error, the others :class:`RankFailedError` naming
        it). ``step`` itself must not exchange anything between ranks.
        """
        if self.world_size == 1:
            return step()
        failure: Exception | None = None
        value: Any = None
        try:
            value = step()
        except Exception as error:
            failure = error
        self._share_failure(failure)
        return value

    def together(self, step: Callable[[], T], to_main: bool = False) -> list[T] | None:
        """Run ``step`` on every rank and return every rank's result, in rank order.

        Failures are shared as in :meth:`checked`, a result that cannot be pickled included.

        Args:
            step: This rank's part (it must not exchange anything between ranks).
            to_main: Send the results to rank 0 only (the others get ``None``); by default
                every rank gets them all.
        """
        if self.world_size == 1:
            return [step()]
        failure: Exception | None = None
        payload = b""
        try:
            payload = pickle.dumps(step(), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            failure = error
        self._share_failure(failure)
        parts = self.gather(payload) if to_main else self.all_gather(payload)
        return None if parts is None else [pickle.loads(part) for part in parts]

    def _share_failure(self, failure: Exception | None) -> None:
        """Tell every rank whether this one failed; raise on every rank if one did."""
        text = None if failure is None else f"{type(failure).__name__}: {failure}"
        every = self.all_gather(text)
        if failure is not None:
            raise failure
        failed = [(rank, line) for rank, line in enumerate(every) if line is not None]
        if failed:
            rank, line = failed[0]
            others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise RankFailedError(f"rank {rank} of {self.world_size} failed{others}: {line}")


def launch(accelerator: str = "auto", devices: int = 1, num_nodes: int = 1) -> Ranks:
    """Start the processes of a job (as ``fit --devices`` does) and return this one's view.

    With one device on one node nothing is started and no process group is made.

    Args:
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``.
        devices: Processes (devices) per node.
        num_nodes: Machines (launch with ``torchrun`` or a cluster launcher).
    """
    if devices <= 1 and num_nodes <= 1:
        wants_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
        return Ranks(device=torch.device("cuda" if wants_gpu else "cpu"))
    from medanomaly.training.engine import make_fabric  # Lightning imports slowly

    fabric = make_fabric(accelerator, devices, num_nodes)
    return Ranks(fabric=fabric, device=fabric.device, local_world_size=max(1, devices))


def default_workers(ranks: Ranks) -> int | None:
    """First-pass workers per rank: the machine's cores shared by its ranks (``None``: auto)."""
    if ranks.world_size == 1:
        return None
    return max(1, available_cores() // ranks.local_world_size)


@dataclass
class Share:
    """One rank's part of a job's cases, and what every rank needs to know about the rest.

    Attributes:
        cases: This rank's kept cases (a streamed set).
        index: Position of each of them in the job's table of kept cases (input order).
        n_cases: Kept cases over all ranks.
        skipped: ``(path, reason)`` of every rank's skipped cases, in input order.
        warnings: ``(path, problem)`` of every rank's kept cases, in input order.
    """

    cases: Any
    index: np.ndarray
    n_cases: int
    skipped: list[tuple[str, str]]
    warnings: list[tuple[str, str]]

    def positions(self, index: np.ndarray) -> np.ndarray:
        """Where this rank's cases at ``index`` stand in the job's table of kept cases."""
        return self.index[index]

    def finish(self) -> Share:
        """The share with every case prepared: this one."""
        return self

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class ShareAhead:
    """A single process's cases while their first pass still runs (``load_share(ahead=True)``).

    Used like a :class:`Share` inside a ``with`` block: ``cases`` is a
    :class:`~medanomaly.data.ahead.PreparingSet`, whose chunks come as they are prepared;
    :meth:`finish` gives the :class:`Share` (the same as without ``ahead``) once the caller
    has taken every chunk. Leaving the block stops the first pass if it still runs.

    Args:
        cases: The set being prepared.
        listing: Every listed case (for the input order of the skipped cases).
    """

    #: The cases' positions are their own (one process): ``screen``'s ``index=None``.
    index = None

    def __init__(self, cases: Any, listing: list[Any]) -> None:
        self.cases = cases
        self.listing = listing

    def positions(self, index: np.ndarray) -> np.ndarray:
        """Where the cases at ``index`` stand among the kept cases: the same positions."""
        return np.asarray(index, dtype=np.int64)

    def finish(self) -> Share:
        """Wait for the first pass to end; the share as :func:`load_share` gives it.

        Raises:
            ImageReadError: No case is readable.
        """
        cases, report = self.cases.finish()
        kept = len(report.kept)
        return Share(
            cases=cases,
            index=np.arange(kept, dtype=np.int64),
            n_cases=kept,
            skipped=[(p, r) for _, p, r in sorted(_placed(report.skipped, self.listing))],
            warnings=[(p, w) for _, p, w in sorted(_placed(report.warnings, self.listing))],
        )

    def __enter__(self) -> ShareAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cases.close()


def load_share(
    detector: Any,
    data: str | Path,
    ranks: Ranks,
    strict: bool = False,
    num_workers: int | None = None,
    ahead: bool = False,
) -> Share | ShareAhead:
    """Prepare this rank's share of ``data`` with the run's own preprocessing, streamed.

    Args:
        detector: The run's detector (its ``run_config_`` holds the ``data:`` block).
        data: Folder or manifest.
        ranks: The job's processes.
        strict: Raise on the first unreadable case (on every rank).
        num_workers: First-pass workers of this rank (default: the run's
            ``data.num_workers``, else the machine's cores shared by its ranks).
        ahead: In a single process, and unless ``strict`` (which finds every unreadable
            case before anything is written), return at once a :class:`ShareAhead` whose
            first pass runs in the background while the caller scores the cases prepared
            (:mod:`medanomaly.data.ahead`). Several ranks need every rank's kept cases
            before the first is placed: they prepare their share first.

    Raises:
        ImageReadError: No rank has a readable case.
    """
    from medanomaly.data.listing import list_cases
    from medanomaly.data.loading import load_cases

    options = dict(detector.run_config_.get("data") or {})
    label_names = options.pop("label_names", None)
    options.setdefault("stream", True)
    if num_workers is not None or "num_workers" not in options:
        options["num_workers"] = num_workers if num_workers is not None else default_workers(ranks)
    listing = list_cases(data, label_names)
    if ahead and ranks.world_size == 1 and not strict and options["stream"]:
        from medanomaly.data.ahead import prepare_ahead

        options.pop("stream")
        preparing = prepare_ahead(listing, data, **options, expect=detector.input_spec())
        return ShareAhead(preparing, listing)
    mine = ranks.share(len(listing))
    local: dict[str, Any] = {}

    def prepare() -> tuple[list[int], list[tuple[int, str, str]], list[tuple[int, str, str]]]:
        local["cases"], report = load_cases(
            [listing[i] for i in mine],
            data,
            **options,
            strict=strict,
            expect=detector.input_spec(),
            allow_empty=ranks.world_size > 1,
        )
        local["kept"] = [int(mine[k]) for k in report.kept]
        return local["kept"], _placed(report.skipped, listing), _placed(report.warnings, listing)

    everyone = ranks.together(prepare)
    every_kept = sorted(position for kept, _, _ in everyone for position in kept)
    skipped = sorted(line for _, lines, _ in everyone for line in lines)
    warnings = sorted(line for _, _, lines in everyone for line in lines)
    if not every_kept:
        lines = "; ".join(f"{path}: {reason}" for _, path, reason in skipped[:3])
        raise ImageReadError(data, f"no readable images: {lines}")
    return Share(
        cases=local["cases"],
        index=np.searchsorted(np.asarray(every_kept), np.asarray(local["kept"], dtype=np.int64)),
        n_cases=len(every_kept),
        skipped=[(path, reason) for _, path, reason in skipped],
        warnings=[(path, problem) for _, path, problem in warnings],
    )


def _placed(lines: list[tuple[str, str]], listing: list[Any]) -> list[tuple[int, str, str]]:
    """``(path, text)`` lines with each path's position in the listing (for input order)."""
    where: dict[str, int] = {}
    for position, case in enumerate(listing):
        where.setdefault(str(case.path), position)
    return [(where.get(path, -1), path, text) for path, text in lines]


def merge_rows(parts: list[list[tuple[int, Any]]], n: int) -> list[Any]:
    """Rows ``(index, row)`` from every rank, as one list in index order.

    Raises:
        RuntimeError: An index is missing or was scored twice (a bug, never the input).
    """
    rows: list[Any] = [None] * n
    seen = np.zeros(n, dtype=np.int64)
    for part in parts:
        for index, row in part:
            rows[int(index)] = row
            seen[int(index)] += 1
    if not np.all(seen == 1):
        raise RuntimeError(
            f"distributed scoring: {int(np.sum(seen == 0))} cases missing, "
            f"{int(np.sum(seen > 1))} scored more than once"
        )
    return rows


def cpu_threads_per_rank(ranks: Ranks) -> None:
    """Share the machine's cores between the ranks of a CPU job (torch's intra-op threads)."""
    if ranks.world_size > 1 and ranks.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cores() // ranks.local_world_size))

"""Ranks of a distributed job: shares, merged rows, and failures that stop every rank."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medanomaly.training.distributed import RankFailedError, Ranks, merge_rows

WORLD = 2
JOIN_SECONDS = 120  # far above the few seconds the exchanges take; a hang fails the test


def test_shares_cover_every_case_once_without_padding():
    shares = [Ranks(fabric=SimpleNamespace(world_size=3, global_rank=r)).share(7) for r in range(3)]
    assert [s.tolist() for s in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    rows = [[(int(i), f"case{i}") for i in share] for share in shares]
    assert merge_rows(rows, 7) == [f"case{i}" for i in range(7)]
    with pytest.raises(RuntimeError, match="2 cases missing"):
        merge_rows(rows[:2], 7)


def test_one_process_runs_the_step_without_exchanging():
    ranks = Ranks()
    assert ranks.together(lambda: 5) == [5] and ranks.together(lambda: 5, to_main=True) == [5]
    assert ranks.checked(lambda: 6) == 6
    with pytest.raises(ValueError, match="boom"):
        ranks.together(_fail)


def _fail() -> None:
    raise ValueError("boom")


def _scenarios(ranks: Ranks) -> list[str]:
    """What each exchange gave this rank, as lines (both ranks run the same sequence)."""
    lines = []

    def attempt(name, call):
        try:
            lines.append(f"{name}: ok {call()!r}")
        except RankFailedError as error:
            lines.append(f"{name}: RankFailedError {error}")
        except Exception as error:
            lines.append(f"{name}: own {type(error).__name__}")

    rank = ranks.rank
    attempt("all", lambda: ranks.together(lambda: rank * 10))
    attempt("main", lambda: ranks.together(lambda: rank * 10, to_main=True))
    attempt("rank 1 fails", lambda: ranks.together(lambda: _fail() if rank == 1 else rank))
    attempt("both fail", lambda: ranks.together(_fail, to_main=True))
    # a result that cannot be pickled fails on its rank, never in the exchange
    attempt("unpicklable", lambda: ranks.together(lambda: (lambda: 0) if rank == 0 else 1))
    attempt("checked", lambda: ranks.checked(lambda: _fail() if rank == 0 else "mine"))
    attempt("after", lambda: ranks.together(lambda: rank + 1))  # still in step
    return lines


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        ranks = Ranks(fabric=SimpleNamespace(world_size=WORLD, global_rank=rank))
        text = "\n".join(_scenarios(ranks))
        dist.destroy_process_group()
    except Exception:
        text = traceback.format_exc()
    Path(out, f"rank{rank}.txt").write_text(text)


def test_a_failing_rank_stops_every_rank_without_a_hang(tmp_path):
    context = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [
        context.Process(target=_worker, args=(rank, init, str(tmp_path))) for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_SECONDS)
    hung = [p.pid for p in processes if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, "ranks hung in an exchange"
    rank0, rank1 = (
        dict(
            line.split(": ", 1)
            for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()
            if ": " in line
        )
        for r in range(WORLD)
    )
    assert rank0["all"] == rank1["all"] == "ok [0, 10]"
    assert rank0["main"] == "ok [0, 10]" and rank1["main"] == "ok None"
    assert rank1["rank 1 fails"] == "own ValueError"
    assert rank0["rank 1 fails"] == "RankFailedError rank 1 of 2 failed: ValueError: boom"
    assert rank0["both fail"] == rank1["both fail"] == "own ValueError"
    assert rank0["unpicklable"].startswith("own ")
    assert rank1["unpicklable"].startswith("RankFailedError rank 0 of 2 failed")
    assert rank0["checked"] == "own ValueError"
    assert rank1["checked"] == "RankFailedError rank 0 of 2 failed: ValueError: boom"
    assert rank0["after"] == rank1["after"] == "ok [1, 2]"
    assert np.all([p.exitcode == 0 for p in processes])

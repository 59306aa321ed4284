"""Progress of the long steps over cases: a bar on a terminal, plain lines in a log.

On a terminal tqdm draws ``desc: 40%|████ | 12/30 [00:05<00:07, 2.4 case/s]`` (cases/s and the
time left). Elsewhere (a batch job's log) the bar is off and a plain INFO line is logged at
every tenth of the cases, with the same rate and time left, so that ``--verbose`` logs show
how far a job got.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class CaseProgress:
    """Counts cases done out of ``total``; use as a context manager.

    Args:
        total: Cases in the step.
        desc: The step in a few words, e.g. ``"scoring"``.
    """

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.done, self.started = 0, time.perf_counter()
        self.bar = tqdm(total=total, unit="case", desc=desc, disable=None)
        self._next_line = max(1, total // 10)

    def update(self, n: int) -> None:
        """``n`` more cases are done."""
        self.done += n
        self.bar.update(n)
        if self.bar.disable and (self.done >= self._next_line or self.done == self.total):
            self._next_line = self.done + max(1, self.total // 10)
            log.info("%s", self.line())

    def line(self) -> str:
        """``desc: done/total cases, rate case/s, ETA s``."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        return f"{self.desc}: {self.done}/{self.total} cases, {rate:.3g} case/s, {left:.0f} s left"

    def __enter__(self) -> CaseProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.close()

"""What ``cv`` and ``compare`` share: a metric over folds, the resume check, a quiet fit."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.detectors.base import BaseDetector
from medanomaly.errors import ConfigError
from medanomaly.reports.files import json_ready, write_json


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "n", "folds"}`` over the values that are not ``None``.

    ``sd`` is the sample standard deviation (``ddof=1``), 0 for a single value; ``folds``
    keeps every fold's value in fold order (``None`` where undefined).
    """
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    n = int(defined.size)
    return {
        "mean": float(defined.mean()) if n else None,
        "sd": float(defined.std(ddof=1)) if n > 1 else (0.0 if n else None),
        "n": n,
        "folds": list(values),
    }


def start_or_resume(
    out: Path, state_file: str, state: dict[str, Any], what: str, unchecked: Sequence[str] = ()
) -> None:
    """Write ``out/state_file``, or check that the run already in ``out`` had the same state.

    A run resumes only where everything that decides its results is unchanged, so that fold
    records from two settings are never mixed in one output folder.

    Args:
        out: The run's output folder.
        state_file: Name of the state file in ``out`` (``cv.json``, ``spec.json``).
        state: What must not change between a run and its resumption (JSON-ready).
        what: The kind of run, for the error (``"cross-validation"``, ``"comparison"``).
        unchecked: Keys written but free to change (e.g. the data's path, when its content
            is checked through the splits).

    Raises:
        ConfigError: ``out`` holds a run with another state; the message names the keys.
    """
    path = out / state_file
    wanted = json.loads(json.dumps(json_ready(state)))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in wanted if k not in unchecked and saved.get(k) != wanted[k])
        if changed:
            raise ConfigError(
                f"{out} holds a {what} with a different {', '.join(changed)}; use a new --out "
                "folder (or the same arguments to resume)"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


class _NoDefaultThresholdWarning(logging.Filter):
    """Drops ``fit``'s warning about its default threshold (the folds use another rule)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "the default threshold" not in record.getMessage()


@contextmanager
def default_threshold_unused(unused: bool = True) -> Iterator[None]:
    """Silence the default-threshold warning of every fold's ``fit`` when ``unused``."""
    if not unused:
        yield
        return
    logger, quiet = logging.getLogger(BaseDetector.__module__), _NoDefaultThresholdWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)

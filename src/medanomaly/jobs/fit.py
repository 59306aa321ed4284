"""Fitting a detector into a run directory: the one writer of a run's ``config.yaml``.

``medanomaly fit``, ``cv`` and ``compare`` all call :func:`fit_run`, so that every run
directory holds the same resolved config (model, engine, data, postprocess, version) and is
usable as it is by ``score``, ``evaluate`` and ``screen``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medanomaly._version import __version__
from medanomaly.config import build_detector
from medanomaly.data.loading import LoadReport, input_spec, load_dataset
from medanomaly.data.sets import Cases
from medanomaly.detectors.base import CONFIG_FILE, BaseDetector
from medanomaly.io.atomic import atomic_write_text


@dataclass
class FittedRun:
    """What :func:`fit_run` made.

    Attributes:
        detector: The fitted detector.
        out: The run directory.
        train: The training cases it saw.
        train_report: Cases of the training data that were skipped, and why.
        val_report: The same for the validation data (empty without one).
    """

    detector: BaseDetector
    out: Path
    train: Cases
    train_report: LoadReport
    val_report: LoadReport


def resolved_config(detector: BaseDetector, config: dict[str, Any]) -> dict[str, Any]:
    """The config a run saves: the detector's resolved blocks, the data block, the version."""
    return {**detector.config(), "data": config.get("data") or {}, "version": __version__}


def write_run_config(out: Path, detector: BaseDetector, config: dict[str, Any]) -> None:
    """Write ``out/config.yaml`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(resolved_config(detector, config), sort_keys=False)
    atomic_write_text(out / CONFIG_FILE, text)


def _load(
    data: str | Path | Cases, config: dict[str, Any], detector: BaseDetector, strict: bool
) -> tuple[Cases, LoadReport]:
    if not isinstance(data, str | Path):
        return data, LoadReport()
    # streamed unless the config says otherwise: memory holds batches, never the set
    options = {"stream": True, **(config.get("data") or {})}
    return load_dataset(data, **options, strict=strict, expect=input_spec(detector), augment=True)


def fit_run(
    config: dict[str, Any],
    data: str | Path | Cases,
    out: str | Path,
    val: str | Path | Cases | None = None,
    resume: bool = False,
    strict: bool = False,
) -> FittedRun:
    """Build the detector a config describes, fit it and write its run directory.

    Args:
        config: ``model``/``engine``/``data`` (and optional ``postprocess``) blocks.
        data: Training folder or manifest (read with the config's ``data`` block, with its
            random transforms as augmentation), or cases already loaded.
        out: The run directory (``config.yaml``, ``model.pt``, checkpoints).
        val: Validation folder, manifest or cases (``None``: held out from ``data``).
        resume: Continue an interrupted run in ``out`` (its ``config.yaml`` is kept).
        strict: Raise on the first unreadable case.

    Returns:
        The fitted detector, the run directory and what was skipped.
    """
    out = Path(out)
    detector = build_detector(config)
    train, train_report = _load(data, config, detector, strict)
    val_report = LoadReport()
    if isinstance(val, str | Path):
        options = {"stream": True, **(config.get("data") or {})}
        val, val_report = load_dataset(val, **options, strict=strict, expect=input_spec(detector))
    if not (resume and (out / CONFIG_FILE).exists()):
        write_run_config(out, detector, config)
    detector.fit(train, val, run_dir=out, resume=resume)
    return FittedRun(detector, out, train, train_report, val_report)

"""Fitting a detector into a run directory, as ``medanomaly fit`` does.

``medanomaly fit``, ``cv`` and ``compare`` all call :func:`fit_run`, which writes the run's
``config.yaml`` through the detector's one writer, so that every run directory holds the same
resolved config (model, engine, data, postprocess, version) and is
usable as it is by ``score``, ``evaluate`` and ``screen``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medanomaly.config import build_detector
from medanomaly.data.listing import Case, list_cases, split_parts
from medanomaly.data.loading import LoadReport, load_cases, load_dataset
from medanomaly.data.sets import Cases
from medanomaly.detectors.base import CONFIG_FILE, BaseDetector
from medanomaly.training.compiled import strict_compiling
from medanomaly.training.engine import EngineConfig, resolve_precision

log = logging.getLogger(__name__)


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


def _load(
    data: str | Path | Cases,
    config: dict[str, Any],
    detector: BaseDetector,
    strict: bool,
    cases: list[Case] | None = None,
    augment: bool = True,
) -> tuple[Cases, LoadReport]:
    if not isinstance(data, str | Path):
        return data, LoadReport()
    # streamed unless the config says otherwise: memory holds batches, never the set
    options = {"stream": True, **(config.get("data") or {})}
    expect = detector.input_spec()
    if cases is None:
        return load_dataset(data, **options, strict=strict, expect=expect, augment=augment)
    options.pop("label_names", None)
    return load_cases(cases, data, **options, strict=strict, expect=expect, augment=augment)


def _split_column(
    data: str | Path | Cases, config: dict[str, Any], val: Any
) -> dict[str, list[Case]] | None:
    """The manifest's ``split`` parts, if it has the column; its test rows never train."""
    if not isinstance(data, str | Path):
        return None
    label_names = (config.get("data") or {}).get("label_names")
    parts = split_parts(list_cases(data, label_names), data)
    if parts is not None:
        log.info(
            "fit: %s has a split column: training on its %d train rows%s; its %d test rows "
            "are left out",
            data,
            len(parts["train"]),
            "" if val is not None else f", validating on its {len(parts['val'])} val rows",
            len(parts["test"]),
        )
    return parts


def check_precision(config: dict[str, Any]) -> None:
    """Refuse an ``engine.precision`` this machine cannot run (``--strict``).

    Without ``--strict`` training falls back to 32-bit with one warning instead.

    Raises:
        ConfigError: E.g. ``bf16-mixed`` on a CPU without AVX512-BF16 or AMX.
    """
    resolve_precision(EngineConfig.from_any(config.get("engine")), strict=True)


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
            random transforms as augmentation), or cases already loaded. A manifest with a
            ``split`` column trains on its ``train`` rows, validates on its ``val`` rows
            (unless ``val`` is given) and never reads its ``test`` rows.
        out: The run directory (``config.yaml``, ``model.safetensors``, checkpoints).
        val: Validation folder, manifest or cases (``None``: held out from ``data``).
        resume: Continue an interrupted run in ``out`` (its ``config.yaml`` is kept).
        strict: Raise on the first unreadable case, on a precision this machine lacks and
            on a network ``torch.compile`` fails on (``engine.compile: true``).

    Returns:
        The fitted detector, the run directory and what was skipped.
    """
    out = Path(out)
    detector = build_detector(config)
    if strict:
        check_precision(config)
    parts = _split_column(data, config, val)
    train, train_report = _load(data, config, detector, strict, parts and parts["train"])
    val_report = LoadReport()
    if parts is not None and val is None and parts["val"]:
        val, val_report = _load(data, config, detector, strict, parts["val"], augment=False)
    elif isinstance(val, str | Path):
        options = {"stream": True, **(config.get("data") or {})}
        val, val_report = load_dataset(val, **options, strict=strict, expect=detector.input_spec())
    if not (resume and (out / CONFIG_FILE).exists()):
        detector.write_run_config(out, config.get("data"))
    with strict_compiling(strict):
        detector.fit(train, val, run_dir=out, resume=resume)
    return FittedRun(detector, out, train, train_report, val_report)

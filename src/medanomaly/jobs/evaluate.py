"""Evaluate a trained run on labelled data: ``metrics.json``, ``scores.csv``, ``report.html``.

:func:`evaluate_run` loads a run directory, reads the labelled data with the run's own
preprocessing (its ``data:`` block), scores every case, applies a threshold and writes::

    OUT/metrics.json      image (and, where masks exist, pixel) metrics, see docs/evaluation.md
    OUT/scores.csv        id, label, score, prediction, threshold, p_value[, pixel_* columns]
    OUT/report.html       self-contained report (figures inlined, sortable per-case table)
    OUT/figures/          roc.png, score_histogram.png, confusion_matrix.png,
                          training_curves.png, gallery/*.png

The cases are streamed and may be split over ranks (``--devices``); the per-rank pass and the
merging live in :mod:`medanomaly.jobs.evaluate_share`; the metric blocks are
:mod:`medanomaly.metrics.blocks` and the report :mod:`medanomaly.reports.evaluation`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.detectors.thresholds import (
    LABELLED_RULES,
    ThresholdChoice,
    conformal_pvalues,
    describe_rule,
    parse_rule,
    rule_threshold,
    run_threshold,
)
from medanomaly.errors import ConfigError
from medanomaly.io.temporary import temporary_folder
from medanomaly.jobs import evaluate_share as job
from medanomaly.jobs.score import SCORE_CHUNK, JobOptions, start_job
from medanomaly.metrics.blocks import image_block, pixel_summary
from medanomaly.metrics.image import predict_abnormal
from medanomaly.outputs.guard import Claim, check_apart, claim_outputs, staging_folder
from medanomaly.outputs.viewer import flag_entries, viewer_volumes
from medanomaly.outputs.writers import save_maps_in_chunks, write_scores_csv
from medanomaly.reports.evaluation import evaluation_figures, write_evaluation_report
from medanomaly.reports.files import FIGURES_DIR, METRICS_FILE, SCORES_FILE, json_ready, write_json
from medanomaly.reports.viewer import VIEWER_DIR, install_static
from medanomaly.training.distributed import load_share

log = logging.getLogger(__name__)


def _evaluate_threshold(
    detector: BaseDetector, spec: str | None, labels: np.ndarray, scores: np.ndarray, alpha: float
) -> ThresholdChoice:
    """The threshold of :func:`evaluate_run` and what it rests on."""
    rule, params = parse_rule(spec)
    if rule in LABELLED_RULES:
        name = describe_rule(rule, params, alpha)
        log.warning("threshold %s is fitted on the evaluated cases themselves (optimistic)", name)
        threshold = rule_threshold(rule, params, labels, scores, alpha)
        source = "the evaluated cases themselves (in-sample, optimistic)"
        return ThresholdChoice(threshold, name, source, int(np.size(labels)))
    return run_threshold(
        spec, detector.threshold_, detector.threshold_rule_, detector.val_scores_, alpha
    )


# -- scoring and metric blocks ----------------------------------------------------------------


# -- evaluate -------------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    threshold: str | None = None,
    alpha: float = 0.05,
    strict: bool = False,
    n_boot: int = 1000,
    gallery_per_group: int = 3,
    foreground_threshold: float | None = None,
    maps_dir: str | Path | None = None,
    dicom: bool = False,
    options: JobOptions | None = None,
    chunk: int = SCORE_CHUNK,
    viewer: bool = True,
) -> dict[str, Any] | None:
    """Score labelled data with a trained run and write metrics, scores and a report.

    The cases are streamed (``chunk`` in memory at a time) and, with ``options.devices``
    above one, split over ranks (:mod:`medanomaly.jobs.evaluate_share`); rank 0 writes every file.

    Args:
        run_dir: Run directory (or ``model.safetensors``) written by ``fit`` or ``cv``.
        data: Labelled folder or manifest (``path,label[,mask][,group]``).
        out: Output folder.
        threshold: ``None``/``"run"`` keeps the run's threshold (mean + k·SD of its held-out
            normal validation scores); ``mean_sd[:k=..]``, ``percentile[:q=..]`` and
            ``conformal[:alpha=..]`` are computed on those validation scores; ``youden`` and
            ``f1`` can only be fitted on the evaluated cases and are flagged as optimistic.
        alpha: Conformal level: default ``alpha`` of the conformal rule and the p-value
            cut-off counted in ``metrics.json``.
        strict: Raise on the first unreadable case instead of skipping it.
        n_boot: Bootstrap resamples of the AUROC interval.
        gallery_per_group: Cases per gallery group (see
            :func:`~medanomaly.reports.figures.gallery_indices`).
        foreground_threshold: Intensity cut-off of the pixel-metric foreground (see
            :func:`~medanomaly.metrics.blocks.foreground_masks`).
        maps_dir: Folder for every case's anomaly map in the scan's own geometry (see
            :func:`medanomaly.outputs.writers.save_maps`); ``None`` writes none.
        dicom: With ``maps_dir``, also write a DICOM Parametric Map per DICOM volume.
        options: Devices and workers (default: one process).
        chunk: Cases read into memory at a time.
        viewer: Write every case's scan and map into ``OUT/viewer/`` for the report's
            interactive viewer (:mod:`medanomaly.outputs.viewer`; ``medanomaly view OUT``).

    Returns:
        The metrics written to ``metrics.json`` (on rank 0; ``None`` on the other ranks);
        ``map_problems`` lists the cases whose maps could not be written.
    """
    out = Path(out)
    options = options or JobOptions()
    check_apart(data, out, maps_dir)
    ranks, detector = start_job(run_dir, options)
    main = ranks.is_main
    viewer_dir = out / VIEWER_DIR if viewer else None
    staged = [maps_dir, viewer_dir]
    claim = claim_outputs(folders=[out], staged=staged, command="evaluate") if main else Claim()
    try:
        share = load_share(detector, data, ranks, strict, options.num_workers)
        label_names = (detector.run_config_.get("data") or {}).get("label_names")
        pixel = any(ranks.all_gather(bool(share.cases.has_masks)))
        volumes = None if viewer_dir is None else viewer_volumes(detector, data, viewer_dir)
        with temporary_folder("evaluate") as spill:
            parts = ranks.together(  # every rank's pass, on every rank; one failing stops all
                lambda: job.score_share(
                    detector,
                    share,
                    data,
                    label_names,
                    pixel,
                    foreground_threshold,
                    Path(spill),
                    chunk,
                    volumes,
                )
            )
            local, scored = parts[ranks.rank], job.merged(parts, share.n_cases)
            _check_labelled(data, scored.labels)
            found = job.pixel_result(ranks, local, scored, Path(spill)) if pixel else None
        labelled = scored.labels != -1
        choice = _evaluate_threshold(
            detector, threshold, scored.labels[labelled], scored.scores[labelled], alpha
        )
        figures_dir = out / FIGURES_DIR
        gallery = job.gallery(
            ranks, detector, share, scored, figures_dir / "gallery", gallery_per_group
        )

        def write_maps() -> list[str]:
            if maps_dir is None:
                return []
            return save_maps_in_chunks(
                detector,
                share.cases,
                staging_folder(maps_dir),
                dicom=dicom,
                threshold=choice.value,
                indices=share.index,
            ).problems

        every_problem = ranks.together(write_maps, to_main=True)  # one failing rank stops all
        if every_problem is None:
            return None
        sources = {"run": str(run_dir), "data": str(data)}
        cases = flag_entries([entry for part in parts for entry in part.viewer], choice.value)
        metrics = _write_evaluation(
            out,
            detector,
            scored,
            choice,
            found,
            (gallery, cases),
            share.skipped,
            alpha,
            n_boot,
            sources,
        )
        if viewer_dir is not None:
            install_static(staging_folder(viewer_dir))
            claim.commit(viewer_dir)
        if maps_dir is not None:
            claim.commit(maps_dir)
            metrics["map_problems"] = [line for part in every_problem for line in part]
        write_json(out / METRICS_FILE, metrics)
        return json_ready(metrics)
    finally:
        claim.release()


def _check_labelled(data: str | Path, labels: np.ndarray) -> None:
    if not np.any(labels != -1):
        raise ConfigError(
            f"{data}: no case has a label; evaluate needs labelled data (a manifest with a "
            "label column, or normal/ and abnormal/ sub-folders)"
        )


def _write_evaluation(
    out: Path,
    detector: BaseDetector,
    scored: job.Scored,
    choice: ThresholdChoice,
    found: tuple[dict[str, Any], str] | None,
    pictures: tuple[list[Path], list[dict[str, Any]]],
    skipped: list[tuple[str, str]],
    alpha: float,
    n_boot: int,
    sources: dict[str, str],
) -> dict[str, Any]:
    """Rank 0's part: metrics, ``scores.csv``, the figures and ``report.html``."""
    labels, scores = scored.labels, scored.scores
    labelled = labels != -1
    value = choice.value
    block = image_block(
        labels[labelled],
        scores[labelled],
        value,
        choice.rule,
        choice.source,
        n_boot,
        threshold_n=choice.n,
    )
    if not math.isfinite(value):
        block["notes"].append(
            "threshold is +inf (too few calibration scores for this alpha): no case is called "
            "abnormal; written as null"
        )
    predictions = predict_abnormal(scores, value)
    extra, conformal = _conformal(detector, scores, alpha)
    metrics: dict[str, Any] = {"image": block}
    if found is not None:
        result, rule = found
        metrics["pixel"] = pixel_summary(result, rule, int(scored.include.sum()))
        extra.update(_per_image_columns(result["per_image"], scored.include))
    metrics.update(
        conformal=conformal,
        n_cases=int(labelled.sum()),
        n_unlabelled=int((~labelled).sum()),
        skipped=[{"case": path, "reason": problem} for path, problem in skipped],
        **sources,
        model=detector.name or type(detector).__name__,
    )
    result = AnomalyResult(scores, predictions, np.empty(0), None, value)
    write_scores_csv(out / SCORES_FILE, scored.ids, labels, result, extra=extra)
    made = evaluation_figures(
        detector.history_, labels[labelled], scores[labelled], block, out / FIGURES_DIR
    )
    cases = (scored.ids, labels, scores)
    gallery, viewer_cases = pictures
    write_evaluation_report(
        out, metrics, made, gallery, cases, predictions, extra, viewer_cases=viewer_cases
    )
    return metrics


def _conformal(
    detector: BaseDetector, scores: np.ndarray, alpha: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The ``p_value`` column and the ``conformal`` block of ``metrics.json``."""
    calibration = np.asarray(detector.val_scores_, dtype=np.float64)
    if calibration.size == 0:
        return {}, {"alpha": alpha, "n_calibration": 0, "note": "no validation scores in run"}
    pvalues = conformal_pvalues(calibration, scores)
    return {"p_value": pvalues}, {
        "alpha": alpha,
        "n_calibration": int(calibration.size),
        "min_p_value": 1.0 / (calibration.size + 1.0),
        "n_p_at_or_below_alpha": int(np.sum(pvalues <= alpha)),
        "p_value": "(1 + #{validation normal scores >= score}) / (n + 1)",
    }


def _per_image_columns(
    per_image: list[dict[str, Any]], include: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-case pixel AUROC / AP / best Dice as ``scores.csv`` columns (NaN where absent)."""
    columns = {}
    for key in ("auroc", "average_precision", "best_dice"):
        values = np.full(include.size, np.nan)
        values[np.flatnonzero(include)] = [np.nan if r[key] is None else r[key] for r in per_image]
        columns[f"pixel_{key}"] = values
    return columns

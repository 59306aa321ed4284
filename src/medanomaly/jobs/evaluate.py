"""Evaluate a trained run on labelled data: ``metrics.json``, ``scores.csv``, ``report.html``.

:func:`evaluate_run` loads a run directory, reads the labelled data with the run's own
preprocessing (its ``data:`` block), scores every case, applies a threshold and writes::

    OUT/metrics.json      image (and, where masks exist, pixel) metrics, see docs/evaluation.md
    OUT/scores.csv        id, label, score, prediction, threshold, p_value[, pixel_* columns]
    OUT/report.html       self-contained report (figures inlined, sortable per-case table)
    OUT/figures/          roc.png, score_histogram.png, confusion_matrix.png,
                          training_curves.png, gallery/*.png

The cases are streamed and may be split over ranks (``--devices``); the per-rank pass and the
merging live in :mod:`medanomaly.evaluation.job`. The helpers here (threshold parsing,
chunked scoring, metric blocks, foreground masks) are shared with
:mod:`medanomaly.evaluation.cv`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medanomaly.data.loading import LoadReport, list_cases
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import MIN_THRESHOLD_NORMALS, AnomalyResult, BaseDetector
from medanomaly.detectors.thresholds import THRESHOLD_RULES, choose_threshold, conformal_pvalues
from medanomaly.errors import ConfigError
from medanomaly.evaluation import figures as figs
from medanomaly.evaluation import job
from medanomaly.evaluation.metrics import bootstrap_auroc_ci, image_metrics, predict_abnormal
from medanomaly.evaluation.pixel import pixel_metrics
from medanomaly.evaluation.report import Facts, Figure, Figures, Table, Text, write_report
from medanomaly.io.atomic import atomic_write_text
from medanomaly.io.temporary import temporary_folder
from medanomaly.jobs.score import SCORE_CHUNK, JobOptions, start_job
from medanomaly.outputs.guard import Claim, check_apart, claim_outputs, staging_folder
from medanomaly.outputs.writers import save_maps_in_chunks, write_scores_csv
from medanomaly.training.distributed import load_share

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
LABELLED_RULES = ("youden", "f1")
FOREGROUND_FRACTION = 0.05
IMAGE_KEYS = ("auroc", "auprc", "sensitivity", "specificity", "accuracy", "precision", "f1")


# -- thresholds -----------------------------------------------------------------------------
def parse_rule(spec: str | None) -> tuple[str | None, dict[str, float]]:
    """Split a threshold spec such as ``"mean_sd:k=2"`` into a rule name and parameters.

    Args:
        spec: ``None`` or ``"run"`` (keep the run's own threshold), or a rule of
            :data:`~medanomaly.detectors.thresholds.THRESHOLD_RULES`, optionally followed by
            ``:name=value[,name=value]`` (``k`` for mean_sd, ``q`` for percentile, ``alpha``
            for conformal).

    Returns:
        ``(rule, params)``; ``rule`` is ``None`` for the run's own threshold.

    Raises:
        ConfigError: For an unknown rule or a malformed parameter.
    """
    if spec is None or spec.strip().lower() in ("", "run"):
        return None, {}
    name, _, raw = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in THRESHOLD_RULES:
        raise ConfigError(
            f"unknown threshold rule {spec!r}; use run or one of {', '.join(THRESHOLD_RULES)}"
        )
    params: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"threshold {spec!r}: write parameters as name=number, e.g. k=3")
    return name, params


def rule_threshold(
    rule: str,
    params: dict[str, float],
    labels: np.ndarray,
    scores: np.ndarray,
    alpha: float,
) -> float:
    """Apply a threshold rule to validation scores.

    ``youden`` and ``f1`` use the labelled scores (falling back to mean + 3·SD of the normal
    ones when no abnormal case is present); the other rules use the normal scores only.

    Args:
        rule: Rule name.
        params: Rule parameters (``alpha`` defaults to ``alpha`` for ``conformal``).
        labels: Validation labels (1 = abnormal, 0 = normal).
        scores: Validation scores.
        alpha: Default false-positive bound of the conformal rule.

    Returns:
        The cut-off for ``score > threshold``.

    Raises:
        ConfigError: When the validation scores hold no normal case.
    """
    labels = np.asarray(labels)
    if not np.any(labels == 0):
        raise ConfigError(f"threshold rule {rule!r}: the validation part holds no normal case")
    if rule == "conformal":
        params = {"alpha": alpha, **params}
    if rule in LABELLED_RULES:
        return choose_threshold(rule, scores, labels, **params)
    return choose_threshold(rule, np.asarray(scores)[labels == 0], **params)


def describe_rule(rule: str | None, params: dict[str, float], alpha: float) -> str:
    """A readable name of a rule with its parameters, e.g. ``conformal(alpha=0.05)``."""
    if rule is None:
        return "run"
    if rule == "conformal":
        params = {"alpha": alpha, **params}
    args = ",".join(f"{k}={v:g}" for k, v in params.items())
    return f"{rule}({args})" if args else rule


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold, its rule, what it was computed from and how many scores it rests on."""

    value: float
    rule: str
    source: str
    n: int


def _evaluate_threshold(
    detector: BaseDetector, spec: str | None, labels: np.ndarray, scores: np.ndarray, alpha: float
) -> ThresholdChoice:
    """The threshold of :func:`evaluate_run` and what it rests on."""
    rule, params = parse_rule(spec)
    calibration = np.asarray(detector.val_scores_, dtype=np.float64)
    if rule is None:
        k = detector.get_params().get("threshold_sd")
        source = (
            f"the run's own threshold: mean + {k:g}·SD of its {calibration.size} held-out "
            "normal validation scores"
            if k is not None
            else "the run's own threshold"
        )
        return ThresholdChoice(float(detector.threshold_), "run", source, calibration.size)
    name = describe_rule(rule, params, alpha)
    if rule in LABELLED_RULES:
        log.warning("threshold %s is fitted on the evaluated cases themselves (optimistic)", name)
        threshold = rule_threshold(rule, params, labels, scores, alpha)
        source = "the evaluated cases themselves (in-sample, optimistic)"
        return ThresholdChoice(threshold, name, source, int(np.size(labels)))
    if calibration.size == 0:
        raise ConfigError(f"threshold {name}: the run holds no validation scores")
    normal = np.zeros(calibration.size, dtype=np.int64)
    threshold = rule_threshold(rule, params, normal, calibration, alpha)
    source = f"the run's {calibration.size} held-out normal validation scores"
    return ThresholdChoice(threshold, name, source, calibration.size)


# -- scoring and metric blocks ----------------------------------------------------------------
def score_in_chunks(
    detector: BaseDetector, images: ImageSet, keep_maps: bool, chunk: int = SCORE_CHUNK
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (and optionally float32 maps) of every case, ``chunk`` cases at a time.

    Reconstructions are dropped after each chunk, so memory holds at most the maps.

    Args:
        detector: A fitted detector.
        images: The cases.
        keep_maps: Keep the anomaly maps (needed for pixel metrics).
        chunk: Cases per call to ``detect``.

    Returns:
        ``(scores, maps or None)``.
    """
    if not keep_maps:
        return np.asarray(detector.score(images), dtype=np.float64), None
    scores, maps = [], []
    for start in range(0, len(images), chunk):
        part = images.subset(np.arange(start, min(start + chunk, len(images))))
        result = detector.detect(part)
        scores.append(np.asarray(result.scores, dtype=np.float64))
        if keep_maps:
            maps.append(np.asarray(result.maps, dtype=np.float32))
    return np.concatenate(scores), (np.concatenate(maps) if keep_maps else None)


def image_block(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    rule: str,
    source: str,
    n_boot: int = 1000,
    threshold_n: int | None = None,
) -> dict[str, Any]:
    """The ``image`` block of ``metrics.json``.

    Args:
        labels: 1 = abnormal, 0 = normal.
        scores: One score per case.
        threshold: The cut-off (abnormal iff score > threshold).
        rule: Name of the threshold rule.
        source: What the threshold was computed from.
        n_boot: Bootstrap resamples of the AUROC interval (0 leaves it out).
        threshold_n: How many scores the threshold was computed from (``None``: unknown);
            fewer than 20 adds a note.

    Returns:
        A JSON-ready dict (see docs/evaluation.md).
    """
    m = image_metrics(labels, scores, threshold)
    low, high = bootstrap_auroc_ci(labels, scores, n_boot=n_boot) if n_boot else (None, None)
    block: dict[str, Any] = {key: m[key] for key in ("auroc",)}
    block["auroc_ci95"] = [low, high]
    block.update({key: m[key] for key in IMAGE_KEYS if key != "auroc"})
    block.update(
        confusion_matrix=m["confusion_matrix"],
        threshold=m["threshold"],
        threshold_rule=rule,
        threshold_n=threshold_n,
        threshold_source=source,
        decision_rule=m["decision_rule"],
        n_normal=m["n_normal"],
        n_abnormal=m["n_abnormal"],
        notes=m["notes"],
    )
    if threshold_n is not None and threshold_n < MIN_THRESHOLD_NORMALS:
        block["notes"].append(
            f"the threshold rests on only {threshold_n} scores (fewer than "
            f"{MIN_THRESHOLD_NORMALS}): its sensitivity and specificity are unsteady"
        )
    return block


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask)


def foreground_masks(
    images: ImageSet, threshold: float | None = None
) -> tuple[np.ndarray | None, str]:
    """Foreground (body/brain) masks for background-excluded pixel metrics, and the rule.

    A foreground mask carried by the data (an ``ImageSet.foreground`` array ``(N,
    *spatial)``, e.g. from the ``foreground_mask`` transform) is used as it is. Otherwise a
    voxel is foreground when any channel exceeds ``threshold``, or, by default, exceeds the
    image's minimum by more than 5 % of its intensity range; enclosed holes are filled.

    Args:
        images: The cases.
        threshold: Intensity cut-off (in preprocessed units), or ``None`` for the default.

    Returns:
        ``(masks (N, *spatial) bool, rule in words)``.
    """
    provided = getattr(images, "foreground", None)
    if provided is not None:
        return np.asarray(provided, dtype=bool), "foreground mask provided by the data"
    arrays = images.images
    if threshold is not None:
        raw = (arrays > threshold).any(axis=1)
        rule = f"any channel > {threshold:g} (preprocessed units), holes filled"
    else:
        axes = tuple(range(1, arrays.ndim))
        lo = arrays.min(axis=axes, keepdims=True)
        hi = arrays.max(axis=axes, keepdims=True)
        raw = (arrays > lo + FOREGROUND_FRACTION * (hi - lo)).any(axis=1)
        rule = (
            f"any channel > image minimum + {FOREGROUND_FRACTION:g} x (max - min) of that "
            "image (non-background), holes filled"
        )
    return np.stack([_fill_holes(m) for m in raw]), rule


def pixel_block(
    maps: np.ndarray,
    masks: np.ndarray,
    foreground: np.ndarray,
    foreground_rule: str,
    include: np.ndarray,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``pixel`` block of ``metrics.json`` and the per-image results.

    Args:
        maps: Anomaly maps ``(N, *spatial)``.
        masks: Lesion masks ``(N, *spatial)``.
        foreground: Foreground masks ``(N, *spatial)``; only voxels inside count.
        foreground_rule: How the foreground was obtained (stored in the block).
        include: Bool ``(N,)``: cases whose lesion mask is known (normal cases and abnormal
            cases with a mask).

    Returns:
        ``(block, per_image)``; ``per_image`` has one dict per included case.
    """
    idx = np.flatnonzero(include)
    result = pixel_metrics(maps[idx], masks[idx], foreground[idx], per_image=True)
    return _pixel_summary(result, foreground_rule, int(idx.size)), result["per_image"]


def _pixel_summary(result: dict[str, Any], foreground_rule: str, n_images: int) -> dict[str, Any]:
    """The ``pixel`` block of ``metrics.json`` from pooled pixel metrics."""
    return {
        "auroc": result["auroc"],
        "average_precision": result["average_precision"],
        "best_dice": result["best_dice"],
        "best_dice_threshold": result["best_dice_threshold"],
        "foreground_rule": foreground_rule,
        "n_images": n_images,
        "n_lesion_voxels": result["n_lesion"],
        "n_normal_voxels": result["n_normal"],
        "per_image_summary": result["per_image_summary"],
        "notes": result["notes"],
    }


def known_masks(
    source: str | Path, label_names: dict[str, int] | None, images: ImageSet
) -> np.ndarray:
    """Bool ``(N,)``: cases whose lesion mask is known (normal, or abnormal with a mask file).

    An abnormal case without a ``mask`` entry in the manifest has no lesion annotation and is
    left out of the pixel metrics instead of being counted as lesion-free.
    """
    with_mask = {str(c.path) for c in list_cases(source, label_names) if c.mask is not None}
    has_mask = np.array([case_id in with_mask for case_id in images.ids], dtype=bool)
    return (images.labels == 0) | has_mask


def json_ready(value: Any) -> Any:
    """Replace non-finite floats by ``None`` and NumPy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-finite floats become ``null``)."""
    atomic_write_text(path, json.dumps(json_ready(data), indent=2) + "\n")
    return path


def skipped_list(report: LoadReport) -> list[dict[str, str]]:
    """The unreadable cases of a load, as ``{"case", "reason"}`` dicts."""
    return [{"case": path, "reason": problem} for path, problem in report.skipped]


# -- evaluate -------------------------------------------------------------------------------
def _outcome(label: int, prediction: int) -> str:
    if label not in (0, 1):
        return ""
    return {(1, 1): "TP", (0, 0): "TN", (0, 1): "FP", (1, 0): "FN"}[(label, prediction)]


def case_table(
    ids: list[str],
    labels: np.ndarray,
    scores: np.ndarray,
    predictions: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
    lead: dict[str, list[Any]] | None = None,
) -> Table:
    """The sortable per-case table of a report.

    Args:
        ids: Case ids.
        labels: Known labels (0, 1, -1).
        scores: Scores.
        predictions: 0/1 predictions.
        extra: More numeric columns after the prediction (e.g. ``p_value``).
        lead: Columns placed before the id (e.g. ``repeat``, ``fold``).

    Returns:
        A :class:`~medanomaly.evaluation.report.Table`.
    """
    extra, lead = extra or {}, lead or {}
    columns = [*lead, "id", "label", "score", "prediction", "outcome", *extra]
    rows = []
    for i, case_id in enumerate(ids):
        label, pred = int(labels[i]), int(predictions[i])
        rows.append(
            [
                *(values[i] for values in lead.values()),
                case_id,
                label,
                float(scores[i]),
                pred,
                _outcome(label, pred),
                *(float(values[i]) for values in extra.values()),
            ]
        )
    classes = ["abnormal" if int(v) == 1 else "" for v in labels]
    note = "Click a column header to sort. Label: 1 = abnormal, 0 = normal, -1 = unknown."
    return Table("Per-case scores", columns, rows, note=note, row_classes=classes)


def headline(block: dict[str, Any]) -> list[tuple[str, Any]]:
    """Key facts of an ``image`` block for a report."""
    ci = block.get("auroc_ci95") or [None, None]
    ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else "n/a"
    names = {"auprc": "AUPRC", "f1": "F1"}
    return [
        ("AUROC", block["auroc"]),
        ("AUROC 95 % bootstrap interval", ci_text),
        *((names.get(k, k), block[k]) for k in IMAGE_KEYS if k != "auroc"),
        ("threshold", block["threshold"]),
        ("threshold rule", _rule_with_n(block)),
        ("threshold from", block["threshold_source"]),
        ("cases (normal / abnormal)", f"{block['n_normal']} / {block['n_abnormal']}"),
    ]


def _rule_with_n(block: dict[str, Any]) -> str:
    """The threshold rule with the number of scores it rests on, e.g. ``run (n = 7)``."""
    n = block.get("threshold_n")
    return block["threshold_rule"] if n is None else f"{block['threshold_rule']} (n = {n})"


def _pixel_facts(block: dict[str, Any]) -> Facts:
    keys = ("auroc", "average_precision", "best_dice", "best_dice_threshold", "n_images")
    return Facts(
        "Pixel/voxel level (inside the foreground)",
        [*((k, block[k]) for k in keys), ("foreground rule", block["foreground_rule"])],
    )


def _evaluation_figures(
    detector: BaseDetector,
    labels: np.ndarray,
    scores: np.ndarray,
    block: dict[str, Any],
    folder: Path,
) -> list[Figure]:
    threshold = block["threshold"]
    rule = block["threshold_rule"]
    made = [
        Figure(
            figs.plot_roc([(labels, scores, threshold)], folder / "roc.png", names=["test"]),
            "ROC curve",
            f"The dot marks the operating point of the threshold ({rule}).",
        ),
        Figure(
            figs.plot_score_histograms(labels, scores, threshold, folder / "score_histogram.png"),
            "Score histograms",
            "Normal vs abnormal cases; the dashed line is the threshold.",
        ),
        Figure(
            figs.plot_confusion_matrix(block["confusion_matrix"], folder / "confusion_matrix.png"),
            "Confusion matrix",
            f"At threshold {threshold:.4g}.",
        ),
        Figure(
            figs.plot_training_curves([detector.history_], folder / "training_curves.png"),
            "Training curves",
            "Normal train and validation loss; mean score of normal and abnormal validation "
            "images per epoch (Chung & Choi 2023, Fig. 2).",
        ),
    ]
    return [f for f in made if f.path is not None]


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
) -> dict[str, Any] | None:
    """Score labelled data with a trained run and write metrics, scores and a report.

    The cases are streamed (``chunk`` in memory at a time) and, with ``options.devices``
    above one, split over ranks (:mod:`medanomaly.evaluation.job`); rank 0 writes every file.

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
        gallery_per_group: Cases per gallery group (see :func:`figures.gallery_indices`).
        foreground_threshold: Intensity cut-off of the pixel-metric foreground (see
            :func:`foreground_masks`).
        maps_dir: Folder for every case's anomaly map in the scan's own geometry (see
            :func:`medanomaly.outputs.writers.save_maps`); ``None`` writes none.
        dicom: With ``maps_dir``, also write a DICOM Parametric Map per DICOM volume.
        options: Devices and workers (default: one process).
        chunk: Cases read into memory at a time.

    Returns:
        The metrics written to ``metrics.json`` (on rank 0; ``None`` on the other ranks);
        ``map_problems`` lists the cases whose maps could not be written.
    """
    out = Path(out)
    options = options or JobOptions()
    check_apart(data, out, maps_dir)
    ranks, detector = start_job(run_dir, options)
    main = ranks.is_main
    claim = claim_outputs(folders=[out], staged=[maps_dir], command="evaluate") if main else Claim()
    try:
        share = load_share(detector, data, ranks, strict, options.num_workers)
        label_names = (detector.run_config_.get("data") or {}).get("label_names")
        pixel = any(ranks.all_gather(bool(share.cases.has_masks)))
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
        metrics = _write_evaluation(
            out, detector, scored, choice, found, gallery, share.skipped, alpha, n_boot, sources
        )
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
    gallery: list[Path],
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
        metrics["pixel"] = _pixel_summary(result, rule, int(scored.include.sum()))
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
    made = _evaluation_figures(
        detector, labels[labelled], scores[labelled], block, out / FIGURES_DIR
    )
    _write_evaluation_report(out, metrics, made, gallery, scored, predictions, extra)
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


def _write_evaluation_report(
    out: Path,
    metrics: dict[str, Any],
    made: list[Figure],
    gallery: list[Path],
    scored: job.Scored,
    predictions: np.ndarray,
    extra: dict[str, np.ndarray],
) -> Path:
    blocks: list[Any] = [Facts("Image level", headline(metrics["image"]))]
    if "pixel" in metrics:
        blocks.append(_pixel_facts(metrics["pixel"]))
    blocks.append(Figures("Figures", made))
    blocks.append(
        Figures(
            "Gallery: input | reconstruction | difference map",
            [Figure(p, p.stem) for p in gallery],
            note="Highest- and lowest-scoring abnormal cases, then highest- and lowest-scoring "
            "normal cases; red = large difference. 3D: three planes through the top voxel.",
        )
    )
    blocks.append(case_table(scored.ids, scored.labels, scored.scores, predictions, extra))
    if metrics["skipped"]:
        lines = "; ".join(f"{s['case']}: {s['reason']}" for s in metrics["skipped"])
        blocks.append(Text(f"Skipped cases ({len(metrics['skipped'])})", lines))
    subtitle = f"run {metrics['run']} · data {metrics['data']} · model {metrics['model']}"
    return write_report(out / REPORT_FILE, "medanomaly evaluation", blocks, subtitle)


def summary_line(block: dict[str, Any]) -> str:
    """One line of headline image metrics (values or mean ± SD dicts)."""

    def fmt(value: Any) -> str:
        if isinstance(value, dict):
            if value.get("mean") is None:
                return "n/a"
            return f"{value['mean']:.3f} ± {value['sd']:.3f}"
        return "n/a" if value is None else f"{value:.3f}"

    keys = ("auroc", "auprc", "f1", "sensitivity", "specificity", "accuracy")
    names = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1"}
    parts = [f"{names.get(k, k)} {fmt(block.get(k))}" for k in keys]
    low, high = block.get("auroc_ci95") or (None, None)
    if low is not None and high is not None:
        parts[0] += f" [95 % CI {low:.3f}-{high:.3f}]"
    return ", ".join(parts)

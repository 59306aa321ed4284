"""The report of ``medanomaly evaluate``: headline facts, figures, gallery and per-case table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.metrics.blocks import IMAGE_KEYS
from medanomaly.reports import figures as figs
from medanomaly.reports.files import REPORT_FILE
from medanomaly.reports.html import Facts, Figure, Figures, Table, Text, write_report
from medanomaly.reports.viewer import Viewer


def _outcome(label: int, prediction: int) -> str:
    """TP, TN, FP or FN; empty for an unlabelled case."""
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
        A :class:`~medanomaly.reports.html.Table`.
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


def pixel_facts(block: dict[str, Any]) -> Facts:
    """The pixel block's key facts for a report."""
    keys = ("auroc", "average_precision", "best_dice", "best_dice_threshold", "n_images")
    return Facts(
        "Pixel/voxel level (inside the foreground)",
        [*((k, block[k]) for k in keys), ("foreground rule", block["foreground_rule"])],
    )


def evaluation_figures(
    history: Sequence[dict[str, float]],
    labels: np.ndarray,
    scores: np.ndarray,
    block: dict[str, Any],
    folder: Path,
) -> list[Figure]:
    """ROC, score histograms, confusion matrix and training curves of one evaluation.

    Args:
        history: The run's losses per epoch (``detector.history_``).
        labels: Labels of the labelled cases.
        scores: Their scores.
        block: The ``image`` block (threshold, rule, confusion matrix).
        folder: Where the PNGs go.

    Returns:
        The figures that could be drawn.
    """
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
            figs.plot_training_curves([history], folder / "training_curves.png"),
            "Training curves",
            "Normal train and validation loss; mean score of normal and abnormal validation "
            "images per epoch (Chung & Choi 2023, Fig. 2).",
        ),
    ]
    return [f for f in made if f.path is not None]


def write_evaluation_report(
    out: Path,
    metrics: dict[str, Any],
    made: list[Figure],
    gallery: list[Path],
    cases: tuple[list[str], np.ndarray, np.ndarray],
    predictions: np.ndarray,
    extra: dict[str, np.ndarray],
    viewer_cases: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``report.html`` of an evaluation.

    Args:
        out: The evaluation's folder.
        metrics: What ``metrics.json`` holds.
        made: The figures of :func:`evaluation_figures`.
        gallery: The gallery PNGs.
        cases: ``(ids, labels, scores)`` of every case.
        predictions: 0/1 per case.
        extra: More per-case columns (p-values, pixel metrics).
        viewer_cases: The cases of the interactive viewer (``OUT/viewer/``; none: no viewer).

    Returns:
        The report's path.
    """
    ids, labels, scores = cases
    blocks: list[Any] = [Facts("Image level", headline(metrics["image"]))]
    if "pixel" in metrics:
        blocks.append(pixel_facts(metrics["pixel"]))
    blocks.append(Figures("Figures", made))
    if viewer_cases:
        blocks.append(
            Viewer(
                "Viewer: each scan with its anomaly map",
                viewer_cases,
                threshold=float(metrics["image"]["threshold"]),
                note="Flagged cases first, then by score; click a case to load it.",
            )
        )
    blocks.append(
        Figures(
            "Gallery: input | reconstruction | difference map",
            [Figure(p, p.stem) for p in gallery],
            note="Highest- and lowest-scoring abnormal cases, then highest- and lowest-scoring "
            "normal cases; red = large difference. 3D: three planes through the top voxel.",
        )
    )
    blocks.append(case_table(ids, labels, scores, predictions, extra))
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

"""Evaluation figures (matplotlib, PNG, written atomically).

* :func:`plot_roc`: ROC curve(s) with the chosen cut-off marked.
* :func:`plot_score_histograms`: scores of normal vs abnormal cases with the threshold line.
* :func:`plot_training_curves`: normal train loss, normal validation loss and the mean scores
  of normal / abnormal validation images per epoch (Chung & Choi 2023, Fig. 2).
* :func:`plot_confusion_matrix`: the 2x2 table at the chosen threshold.
* :func:`plot_fold_boxplot`: per-fold metrics of a cross-validation as box plots.
* :func:`save_gallery`: input | reconstruction | difference map of selected cases
  (:func:`medanomaly.viz.case_figure.save_case_figure`).

Every function returns the path it wrote, or ``None`` when there is nothing to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from medanomaly.io.atomic import atomic_path  # noqa: E402
from medanomaly.metrics.image import predict_abnormal  # noqa: E402
from medanomaly.viz.case_figure import save_case_figure  # noqa: E402

DPI = 90
NORMAL_COLOUR = "tab:blue"
ABNORMAL_COLOUR = "tab:red"


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it.

    Args:
        fig: The figure.
        path: Target ``.png`` file.

    Returns:
        The path written.
    """
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 1) and np.any(labels == 0))


def _operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple:
    """False- and true-positive rate of ``score > threshold``."""
    pred = predict_abnormal(scores, threshold)
    fpr = float(np.mean(pred[labels == 0])) if np.any(labels == 0) else float("nan")
    tpr = float(np.mean(pred[labels == 1])) if np.any(labels == 1) else float("nan")
    return fpr, tpr


def plot_roc(
    curves: Sequence[tuple[np.ndarray, np.ndarray, float | None]],
    path: str | Path,
    names: Sequence[str] | None = None,
    title: str = "ROC curve",
) -> Path | None:
    """ROC curve(s) with each one's cut-off marked as a dot.

    Args:
        curves: One ``(labels, scores, threshold)`` per curve (one for an evaluation, one
            per fold for a cross-validation); ``threshold`` may be ``None`` (no marker).
        path: Target PNG.
        names: Legend entry per curve (with its AUROC appended).
        title: Figure title.

    Returns:
        The path written, or ``None`` when no curve has both classes.
    """
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    drawn = 0
    many = len(curves) > 1
    for i, (labels, scores, threshold) in enumerate(curves):
        labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
        if not _has_both_classes(labels):
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        auc = float(roc_auc_score(labels, scores))
        name = names[i] if names else "ROC"
        line = ax.plot(fpr, tpr, lw=1.0 if many else 2.0, alpha=0.7 if many else 1.0)[0]
        line.set_label(f"{name} (AUROC {auc:.3f})")
        if threshold is not None and np.isfinite(threshold):
            x, y = _operating_point(labels, scores, float(threshold))
            ax.plot([x], [y], "o", color=line.get_color(), ms=6, mec="black")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.plot([], [], "o", color="white", mec="black", label="chosen cut-off")
    ax.set(xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7 if many else 9)
    return save_figure(fig, path)


def plot_score_histograms(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float | None,
    path: str | Path,
    title: str = "Anomaly scores",
) -> Path:
    """Histograms of normal and abnormal scores with the threshold as a vertical line.

    Args:
        labels: 1 = abnormal, 0 = normal (other values are left out).
        scores: One score per case.
        threshold: The cut-off (abnormal iff score > threshold), or ``None``.
        path: Target PNG.
        title: Figure title.

    Returns:
        The path written.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, scores.size // 4)))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for value, name, colour in ((0, "normal", NORMAL_COLOUR), (1, "abnormal", ABNORMAL_COLOUR)):
        chosen = scores[labels == value]
        if chosen.size:
            ax.hist(chosen, bins=bins, alpha=0.55, color=colour, label=f"{name} (n={chosen.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="anomaly score (higher = more abnormal)", ylabel="cases", title=title)
    ax.legend(fontsize=9)
    return save_figure(fig, path)


_LOSS_KEYS = (("train_loss", "normal train loss"), ("val_loss", "normal validation loss"))
_SCORE_KEYS = (
    ("val_score_normal", "normal validation", NORMAL_COLOUR),
    ("val_score_abnormal", "abnormal validation", ABNORMAL_COLOUR),
)


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of one history column (epochs without the key are left out)."""
    rows = [row for row in history if row.get(key) is not None]
    return (
        np.array([row.get("epoch", i + 1) for i, row in enumerate(rows)], dtype=np.float64),
        np.array([row[key] for row in rows], dtype=np.float64),
    )


def plot_training_curves(
    histories: Sequence[Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str = "Training curves",
) -> Path | None:
    """Per-epoch losses and mean validation scores of runs (Chung & Choi 2023, Fig. 2).

    Left: normal training loss and normal validation loss. Right: mean anomaly score of the
    normal and of the abnormal validation images (the gap is what the model learns to open).
    Several histories (cross-validation folds) are drawn as thin lines.

    Args:
        histories: One per-epoch history per run (dicts with ``epoch``, ``train_loss``,
            ``val_loss``, ``val_score_normal``, ``val_score_abnormal``; missing keys are
            skipped).
        path: Target PNG.
        title: Figure title.

    Returns:
        The path written, or ``None`` when every history is empty.
    """
    histories = [h for h in histories if h]
    if not histories:
        return None
    many = len(histories) > 1
    lw, alpha = (0.8, 0.6) if many else (1.8, 1.0)
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for n, history in enumerate(histories):
        for (key, name), colour in zip(_LOSS_KEYS, ("tab:green", NORMAL_COLOUR), strict=True):
            x, y = _series(history, key)
            if y.size:
                ax_loss.plot(x, y, color=colour, lw=lw, alpha=alpha, label=None if n else name)
        for key, name, colour in _SCORE_KEYS:
            x, y = _series(history, key)
            if y.size:
                ax_score.plot(x, y, color=colour, lw=lw, alpha=alpha, label=None if n else name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="losses")
    ax_score.set(xlabel="epoch", ylabel="mean anomaly score", title="validation scores")
    for ax in (ax_loss, ax_score):
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[]])
        if values.size and np.all(values > 0):
            ax.set_yscale("log")  # losses and residual scores fall by orders of magnitude
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.suptitle(title + (f" ({len(histories)} runs)" if many else ""))
    return save_figure(fig, path)


def plot_confusion_matrix(
    confusion: Mapping[str, int], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """The 2x2 confusion matrix (rows: true class, columns: predicted class).

    Args:
        confusion: ``{"tn", "fp", "fn", "tp"}`` counts.
        path: Target PNG.
        title: Figure title.

    Returns:
        The path written.
    """
    table = np.array(
        [[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], dtype=float
    )
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(table, cmap="Blues", vmin=0, vmax=max(table.max(), 1))
    names = ("normal", "abnormal")
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names, rotation=90, va="center")
    ax.set(xlabel="predicted (score > threshold)", ylabel="true label")
    tags = (("TN", "FP"), ("FN", "TP"))
    for i in range(2):
        for j in range(2):
            dark = table[i, j] > 0.6 * max(table.max(), 1)
            ax.text(
                j,
                i,
                f"{tags[i][j]}\n{int(table[i, j])}",
                ha="center",
                va="center",
                fontsize=12,
                color="white" if dark else "black",
            )
    ax.set_title(title)
    return save_figure(fig, path)


def plot_fold_boxplot(
    values: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "Per-fold test metrics",
) -> Path | None:
    """Box plot of per-fold values, one box per metric, with the folds as dots.

    Args:
        values: Metric name -> per-fold values (``None`` entries are dropped).
        path: Target PNG.
        title: Figure title.

    Returns:
        The path written, or ``None`` when no metric has a value.
    """
    data = {k: [float(v) for v in vs if v is not None] for k, vs in values.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(1.6 * len(data) + 2.0, 4.2))
    ax.boxplot(list(data.values()), widths=0.5)
    ax.set_xticks(range(1, len(data) + 1), list(data))
    jitter = np.random.default_rng(0)
    for i, vs in enumerate(data.values(), start=1):
        ax.plot(i + jitter.uniform(-0.08, 0.08, len(vs)), vs, "o", ms=4, alpha=0.7, color="k")
    ax.set(ylabel="value on the test fold", title=title, ylim=(-0.02, 1.02))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def gallery_indices(labels: np.ndarray, scores: np.ndarray, per_group: int = 3) -> list[int]:
    """Cases worth looking at, in this order (each case at most once).

    The highest-scoring abnormal cases (clear detections), the lowest-scoring abnormal cases
    (likely misses), the highest-scoring normal cases (likely false alarms) and the
    lowest-scoring normal cases (typical normal anatomy).

    Args:
        labels: 1 = abnormal, 0 = normal.
        scores: One score per case.
        per_group: Cases per group.

    Returns:
        Indices into ``labels``/``scores``.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    chosen: list[int] = []
    for value, descending in ((1, True), (1, False), (0, True), (0, False)):
        idx = np.flatnonzero(labels == value)
        order = idx[np.argsort(-scores[idx] if descending else scores[idx], kind="stable")]
        fresh = [int(i) for i in order if int(i) not in chosen]
        chosen.extend(fresh[:per_group])
    return chosen


def save_gallery(
    folder: str | Path,
    images: np.ndarray,
    reconstructions: np.ndarray | None,
    maps: np.ndarray,
    titles: Sequence[str],
    stems: Sequence[str],
) -> list[Path]:
    """Input | reconstruction | difference map (overlaid) for each given case.

    The colour scale of the difference maps is shared across the gallery (99.9th percentile
    of all shown maps) so that cases can be compared; 3D volumes are shown as three
    orthogonal planes through the highest-scoring voxel.

    Args:
        folder: Where the PNGs go.
        images: Inputs ``(N, C, *spatial)``.
        reconstructions: Reconstructions of the same shape, or ``None``.
        maps: Anomaly maps ``(N, *spatial)``.
        titles: Title per case (id, label, score).
        stems: File stem per case.

    Returns:
        The paths written, in input order.
    """
    folder = Path(folder)
    if not len(maps):
        return []
    # one scale over every shown map (cases may differ in shape)
    diff_max = float(np.percentile(np.concatenate([np.ravel(m) for m in maps]), 99.9)) or None
    written = []
    for i, (title, stem) in enumerate(zip(titles, stems, strict=True)):
        recon = None if reconstructions is None else reconstructions[i]
        written.append(
            save_case_figure(images[i], recon, maps[i], folder / f"{stem}.png", title, diff_max)
        )
    return written

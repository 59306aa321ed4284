"""The ``image`` and ``pixel`` blocks of ``metrics.json``, and the foreground they count in.

Shared by ``evaluate`` (:mod:`medanomaly.jobs.evaluate`), ``cv`` and ``compare``
(:mod:`medanomaly.model_selection`), so that one case set gives the same figures whichever
command measured it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medanomaly.data.listing import list_cases
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import MIN_THRESHOLD_NORMALS
from medanomaly.metrics.image import bootstrap_auroc_ci, image_metrics
from medanomaly.metrics.pixel import pixel_metrics

FOREGROUND_FRACTION = 0.05


IMAGE_KEYS = ("auroc", "auprc", "sensitivity", "specificity", "accuracy", "precision", "f1")


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
    return pixel_summary(result, foreground_rule, int(idx.size)), result["per_image"]


def pixel_summary(result: dict[str, Any], foreground_rule: str, n_images: int) -> dict[str, Any]:
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

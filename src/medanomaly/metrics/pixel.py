"""Pixel/voxel-level metrics against ground-truth lesion masks.

Voxel scores are "higher = more abnormal" and a voxel is called abnormal iff
``score > threshold``, as for image-level scores.

Only voxels inside the foreground (body/brain) mask are counted when one is given: background
voxels are trivially normal and inflate the AUROC (Kobayashi et al. 2020). Lesion voxels outside the
foreground are ignored too.

The metrics are computed from two score histograms (lesion and non-lesion voxels, int64
counts over fixed bins), so 3D volumes can be streamed one volume, or one slab, at a time with
memory that does not grow with the number of voxels. Bins are closed on the right:
bin ``j`` holds scores in ``(e_j, e_{j+1}]`` (bin 0 also holds ``e_0``), so flagging bins
``j..`` is exactly ``score > e_j``. Scores outside the range are clipped into the first or
last bin and counted in ``n_clipped``. Within a bin, lesion and non-lesion voxels count as
ties, so the binned AUROC and AP approach the exact values as ``n_bins`` grows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_N_BINS = 10_000
_CHUNK = 1 << 20  # voxels binned per step, bounds temporary memory per update


def _match_shape(arr: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Drop leading singleton axes (e.g. a channel axis) until ``arr`` has ``shape``."""
    while arr.ndim > len(shape) and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def _align(
    score_map: np.ndarray, gt_mask: np.ndarray, foreground: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Bring score map, lesion mask and foreground mask to one shape, flattened."""
    scores = np.asarray(score_map)
    gt = np.asarray(gt_mask)
    fg = None if foreground is None else np.asarray(foreground)
    target = min((a for a in (scores, gt, fg) if a is not None), key=np.ndim).shape
    scores = _match_shape(scores, target, "score_map")
    gt = _match_shape(gt, target, "gt_mask")
    if fg is not None:
        fg = _match_shape(fg, target, "foreground").reshape(-1)
    return scores.reshape(-1), gt.reshape(-1), fg


def _finite_range(lo: float, hi: float) -> tuple[float, float]:
    """Validate a score range, widening a degenerate one."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise ValueError(f"range must be finite with lo <= hi, got ({lo}, {hi})")
    if hi == lo:
        pad = max(abs(lo) * 1e-6, 0.5)
        return lo - pad, hi + pad
    return float(lo), float(hi)


def _roc_auc(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """Trapezoid area under the binned ROC (within-bin pairs count one half)."""
    tp = np.concatenate([[0], np.cumsum(pos_hist[::-1])]).astype(np.float64)
    fp = np.concatenate([[0], np.cumsum(neg_hist[::-1])]).astype(np.float64)
    tpr, fpr = tp / tp[-1], fp / fp[-1]
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))


def _average_precision(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """Binned average precision: sum over bins (high to low) of recall step x precision."""
    tp = np.cumsum(pos_hist[::-1]).astype(np.float64)
    fp = np.cumsum(neg_hist[::-1]).astype(np.float64)
    recall_step = pos_hist[::-1] / tp[-1]
    called = tp + fp
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    return float(np.sum(recall_step * precision))


def _best_dice(
    pos_hist: np.ndarray, neg_hist: np.ndarray, edges: np.ndarray
) -> tuple[float, float]:
    """Best Dice over the cut-offs ``e_1 .. e_n`` and the cut-off that reaches it.

    Ties go to the highest cut-off. ``e_0`` (flag everything) is not a candidate.
    """
    tp = np.cumsum(pos_hist[::-1])[::-1][1:].astype(np.float64)  # flagged: bins j.. (j >= 1)
    fp = np.cumsum(neg_hist[::-1])[::-1][1:].astype(np.float64)
    tp, fp = np.append(tp, 0.0), np.append(fp, 0.0)  # last cut-off e_n flags nothing
    dice = 2.0 * tp / (tp + fp + pos_hist.sum())
    j = dice.size - 1 - int(np.argmax(dice[::-1]))
    return float(dice[j]), float(edges[j + 1])


def _histogram_metrics(
    pos_hist: np.ndarray, neg_hist: np.ndarray, edges: np.ndarray | None
) -> dict[str, Any]:
    """AUROC, AP and best Dice from the two histograms; ``None`` with a note if undefined."""
    n_pos, n_neg = int(pos_hist.sum()), int(neg_hist.sum())
    out: dict[str, Any] = {
        "auroc": None,
        "average_precision": None,
        "best_dice": None,
        "best_dice_threshold": None,
        "n_lesion": n_pos,
        "n_normal": n_neg,
        "notes": [],
    }
    if n_pos and n_neg:
        out["auroc"] = _roc_auc(pos_hist, neg_hist)
    else:
        out["notes"].append("auroc undefined: need both lesion and non-lesion voxels")
    if n_pos and edges is not None:
        out["average_precision"] = _average_precision(pos_hist, neg_hist)
        out["best_dice"], out["best_dice_threshold"] = _best_dice(pos_hist, neg_hist, edges)
    else:
        out["notes"].append("average_precision and best_dice undefined: no lesion voxels")
    return out


def _summary(per_image: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, SD (ddof=0) and count of each per-image metric over the images where defined."""
    out: dict[str, dict[str, Any]] = {}
    for key in ("auroc", "average_precision", "best_dice"):
        values = np.array([r[key] for r in per_image if r[key] is not None], dtype=np.float64)
        defined = values.size > 0
        out[key] = {
            "mean": float(values.mean()) if defined else None,
            "sd": float(values.std()) if defined else None,
            "n": int(values.size),
        }
    return out


class PixelMetricAccumulator:
    """Streaming, histogram-binned pixel/voxel metrics (AUROC, AP, best Dice).

    Feed images (or slabs of a volume) with :meth:`update`; :meth:`compute` returns the
    pooled metrics over all voxels seen, and per-image metrics when ``per_image=True``.
    Memory is two int64 histograms of ``n_bins`` counts, plus one small dict per update when
    ``per_image=True``.

    Range: pass ``range=(lo, hi)`` when the score range is known (e.g. residuals of images in
    [0, 1] lie in [0, 1]). With ``range=None`` the first update that has foreground voxels
    fixes the range to the min and max of its scores; later scores outside it are clipped into
    the edge bins, counted in ``n_clipped`` and logged once. :func:`pixel_metrics` avoids
    clipping by scanning all maps for their range first.

    Args:
        n_bins: Number of histogram bins.
        range: ``(lo, hi)`` of the scores, or ``None`` to take it from the first update.
        per_image: Keep one small result dict per :meth:`update` call.
    """

    def __init__(
        self,
        n_bins: int = DEFAULT_N_BINS,
        range: tuple[float, float] | None = None,  # same name as numpy.histogram
        per_image: bool = False,
    ) -> None:
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        self.n_bins = int(n_bins)
        self.per_image = per_image
        self.range: tuple[float, float] | None = None
        self.edges: np.ndarray | None = None
        self.pos_hist = np.zeros(self.n_bins, dtype=np.int64)
        self.neg_hist = np.zeros(self.n_bins, dtype=np.int64)
        self.n_clipped = 0
        self.images: list[dict[str, Any]] = []
        if range is not None:
            self._set_range(*range)

    def _set_range(self, lo: float, hi: float) -> None:
        self.range = _finite_range(float(lo), float(hi))
        self.edges = np.linspace(self.range[0], self.range[1], self.n_bins + 1)

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        """Right-closed bin index of each score, clipped to ``[0, n_bins - 1]``."""
        lo, hi = self.range  # type: ignore[misc]
        s = np.clip(scores, lo, hi)
        idx = np.ceil((s - lo) * (self.n_bins / (hi - lo))).astype(np.int64) - 1
        idx = np.clip(idx, 0, self.n_bins - 1)
        # Float rounding can put a score one bin off its edge; compare with the edges to fix.
        idx -= (idx > 0) & (s <= self.edges[idx])  # type: ignore[index]
        idx += (idx < self.n_bins - 1) & (s > self.edges[idx + 1])  # type: ignore[index]
        return idx

    def _histograms(
        self, scores: np.ndarray, gt: np.ndarray, fg: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lesion and non-lesion histograms of one flattened update, built chunk by chunk."""
        pos = np.zeros(self.n_bins, dtype=np.int64)
        neg = np.zeros(self.n_bins, dtype=np.int64)
        lo, hi = self.range  # type: ignore[misc]
        for start in range(0, scores.size, _CHUNK):
            s = np.asarray(scores[start : start + _CHUNK], dtype=np.float64)
            g = gt[start : start + _CHUNK].astype(bool)
            if fg is not None:
                keep = fg[start : start + _CHUNK].astype(bool)
                s, g = s[keep], g[keep]
            if not np.all(np.isfinite(s)):
                raise ValueError("score_map holds NaN or inf inside the evaluated region")
            self.n_clipped += int(np.count_nonzero((s < lo) | (s > hi)))
            idx = self._bin(s)
            pos += np.bincount(idx[g], minlength=self.n_bins)
            neg += np.bincount(idx[~g], minlength=self.n_bins)
        return pos, neg

    def _range_from(self, scores: np.ndarray, fg: np.ndarray | None) -> None:
        """Fix the range from one update's evaluated scores (``range=None`` mode)."""
        s = scores if fg is None else scores[fg.astype(bool)]
        if s.size == 0:
            return
        self._set_range(float(np.min(s)), float(np.max(s)))
        logger.debug("pixel metrics: range fixed by first update to %s", self.range)

    def update(
        self,
        score_map: np.ndarray,
        gt_mask: np.ndarray,
        foreground: np.ndarray | None = None,
        name: str | None = None,
    ) -> None:
        """Add one image (or one slab of a volume).

        Args:
            score_map: Voxel anomaly scores, higher = more abnormal.
            gt_mask: Lesion mask of the same shape (non-zero = lesion).
            foreground: Optional body/brain mask (non-zero = inside); voxels outside are
                ignored. Leading singleton axes (a channel axis) of any input are dropped.
            name: Optional identifier stored in the per-image result.

        Raises:
            ValueError: On mismatched shapes or non-finite scores inside the foreground.
        """
        scores, gt, fg = _align(score_map, gt_mask, foreground)
        if self.range is None:
            self._range_from(scores, fg)
            if self.range is None:  # no foreground voxel yet: nothing to count
                self._record(name, np.zeros_like(self.pos_hist), np.zeros_like(self.neg_hist))
                return
        clipped_before = self.n_clipped
        pos, neg = self._histograms(scores, gt, fg)
        if clipped_before == 0 and self.n_clipped > 0:
            logger.warning(
                "pixel metrics: scores outside range %s are clipped into the edge bins; "
                "pass range=(lo, hi) covering all scores for exact binning",
                self.range,
            )
        self.pos_hist += pos
        self.neg_hist += neg
        self._record(name, pos, neg)

    def _record(self, name: str | None, pos: np.ndarray, neg: np.ndarray) -> None:
        """Store the per-image result of one update when ``per_image`` is on."""
        if not self.per_image:
            return
        result = _histogram_metrics(pos, neg, self.edges)
        result["name"] = name
        self.images.append(result)

    def merge(self, other: PixelMetricAccumulator) -> PixelMetricAccumulator:
        """Add the counts (and per-image results) of an accumulator over the same bins.

        Ranks of a distributed evaluation each accumulate their cases; rank 0 merges them.

        Raises:
            ValueError: The two do not share their bins and range.
        """
        if other.n_bins != self.n_bins or other.range != self.range:
            raise ValueError(
                f"cannot merge pixel metrics over {other.n_bins} bins in {other.range} into "
                f"{self.n_bins} bins in {self.range}"
            )
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.n_clipped += other.n_clipped
        self.images += other.images
        return self

    def compute(self) -> dict[str, Any]:
        """Pooled metrics over every voxel seen (plus per-image results when kept).

        Returns:
            A JSON-serialisable dict: ``auroc``, ``average_precision``, ``best_dice``,
            ``best_dice_threshold`` (cut-off for ``score > threshold``, at bin resolution),
            ``n_lesion``, ``n_normal`` (voxel counts), ``notes``, ``n_bins``, ``range``,
            ``n_clipped``; with ``per_image=True`` also ``per_image`` (one dict per update)
            and ``per_image_summary`` (mean, SD and count of each metric).
        """
        result = _histogram_metrics(self.pos_hist, self.neg_hist, self.edges)
        result.update(
            n_bins=self.n_bins,
            range=None if self.range is None else [self.range[0], self.range[1]],
            n_clipped=int(self.n_clipped),
        )
        if self.per_image:
            result["per_image"] = list(self.images)
            result["per_image_summary"] = _summary(self.images)
        return result


def scan_range(
    maps: Sequence[np.ndarray], foreground: Sequence[np.ndarray | None]
) -> tuple[float, float] | None:
    """Min and max of all evaluated scores (one cheap pass over the maps)."""
    lo, hi = np.inf, -np.inf
    for score_map, fg in zip(maps, foreground, strict=True):
        s, _, keep = _align(score_map, score_map, fg)
        if keep is not None:
            s = s[keep.astype(bool)]
        if s.size:
            lo, hi = min(lo, float(np.min(s))), max(hi, float(np.max(s)))
    return None if lo > hi else (lo, hi)


def histogram_average_precision(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float | None:
    """Binned average precision of lesion / non-lesion histograms (``None`` without lesion)."""
    if int(np.sum(pos_hist)) == 0:
        return None
    return _average_precision(np.asarray(pos_hist), np.asarray(neg_hist))


def case_histograms(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    foreground: Sequence[np.ndarray] | np.ndarray,
    n_bins: int = DEFAULT_N_BINS,
) -> tuple[np.ndarray, np.ndarray]:
    """Each case's lesion and non-lesion voxel histograms over one binning of all cases.

    Summing the rows of any subset of cases gives that subset's pooled histograms, so pixel
    metrics of bootstrap resamples of cases cost a sum each.

    Returns:
        ``(pos, neg)``, each ``(n_cases, n_bins)`` int64 (zeros without foreground voxels).
    """
    pos = np.zeros((len(maps), n_bins), dtype=np.int64)
    neg = np.zeros((len(maps), n_bins), dtype=np.int64)
    found = scan_range(list(maps), list(foreground))
    if found is None:
        return pos, neg
    accumulator = PixelMetricAccumulator(n_bins, range=found)
    for i, (score_map, mask, fg) in enumerate(zip(maps, masks, foreground, strict=True)):
        scores, gt, keep = _align(score_map, mask, fg)
        pos[i], neg[i] = accumulator._histograms(scores, gt, keep)
    return pos, neg


def pixel_metrics(
    maps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    foreground: Sequence[np.ndarray] | np.ndarray | None = None,
    n_bins: int = DEFAULT_N_BINS,
    range: tuple[float, float] | None = None,  # same name as numpy.histogram
    per_image: bool = True,
) -> dict[str, Any]:
    """Pooled and per-image pixel/voxel metrics over a set of images.

    Args:
        maps: Anomaly maps, a sequence of arrays or one array stacked on axis 0.
        masks: Lesion masks, one per map.
        foreground: Body/brain masks, one per map, or ``None`` to count every voxel.
        n_bins: Number of histogram bins.
        range: Score range; ``None`` scans all maps (inside the foreground) for it first, so
            that nothing is clipped. ``maps`` must then be re-iterable (not a generator).
        per_image: Also report one result per image.

    Returns:
        The dict of :meth:`PixelMetricAccumulator.compute`.

    Raises:
        ValueError: If the numbers of maps, masks and foreground masks differ.
    """
    fgs: Sequence[np.ndarray | None] = [None] * len(maps) if foreground is None else foreground
    if not len(maps) == len(masks) == len(fgs):
        raise ValueError(
            f"got {len(maps)} maps, {len(masks)} masks and {len(fgs)} foreground masks"
        )
    if range is None:
        range = scan_range(maps, fgs)
    acc = PixelMetricAccumulator(n_bins=n_bins, range=range, per_image=per_image)
    for i, (score_map, mask, fg) in enumerate(zip(maps, masks, fgs, strict=True)):
        acc.update(score_map, mask, fg, name=str(i))
    return acc.compute()

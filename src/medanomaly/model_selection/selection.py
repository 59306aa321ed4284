"""How ``compare`` chooses between candidates without trusting its own optimism.

Each fold's validation part is halved by patient groups. The **tuning half** tunes every
candidate (its epoch, post-processing and a fusion's weights); the **selection half** only
scores the tuned candidates. A figure on the selection half carries none of the tuning's
optimism, but it is still the best of several noisy figures, so a more complex candidate must
earn its place:

* candidates are ordered by complexity: no-model (0) < single model (1) < fusion (2);
* the incumbent is the best candidate of the simplest level; the best candidate of each higher
  level replaces it only when its advantage exceeds one standard error of that advantage (the
  one-standard-error rule of Hastie, Tibshirani and Friedman, *The Elements of Statistical
  Learning*, 2nd ed., 2009, section 7.10, applied to the paired difference).

Within one fold the standard error comes from a paired, stratified bootstrap of the selection
half (the same resamples for every candidate); over all folds, from the spread of the per-fold
differences (``sd / sqrt(n_folds)``), or from the bootstrap when there is a single fold.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from medanomaly.metrics.pixel import histogram_average_precision

N_BOOT = 200
"""Bootstrap resamples of a selection half (paired across the fold's candidates)."""

LEVELS = {0: "no-model", 1: "single model", 2: "fusion"}


def resamples(labels: np.ndarray, n_boot: int, key: str) -> np.ndarray:
    """``(n_boot, n)`` stratified bootstrap indices, the same for every candidate of a fold.

    Args:
        labels: The selection half's labels (the resamples keep each class's count).
        n_boot: Number of resamples.
        key: Seeds the draws (the fold's name), so that candidates are paired.
    """
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    labels = np.asarray(labels)
    columns = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        columns.append(rng.choice(members, size=(n_boot, members.size), replace=True))
    return np.concatenate(columns, axis=1) if columns else np.zeros((n_boot, 0), np.int64)


def auroc_replicates(labels: np.ndarray, scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Image AUROC of each bootstrap resample (``draws`` from :func:`resamples`).

    The Mann-Whitney form over mid-ranks, all resamples at once (ties count one half).
    """
    positive = np.asarray(labels)[draws] == 1
    ranks = rankdata(np.asarray(scores, dtype=np.float64)[draws], axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    return (np.sum(ranks * positive, axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def ap_replicates(pos: np.ndarray, neg: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Pixel AP of each resample of cases, from per-case voxel histograms ``(n, bins)``."""
    values = []
    for d in draws:
        ap = histogram_average_precision(pos[d].sum(axis=0), neg[d].sum(axis=0))
        values.append(np.nan if ap is None else ap)
    return np.asarray(values, dtype=np.float64)


def paired_se(first: Sequence[float], second: Sequence[float]) -> float:
    """Standard error of ``first - second`` from paired bootstrap replicates (NaN ignored)."""
    diff = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    return float(diff.std(ddof=1)) if diff.size > 1 else float("inf")


def fold_se(first: Sequence[float], second: Sequence[float]) -> float:
    """Standard error of the mean per-fold difference ``first - second`` (sd / sqrt n)."""
    diff = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    if diff.size < 2:
        return float("inf")
    return float(diff.std(ddof=1) / np.sqrt(diff.size))


def one_se_choice(
    figures: Mapping[str, float],
    levels: Mapping[str, int],
    se: Callable[[str, str], float],
) -> tuple[str | None, list[dict[str, Any]]]:
    """The candidate the one-standard-error rule keeps, and each step of the decision.

    Args:
        figures: Selection figure of each candidate still in the running (higher = better).
        levels: Complexity level of each candidate (see :data:`LEVELS`).
        se: Standard error of ``figure(challenger) - figure(incumbent)``.

    Returns:
        ``(chosen, steps)``; each step says which candidate challenged which, the advantage,
        its standard error and whether the challenger replaced the incumbent.
    """
    ranked = sorted(figures, key=lambda n: (levels[n], -figures[n]))
    if not ranked:
        return None, []
    incumbent = ranked[0]
    steps = []
    for level in sorted({levels[n] for n in ranked if levels[n] > levels[incumbent]}):
        challenger = max((n for n in ranked if levels[n] == level), key=lambda n: figures[n])
        advantage = figures[challenger] - figures[incumbent]
        error = se(challenger, incumbent)
        replaced = bool(advantage > error)
        steps.append(
            {
                "challenger": challenger,
                "incumbent": incumbent,
                "advantage": float(advantage),
                "se": float(error),
                "replaced": replaced,
            }
        )
        if replaced:
            incumbent = challenger
    return incumbent, steps


def decide_fold(records: Mapping[str, dict[str, Any]], levels: Mapping[str, int]) -> dict[str, Any]:
    """One fold's choice from its candidates' records (failed candidates are left out)."""
    done = {n: r for n, r in records.items() if "error" not in r}
    figures = {n: r["selection_metric"] for n, r in done.items()}

    def se(a: str, b: str) -> float:
        return paired_se(done[a]["selection_boot"], done[b]["selection_boot"])

    chosen, steps = one_se_choice(figures, levels, se)
    return {"chosen": chosen, "steps": steps}


def decide_overall(
    records: Mapping[str, list[dict[str, Any]]], levels: Mapping[str, int]
) -> tuple[str | None, list[dict[str, Any]]]:
    """The choice over all folds: mean selection figures, fold-to-fold standard errors.

    Only candidates that finished every fold take part.
    """
    complete = {n: rs for n, rs in records.items() if rs and all("error" not in r for r in rs)}
    values = {n: [r["selection_metric"] for r in rs] for n, rs in complete.items()}
    figures = {n: float(np.mean(v)) for n, v in values.items()}

    def se(a: str, b: str) -> float:
        if len(values[a]) == 1:
            return paired_se(complete[a][0]["selection_boot"], complete[b][0]["selection_boot"])
        return fold_se(values[a], values[b])

    return one_se_choice(figures, levels, se)

"""Size-bias diagnostics: does the screen rank scans by their size rather than content?"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ERRORS = ("mse", "masked_mse")
SIZES = ("voxel_count", "foreground_voxels")


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman's rho and its p-value over the cases where both values are finite.

    Args:
        x: First variable.
        y: Second variable.

    Returns:
        ``{"rho", "p", "n"}`` plus ``"note"`` when rho is undefined (then rho and p are NaN).
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out: dict[str, Any] = {"rho": math.nan, "p": math.nan, "n": int(keep.sum())}
    if len(a) < 3:
        out["note"] = f"undefined: {len(a)} case(s) with both values (needs 3)"
    elif np.ptp(a) == 0 or np.ptp(b) == 0:
        out["note"] = "undefined: one of the two is the same for every case"
    else:
        result = spearmanr(a, b)
        out.update(rho=float(result.statistic), p=float(result.pvalue))
    return out


def size_bias(
    mse: np.ndarray,
    masked_mse: np.ndarray,
    voxel_count: np.ndarray,
    foreground_voxels: np.ndarray,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman correlation of each error with each size.

    Args:
        mse: Error over all voxels per case.
        masked_mse: Error over the foreground per case.
        voxel_count: Raw voxel count per case (NaN where the raw read failed).
        foreground_voxels: Foreground voxel count per case (preprocessed grid).

    Returns:
        ``{error: {size: {"rho", "p", "n"[, "note"]}}}`` for errors ``mse``, ``masked_mse``
        and sizes ``voxel_count``, ``foreground_voxels``.
    """
    errors = {"mse": mse, "masked_mse": masked_mse}
    sizes = {"voxel_count": voxel_count, "foreground_voxels": foreground_voxels}
    return {e: {s: spearman(errors[e], sizes[s]) for s in SIZES} for e in ERRORS}

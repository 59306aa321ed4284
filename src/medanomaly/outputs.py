"""Files that scoring commands write: the per-case score table and the anomaly maps."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.base import AnomalyResult
from medanomaly.checkpoint import atomic_path, atomic_write
from medanomaly.viz import save_case_figure

SCORE_COLUMNS = ("id", "label", "score", "prediction", "threshold")


def write_scores_csv(
    path: str | Path,
    ids: Sequence[str],
    labels: np.ndarray,
    result: AnomalyResult,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write one row per case: id, known label (-1 unknown), score, prediction, threshold.

    Args:
        path: CSV file (written atomically).
        ids: Case names.
        labels: Known labels (0, 1 or -1).
        result: Scores and predictions.
        extra: More per-case columns (e.g. conformal p-values).
    """
    extra = extra or {}

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow([*SCORE_COLUMNS, *extra])
        for i, case_id in enumerate(ids):
            row = [case_id, int(labels[i]), f"{result.scores[i]:.8g}", int(result.labels[i])]
            row.append(f"{result.threshold:.8g}")
            row.extend(f"{values[i]:.6g}" for values in extra.values())
            writer.writerow(row)

    atomic_write(path, write, mode="w")
    return Path(path)


def read_scores_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a score table back as a list of rows."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def case_stem(case_id: str, index: int) -> str:
    """A safe, unique file stem for a case."""
    name = Path(case_id).name
    for suffix in (".nii.gz", ".nii", ".npy", ".npz", ".png", ".jpg", ".tif", ".tiff", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "case"
    return f"{index:05d}_{safe}"


def save_maps(
    folder: str | Path, ids: Sequence[str], images: np.ndarray, result: AnomalyResult
) -> list[Path]:
    """Save each case's anomaly map (``.npy``) and its input | reconstruction | map PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    diff_max = float(np.percentile(result.maps, 99.9)) if result.maps.size else None
    written = []
    for i, case_id in enumerate(ids):
        stem = case_stem(case_id, i)
        with atomic_path(folder / f"{stem}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, result.maps[i].astype(np.float32))
        recon = None if result.reconstructions is None else result.reconstructions[i]
        title = f"{Path(case_id).name}  score {result.scores[i]:.4g}"
        written.append(
            save_case_figure(
                images[i], recon, result.maps[i], folder / f"{stem}.png", title, diff_max
            )
        )
    return written

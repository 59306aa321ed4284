"""The files of a screen: ``screen.csv``, ``summary.json``, the figures and ``report.html``."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.io.atomic import atomic_write
from medanomaly.reports.files import write_json
from medanomaly.reports.html import write_report
from medanomaly.screening.files import (
    CSV_FILE,
    GALLERY_DIR,
    REPORT_FILE,
    SIZE_BIAS_FILE,
    SUMMARY_FILE,
    UMAP_SCORE_FILE,
    UMAP_SIZE_FILE,
)
from medanomaly.screening.plots import plot_latent_map, plot_size_bias
from medanomaly.screening.report import report_blocks
from medanomaly.screening.result import CSV_COLUMNS, ScreenResult


def write_screen_csv(result: ScreenResult, path: str | Path) -> Path:
    """Write ``screen.csv`` (columns :data:`CSV_COLUMNS`, ranked by score) atomically."""

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in result.rows():
            writer.writerow([_csv_cell(row[c], c) for c in CSV_COLUMNS])

    atomic_write(path, write, mode="w")
    return Path(path)


def _csv_cell(value: Any, column: str) -> str:
    """Numbers with enough digits, missing values empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.8g}" if column == "score" else f"{value:.6g}"
    return str(value)


def write_screen_outputs(
    result: ScreenResult,
    out_dir: str | Path,
    gallery: Sequence[Path] = (),
    run: str = "",
    data: str = "",
    viewer_cases: Sequence[dict[str, Any]] = (),
) -> dict[str, Path]:
    """Write the table, the summary, the figures and the report of a screen (atomically).

    Args:
        result: The screen.
        out_dir: Output folder (created).
        gallery: The PNGs of :func:`save_gallery`, in rank order.
        run: The run directory (shown in the report and the summary).
        data: The screened folder or manifest.
        viewer_cases: The cases of the report's interactive viewer (``OUT/viewer/``).

    Returns:
        Name -> path of every file written (``csv``, ``summary``, ``report``, the figures).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": write_screen_csv(result, out / CSV_FILE)}
    written["size_bias"] = plot_size_bias(result, out / SIZE_BIAS_FILE)
    latent = result.latent
    if latent is not None and latent.embedding is not None:
        flagged, noise = result.flagged, latent.labels == -1
        written["umap_score"] = plot_latent_map(
            latent.embedding,
            result.scores,
            flagged,
            out / UMAP_SCORE_FILE,
            "anomaly score",
            "Latent space (UMAP), coloured by score",
            noise,
        )
        written["umap_size"] = plot_latent_map(
            latent.embedding,
            result.voxel_counts,
            flagged,
            out / UMAP_SIZE_FILE,
            "raw voxel count",
            "Latent space (UMAP), coloured by voxel count",
            noise,
        )
    summary = {**result.summary(), "run": str(run), "data": str(data)}
    summary["files"] = {k: p.name for k, p in written.items()}
    summary["files"]["gallery"] = [f"{GALLERY_DIR}/{Path(p).name}" for p in gallery]
    written["report"] = write_report(
        out / REPORT_FILE,
        "medanomaly screen",
        report_blocks(result, written, list(gallery), viewer_cases),
        subtitle=f"run {run} · data {data} · model {result.model}",
    )
    summary["files"]["report"] = REPORT_FILE
    written["summary"] = write_json(out / SUMMARY_FILE, summary)
    return written


def summary_line(result: ScreenResult, out_dir: str | Path) -> str:
    """One line for the terminal: cases, flagged, threshold, skipped, where the outputs are."""
    skipped = f", {len(result.skipped)} file(s) skipped" if result.skipped else ""
    return (
        f"screened {len(result)} cases: {len(result.flagged_order)} flagged above threshold "
        f"{result.threshold:.6g} ({result.threshold_rule}){skipped} -> {out_dir}"
    )

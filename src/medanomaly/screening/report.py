"""The blocks of a screen's ``report.html``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.reports.html import Block, Facts, Figure, Figures, Table, Text
from medanomaly.reports.viewer import Viewer
from medanomaly.screening.files import GALLERY_DIR
from medanomaly.screening.result import CSV_COLUMNS, ScreenResult
from medanomaly.screening.size_bias import ERRORS, SIZES

#: Flagged cases inlined in report.html (all of them are in gallery/).
REPORT_GALLERY_MAX = 50


def report_blocks(
    result: ScreenResult,
    figures: dict[str, Path],
    gallery: list[Path],
    viewer_cases: Sequence[dict[str, Any]] = (),
) -> list[Block]:
    """The blocks of ``report.html``: facts, viewer, latent space, size bias, gallery, table."""
    flagged = result.flagged_order
    blocks: list[Block] = [
        Facts(
            "Screening",
            [
                ("cases screened", len(result)),
                ("flagged", f"{len(flagged)} ({len(flagged) / max(len(result), 1):.1%})"),
                ("threshold", result.threshold),
                ("threshold rule", result.summary()["threshold_rule"]),
                ("cases with file oddities", sum(1 for o in result.oddities if o)),
                ("metal level (raw units)", result.metal_level),
                ("foreground", result.foreground_rule),
                ("files skipped", len(result.skipped)),
            ],
        )
    ]
    if viewer_cases:
        blocks.append(
            Viewer(
                "Viewer: each scan with its anomaly map",
                viewer_cases,
                threshold=float(result.threshold),
                note="Flagged cases first, then by score; click a case to load it.",
            )
        )
    blocks += _latent_blocks(result, figures)
    blocks += _size_bias_blocks(result, figures)
    if gallery:
        shown = gallery[:REPORT_GALLERY_MAX]
        more = len(gallery) - len(shown)
        blocks.append(
            Figures(
                "Flagged cases: input | reconstruction | difference",
                [Figure(p, p.stem) for p in shown],
                note="Highest score first. 3D: the three planes through the voxel with the "
                "largest difference. Colour scale shared: red = at least the largest residual "
                "seen in an unflagged case."
                + (f" {more} more flagged case(s) are in {GALLERY_DIR}/." if more else ""),
            )
        )
    blocks.append(_case_table(result))
    if result.skipped:
        lines = "; ".join(f"{path}: {reason}" for path, reason in result.skipped)
        blocks.append(Text(f"Skipped files ({len(result.skipped)})", lines))
    return blocks


def _latent_blocks(result: ScreenResult, figures: dict[str, Path]) -> list[Any]:
    latent = result.latent
    if latent is None:
        why = "; ".join(n for n in result.notes if "latent" in n or "UMAP" in n)
        return [Text("Latent space", f"No latent-space analysis: {why or 'no latent vectors'}.")]
    info = latent.summary()
    sizes = ", ".join(
        f"{'noise' if k == '-1' else 'cluster ' + k}: {v}" for k, v in info["cluster_sizes"].items()
    )
    blocks: list[Any] = [
        Facts(
            "Latent clusters (DBSCAN on standardised latent vectors)",
            [
                ("latent dimensions", latent.dimensions),
                ("eps", latent.eps),
                ("eps from", latent.eps_source),
                ("min_samples", latent.min_samples),
                ("clusters", info["n_clusters"]),
                ("noise cases (cluster -1)", info["n_noise"]),
                ("cases per cluster", sizes),
            ],
        )
    ]
    shown = [figures[k] for k in ("umap_score", "umap_size") if k in figures]
    if shown:
        blocks.append(
            Figures(
                "Latent space (UMAP)",
                [Figure(p, p.stem) for p in shown],
                note="2D UMAP of the standardised latent vectors; black rings = flagged cases, "
                "red crosses = DBSCAN noise (cluster -1).",
            )
        )
    return blocks


def _size_bias_blocks(result: ScreenResult, figures: dict[str, Path]) -> list[Any]:
    items = []
    for error in ERRORS:
        for size in SIZES:
            found = result.size_bias[error][size]
            text = (
                f"rho {found['rho']:.3f}, p {found['p']:.3g} (n {found['n']})"
                if math.isfinite(found["rho"])
                else found.get("note", "n/a")
            )
            items.append((f"{error} vs {size}", text))
    return [
        Facts("Size bias (Spearman)", items),
        Figures(
            "Error against size",
            [Figure(figures["size_bias"], "size_bias")] if "size_bias" in figures else [],
            note="A strong correlation means the error ranks scans by size rather than content.",
        ),
    ]


def _case_table(result: ScreenResult) -> Table:
    rows = result.rows()
    columns = [c for c in CSV_COLUMNS if c != "cluster" or result.latent is not None]
    return Table(
        "Cases (ranked by score)",
        columns,
        [[bool(row[c]) if c == "flagged" else row[c] for c in columns] for row in rows],
        note="flagged = score > threshold; p_value = conformal p-value against the run's "
        "normal validation scores; cluster -1 = DBSCAN noise.",
        row_classes=["abnormal" if row["flagged"] else "" for row in rows],
    )

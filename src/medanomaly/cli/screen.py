"""``medanomaly screen``: flag outliers in an unlabelled folder with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly.cli._common import (
    add_archive_arguments,
    add_device_arguments,
    add_dicom_argument,
    add_viewer_argument,
    archive_settings,
    at_least,
    check_dicom_needs_maps,
)

DESCRIPTION = """\
Score every case of an unlabelled folder (or manifest) with a trained run, flag the cases whose
score exceeds mean + k*SD of the run's held-out normal validation scores, and describe each case
(reconstruction error over all voxels and over the foreground, raw size, spacing, intensities,
metal fraction, orientation/spacing oddities, latent-space cluster) so that findings can be told
from acquisition problems. Unreadable files are skipped and listed (never fatal)."""

EPILOG = """\
outputs in --out:
  screen.csv      one row per case, ranked by score: rank, id, score, flagged, p_value, mse,
                  masked_mse, shape, voxel_count, foreground_voxels, max_intensity,
                  mean_intensity, metal_fraction, spacing, oddities, cluster (-1 = DBSCAN noise)
  summary.json    threshold, k, case and flagged counts, flagged ids, Spearman size-bias
                  results, DBSCAN settings and cluster sizes, skipped files
  report.html     self-contained report (figures inlined, sortable case table)
  gallery/*.png   input | reconstruction | difference of every flagged case
  umap_score.png, umap_size.png
                  2D UMAP of the latent vectors coloured by score / raw voxel count, flagged
                  cases ringed (only for models with a latent space and >= 5 cases)
  size_bias.png   each error against raw and foreground voxel count
  skipped.txt     unreadable files and why (only when there are some)
with --maps DIR, every case's anomaly map in the scan's own geometry (<case>_map.nii.gz or
<case>_map.tiff + _overlay.png, <case>_map.json; with --dicom a Parametric Map per DICOM volume)

--data may be a DICOMweb archive (dicomweb+http://HOST:PORT/PATH/?FILTERS): maps go back to it
with --dicom (or to --store URL), with a Key Object Selection per study of the flagged series;
credentials from netrc or MEDANOMALY_DICOMWEB_USER/_PASSWORD or _TOKEN. See docs/archive.md.

exit status: 0; 2 on an error (with --strict: the first unreadable file). See docs/screening.md."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``screen``."""
    p = sub.add_parser(
        "screen",
        help="flag outliers in an unlabelled folder (with size-bias and latent-space checks)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory (or its model.safetensors)")
    p.add_argument(
        "--data",
        required=True,
        help="unlabelled folder, CSV manifest, or DICOMweb archive "
        "dicomweb+http://HOST:PORT/PATH/?FILTERS (QIDO-RS filters, e.g. Modality=CT) to screen",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--threshold",
        default=None,
        metavar="RULE",
        help="flag score > the cut-off of RULE on the run's held-out normal validation scores: "
        "mean_sd[:k=3] (default), percentile[:q=99], conformal[:alpha=0.05], or run (the "
        "run's own threshold); spelled as in evaluate, cv and compare specs",
    )
    rule.add_argument(
        "--k",
        type=at_least(0.0, float),
        default=None,
        help="shorthand for --threshold mean_sd:k=K",
    )
    p.add_argument(
        "--metal-level",
        type=float,
        default=3000.0,
        help="raw value above which a voxel counts as metal, in the file's units "
        "(default: 3000, i.e. HU for CT)",
    )
    p.add_argument(
        "--eps",
        type=at_least(0.0, float),
        help="DBSCAN radius in standardised latent units (default: automatic, the 90 %% "
        "quantile of each case's distance to its min-samples-th nearest case)",
    )
    p.add_argument(
        "--min-samples",
        type=at_least(1),
        default=5,
        help="DBSCAN min_samples: cases (itself included) a core case has within eps "
        "(default: 5, capped at the number of cases)",
    )
    p.add_argument(
        "--batch",
        type=at_least(1),
        default=16,
        help="cases scored at a time; bounds memory held by maps (default: 16)",
    )
    p.add_argument(
        "--maps", help="folder for every case's anomaly map in the scan's geometry (see score)"
    )
    add_dicom_argument(p)
    add_viewer_argument(p)
    add_archive_arguments(p)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image, before writing anything (exit 2)",
    )
    add_device_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Screen the folder with the run's own preprocessing and write the outputs."""
    from medanomaly.cli._common import job_options, report_lines, report_map_problems
    from medanomaly.screening import SKIPPED_FILE, screen_folder, summary_line

    out = Path(args.out)
    store = archive_settings(args, out / "maps")
    check_dicom_needs_maps(args)
    job = screen_folder(
        args.run,
        args.data,
        out,
        threshold=_rule(args),
        metal_level=args.metal_level,
        eps=args.eps,
        min_samples=args.min_samples,
        batch=args.batch,
        maps=args.maps,
        dicom=args.dicom,
        options=job_options(args),
        strict=args.strict,
        store=store,
        viewer=args.viewer,
    )
    if job is None:  # another rank: rank 0 reports
        return 0
    report_lines(job.result.skipped, job.warnings, out / SKIPPED_FILE)
    report_map_problems(job.map_problems)
    print(summary_line(job.result, out))
    return 0


def _rule(args: argparse.Namespace) -> str:
    """The threshold rule of ``--threshold`` or ``--k`` (default mean + 3 SD)."""
    if args.k is not None:
        return f"mean_sd:k={args.k:g}"
    return args.threshold or "mean_sd:k=3"

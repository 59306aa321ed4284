"""Helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the readers are heavy to import; --help must stay fast
    from medanomaly.data.loading import LoadReport
    from medanomaly.jobs.score import JobOptions


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values below ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below the minimum {minimum}")
        return value

    return parse


def in_open_unit(text: str) -> float:
    """An argparse ``type`` for a fraction strictly between 0 and 1."""
    value = at_least(0.0, float)(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-pickle``: also load legacy pickle model files (they can run code)."""
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load a model.pt/checkpoint.pt written by medanomaly before 0.2: a pickle, "
        "which can run any code; only for files you trust (see docs/safe_files.md)",
    )


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) and ``--strict``, shared by fit and cv."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set engine.epochs=5",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop on the first unreadable image (and on an engine.precision the machine lacks)",
    )


def report_skipped(report: LoadReport, out: Path | None) -> None:
    """Print skipped cases (and why) and problems of kept cases; list the skipped in ``out``."""
    if report.warnings:
        print(f"{len(report.warnings)} problem(s) in cases that were kept:", file=sys.stderr)
        for line in report.warning_lines():
            print(f"  {line}", file=sys.stderr)
    if not report:
        return
    print(f"skipped {len(report.skipped)} unreadable case(s):", file=sys.stderr)
    for line in report.lines():
        print(f"  {line}", file=sys.stderr)
    if out is not None:
        from medanomaly.io.atomic import atomic_write_text

        atomic_write_text(out, "\n".join(report.lines()) + "\n")


def add_dicom_argument(parser: argparse.ArgumentParser) -> None:
    """``--dicom``: also write a DICOM Parametric Map per DICOM volume (with ``--maps``)."""
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="with --maps, also write <case>_map.dcm for DICOM volumes: a DICOM Parametric "
        "Map of the anomaly map on the source frame of reference, referencing the source series",
    )


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """``--store URL`` and ``--ca-bundle FILE``: a DICOMweb archive as source and store."""
    parser.add_argument(
        "--store",
        metavar="URL",
        help="send each case's DICOM Parametric Map to this DICOMweb archive with STOW-RS "
        "(dicomweb+http://HOST:PORT/PATH/); implies --dicom; default with --dicom and a "
        "dicomweb+ --data: that archive. Credentials come from netrc or the environment "
        "(MEDANOMALY_DICOMWEB_USER + _PASSWORD, or MEDANOMALY_DICOMWEB_TOKEN), never from here",
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="CA bundle that verifies the archive's TLS certificate (default: the system's)",
    )


def archive_settings(args: argparse.Namespace, default_maps: Path) -> str | None:
    """The archive the maps go to (``None``: none); fills ``--maps``/``--dicom`` it needs.

    ``--ca-bundle`` goes into the environment, where every archive connection reads it.
    """
    import os

    from medanomaly.io.dicomweb import CA_BUNDLE_ENV, is_dicomweb_url

    if args.ca_bundle:
        os.environ[CA_BUNDLE_ENV] = str(args.ca_bundle)
    store = args.store
    if store is None and args.dicom and is_dicomweb_url(args.data):
        store = args.data.split("?", 1)[0]
    if store is not None:
        args.dicom = True
        args.maps = args.maps or str(default_maps)
    return store


def report_map_problems(problems: list[str]) -> None:
    """Name each case whose maps in the scan's geometry could not be written."""
    if problems:
        print(f"{len(problems)} case(s) without a map in the scan's geometry:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)


def check_dicom_needs_maps(args: argparse.Namespace) -> None:
    """``--dicom`` writes beside the maps, so it needs ``--maps``."""
    if getattr(args, "dicom", False) and not getattr(args, "maps", None):
        from medanomaly.errors import ConfigError

        raise ConfigError("--dicom writes the DICOM maps into the --maps folder: give --maps DIR")


def add_device_arguments(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--accelerator``, ``--devices``, ``--num-nodes`` (as ``fit``) and ``--num-workers``."""
    parser.add_argument(
        "--accelerator",
        default=None,
        help="auto (default: a GPU if there is one), cpu, cuda or gpu",
    )
    parser.add_argument(
        "--devices",
        type=at_least(1),
        default=None,
        help="processes (GPUs) per node; N > 1 splits the cases over N data-parallel ranks "
        "(DDP: NCCL on GPUs, gloo on CPUs)",
    )
    parser.add_argument(
        "--num-nodes",
        type=at_least(1),
        default=None,
        help="machines (launch each with torchrun or a cluster launcher)",
    )
    add_trust_argument(parser)
    if workers:
        parser.add_argument(
            "--num-workers",
            type=at_least(0),
            default=None,
            help="worker processes decoding and preprocessing the cases on their first pass "
            "(default: the run's data.num_workers, else the cores available, shared by the "
            "ranks of a machine)",
        )


def job_options(args: argparse.Namespace) -> JobOptions:
    """The :class:`~medanomaly.jobs.score.JobOptions` of the device arguments."""
    from medanomaly.jobs.score import JobOptions

    return JobOptions(
        accelerator=args.accelerator or "auto",
        devices=args.devices or 1,
        num_nodes=args.num_nodes or 1,
        num_workers=args.num_workers,
        share_cores=True,
    )


def report_lines(
    skipped: list[tuple[str, str]], warnings: list[tuple[str, str]], out: Path | None
) -> None:
    """:func:`report_skipped` for lines gathered from every rank of a job."""
    from medanomaly.data.loading import LoadReport

    report_skipped(LoadReport(skipped=list(skipped), warnings=list(warnings)), out)


def add_viewer_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-viewer``: leave each case's scan and map out of the report's viewer."""
    parser.add_argument(
        "--no-viewer",
        dest="viewer",
        action="store_false",
        help="write no viewer volumes (OUT/viewer/: each case's scan and map for the report's "
        "interactive viewer, opened with medanomaly view OUT)",
    )

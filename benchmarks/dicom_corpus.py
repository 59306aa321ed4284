"""Run ``medanomaly inspect`` over every file of pydicom's bundled test files and count.

pydicom installs about 180 files under ``pydicom/data/test_files`` (79 ``.dcm`` files): every
transfer syntax, multi-frame images, files without preamble and deliberately broken ones.
This script passes all of them to one ``medanomaly inspect`` process and sorts each file:

* ``read``: the reader returned an image;
* ``refused``: a one-line ``cannot read:`` reason (split into files that hold pixel data and
  files that do not, as pydicom itself sees them with ``force=True``);
* tracebacks on stderr (there must be none).

The no-model row of this benchmark is the reader a user has without medanomaly: plain
``pydicom.dcmread(path, force=True).pixel_array`` with the same installed packages, counted
over the same files. ``--json`` writes ``rows`` (``medanomaly inspect`` and that baseline,
each with ``"baseline"``) beside the counts and the per-file outcomes.

    .venv/bin/python benchmarks/dicom_corpus.py [--json OUT.json]

``tests/test_dicom_corpus.py`` runs the same function and checks the outcome.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_row  # noqa: E402  (benchmarks/common.py)

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class Outcome:
    """What ``inspect`` said about one file."""

    name: str
    read: bool
    reason: str
    has_pixels: bool
    pydicom_reads: bool = False


def corpus_files(root: Path = CORPUS) -> list[Path]:
    """Every regular file under ``root``, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def holds_pixel_data(path: Path) -> bool:
    """Whether pydicom (with ``force=True``) finds pixel data in the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd files are the point of this corpus
            ds = pydicom.dcmread(path, force=True, defer_size=1024)
    except Exception:
        return False
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def pydicom_reads(path: Path) -> bool:
    """Whether plain pydicom decodes the file's pixels (the no-model row: no medanomaly)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True).pixel_array.size > 0
    except Exception:  # every failure counts as not read, whatever raised it
        return False


def run_inspect(files: list[Path]) -> tuple[str, str]:
    """stdout and stderr of one ``medanomaly inspect`` call over ``files``."""
    command = [sys.executable, "-m", "medanomaly.cli", "inspect", *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.stdout, done.stderr


def parse_reports(stdout: str, root: Path) -> dict[str, list[str]]:
    """Split the output into one report (list of lines) per file, keyed by relative path."""
    reports: dict[str, list[str]] = {}
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("path: "):
            current = []
            reports[str(Path(line[len("path: ") :]).relative_to(root))] = current
        current.append(line)
    return reports


def survey(root: Path = CORPUS) -> tuple[list[Outcome], str]:
    """Inspect every file of ``root``; return the outcomes and inspect's stderr."""
    files = corpus_files(root)
    stdout, stderr = run_inspect(files)
    reports = parse_reports(stdout, root)
    outcomes = []
    for path in files:
        name = str(path.relative_to(root))
        lines = reports.get(name, ["(no report)"])
        refusals = [line for line in lines if line.startswith("cannot read:")]
        outcomes.append(
            Outcome(
                name=name,
                read=not refusals and name in reports,
                reason=refusals[0].removeprefix("cannot read: ") if refusals else "",
                has_pixels=holds_pixel_data(path),
                pydicom_reads=pydicom_reads(path),
            )
        )
    return outcomes, stderr


def counts(outcomes: list[Outcome], stderr: str) -> dict[str, int]:
    """The figures the README and the issue quote."""
    dcm = [o for o in outcomes if o.name.endswith(".dcm")]
    tally = Counter(
        "read" if o.read else ("refused_with_pixels" if o.has_pixels else "refused_no_pixels")
        for o in outcomes
    )
    return {
        "files": len(outcomes),
        "dcm_files": len(dcm),
        "dcm_read": sum(o.read for o in dcm),
        "read": tally["read"],
        "refused_with_pixel_data": tally["refused_with_pixels"],
        "refused_without_pixel_data": tally["refused_no_pixels"],
        "tracebacks": stderr.count("Traceback"),
        "stderr_lines": len(stderr.splitlines()),
    }


def rows(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Files read (of all, of the ``.dcm`` ones) by medanomaly and by plain pydicom."""

    def row(read: list[bool], baseline: bool) -> dict[str, Any]:
        dcm = [r for r, o in zip(read, outcomes, strict=True) if o.name.endswith(".dcm")]
        return results_row({"read": sum(read), "dcm_read": sum(dcm)}, baseline=baseline)

    return {
        "medanomaly inspect": row([o.read for o in outcomes], baseline=False),
        "pydicom dcmread + pixel_array": row([o.pydicom_reads for o in outcomes], baseline=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write outcomes and counts here")
    args = parser.parse_args(argv)
    outcomes, stderr = survey()
    for outcome in outcomes:
        if not outcome.read and outcome.has_pixels:
            print(f"refused, holds pixel data: {outcome.name}: {outcome.reason}")
    summary = counts(outcomes, stderr)
    print(json.dumps(summary))
    table = rows(outcomes)
    print(json.dumps(table))
    if args.json:
        files = [asdict(o) for o in outcomes]
        data = {"rows": table, "counts": summary, "files": files, "stderr": stderr}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

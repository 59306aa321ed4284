"""Data preparation of the head CT benchmark: a manifest for ``medanomaly compare``.

Writes ``path,label,group`` for ../shared/data/head_ct_hemorrhage (100 normal ids 100-199,
100 hemorrhage ids 000-099; one slice per patient, so each slice is its own group), then the
comparison is one command::

    .venv/bin/python benchmarks/prepare_head_ct.py --out runs/head_ct
    medanomaly compare --spec head_ct --out runs/compare_head_ct
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preparation import preparation_parser, run_preparation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "head_ct_hemorrhage"


def write_manifest(folder: Path, out: Path) -> Path:
    """``out/manifest.csv``: one row per slice, ``label`` from ``labels.csv``."""
    with open(folder / "labels.csv", newline="") as handle:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(handle)]
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for row in sorted(rows, key=lambda r: r["id"]):
            path = (folder / f"{row['id']}.png").resolve()
            writer.writerow([str(path), row["hemorrhage"], row["id"]])
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = preparation_parser(__doc__, DATA, "head_ct")
    args = parser.parse_args(argv)
    return run_preparation(write_manifest, args)


if __name__ == "__main__":
    sys.exit(main())

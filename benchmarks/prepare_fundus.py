"""Data preparation of the fundus quality benchmark (DRIMDB): a manifest for ``compare``.

Writes ``path,label,group,kind`` for ../shared/data/fundus_quality_drimdb (Şevik et al.
2014: 125 good, 69 bad = ungradable, 22 outliers = not a fundus; RGB JPEG). ``label`` is 0
for good and 1 for bad and outlier images; there are no patient ids, so each image is its
own ``group``; ``kind`` (good / bad / outlier) gives the per-kind AUROC of the spec's
``subgroups: kind``. Then the comparison is one command::

    .venv/bin/python benchmarks/prepare_fundus.py --out runs/fundus
    medanomaly compare --spec fundus_quality --out runs/compare_fundus
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preparation import preparation_parser, run_preparation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fundus_quality_drimdb"
KINDS = ("good", "bad", "outlier")


def write_manifest(folder: Path, out: Path) -> Path:
    """``out/manifest.csv``: one row per JPEG in ``folder/{good,bad,outlier}``.

    Raises:
        FileNotFoundError: ``folder`` has no ``good`` images (not a DRIMDB folder).
    """
    rows = [
        (path.resolve(), kind) for kind in KINDS for path in sorted((folder / kind).glob("*.jpg"))
    ]
    if not any(kind == "good" for _, kind in rows):
        raise FileNotFoundError(f"{folder}: no good/*.jpg (expected good/, bad/, outlier/)")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "kind"])
        for path, kind in rows:
            writer.writerow([str(path), int(kind != "good"), f"{kind}/{path.stem}", kind])
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = preparation_parser(__doc__, DATA, "fundus")
    args = parser.parse_args(argv)
    return run_preparation(write_manifest, args)


if __name__ == "__main__":
    sys.exit(main())

"""Data preparation of the fundus quality benchmark (DRIMDB): a manifest for ``compare``.

Writes ``path,label,group,kind`` for ../shared/data/fundus_quality_drimdb (Şevik et al.
2014: 125 good, 69 bad = ungradable, 22 outliers = not a fundus; RGB JPEG). ``label`` is 0
for good and 1 for bad and outlier images; there are no patient ids, so each image is its
own ``group``; ``kind`` (good / bad / outlier) gives the per-kind AUROC of the spec's
``subgroups: kind``. Then the comparison is one command::

    .venv/bin/python benchmarks/prepare_fundus.py --out runs/fundus
    medanomaly compare --spec benchmarks/specs/fundus_quality.yaml --out runs/compare_fundus
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fundus")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (needs ../shared/data beside the repo)")
        return 0
    print(f"wrote {write_manifest(args.data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

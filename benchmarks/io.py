"""DICOM reading + preprocessing throughput: first pass versus cached pass.

For each real CT series (../shared/data/dicom_head_ct, totalseg_ct/example_ct_dicom) the
series is loaded through :func:`medanomaly.data.loading.load_dataset` with a Hjohlman 2022-like
pipeline (clip at -1024 HU, resample to 3 mm isotropic, resize to 64^3):

* first pass: empty cache, so the DICOM files are decoded, transformed and stored;
* cached pass: the same call again; only the files are hashed (the key is their content)
  and the stored arrays are read.

Throughput is given in series/s and MB/s, MB being the bytes of the files in the series
folder (10^6 bytes). The reader's warnings about the series (non-DICOM files beside the
slices, slice step above SliceThickness) are silenced. Each pass is timed ``--repeats``
times (the first pass each time with a fresh cache folder) and the median is reported.

    .venv/bin/python benchmarks/io.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from medanomaly.data.loading import load_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SERIES = ("dicom_head_ct", "totalseg_ct/example_ct_dicom")
TRANSFORMS = [
    {"clip": {"lower": -1024.0}},
    {"resample": {"spacing": 3.0}},
    {"resize": {"shape": [64, 64, 64], "mode": "area"}},
]


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files directly inside ``folder`` (what the reader looks at)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_manifest(series: Path, out: Path) -> Path:
    """A one-row manifest naming ``series`` (a dataset of one DICOM series)."""
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["path"], [str(series)]])
    return manifest


def median_seconds(run: Callable[[int], None], repeats: int) -> float:
    """Median wall time of ``run(i)`` over ``repeats`` calls."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_series(series: Path, repeats: int) -> dict[str, float]:
    """Seconds of one uncached and one cached load of ``series`` (medians)."""
    with tempfile.TemporaryDirectory(prefix="medanomaly-io-bench-") as tmp:
        tmp_path = Path(tmp)
        manifest = write_manifest(series, tmp_path)

        def first(i: int) -> None:
            load_dataset(manifest, TRANSFORMS, strict=True, cache=tmp_path / f"cache{i}")

        def cached(i: int) -> None:
            load_dataset(manifest, TRANSFORMS, strict=True, cache=tmp_path / "cache0")

        return {"first": median_seconds(first, repeats), "cached": median_seconds(cached, repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pass (median)")
    args = parser.parse_args(argv)
    logging.getLogger("medanomaly").setLevel(logging.ERROR)  # the series' known problems
    present = [DATA / s for s in SERIES if (DATA / s).is_dir()]
    if not present:
        print(f"skipped: real data not found under {DATA} (needs ../shared/data beside the repo)")
        return 0
    steps = ", ".join(next(iter(t)) for t in TRANSFORMS)
    print(f"pipeline: {steps} (3 mm, 64^3); median of {args.repeats} runs per pass")
    print(f"{'series':34s} {'MB':>6s} {'pass':>7s} {'s':>7s} {'series/s':>9s} {'MB/s':>8s}")
    for series in present:
        megabytes = folder_bytes(series) / 1e6
        seconds = bench_series(series, args.repeats)
        for name in ("first", "cached"):
            s = seconds[name]
            print(
                f"{str(series.relative_to(DATA)):34s} {megabytes:6.1f} {name:>7s} {s:7.3f} "
                f"{1 / s:9.2f} {megabytes / s:8.1f}"
            )
        print(f"{'':34s} {'':6s} {'speed-up':>7s} {seconds['first'] / seconds['cached']:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Summarise a py-spy profile of a ``medanomaly screen`` by phase (wall seconds).

Record the screen with py-spy (``pip install py-spy``), its worker processes and idle time
included, in the raw (collapsed-stack) format, then summarise it:

    .venv/bin/py-spy record --subprocesses --idle --rate 50 --format raw -o PROFILE.txt -- \\
        .venv/bin/python -m medanomaly.cli screen --run RUN --data DATA --out OUT ...
    .venv/bin/python benchmarks/profile_summary.py PROFILE.txt [PROFILE2.txt ...] [--rate 50]

For the main process's main thread (the screen's critical path) each sample goes to the first
phase of :data:`PHASES` whose pattern one of its frames matches (``other`` when none does);
the worker processes' samples are summed over the workers, idle time included.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

PHASES = (
    ("store maps (STOW-RS)", r"store_maps|store_instances"),
    ("list instances (QIDO-RS)", r"series_digest|with_instances|list_instances"),
    ("retrieve (WADO-RS)", r"fetch_series"),
    ("import", r"_find_and_load"),
    ("check access", r"check_access|open_store"),
    ("list series (QIDO-RS)", r"find_series|list_cases"),
    ("first pass: wait for the workers", r"map_in_workers"),
    ("first pass: prepare", r"_prepare \(|_load_case"),
    ("load the run", r"BaseDetector.load|start_job"),
    ("score (detect)", r"\.detect \("),
    ("write maps (NIfTI, DICOM, figures)", r"save_part_maps|MapTarget.write"),
    ("viewer volumes", r"ViewerVolumes|viewer_volumes|<lambda> \(medanomaly/screening/job.py"),
    ("read chunks from the cache", r"in_chunks|to_image_set"),
    ("key objects", r"_key_objects"),
    ("gallery", r"save_gallery"),
    ("latent / UMAP", r"latent_analysis"),
    ("outputs / report", r"write_screen_outputs|install_static"),
)


def phase(frames: list[str]) -> str:
    """The first phase whose pattern a frame of the stack matches."""
    text = ";".join(frames)
    return next((name for name, pattern in PHASES if re.search(pattern, text)), "other")


def summarise(path: Path, rate: float) -> str:
    """The phase table of one profile, as text."""
    main, workers = Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        processes = [p for p in parts if p.startswith("process ")]
        frames = [p for p in parts if not p.startswith("process ")]
        if len(processes) > 1:
            workers[phase(frames)] += int(count)
        elif not (frames and frames[0].startswith("Thread._bootstrap")):  # the main thread
            main[phase(frames)] += int(count)
    lines = [f"# {path.name}", f"main process, main thread: {sum(main.values()) / rate:.1f} s"]
    lines += [f"{n / rate:8.1f} s  {name}" for name, n in main.most_common()]
    lines.append(f"worker processes (summed, idle included): {sum(workers.values()) / rate:.1f} s")
    lines += [f"{n / rate:8.1f} s  {name}" for name, n in workers.most_common()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--rate", type=float, default=50.0, help="py-spy's samples per second")
    args = parser.parse_args()
    print("\n\n".join(summarise(path, args.rate) for path in args.profiles))


if __name__ == "__main__":
    main()

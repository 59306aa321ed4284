"""Scale: first pass, training epoch and screen of thousands of CT volumes in flat memory.

Synthetic CT-like volumes at Hjohlman's (2022) size (87 x 87 x 273 voxels of 3 mm, int16 NIfTI,
HU values): a thorax of varied size and position with subcutaneous fat, lungs, a heart with
contrast-filled chambers, an aorta, a spine and a sternum, and scanner noise. For each N of
``--sizes`` (default 250, 500, 1000, 2000) the benchmark measures, each step in a process of
its own:

* ``decode_1_worker`` / ``decode_2_workers``: the first pass of ``load_dataset(stream=True)``
  with an empty cache (read, HU clip at -1024, foreground HU > -990, z-score; stored as
  memory-mappable arrays), with 1 and with 2 worker processes;
* ``train_epoch``: one training epoch of a 3D ``resnet_ae`` on random 48 x 48 x 96 patches
  (one per volume and step), the volumes streamed from the cache;
* ``screen``: ``medanomaly screen`` of the N volumes with a trained run (scores by sliding
  window over whole volumes, raw facts, latent DBSCAN + UMAP, gallery, report), the first
  pass reading the cache.

Peak RSS is sampled every 0.1 s as the sum over the step's process tree (workers and the
fork server included; pages shared between processes count once per process, so the sum is
an upper bound); ``peak_pss_mb`` sums the proportional set sizes instead (shared pages
counted once), and ``max_process_rss_mb`` is the largest single process (``wait4``).
Volumes are written once (gzip) for the largest N and reused for the smaller ones; each N's
caches are removed after it, the volumes at the end (``--keep-volumes`` keeps them).

Before the sizes, the machine's own ceiling is measured (``parallel_ceiling``): the items per
second of 1 and of 2 warm worker processes on the first pass without its cache writes (40
volumes read and preprocessed in memory) and on pure-Python arithmetic. The first pass's
speed-up cannot beat it; ``--ceiling-only`` measures it alone.

    .venv/bin/python benchmarks/scale.py --out OUT [--sizes 250 500 1000 2000]
    -> OUT/results.json (rows: one per N), OUT/results.md
    .venv/bin/python benchmarks/scale.py --out OUT --ceiling-only   # -> OUT/ceiling.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

SHAPE = (87, 87, 273)
SPACING_MM = 3.0
DEFAULT_SIZES = (250, 500, 1000, 2000)
FIT_CASES = 60
TRANSFORMS = [
    {"clip": {"lower": -1024.0}},
    {"foreground_mask": {"threshold": -990.0, "fill_holes": True}},
    {"z_score": {"mean": -276.0, "std": 500.0}},
]
MODEL = {
    "name": "resnet_ae",
    "spatial_dims": 3,
    "depth": 10,
    "channels": [4, 8, 16, 32],
    "latent_dim": 1024,
    "foreground_threshold": -1.428,  # HU > -990 after the z-score
    "patch_size": [48, 48, 96],
    "patch_overlap": 0.0,
}
ENGINE = {"epochs": 1, "batch_size": 4, "seed": 0, "progress": False, "val_min": 20}
RSS_INTERVAL = 0.1
TARGET_RSS_MB = 3072
TARGET_SPEEDUP = 1.7
LINEAR_SLOPE = (0.85, 1.15)
CEILING_CASES = 40


# -- synthetic CT volumes ------------------------------------------------------------------
def ct_volume(index: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """One CT-like thorax in HU (int16), its anatomy drawn from a generator seeded by ``index``."""
    rng = np.random.default_rng(10_000 + index)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None] - shape[0] / 2
    y = np.arange(shape[1], dtype=np.float32)[None, :, None] - shape[1] / 2
    z = np.arange(shape[2], dtype=np.float32)[None, None, :]
    volume = np.full(shape, -1000.0, np.float32)
    cx, cy = rng.uniform(-3, 3, 2)
    ax, ay = rng.uniform(30, 39), rng.uniform(22, 31)  # body half-axes (voxels)
    top, bottom = rng.uniform(0, 25), shape[2] - rng.uniform(0, 25)
    inside_z = (z >= top) & (z <= bottom)

    def ellipse(rx: float, ry: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        return ((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2 <= 1.0

    def ellipsoid(rx: float, ry: float, rz: float, dx: float, dy: float, mz: float) -> np.ndarray:
        return ((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2 + ((z - mz) / rz) ** 2 <= 1

    fat = rng.uniform(2, 5)
    volume[ellipse(ax, ay) & inside_z] = -100.0
    volume[ellipse(ax - fat, ay - fat) & inside_z] = 40.0
    mid = rng.uniform(0.4, 0.6) * shape[2]
    for side in (-1.0, 1.0):  # lungs
        lung = ellipsoid(
            ax * rng.uniform(0.3, 0.4),
            ay * rng.uniform(0.55, 0.7),
            rng.uniform(60, 95),
            side * ax * rng.uniform(0.4, 0.5),
            -ay * 0.05,
            mid + rng.uniform(-10, 10),
        )
        volume[lung & inside_z] = -850.0
    heart_z = mid + rng.uniform(0, 30)
    heart_r = rng.uniform(9, 14)
    volume[ellipsoid(heart_r * 1.2, heart_r, heart_r * 1.6, ax * 0.1, ay * 0.2, heart_z)] = 40.0
    for dx, dy in ((-0.3, 0.1), (0.3, 0.35)):  # contrast-filled chambers (CCTA)
        chamber = ellipsoid(
            heart_r * 0.45, heart_r * 0.4, heart_r * 0.7, dx * heart_r, dy * heart_r, heart_z
        )
        volume[chamber] = rng.uniform(300, 420)
    aorta = ellipse(rng.uniform(3, 4.5), rng.uniform(3, 4.5), -ax * 0.05, -ay * 0.45)
    volume[aorta & (z >= heart_z - 60) & (z <= heart_z + 10) & inside_z] = rng.uniform(300, 420)
    spine = ellipse(rng.uniform(5, 7), rng.uniform(5, 7), 0.0, -ay * 0.78)
    volume[spine & inside_z] = rng.uniform(600, 900)
    sternum = ellipse(rng.uniform(4, 6), rng.uniform(1.5, 2.5), 0.0, ay * 0.85)
    volume[sternum & (z >= mid - 40) & (z <= mid + 40)] = rng.uniform(400, 700)
    volume += rng.normal(0.0, rng.uniform(12, 25), shape).astype(np.float32)
    return np.clip(np.round(volume), -1024, 3071).astype(np.int16)


def _write_volume(task: tuple[int, str]) -> None:
    index, path = task
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(ct_volume(index), affine), tmp)
    os.replace(tmp, path)


def volume_path(folder: Path, index: int) -> Path:
    return folder / f"ct_{index:05d}.nii.gz"


def ensure_volumes(folder: Path, n: int, workers: int) -> float:
    """Write the volumes ``0 .. n-1`` that are missing; return the seconds it took."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [
        (i, str(volume_path(folder, i))) for i in range(n) if not volume_path(folder, i).exists()
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_volume, missing, chunksize=8))
    return time.perf_counter() - start


def write_manifest(out: Path, folder: Path, n: int) -> Path:
    manifest = out / f"manifest_{n}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([[str(volume_path(folder, i))] for i in range(n)])
    return manifest


# -- measuring a step ------------------------------------------------------------------------
def _pss_kb(pid: int) -> int | None:
    """Proportional set size (shared pages split between their processes), or ``None``."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree_memory_kb(root: int) -> tuple[int, int]:
    """Resident and proportional memory (kB) of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            pid, parent = int(entry.name), int(fields[1])
            rss[pid] = int(fields[21]) * page_kb
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(pid)
    resident = proportional = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        resident += rss.get(pid, 0)
        pss = _pss_kb(pid)
        proportional += rss.get(pid, 0) if pss is None else pss
        stack.extend(children.get(pid, []))
    return resident, proportional


def run_step(command: list[str], log: Path) -> dict[str, Any]:
    """Run one step; its wall time, peak process-tree RSS and the JSON it printed last."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, text=True)
        peak = [0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[:] = map(max, peak, _tree_memory_kb(process.pid))
                done.wait(RSS_INTERVAL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = process.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed; see {log}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    found = json.loads(lines[-1]) if lines else {}
    return {
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak[0] / 1024,
        "peak_pss_mb": peak[1] / 1024,
        "max_process_rss_mb": usage.ru_maxrss / 1024,
        **found,
    }


def step_command(step: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--step", step, *args]


# -- the steps (each in its own process) ------------------------------------------------------
def decode_step(manifest: str, cache: str, workers: int) -> dict[str, Any]:
    """The first pass: read, preprocess and store every volume."""
    from medanomaly.data.loading import load_dataset

    start = time.perf_counter()
    cases, report = load_dataset(
        manifest, transforms=TRANSFORMS, cache=cache, stream=True, num_workers=workers
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cases": len(cases), "skipped": len(report.skipped)}


def train_step(manifest: str, cache: str) -> dict[str, Any]:
    """One training epoch over the streamed volumes (their first pass reads the cache)."""
    from medanomaly import get_model
    from medanomaly.data.loading import load_dataset
    from medanomaly.training.engine import Engine, EngineConfig, TrainingData, TrainingTask

    cases, _ = load_dataset(manifest, transforms=TRANSFORMS, cache=cache, stream=True)
    model = {k: v for k, v in MODEL.items() if k != "name"}
    detector = get_model("resnet_ae", **model, engine=ENGINE)
    network = detector.build_network(cases.shapes[0])
    task = TrainingTask(
        network=network,
        loss=detector.loss,
        score=lambda net, x: detector.evaluate(net, x)[0],
        collate=detector.training_collate(),
    )
    start = time.perf_counter()
    history = Engine(EngineConfig(**ENGINE)).fit(task, TrainingData(cases))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cases": len(cases), "train_loss": history[-1]["train_loss"]}


def model_flops() -> dict[str, float]:
    """FLOPs of one training volume (a patch) and of scoring one whole volume."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import inference_flops, training_flops

    from medanomaly import get_model
    from medanomaly.detectors.deep import inference_network

    model = {k: v for k, v in MODEL.items() if k != "name"}
    detector = get_model("resnet_ae", **model, engine=ENGINE)
    patches = torch.zeros(2, 1, *MODEL["patch_size"])
    train = training_flops(detector, patches)
    detector.network_ = inference_network(detector.build_network((1, *SHAPE)), 3)
    score = inference_flops(detector, torch.zeros(1, 1, *SHAPE))
    return {"train_gflop_per_volume": train / 1e9, "score_gflop_per_volume": score / 1e9}


def sliding_windows(shape: tuple[int, ...], patch: list[int], overlap: float) -> int:
    """Windows MONAI's sliding window takes over ``shape`` (step ``patch * (1 - overlap)``)."""
    count = 1
    for size, side in zip(shape, patch, strict=True):
        step = max(1, int(side * (1 - overlap)))
        count *= 1 if size <= side else math.ceil((size - side) / step) + 1
    return count


def seed004_flops() -> dict[str, float]:
    """FLOPs of Hjohlman's (2022) model (built-in config ``resnet_ae_ccta_3d_seed004``), counted on
    meta.

    Training: one 64^3 patch forward and backward; scoring: a whole 87 x 87 x 273 volume by
    sliding window (forward passes only). Counted on the meta device: no arithmetic is done.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medanomaly import get_model
    from medanomaly.config import load_config

    model = load_config("resnet_ae_ccta_3d_seed004")["model"]
    detector = get_model(**model)
    patch = (1, *model["patch_size"])
    with torch.device("meta"):
        network = detector.build_network(patch).train()
        with FlopCounterMode(display=False) as train:
            detector.loss(network, torch.zeros(2, *patch)).backward()
        with torch.no_grad(), FlopCounterMode(display=False) as forward:
            network.eval()(torch.zeros(1, *patch))
    windows = sliding_windows(SHAPE, model["patch_size"], model["patch_overlap"])
    return {
        "train_gflop_per_volume": train.get_total_flops() / 2 / 1e9,
        "score_gflop_per_volume": forward.get_total_flops() * windows / 1e9,
        "windows_per_volume": windows,
    }


# -- the machine's own ceiling for two processes ---------------------------------------------
def _decode_in_memory(path: str) -> float:
    """Read and preprocess one volume, nothing written: the first pass minus its cache."""
    from medanomaly.io import read_image
    from medanomaly.transforms import build_transforms

    return float(build_transforms(TRANSFORMS)(read_image(path)).array.mean())


def _count_primes(limit: int) -> int:
    """Pure-Python arithmetic: no memory traffic, no I/O, no library threads."""
    return sum(all(k % d for d in range(2, int(k**0.5) + 1)) for k in range(2, limit))


def _rate(function: Any, items: list[Any], processes: int) -> float:
    """Items per second of ``function`` over ``items`` in a warm pool of ``processes``."""
    from medanomaly.data.workers import worker_context

    with ProcessPoolExecutor(processes, mp_context=worker_context()) as pool:
        list(pool.map(function, items[:processes]))  # start-up and imports off the clock
        start = time.perf_counter()
        list(pool.map(function, items))
        return len(items) / (time.perf_counter() - start)


def parallel_ceiling(volumes: Path, cases: int = CEILING_CASES) -> dict[str, float]:
    """What 2 processes gain over 1 on this machine, with no cache writes and no start-up.

    The first pass's own speed-up is bounded by this: ``decode`` reads and preprocesses
    ``cases`` volumes (page-cache hot) and writes nothing; ``arithmetic`` is pure Python.
    """
    paths = [str(volume_path(volumes, i)) for i in range(cases)]
    primes = [60_000] * 16
    found = {}
    for name, function, items in (
        ("decode", _decode_in_memory, paths),
        ("arithmetic", _count_primes, primes),
    ):
        one, two = (_rate(function, items, p) for p in (1, 2))
        found[f"{name}_speedup"] = two / one
        found[f"{name}_per_second_1_process"] = one
    return found


# -- the benchmark ---------------------------------------------------------------------------
def fit_screening_run(out: Path, volumes: Path, cache: Path, logs: Path) -> Path:
    """A briefly trained run to screen with (its threshold rests on 20 held-out volumes)."""
    run = out / "run"
    config = {
        "model": MODEL,
        "engine": ENGINE,
        "data": {"transforms": TRANSFORMS, "cache": str(cache)},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = write_manifest(out, volumes, FIT_CASES)
    command = [sys.executable, "-m", "medanomaly.cli", "fit", "--config", str(out / "config.yaml")]
    run_step([*command, "--data", str(manifest), "--out", str(run)], logs / "fit.log")
    return run


def measure(n: int, out: Path, volumes: Path, run: Path, logs: Path) -> dict[str, Any]:
    """Every step at one N; the caches are removed afterwards."""
    manifest = str(write_manifest(out, volumes, n))
    cache, cache_1 = out / "cache", out / "cache_1_worker"
    for folder in (cache, cache_1):
        shutil.rmtree(folder, ignore_errors=True)
    steps = {
        "decode_1_worker": run_step(
            step_command("decode", manifest, str(cache_1), "1"), logs / f"decode1_{n}.log"
        )
    }
    shutil.rmtree(cache_1, ignore_errors=True)
    steps["decode_2_workers"] = run_step(
        step_command("decode", manifest, str(cache), "2"), logs / f"decode2_{n}.log"
    )
    steps["train_epoch"] = run_step(
        step_command("train", manifest, str(cache)), logs / f"train_{n}.log"
    )
    screen = [
        sys.executable,
        "-m",
        "medanomaly.cli",
        "screen",
        "--run",
        str(run),
        "--data",
        manifest,
    ]
    screen_out = out / f"screen_{n}"
    steps["screen"] = run_step(
        [*screen, "--out", str(screen_out), "--num-workers", "2"], logs / f"screen_{n}.log"
    )
    steps["screen"]["seconds"] = steps["screen"]["wall_seconds"]
    summary = json.loads((screen_out / "summary.json").read_text())
    cache_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(screen_out / "gallery", ignore_errors=True)
    return {
        "n": n,
        "decode_seconds_1_worker": steps["decode_1_worker"]["seconds"],
        "decode_seconds_2_workers": steps["decode_2_workers"]["seconds"],
        "decode_speedup": steps["decode_1_worker"]["seconds"]
        / steps["decode_2_workers"]["seconds"],
        "train_epoch_seconds": steps["train_epoch"]["seconds"],
        "screen_seconds": steps["screen"]["seconds"],
        "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
        "peak_pss_mb": max(s["peak_pss_mb"] for s in steps.values()),
        "screen_flagged": summary["n_flagged"],
        "cache_mb": cache_mb,
        "steps": steps,
    }


def slope(rows: list[dict[str, Any]], key: str) -> float | None:
    """Exponent b of time = a * N^b (least squares in log-log); 1 is linear."""
    if len(rows) < 2:
        return None
    n = np.log([r["n"] for r in rows])
    t = np.log([max(r[key], 1e-9) for r in rows])
    return float(np.polyfit(n, t, 1)[0])


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "decode_seconds_1_worker",
        "decode_seconds_2_workers",
        "train_epoch_seconds",
        "screen_seconds",
    )
    slopes = {k: slope(rows, k) for k in keys}
    peaks = [r["peak_rss_mb"] for r in rows]
    speedups = [r["decode_speedup"] for r in rows]
    return {
        "time_exponent": slopes,
        "linear_time": all(
            s is not None and LINEAR_SLOPE[0] <= s <= LINEAR_SLOPE[1] for s in slopes.values()
        ),
        "peak_rss_mb_largest_n": peaks[-1],
        "rss_growth_smallest_to_largest_n": peaks[-1] / peaks[0],
        "rss_within_3_gb": max(peaks) <= TARGET_RSS_MB,
        "decode_speedup_min": min(speedups),
        "decode_speedup_target_met": min(speedups) >= TARGET_SPEEDUP,
    }


def machine() -> dict[str, Any]:
    import torch

    from medanomaly.data.workers import available_cores

    return {
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def write_results(out: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import results_row

    found = targets(rows)
    results = {
        "rows": {str(r["n"]): results_row(r, baseline=False) for r in rows},
        "targets": found,
        **extra,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, found, extra))


def markdown(rows: list[dict[str, Any]], found: dict[str, Any], extra: dict[str, Any]) -> str:
    host = extra["machine"]
    load = ", ".join(f"{v:.2f}" for v in host["load_average_at_start"])
    lines = [
        f"# Scale: CT-like volumes {'x'.join(map(str, SHAPE))} (int16 NIfTI), streamed",
        "",
        f"Machine: {host['cores']} cores, torch {host['torch']} on {host['torch_threads']} "
        f"threads; load average at start {load}.",
        "",
        "| N | decode, 1 worker | decode, 2 workers | speed-up | training epoch | screen "
        "| peak RSS (PSS) | cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (
            r["n"],
            f"{r['decode_seconds_1_worker']:.1f} s",
            f"{r['decode_seconds_2_workers']:.1f} s",
            f"{r['decode_speedup']:.2f}x",
            f"{r['train_epoch_seconds']:.1f} s",
            f"{r['screen_seconds']:.1f} s",
            f"{r['peak_rss_mb']:.0f} MB ({r['peak_pss_mb']:.0f} MB)",
            f"{r['cache_mb'] / 1e3:.1f} GB",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Seconds per case (decode 1 worker / 2 workers, epoch, screen):", ""]
    keys = (
        "decode_seconds_1_worker",
        "decode_seconds_2_workers",
        "train_epoch_seconds",
        "screen_seconds",
    )
    for r in rows:
        lines.append(f"- N={r['n']}: " + " / ".join(f"{r[k] / r['n']:.3f}" for k in keys))
    exponents = ", ".join(f"{k} {v:.2f}" for k, v in found["time_exponent"].items() if v)
    linear = "linear" if found["linear_time"] else "not linear"
    rss = "met" if found["rss_within_3_gb"] else "missed"
    speedup = "met" if found["decode_speedup_target_met"] else "missed"
    data_gb = rows[-1]["n"] * math.prod(SHAPE) * 4 / 1e9
    model, flops = extra["model"], extra["flops"]
    lines += [
        "",
        f"- time grows as N^b: {exponents or 'one size only'} ({linear} within "
        f"{LINEAR_SLOPE[0]}-{LINEAR_SLOPE[1]})",
        f"- peak RSS {found['peak_rss_mb_largest_n']:.0f} MB at the largest N "
        f"(x{found['rss_growth_smallest_to_largest_n']:.2f} from the smallest; target "
        f"<= {TARGET_RSS_MB} MB: {rss}); the float32 data alone would be {data_gb:.1f} GB",
        f"- 2-worker decode at least {found['decode_speedup_min']:.2f}x faster than 1 worker "
        f"(target {TARGET_SPEEDUP}x: {speedup})",
        f"- model: {model['name']} depth {model['depth']}, channels {model['channels']}, "
        f"patches {model['patch_size']}; {flops['train_gflop_per_volume']:.1f} GFLOP per "
        f"training volume (one patch), {flops['score_gflop_per_volume']:.1f} GFLOP to score "
        "one volume",
    ]
    if "parallel_ceiling" in extra:
        lines.append(ceiling_line(extra["parallel_ceiling"]))
    return "\n".join(lines) + "\n"


def ceiling_line(ceiling: dict[str, float]) -> str:
    return (
        f"- this machine's ceiling for 2 processes over 1 (warm pools, nothing written): "
        f"decode in memory {ceiling['decode_speedup']:.2f}x, pure-Python arithmetic "
        f"{ceiling['arithmetic_speedup']:.2f}x"
    )


def run_benchmark(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    volumes = out / "volumes"
    sizes = sorted(args.sizes)
    extra: dict[str, Any] = {
        "shape": list(SHAPE),
        "spacing_mm": SPACING_MM,
        "model": MODEL,
        "engine": ENGINE,
        "transforms": TRANSFORMS,
        "machine": machine(),
        "flops": model_flops(),
        "seed004_flops": seed004_flops(),
        "generation_seconds": ensure_volumes(
            volumes, max(max(sizes), FIT_CASES), args.generate_workers
        ),
    }
    print(f"volumes ready in {volumes} ({extra['generation_seconds']:.0f} s)", flush=True)
    extra["parallel_ceiling"] = parallel_ceiling(volumes)
    print(ceiling_line(extra["parallel_ceiling"]), flush=True)
    run = fit_screening_run(out, volumes, out / "cache", logs)
    rows = []
    for n in sizes:
        rows.append(measure(n, out, volumes, run, logs))
        write_results(out, rows, extra)
        r = rows[-1]
        decode = f"{r['decode_seconds_1_worker']:.1f} s / {r['decode_seconds_2_workers']:.1f} s"
        print(
            f"N={n}: decode {decode}, epoch {r['train_epoch_seconds']:.1f} s, "
            f"screen {r['screen_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    if not args.keep_volumes:
        shutil.rmtree(volumes, ignore_errors=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def measure_ceiling_only(out: Path, generate_workers: int) -> None:
    """The machine's 2-process ceiling on its own (the volumes it needs are written first)."""
    volumes = out / "volumes"
    ensure_volumes(volumes, CEILING_CASES, generate_workers)
    ceiling = {"machine": machine(), **parallel_ceiling(volumes)}
    (out / "ceiling.json").write_text(json.dumps(ceiling, indent=2) + "\n")
    print(ceiling_line(ceiling))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (volumes, caches, results)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--keep-volumes", action="store_true", help="keep OUT/volumes")
    parser.add_argument("--generate-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only measure what 2 processes gain over 1 here (writes OUT/ceiling.json)",
    )
    parser.add_argument("--step", choices=("decode", "train"), help=argparse.SUPPRESS)
    parser.add_argument("step_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "decode":
        manifest, cache, workers = args.step_args
        print(json.dumps(decode_step(manifest, cache, int(workers))))
    elif args.step == "train":
        print(json.dumps(train_step(*args.step_args)))
    elif args.out and args.ceiling_only:
        measure_ceiling_only(Path(args.out).resolve(), args.generate_workers)
    elif args.out:
        run_benchmark(args)
    else:
        parser.error("--out is required")


if __name__ == "__main__":  # worker processes import this module again
    main()

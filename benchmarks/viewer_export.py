"""The report viewer and ONNX export on real data: open time, report sizes, parity and speed.

Three parts (``--part``, default all), each writing into ``OUT/results.json``:

* ``open``: a 240x240x155 BraTS case (``../shared/data/brats_3d/test``) with an ``intensity``
  map and its tumour outline in a report's viewer, opened in headless Chromium (WebGL in
  software, SwiftShader): milliseconds from opening the case to the drawn panel (the viewer's
  ``data-open-ms``), the first case of the page (NiiVue's shaders compiled then) and again
  warm; the target is under 2 s;
* ``sizes``: the report folders of ``evaluate`` on LGG slices (20 patients fit the
  ``intensity`` baseline, the other 10 are evaluated) and of ``screen`` on IXI T1 volumes
  (30 fit, 12 screened): the viewer's volumes and what one self-contained HTML file (every
  volume inlined as base64) would weigh;
* ``export``: ``cae``, ``vae`` and ``dae`` (LGG FLAIR at 64², one epoch) and ``resnet_ae``
  (IXI at 3 mm, 64x80x80, one epoch) exported to ONNX: largest map and score difference and
  flags against the torch run on the held-out cases, and scoring time of the same cases in
  memory, torch against ONNX Runtime, on the same threads (best of 3).

One epoch is enough here: parity and speed do not depend on how well the network learnt.
``.venv/bin/python benchmarks/viewer_export.py --out runs/viewer_export`` (about 10 minutes on
two CPU cores); docs/viewer.md and docs/export.md quote its output.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

THREADS = 2
LGG_TRANSFORMS = [{"resize": {"shape": [64, 64], "mode": "area"}}, {"min_max": {}}]
IXI_TRANSFORMS = [
    {"resample": {"spacing": [3.0, 3.0, 3.0], "mode": "bilinear", "padding_mode": "zeros"}},
    {"pad": {"shape": [64, 80, 80], "position": "center", "value": 0.0, "crop": True}},
    {"percentile_rescale": {"lower": 0.0, "upper": 99.5, "output": [0.0, 1.0]}},
]
ENGINE = {"epochs": 1, "batch_size": 16, "progress": False, "seed": 0, "val_fraction": 0.15}
MODELS_2D = {
    "cae": {"channels": [16, 32, 64], "latent_channels": 8},
    "vae": {"channels": [16, 32, 64, 128], "hidden_dim": 128, "latent_dim": 32},
    "dae": {"features": [8, 16, 32, 64, 64, 8], "norm_groups": 4, "foreground_threshold": 0.05},
}


def run_cli(*args: str) -> None:
    from medanomaly.cli import main

    code = main(list(args))
    if code != 0:
        raise SystemExit(f"medanomaly {' '.join(args)} exited {code}")


def fit_once(config: Path, data: Path, run_dir: Path) -> None:
    """``medanomaly fit`` unless the run is there already (a rerun measures the same run)."""
    if not (run_dir / "model.safetensors").is_file():
        run_cli("fit", "--config", str(config), "--data", str(data), "--out", str(run_dir))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- data ---------------------------------------------------------------------------------


def lgg_manifests(out: Path) -> tuple[Path, Path]:
    """``train.csv`` (normal slices of 20 patients) and ``test.csv`` (all slices of 10 more)."""
    from prepare_lgg import source_manifest

    out.mkdir(parents=True, exist_ok=True)
    with open(source_manifest(DATA / "lgg_mri_2d" / "kaggle_3m", out), newline="") as handle:
        rows = list(csv.DictReader(handle))
    patients = sorted({r["group"] for r in rows})
    train = [r for r in rows if r["group"] in patients[:20] and r["label"] == "0"]
    test = [r for r in rows if r["group"] in patients[20:]]
    paths = []
    for name, part in (("train", train), ("test", test)):
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["path", "label", "mask", "group"])
            writer.writeheader()
            writer.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


def ixi_manifests(out: Path) -> tuple[Path, Path]:
    """``train.csv`` (30 IXI T1 volumes) and ``test.csv`` (the other 12, unlabelled)."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted((DATA / "ixi_t1_3d" / "t1").glob("*.nii.gz"))
    paths = []
    for name, part in (("train", files[:30]), ("test", files[30:])):
        path = out / f"{name}.csv"
        path.write_text(
            "path,label\n" + "".join(f"{f},{0 if name == 'train' else -1}\n" for f in part)
        )
        paths.append(path)
    return paths[0], paths[1]


def write_config(path: Path, model: dict[str, Any], transforms: list[Any], **data: Any) -> Path:
    import yaml

    config = {"model": model, "engine": ENGINE, "data": {"transforms": transforms, **data}}
    path.write_text(yaml.safe_dump(config))
    return path


# -- parts --------------------------------------------------------------------------------


DISPLAY: dict[str, int] = {}  # --display-voxels N: the viewer's cap (default: its own)


def viewer_open(out: Path) -> dict[str, Any]:
    """Open BraTS cases in a report's viewer; milliseconds per open."""
    from browser import Browser

    from medanomaly.data.loading import load_dataset
    from medanomaly.detectors.registry import get_model
    from medanomaly.outputs.viewer import ViewerVolumes
    from medanomaly.reports.html import write_report
    from medanomaly.reports.serve import serve_in_background
    from medanomaly.reports.viewer import VIEWER_DIR, Viewer, install_static

    brats = DATA / "brats_3d"
    flair = "Flair_subtrMeanDivStd.nii.gz"
    train = sorted((brats / "train").iterdir()) + sorted((brats / "validation").iterdir())
    test = sorted((brats / "test").iterdir())
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "brats.csv"
    manifest.write_text(
        "path,label,mask\n" + "".join(f"{c / flair},1,{c / 'OTMultiClass.nii.gz'}\n" for c in test)
    )
    detector = get_model("intensity", spatial_dims=3, foreground_threshold=0.0)
    out.mkdir(parents=True, exist_ok=True)
    fit_set, _ = load_dataset(_list(out / "brats_train.csv", [c / flair for c in train]))
    detector.fit(fit_set)
    cases, _ = load_dataset(manifest)
    result = detector.detect(cases)
    report = out / "brats_report"
    volumes = ViewerVolumes(
        report / VIEWER_DIR,
        masks={str(c / flair): c / "OTMultiClass.nii.gz" for c in test},
        **({"max_voxels": DISPLAY["voxels"]} if DISPLAY else {}),
    )
    entries = volumes.write(cases, result, list(range(len(cases))))
    install_static(report / VIEWER_DIR)
    write_report(report / "report.html", "BraTS", [Viewer("Viewer", entries, detector.threshold_)])
    server, url = serve_in_background(report)
    timings = {}
    try:
        with Browser(1400, 1100) as browser:
            started = time.perf_counter()
            browser.open(url)
            state = "document.getElementById('mv').dataset"
            browser.wait_for(f"{state}.state === 'ready'", timeout=120)
            timings["page_to_first_case_ms"] = round(1000 * (time.perf_counter() - started))
            timings["script_ms"] = int(browser.evaluate(f"{state}.scriptMs"))
            timings["first_open_ms"] = int(browser.evaluate(f"{state}.openMs"))
            warm, cpu = [], []
            for k in (1, 0, 1):
                before = chromium_cpu_seconds(browser)
                browser.evaluate(f"window.medanomalyViewer.open({k})")
                browser.wait_for(f"{state}.state === 'ready'", timeout=120)
                warm.append(int(browser.evaluate(f"{state}.openMs")))
                cpu.append(round(chromium_cpu_seconds(browser) - before, 2))
            timings["warm_open_ms"] = warm
            timings["warm_open_chromium_cpu_seconds"] = cpu
            timings["load_average_1min"] = os.getloadavg()[0]
            timings["console"] = browser.console
            timings["outside_loopback"] = [
                u for u in browser.requests if not u.startswith(("http://127.0.0.1:", "data:"))
            ]
    finally:
        server.shutdown()
    shape = nib.load(test[0] / flair).shape
    return {
        "case_shape": list(shape),
        "display_shape": list(nib.load(report / VIEWER_DIR / entries[0]["scan"]).shape),
        "case_files_bytes": folder_bytes(report / VIEWER_DIR / "cases") // len(test),
        **timings,
    }


def chromium_cpu_seconds(browser: Any) -> float:
    """CPU time used so far by the browser's processes (all of its process tree).

    On a machine shared with other work the wall time of an open says little; the CPU time
    that Chromium spent on it is what the open costs on an idle machine (at most, as
    SwiftShader draws on several threads).
    """
    parents, times = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    root = browser._process.pid
    tree, grown = {root}, True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return sum(times.get(pid, 0.0) for pid in tree)


def _list(path: Path, files: list[Path]) -> Path:
    path.write_text("path,label\n" + "".join(f"{f},0\n" for f in files))
    return path


def report_sizes(out: Path) -> dict[str, Any]:
    """Report folders of evaluate (LGG) and screen (IXI) with the intensity baseline."""
    found = {}
    lgg_train, lgg_test = lgg_manifests(out / "lgg")
    config = write_config(
        out / "lgg_intensity.yaml",
        {"name": "intensity", "spatial_dims": 2, "foreground_threshold": 0.05},
        LGG_TRANSFORMS,
        read_options={"channel": 1},
    )
    fit_once(config, lgg_train, out / "lgg_run")
    run_cli(
        "evaluate",
        "--run",
        str(out / "lgg_run"),
        "--data",
        str(lgg_test),
        "--out",
        str(out / "lgg_eval"),
    )
    found["lgg_evaluate"] = _sizes(out / "lgg_eval")
    ixi_train, ixi_test = ixi_manifests(out / "ixi")
    config = write_config(
        out / "ixi_intensity.yaml",
        {
            "name": "intensity",
            "spatial_dims": 3,
            "per_voxel": True,
            "direction": "both",
            "foreground_threshold": 0.05,
        },
        IXI_TRANSFORMS,
    )
    fit_once(config, ixi_train, out / "ixi_run")
    run_cli(
        "screen",
        "--run",
        str(out / "ixi_run"),
        "--data",
        str(ixi_test),
        "--out",
        str(out / "ixi_screen"),
    )
    found["ixi_screen"] = _sizes(out / "ixi_screen")
    return found


def _sizes(folder: Path) -> dict[str, Any]:
    cases = folder / "viewer" / "cases"
    volumes = folder_bytes(cases)
    n = len({p.name.split("_")[0] for p in cases.iterdir()})
    report = (folder / "report.html").stat().st_size
    scripts = folder_bytes(folder / "viewer") - volumes
    return {
        "cases": n,
        "report_html_bytes": report,
        "viewer_scripts_bytes": scripts,
        "viewer_volumes_bytes": volumes,
        "per_case_bytes": volumes // max(n, 1),
        "self_contained_html_bytes_estimate": report + scripts + (4 * volumes) // 3,
    }


def export_parity(out: Path) -> dict[str, Any]:
    """Export cae, vae, dae (LGG 2D) and resnet_ae (IXI 3D): parity and speed against torch."""
    from medanomaly.data.loading import load_dataset
    from medanomaly.detectors.base import BaseDetector

    rows = {}
    lgg_train, lgg_test = lgg_manifests(out / "lgg")
    ixi_train, ixi_test = ixi_manifests(out / "ixi")
    jobs = [
        (
            name,
            {"name": name, "spatial_dims": 2, **params},
            LGG_TRANSFORMS,
            lgg_train,
            lgg_test,
            {"read_options": {"channel": 1}},
        )
        for name, params in MODELS_2D.items()
    ]
    jobs.append(
        (
            "resnet_ae",
            {
                "name": "resnet_ae",
                "spatial_dims": 3,
                "depth": 10,
                "channels": [16, 32, 64, 128],
                "latent_dim": 256,
                "output_activation": "sigmoid",
                "foreground_threshold": 0.05,
            },
            IXI_TRANSFORMS,
            ixi_train,
            ixi_test,
            {},
        )
    )
    torch.set_num_threads(THREADS)
    for name, model, transforms, train, test, data in jobs:
        run_dir, exported = out / f"{name}_run", out / f"{name}_onnx"
        config = write_config(out / f"{name}.yaml", model, transforms, **data)
        fit_once(config, train, run_dir)
        started = time.perf_counter()
        run_cli("export", "--run", str(run_dir), "--out", str(exported))
        export_seconds = time.perf_counter() - started
        detector, onnx = BaseDetector.load(run_dir), BaseDetector.load(exported)
        cases, _ = load_dataset(test, transforms=transforms, stream=False, **data)
        expected, found = detector.detect(cases), onnx.detect(cases)
        rows[name] = {
            "cases": len(cases),
            "input_shape": list(detector.input_shape_),
            "max_map_difference": float(np.max(np.abs(found.maps - expected.maps))),
            "max_score_difference": float(np.max(np.abs(found.scores - expected.scores))),
            "max_score_relative_difference": float(
                np.max(
                    np.abs(found.scores - expected.scores)
                    / np.maximum(np.abs(expected.scores), 1e-12)
                )
            ),
            "same_flags": bool(np.array_equal(found.labels, expected.labels)),
            "flagged": int(expected.labels.sum()),
            # a one-epoch run may flag few cases: the flags at a cut-off halfway between the
            # two middle scores too (a cut-off equal to a score would test rounding only)
            "same_flags_at_middle": bool(
                np.array_equal(
                    found.scores > middle_cutoff(expected.scores),
                    expected.scores > middle_cutoff(expected.scores),
                )
            ),
            "torch_seconds": _best(detector.detect, cases),
            "onnxruntime_seconds": _best(onnx.detect, cases),
            "export_seconds": round(export_seconds, 1),
            "onnx_bytes": (exported / "model.onnx").stat().st_size,
        }
        row = rows[name]
        row["speedup"] = row["torch_seconds"] / row["onnxruntime_seconds"]
        print(name, json.dumps(row), flush=True)
    return {"threads": THREADS, "rows": rows}


def middle_cutoff(scores: np.ndarray) -> float:
    """Halfway between the two distinct scores nearest the middle of the ranking."""
    distinct = np.unique(scores)
    k = len(distinct) // 2
    return float((distinct[max(k - 1, 0)] + distinct[k]) / 2)


def _best(work: Any, cases: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work(cases)
        times.append(time.perf_counter() - started)
    return min(times)


PARTS = {"open": viewer_open, "sizes": report_sizes, "export": export_parity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "viewer_export")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--display-voxels", type=int, help="the viewer's voxel cap (open)")
    args = parser.parse_args()
    if args.display_voxels:
        DISPLAY["voxels"] = args.display_voxels
    if not DATA.is_dir():
        sys.exit(f"viewer_export: real data not found at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            results[name] = part(args.out / name)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
            print(name, json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()

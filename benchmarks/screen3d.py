"""Hjohlman 2022 analogue: screen an unlabelled folder of 3D volumes for outliers.

A 3D ResNet autoencoder (Hjohlman 2022) is trained on healthy IXI brain T1 volumes
(../shared/data/ixi_t1_3d, 42 volumes; 8 held out), then ``medanomaly screen`` ranks a folder
that mixes the 8 held-out normals with planted outliers:

* ``brats_*``: the BraTS T1c volumes of ../shared/data/brats_3d (another protocol:
  skull-stripped, z-scored inside the brain, 1 mm);
* ``ct_*``: a body CT (../shared/data/totalseg_ct/example_ct.nii.gz) and a head CT DICOM
  series (../shared/data/dicom_head_ct);
* held-out IXI volumes altered on disk (voxel order and header as in the original file):
  ``metal_*`` (bright metal-like streaks through 12 axial slices), ``missing_*`` (a block of
  10 axial slices set to 0), ``noise_*`` (Gaussian noise of 25 % of the 99th intensity
  percentile), ``flip_*`` (left-right mirrored voxels, header unchanged) and ``flip_header_*``
  (voxels unchanged, the header's left-right axis mirrored: a conversion error, after which
  every reader shows a mirrored brain).

One network (trained with the plain MSE loss, epoch chosen by the validation loss), two scores:
Hjohlman's (2022) masked MSE (voxels above 0.05 after scaling to [0, 1]) and the MSE over every
voxel.
The ``mse`` run is the ``masked_mse`` run's network re-scored: its threshold is recomputed from
the same held-out normal validation volumes (``DeepDetector.calibrate``). The no-model row
``intensity`` (``"baseline": true``) is the ``intensity`` detector fitted on the same training
volumes and screened the same way: each voxel's intensity z-scored by the normal volumes' mean
and SD at that voxel (the volumes share one grid), in both directions, scored by the 99th
percentile of |z| inside the foreground (voxels above 0.05).
The threshold is mean + 3 SD of the scores of normal validation volumes held out of training
(``engine.val_fraction``); the held-out normals never take part in training or threshold.
Reported: which planted outliers are flagged, false positives among the held-out normals,
whether every planted outlier ranks above every held-out normal, the AUROC of planted vs
normal, and wall times (fit, screen).

    .venv/bin/python benchmarks/screen3d.py --out OUT [--epochs N] [--quick]

Writes ``OUT/results.json`` (``rows``: score -> outcome, with ``baseline``) and
``OUT/results.md``; the screen's own outputs (``screen.csv``,
``report.html``, gallery) are in ``OUT/screen``.
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
import yaml
from sklearn.metrics import roc_auc_score

from medanomaly import load_model
from medanomaly.cli import main as medanomaly
from medanomaly.data.loading import load_dataset
from medanomaly.io.safe_files import load_state
from medanomaly.training.engine import split_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_row  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_HELD_OUT = 8
PLANTED_KINDS = ("metal", "missing", "noise", "flip", "flip_header")

MODEL = {
    "name": "resnet_ae",
    "spatial_dims": 3,
    "depth": 10,
    "channels": [16, 32, 64, 128],
    "latent_dim": 1024,
    "output_activation": "sigmoid",
    "threshold_sd": 3.0,
}
# The two scores of Hjohlman 2022 (the first trains the network, the second re-scores it): voxels
# above 0.05 after scaling to [0, 1] (the brain and skull; air is ~0), or every voxel.
SCORES = {"masked_mse": 0.05, "mse": None, "intensity": 0.05}
TRAINED = "masked_mse"
BASELINE = "intensity"
INTENSITY = {
    "name": "intensity",
    "spatial_dims": 3,
    "per_voxel": True,
    "direction": "both",
    "score_reduce": "percentile",
    "score_value": 99.0,
    "threshold_sd": 3.0,
}
ENGINE = {
    "epochs": 80,
    "batch_size": 4,
    "lr": 0.001,
    "seed": 0,
    "patience": 25,
    "val_fraction": 0.2,
}
# 2 mm IXI -> 3 mm (60 x 80 x 80), centred on a 64 x 80 x 80 grid, intensities to [0, 1].
TRANSFORMS = [
    {"resample": {"spacing": [3.0, 3.0, 3.0], "mode": "bilinear", "padding_mode": "zeros"}},
    {"pad": {"shape": [64, 80, 80], "position": "center", "value": 0.0, "crop": True}},
    {"percentile_rescale": {"lower": 0.0, "upper": 99.5, "output": [0.0, 1.0]}},
    {"rand_affine": {"rotate_deg": 5.0, "translate": 0.03, "scale": 0.05, "shear": 0.0}},
]


def ixi_volumes(data: Path) -> list[Path]:
    """The IXI T1 volumes, sorted by name."""
    files = sorted((data / "ixi_t1_3d" / "t1").glob("*.nii.gz"))
    if len(files) <= N_HELD_OUT:
        sys.exit(f"screen3d: need more than {N_HELD_OUT} volumes in {data / 'ixi_t1_3d/t1'}")
    return files


def split_ixi(files: list[Path], seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Training volumes and the ``N_HELD_OUT`` held-out normals (a seeded random choice)."""
    order = np.random.default_rng(seed).permutation(len(files))
    held = sorted(files[i] for i in order[:N_HELD_OUT])
    return [f for f in files if f not in held], held


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        target.symlink_to(source.resolve())


def _save(array: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write ``array`` as float32 NIfTI with ``affine`` and ``like``'s header (atomically)."""
    header = like.header.copy()
    header.set_data_dtype(np.float32)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine, header), tmp)
    os.replace(tmp, path)


def _ras_transforms(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Orientation transforms from the file's voxel order to RAS+ and back."""
    on_disk = nib.orientations.io_orientation(image.affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    return (
        nib.orientations.ornt_transform(on_disk, ras),
        nib.orientations.ornt_transform(ras, on_disk),
    )


def _alter_ras(kind: str, ras: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The planted alteration of a RAS+ array (x: left-right, y: back-front, z: up-down)."""
    ras = ras.copy()
    top = float(np.percentile(ras, 99))
    nx, ny, nz = ras.shape
    if kind == "metal":  # six bright streaks through 12 axial slices, like metal artefacts
        cx, cy, cz = nx // 2, int(ny * 0.6), int(nz * 0.55)
        t = np.arange(-max(nx, ny), max(nx, ny))
        for angle in np.linspace(0, np.pi, 6, endpoint=False):
            xs = np.clip((cx + t * np.cos(angle)).astype(int), 0, nx - 1)
            ys = np.clip((cy + t * np.sin(angle)).astype(int), 0, ny - 1)
            for dz in range(-6, 6):
                ras[xs, ys, cz + dz] = 4.0 * top
                ras[np.clip(xs + 1, 0, nx - 1), ys, cz + dz] = 4.0 * top
    elif kind == "missing":
        start = int(nz * 0.5)
        ras[:, :, start : start + 10] = 0.0
    elif kind == "noise":
        ras = np.clip(ras + rng.normal(0.0, 0.25 * top, ras.shape), 0, None)
    elif kind == "flip":
        ras = ras[::-1]
    else:
        raise ValueError(f"unknown planted outlier {kind!r}")
    return ras


def plant(kind: str, image: nib.Nifti1Image, rng: np.random.Generator, path: Path) -> None:
    """Write an altered copy of a held-out volume, in the file's own voxel order and header.

    ``flip_header`` keeps the voxels and mirrors the affine's left-right axis (a conversion
    error: readers then mirror the brain); the others alter the voxels and keep the header.
    """
    array = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    if kind == "flip_header":
        to_ras, _ = _ras_transforms(image)
        axis = int(np.flatnonzero(to_ras[:, 0] == 0)[0])  # the file axis that becomes R-L
        mirror = np.eye(4)
        mirror[axis, axis], mirror[axis, 3] = -1.0, array.shape[axis] - 1
        _save(array, affine @ mirror, image, path)
        return
    to_ras, back = _ras_transforms(image)
    ras = nib.orientations.apply_orientation(array, to_ras)
    altered = nib.orientations.apply_orientation(_alter_ras(kind, ras, rng), back)
    _save(altered, affine, image, path)


def prepare(data: Path, out: Path) -> tuple[Path, Path, dict[str, str]]:
    """Write the training manifest and the screening folder; return them and the truth."""
    folder = out / "data" / "screen"
    folder.mkdir(parents=True, exist_ok=True)
    train, held = split_ixi(ixi_volumes(data))
    manifest = out / "data" / "train.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.resolve()},normal\n" for p in train))
    truth: dict[str, str] = {}
    for path in held:
        name = f"normal_{path.name}"
        _link(path, folder / name)
        truth[name] = "normal"
    rng = np.random.default_rng(0)
    for kind, path in zip(PLANTED_KINDS, held, strict=False):
        name = f"{kind}_{path.name}"
        if not (folder / name).exists():
            plant(kind, nib.load(path), rng, folder / name)
        truth[name] = kind
    for case in sorted((data / "brats_3d").glob("*/*/T1c_subtrMeanDivStd.nii.gz")):
        name = f"brats_{case.parent.name}.nii.gz"
        _link(case, folder / name)
        truth[name] = "brats"
    ct = {"ct_body.nii.gz": data / "totalseg_ct" / "example_ct.nii.gz"}
    ct["ct_head_dicom"] = data / "dicom_head_ct"
    for name, source in ct.items():
        if source.exists():
            _link(source, folder / name)
            truth[name] = "ct"
    return manifest, folder, truth


def write_config(out: Path, epochs: int | None, score: str) -> Path:
    """The YAML config (model, engine, data) of the run with ``score``."""
    engine = {**ENGINE, **({"epochs": epochs} if epochs else {})}
    model = {**(INTENSITY if score == BASELINE else MODEL), "foreground_threshold": SCORES[score]}
    config = {"model": model, "engine": engine, "data": {"transforms": TRANSFORMS}}
    path = out / f"config_{score}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(args: list[str]) -> float:
    """Run a ``medanomaly`` command in-process; return its wall time in seconds."""
    start = time.perf_counter()
    code = medanomaly(args)
    if code not in (0, 1):
        sys.exit(f"screen3d: medanomaly {' '.join(args)} failed with code {code}")
    return time.perf_counter() - start


def fit(config: Path, manifest: Path, run: Path, retrain: bool) -> float:
    """Train (or resume, or reuse) the run; its training seconds."""
    timing = run / "fit_seconds.json"
    if (run / "model.safetensors").exists() and timing.exists() and not retrain:
        print(f"reusing {run / 'model.safetensors'}")
        return float(json.loads(timing.read_text())["seconds"])
    resume = ["--resume"] if (run / "checkpoint.safetensors").exists() and not retrain else []
    seconds = run_cli(
        ["fit", "--config", str(config), "--data", str(manifest), "--out", str(run), *resume]
    )
    timing.write_text(json.dumps({"seconds": seconds, "resumed": bool(resume)}))
    return seconds


def summarise(rows: list[dict[str, str]], truth: dict[str, str]) -> dict[str, Any]:
    """Which planted outliers are flagged, false positives, ranking and AUROC."""
    cases = []
    for row in rows:
        name = Path(row["id"]).name
        cases.append(
            {
                "case": name,
                "kind": truth.get(name, "unknown"),
                "rank": int(row["rank"]),
                "score": float(row["score"]),
                "flagged": row["flagged"].lower() in ("1", "true"),
                "oddities": row.get("oddities", ""),
            }
        )
    normal = [c for c in cases if c["kind"] == "normal"]
    planted = [c for c in cases if c["kind"] not in ("normal", "unknown")]
    labels = [0] * len(normal) + [1] * len(planted)
    scores = [c["score"] for c in normal] + [c["score"] for c in planted]
    worst_planted = max(c["rank"] for c in planted)
    best_normal = min(c["rank"] for c in normal)
    return {
        "cases": sorted(cases, key=lambda c: c["rank"]),
        "n_normal": len(normal),
        "n_planted": len(planted),
        "planted_flagged": sum(c["flagged"] for c in planted),
        "planted_missed": [c["case"] for c in planted if not c["flagged"]],
        "false_positives": [c["case"] for c in normal if c["flagged"]],
        "all_planted_above_all_normals": worst_planted < best_normal,
        "auroc_planted_vs_normal": float(roc_auc_score(labels, scores)),
    }


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The row's metrics in ``results.json`` (the cases stay in its ``summary``)."""
    keys = ("auroc_planted_vs_normal", "planted_flagged", "n_planted", "n_normal")
    return {
        **{k: summary[k] for k in keys},
        "false_positives": len(summary["false_positives"]),
        "all_planted_above_all_normals": summary["all_planted_above_all_normals"],
    }


def _case_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One table row per case: its kind, and rank / score / flag under each score."""
    scores = list(runs)
    by_case = {score: {c["case"]: c for c in runs[score]["summary"]["cases"]} for score in scores}
    first = runs[scores[0]]["summary"]["cases"]
    header = "| case | kind | " + " | ".join(f"{s} rank | {s} score | flagged" for s in scores)
    lines = [header + " | file oddities |", "|---|---|" + "---|---|---|" * len(scores) + "---|"]
    for case in first:
        cells = [case["case"], case["kind"]]
        for score in scores:
            c = by_case[score][case["case"]]
            cells += [str(c["rank"]), f"{c['score']:.5f}", "yes" if c["flagged"] else "no"]
        cells.append(case["oddities"] or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fit_cell(run: dict[str, Any]) -> str:
    if run["baseline"]:
        return f"{run['fit_seconds']:.0f} s (statistics, no training)"
    if run["rescored_from"]:
        return f"the {run['rescored_from']} network, re-scored"
    return f"{run['fit_seconds'] / 60:.1f} min ({run['epochs_run']} epochs)"


def results_markdown(results: dict[str, Any]) -> str:
    """The benchmark's markdown report."""
    runs = results["rows"]
    lines = [
        "# 3D outlier screening (Hjohlman 2022 analogue): IXI T1 normals + planted outliers",
        "",
        f"Model: `resnet_ae` depth {MODEL['depth']}, channels {MODEL['channels']}, latent "
        f"{MODEL['latent_dim']}; {results['n_train']} IXI training volumes, of which "
        f"{results['n_val']} held out for the threshold (mean + 3 SD of their scores); "
        f"{results['n_held_out']} more IXI volumes held out as the screen's normals. CPU threads: "
        f"{results['threads']} (shared with other jobs: times are upper bounds).",
        "",
        "| score | planted flagged | missed | false positives (held-out normals) | every "
        "planted above every normal | AUROC planted vs normal | fit | screen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for score, run in runs.items():
        s = run["summary"]
        label = f"*{score} (no model)*" if run["baseline"] else score
        lines.append(
            f"| {label} | {s['planted_flagged']} / {s['n_planted']} | "
            f"{', '.join(s['planted_missed']) or '–'} | {len(s['false_positives'])} / "
            f"{s['n_normal']} | {'met' if s['all_planted_above_all_normals'] else 'missed'} | "
            f"{s['auroc_planted_vs_normal']:.3f} | {_fit_cell(run)} | "
            f"{run['screen_seconds']:.0f} s |"
        )
    lines += ["", *_case_lines(runs), ""]
    return "\n".join(lines) + "\n"


def rescore(source: Path, run: Path, manifest: Path, score: str) -> float:
    """Copy the trained run at ``source`` with another score; recalibrate its threshold.

    The threshold comes from the validation volumes the source run held out (the engine's
    seeded split of the training manifest); recalibrating the source's own score first
    checks that the split is the same.
    """
    detector = load_model(source)
    config = detector.run_config_
    images, _ = load_dataset(manifest, **config["data"])
    engine = detector.engine_config
    held = split_indices(len(images), engine.val_fraction, engine.seed, engine.val_min)[1]
    held = images.subset(held)
    start = time.perf_counter()
    original = detector.threshold_
    if not np.isclose(detector.calibrate(held).threshold_, original, rtol=1e-4):
        sys.exit(f"screen3d: cannot reproduce the validation split of {source}")
    detector.set_params(foreground_threshold=SCORES[score]).calibrate(held)
    detector.run_config_ = detector.write_run_config(run, config["data"])
    detector.save(run / "model.safetensors")
    return time.perf_counter() - start


def run_score(args: argparse.Namespace, score: str, manifest: Path, folder: Path) -> dict:
    """Fit, re-score or reuse the run of ``score``, screen the folder, read back the outcome."""
    run = args.out / f"run_{score}"
    trained = args.out / f"run_{TRAINED}"
    if score in (TRAINED, BASELINE):
        fit_seconds = fit(write_config(args.out, args.epochs, score), manifest, run, args.retrain)
    else:
        fit(write_config(args.out, args.epochs, TRAINED), manifest, trained, args.retrain)
        seconds = rescore(trained, run, manifest, score)
        print(f"{score}: re-scored {trained.name} in {seconds:.0f} s")
        fit_seconds = json.loads((trained / "fit_seconds.json").read_text())["seconds"]
    screen_dir = args.out / f"screen_{score}"
    screen_seconds = run_cli(
        ["screen", "--run", str(run), "--data", str(folder), "--out", str(screen_dir)]
    )
    with open(screen_dir / "screen.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    saved = load_state(run / "model.safetensors")
    history = saved.get("history") or []  # no-model rows train no epochs
    return {
        "rows": rows,
        "threshold": float(json.loads((screen_dir / "summary.json").read_text())["threshold"]),
        "fit_seconds": fit_seconds,
        "screen_seconds": screen_seconds,
        "epochs_run": len(history),
        "foreground_threshold": SCORES[score],
        "rescored_from": None if score in (TRAINED, BASELINE) else TRAINED,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--epochs", type=int, help="override engine.epochs")
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true", help="ignore finished runs")
    args = parser.parse_args(argv)
    if not (args.data / "ixi_t1_3d").exists():
        sys.exit(f"screen3d: {args.data / 'ixi_t1_3d'} is missing (see ../shared/data/README.md)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest, folder, truth = prepare(args.data, args.out)
    runs = {}
    for score in args.scores:
        run = run_score(args, score, manifest, folder)
        run["summary"] = summarise(run.pop("rows"), truth)
        runs[score] = run
    n_train = len(manifest.read_text().splitlines()) - 1
    rows = {
        score: results_row(headline(run["summary"]), score == BASELINE, **run)
        for score, run in runs.items()
    }
    results = {
        "benchmark": "screen3d",
        "rows": rows,
        "threads": args.threads,
        "n_train": n_train,
        "n_val": round(n_train * ENGINE["val_fraction"]),
        "n_held_out": N_HELD_OUT,
        "model": MODEL,
        "engine": {**ENGINE, **({"epochs": args.epochs} if args.epochs else {})},
        "transforms": TRANSFORMS,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(results_markdown(results))
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check: every registered model fits and scores on CUDA, and scores as on the CPU.

    python benchmarks/gpu_check.py --out gpu_check/      # about 5 minutes on one GPU

1. Every registered model is built from the first built-in config that uses it (else
   its defaults), fitted for one short epoch on CUDA with the config's precision (``auto``:
   bf16 mixed on a GPU with bf16, else 16-bit mixed) on synthetic phantoms at the config's
   input size (the shape of its last ``resize``/``pad``; 64² without one), then scored on
   the GPU and, after ``detector.to("cpu")``, on the CPU. The two score vectors must agree:
   Spearman rank correlation >= 0.99 and maximum relative difference <= 2 % (cuDNN's TF32
   convolutions round differently from the CPU's float32).
2. ``fit`` and ``score`` of the ``cae`` are timed at 64², 256² and 64³ and reported as
   images/s and as a share of the GPU's float32 and float16 matrix-multiply peaks measured in
   the same run.
3. The speed benchmark (``benchmarks/speed.py``) runs on the GPU: training and scoring
   throughput of ``cae``, ``vae``, ``dae``, ``fanogan`` and ``resnet_ae`` in float32 and
   in ``precision: auto``, with the memory layout ``auto`` chose, ``dae`` also compiled, the
   GPU's peak and its peak memory; written to ``speed/results.json`` and ``speed/table.md``
   (``--no-speed`` skips it; on the CPU, with ``--allow-cpu``, it runs ``--quick``).

Writes ``results.json`` (``rows``: one per model, with ``"baseline"`` set for the no-model
baselines, and ``timing``) and prints one line per model. Exits 1 if any model fails, 0 when
every check passes, and 0 with a message when no CUDA GPU is present (``--allow-cpu`` runs
the same checks on the CPU, to test this script).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.stats import spearmanr

from medanomaly import builtin, get_model, list_models
from medanomaly.data.phantoms import make_phantoms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import is_baseline, results_row  # noqa: E402  (benchmarks/common.py)

MIN_SPEARMAN = 0.99
MAX_RELATIVE_DIFFERENCE = 0.02
TIMED_SHAPES = ((64, 64), (256, 256), (64, 64, 64))


def model_configs() -> dict[str, dict[str, Any]]:
    """The first config (by file name) of each model, keyed by model name."""
    found: dict[str, dict[str, Any]] = {}
    for config_name in builtin.names("config"):
        config = yaml.safe_load(builtin.builtin("config", config_name).read_text()) or {}
        name = (config.get("model") or {}).get("name")
        if name and name not in found:
            found[name] = {**config, "file": config_name}
    return found


def input_shape(config: dict[str, Any], spatial_dims: int) -> tuple[int, ...]:
    """The config's model input size: the last ``resize``/``pad`` shape (64 per side without)."""
    shape = (64,) * spatial_dims
    for step in (config.get("data") or {}).get("transforms") or []:
        name, args = next(iter(step.items()))
        if name in ("resize", "pad") and (args or {}).get("position") != "random":
            shape = tuple(int(s) for s in args["shape"])
    return shape


def build(name: str, config: dict[str, Any] | None, device: str) -> Any:
    """The model of ``config`` (or its defaults) with a one-epoch engine on ``device``."""
    params = copy.deepcopy((config or {}).get("model") or {"name": name})
    params.pop("name")
    engine = {**((config or {}).get("engine") or {})}
    engine.update(epochs=1, progress=False, accelerator=device, devices=1, patience=None)
    engine["batch_size"] = min(int(engine.get("batch_size", 8)), 8)
    return get_model(name, **params, engine=engine)


def phantoms(detector: Any, shape: tuple[int, ...], n: int = 16) -> Any:
    """Labelled phantoms at ``shape`` with the model's channel count."""
    data = make_phantoms(n, n // 2, shape, seed=0)
    channels = int(detector.get_params().get("in_channels") or 1)
    if channels > 1:
        data.images = np.repeat(data.images, channels, axis=1)
    return data


def check_model(name: str, config: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """Fit on ``device``, score there and on the CPU; the agreement and the times."""
    detector = build(name, config, device)
    shape = input_shape(config or {}, int(detector.get_params().get("spatial_dims") or 2))
    data = phantoms(detector, shape)
    train = data if detector.supervised else data.normal
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    detector.to(device)
    start = time.perf_counter()
    on_device = np.asarray(detector.score(data), dtype=np.float64)
    score_seconds = time.perf_counter() - start
    on_cpu = np.asarray(detector.to("cpu").score(data), dtype=np.float64)
    rho = float(spearmanr(on_device, on_cpu).statistic)
    scale = np.maximum(np.abs(on_cpu), 1e-12)
    relative = float(np.max(np.abs(on_device - on_cpu) / scale))
    passed = bool(np.isfinite(on_device).all() and rho >= MIN_SPEARMAN)
    passed = passed and relative <= MAX_RELATIVE_DIFFERENCE
    return {
        "config": (config or {}).get("file"),
        "shape": list(shape),
        "precision": detector.engine_config.precision,
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "spearman": rho,
        "max_relative_difference": relative,
        "passed": passed,
    }


def matmul_peaks(device: str) -> dict[str, float]:
    """Best-of-five matrix-multiply rates on ``device`` in TFLOP/s, float32 and float16."""
    size = 8192 if device == "cuda" else 1024
    peaks = {}
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    for label, dtype in dtypes.items():
        if device == "cpu" and dtype is torch.float16:
            continue
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = min(_timed(lambda a=a, b=b: a @ b, device) for _ in range(5))
        peaks[label] = 2 * size**3 / best / 1e12
    return peaks


def _timed(call: Any, device: str) -> float:
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timing(device: str, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """``cae`` fit and score images/s at each of :data:`TIMED_SHAPES`, with FLOP shares."""
    from common import inference_flops

    rows = []
    for shape in TIMED_SHAPES:
        dims = len(shape)
        config = {"model": {"name": "cae", "spatial_dims": dims}, "engine": {"batch_size": 8}}
        detector = build("cae", config, device)
        data = make_phantoms(32, 0, shape, seed=1)
        start = time.perf_counter()
        detector.fit(data)
        fit_rate = len(data) / (time.perf_counter() - start)
        detector.to(device)
        detector.score(data)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        detector.score(data)
        if device == "cuda":
            torch.cuda.synchronize()
        score_rate = len(data) / (time.perf_counter() - start)
        batch = torch.from_numpy(data.images[:4]).to(device)
        flops = inference_flops(detector, batch)
        achieved = score_rate * flops / 1e12
        rows.append(
            {
                "shape": list(shape),
                "fit_images_per_second": fit_rate,
                "score_images_per_second": score_rate,
                "score_tflops": achieved,
                "score_share_of_peak": {k: achieved / v for k, v in peaks.items()},
            }
        )
    return rows


def run_speed(models: list[str] | None, device: str, out: Path) -> dict[str, Any] | None:
    """``benchmarks/speed.py`` on ``device`` (quick on a CPU); its targets, or ``None``.

    Only the speed benchmark's models among ``models`` (all of them by default) run.
    """
    import speed  # benchmarks/speed.py

    chosen = [m for m in (models or list(speed.MODELS)) if m in speed.MODELS]
    if not chosen:
        return None
    quick = device != "cuda"
    plan = speed.QUICK if quick else speed.FULL
    compiled = tuple(m for m in speed.COMPILE_DEFAULT if m in chosen)
    results = speed.run(chosen, plan, torch.get_num_threads(), quick, device, compiled)
    results["command"] = f"python benchmarks/gpu_check.py (speed on {device})"
    speed.write(out, results)
    print(speed.table(results))
    return {"out": str(out), "targets": results["targets"], "rows": sorted(results["rows"])}


def main(argv: list[str] | None = None) -> int:
    """Run every check; exit 1 if one fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--models", nargs="*", help="only these models (default: all)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU without a GPU")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed runs")
    parser.add_argument("--no-speed", action="store_true", help="skip benchmarks/speed.py")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"no CUDA GPU found (torch {torch.__version__}): nothing to check")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"checking on {name}")
    configs, rows, failed = model_configs(), {}, []
    for model in args.models or list_models():
        try:
            row = check_model(model, configs.get(model), device)
        except Exception as error:  # one broken model must not hide the others
            traceback.print_exc()
            row = {"passed": False, "error": f"{type(error).__name__}: {error}"}
        rows[model] = results_row(row, is_baseline(model))
        if not row["passed"]:
            failed.append(model)
        shown = {k: v for k, v in row.items() if k in ("spearman", "max_relative_difference")}
        print(f"{model:20s} {'ok' if row['passed'] else 'FAILED'} {shown or row.get('error')}")
    peaks = matmul_peaks(device)
    results = {"device": name, "torch": torch.__version__, "matmul_peak_tflops": peaks,
               "rows": rows}  # fmt: skip
    if not args.no_timing:
        results["timing"] = timing(device, peaks)
        for row in results["timing"]:
            print(f"cae {row['shape']}: fit {row['fit_images_per_second']:.1f} img/s, score "
                  f"{row['score_images_per_second']:.1f} img/s")  # fmt: skip
    if not args.no_speed:
        results["speed"] = run_speed(args.models, device, args.out / "speed")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{len(rows) - len(failed)}/{len(rows)} models passed -> {args.out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.getLogger("medanomaly").setLevel(logging.ERROR)  # one-epoch fits: no threshold talk
    sys.exit(main())

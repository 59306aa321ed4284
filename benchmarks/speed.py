"""Speed: training and scoring throughput in float32 and in ``engine.precision: auto``.

    .venv/bin/python benchmarks/speed.py --out runs/speed      # about 15 minutes on 2 shared cores

For ``cae``, ``vae``, ``dae`` and ``fanogan`` at 64² and 128² and for ``resnet_ae`` at 32³
(each built from its head CT / 3D screening config, on synthetic phantoms from
:mod:`medanomaly.data.phantoms`), one run measures three variants in turn (float32 as before
issue 30, float32 now, ``auto``, then the same in reverse order, so that all see the same load
on a shared machine):

* ``32-true before``: float32 with the layouts every deep detector used before issue 30
  (training contiguous, scoring channels-last), the "today's fp32" of the issue's targets;
* ``32-true``: float32 in the layouts ``engine.memory_format: auto`` measures for it;
* ``auto``: ``engine.precision: auto`` (bf16-mixed on a CPU with bf16), layouts measured.

For each:

* **training**: the detector's own ``fit`` for one epoch (f-AnoGAN: one epoch of each
  stage) with every training step the engine runs timed; images/s over the steps after
  two warm-up steps (data loading, validation and the rest of ``fit`` left out),
  each step counted with the faster of its two passes (the same step does the same work in
  both; another job's burst slows one);
* **scoring**: ``detector.score`` on a fresh set of phantoms, images/s of the fastest of
  the two passes' two calls each (after a warm-up call);
* **peak memory**: the process's peak resident set size (``VmHWM`` of
  ``/proc/self/status``) while the row ran, reset before each row through
  ``/proc/self/clear_refs`` (after returning freed heap to the system with ``malloc_trim``);
  it includes what the process held before the row (the interpreter, torch, earlier
  rows' caches). Where the kernel refuses the reset, ``getrusage``'s ``ru_maxrss`` (the
  peak of the whole run so far) is given instead, and ``memory`` says which;
* **the machine's peak**: float32 and bf16 ``torch.matmul`` of 2048² matrices and a 3x3
  ``conv2d`` (64 -> 64 channels, channels-last) on the same threads, measured before and
  after the models (the better of the two kept), in GFLOP/s; each row gives the share of
  the peak of its own arithmetic (bf16 for ``bf16-mixed`` rows) that it reaches, counting
  the floating-point operations of a training step (``torch.utils.flop_counter``, on extra
  untimed steps) and of scoring a batch (``evaluate``).

Each row also says which memory layout it trained and scored in (``auto``'s choice is
measured in the process, :mod:`medanomaly.training.layout`), and its speed-up over both
float32 rows. With ``--compile`` (default: ``dae`` at the first 2D size) one more variant,
``auto`` with ``engine.compile: true`` (``torch.compile``), runs once between the ``auto``
passes; compilation happens in the warm-up steps and the warm-up scoring call, outside the
timing.

The no-model ``intensity`` baseline's fit and score at 64² are timed once as a reference.
``--device cuda`` runs the same on a GPU (``benchmarks/gpu_check.py`` does so when one is
lent): the peak is then the GPU's, and ``peak_gpu_mb`` gives ``torch.cuda``'s peak.
Writes ``OUT/results.json`` (``rows``, ``peaks``, ``targets``, ``machine``) and
``OUT/table.md``, each atomically. ``--quick`` runs tiny sizes and a single step (seconds;
for the test), ``--models`` a subset.

Targets (issue 30): DAE 2D training >= 1.7x and scoring >= 1.8x the rate of float32 as
before the issue, 3D ``resnet_ae`` training >= 1.5x.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import torch
import yaml
from torch.nn import functional
from torch.utils.flop_counter import FlopCounterMode

from medanomaly import builtin, get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.io.atomic import atomic_write_text
from medanomaly.training import engine as engine_module
from medanomaly.training.engine import Engine, EngineConfig, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_row  # noqa: E402  (benchmarks/common.py)

MODELS = {
    "cae": "cae_head_ct_2d",
    "vae": "vae_head_ct_2d",
    "dae": "dae_head_ct_2d",
    "fanogan": "fanogan_head_ct_2d",
    "resnet_ae": "resnet_ae_screen_cpu_3d",
}
"""Each model and the built-in config it is built from (architecture and batch size)."""
SHAPES_2D = ((64, 64), (128, 128))
SHAPE_3D = (32, 32, 32)
QUICK_2D = ((32, 32),)
QUICK_3D = (16, 16, 16)
PRECISIONS = ("32-true", "auto")
BEFORE = "32-true before"
"""Float32 with the layouts fixed as they were before issue 30 (training contiguous, scoring
channels-last): the "today's fp32" the issue's targets are set against."""
ORDER = (BEFORE, "32-true", "auto", "auto", "32-true", BEFORE)
"""Passes of each model and size: ABCCBA, so that a drift in the machine's load cancels."""
COMPILED = "auto compile"
"""The variant ``precision: auto`` with ``engine.compile: true``."""
COMPILE_DEFAULT = ("dae",)
"""Models measured with ``--compile`` by default (at the first 2D size only)."""
TARGETS = {
    ("dae", 2, "training"): 1.7,
    ("dae", 2, "scoring"): 1.8,
    ("resnet_ae", 3, "training"): 1.5,
}
"""Issue 30's speed-ups of ``auto`` over float32 as before the issue (model, dims, phase)."""


class Plan(NamedTuple):
    """How much each measurement runs."""

    warmup: int = 2
    timed: int = 5
    counted: int = 5
    score_batches: int = 2
    score_images: int | None = None
    batch_2d: int | None = None
    batch_3d: int | None = None
    order: tuple[str, ...] = ORDER


FULL = Plan()
"""Five timed steps after two warm-up steps (f-AnoGAN: one generator step per five), five
more under the FLOP counter; scoring two inference batches; passes ABCCBA."""
QUICK = Plan(
    warmup=1,
    timed=1,
    counted=1,
    score_images=8,
    batch_2d=4,
    batch_3d=2,
    order=(BEFORE, *PRECISIONS),
)


# -- the machine's peak ---------------------------------------------------------------------
def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def best_gflops(call: Callable[[], Any], flop: float, repeats: int) -> float:
    """GFLOP/s of the fastest of ``repeats`` calls, after one warm-up call."""

    def synchronised() -> None:
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    synchronised()
    return flop / min(_seconds(synchronised) for _ in range(repeats)) / 1e9


def machine_peak(quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """Float32 and bf16 matmul and 3x3 convolution rates (GFLOP/s) on the current threads."""
    size, repeats = (256, 1) if quick else ((8192, 5) if device == "cuda" else (2048, 5))
    peak: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        peak[f"matmul_{name}"] = best_gflops(lambda a=a, b=b: a @ b, 2 * size**3, repeats)
        batch, channels, side = (2, 16, 32) if quick else (16, 64, 128)
        x = torch.randn(batch, channels, side, side, dtype=dtype, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype, device=device)
        w = w.contiguous(memory_format=torch.channels_last)
        flop = 2 * batch * channels * channels * 9 * side * side
        with torch.inference_mode():
            peak[f"conv_{name}"] = best_gflops(
                lambda x=x, w=w: functional.conv2d(x, w, padding=1), flop, repeats
            )
    return peak


def better_peak(*peaks: dict[str, float]) -> dict[str, float]:
    """The higher of several measurements of each peak."""
    return {key: max(p[key] for p in peaks) for key in peaks[0]}


class _Untracked:
    """A stand-in for FlopCounterMode's module tracker: every FLOP counts as global."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _Untracked:
        return self

    def __exit__(self, *args: object) -> None:
        return None


class TotalFlops(FlopCounterMode):
    """``FlopCounterMode`` without its per-module tracking.

    The tracker's backward hooks break ``torch.autograd.grad`` (torch 2.13: "A leaf node
    was passed to _will_engine_execute_node"), which f-AnoGAN's gradient penalty calls.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _Untracked()


# -- memory ---------------------------------------------------------------------------------
class PeakMemory:
    """The process's peak RSS since :meth:`reset` (``VmHWM``), or ``ru_maxrss`` without reset."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(path) if path else None
        self.source = "VmHWM since reset (/proc/self/clear_refs)"
        try:
            self.reset()
        except OSError:
            self.source = "ru_maxrss (peak of the whole run)"

    def reset(self) -> None:
        """Give freed heap back to the system, then restart the peak from the current RSS."""
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")

    def start(self) -> None:
        """Begin a row (where the peak can be reset)."""
        if self.source.startswith("VmHWM"):
            self.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def gpu_peak(self) -> dict[str, float]:
        """``{"peak_gpu_mb": ...}``: torch's peak GPU memory since :meth:`start` (or ``{}``)."""
        if not torch.cuda.is_available():
            return {}
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 1e6}

    def peak_mb(self) -> float:
        """The peak resident set size in MB (10^6 bytes)."""
        if self.source.startswith("VmHWM"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


# -- training -------------------------------------------------------------------------------
class StepClock:
    """Times every training step the engine runs, per stage; counts FLOPs on extra steps.

    Args:
        warmup: Leading steps of each stage left out of the timing.
        timed: Timed steps per stage; later steps are run under a FLOP counter (untimed).
    """

    def __init__(self, warmup: int, timed: int) -> None:
        self.warmup = warmup
        self.timed = timed
        self.seconds: dict[str, list[tuple[int, float]]] = {}
        self.flops: dict[str, list[tuple[int, float]]] = {}
        self.precisions: set[str] = set()
        self.compiled: set[bool] = set()

    def wrap(self, step: Callable[..., torch.Tensor], stage: str) -> Callable[..., torch.Tensor]:
        """``step`` (the engine's training step signature), timed."""
        seconds = self.seconds.setdefault(stage or "main", [])
        flops = self.flops.setdefault(stage or "main", [])

        def timed_step(model, batch, optimizers, backward, index):  # noqa: ANN001, ANN202
            n = engine_module.batch_size(batch)
            if index >= self.warmup + self.timed:
                with TotalFlops() as counter:
                    loss = step(model, batch, optimizers, backward, index)
                flops.append((n, counter.get_total_flops()))
                return loss
            start = time.perf_counter()
            loss = step(model, batch, optimizers, backward, index)
            loss = loss.detach().float().cpu()  # waits for the step to finish on a GPU
            if index >= self.warmup:
                seconds.append((n, time.perf_counter() - start))
            return loss

        return timed_step

    @contextmanager
    def installed(self) -> Iterator[StepClock]:
        """Every :meth:`Engine.fit` inside the block runs its steps through the clock."""
        original = Engine.fit
        clock = self

        def fit(engine, task, data, run_dir=None, resume=False, extra_state=None, stage=""):  # noqa: ANN001, ANN202
            clock.precisions.add(resolve_precision(engine.config))
            step = task.step or engine_module._minimise_loss(task.loss)  # the engine's default
            task = dataclasses.replace(task, step=clock.wrap(step, stage))
            history = original(engine, task, data, run_dir, resume, extra_state, stage)
            clock.compiled.add(engine.compiled_used)
            return history

        with mock.patch.object(Engine, "fit", fit):
            yield self

    def flop_per_image(self) -> float | None:
        """FLOPs of a training step per image, weighted as the timed steps are over stages."""
        total = 0.0
        for stage, steps in self.seconds.items():
            counted = self.flops.get(stage) or []
            if not counted:
                return None
            per_image = sum(f for _, f in counted) / sum(n for n, _ in counted)
            total += per_image * sum(n for n, _ in steps)
        return total / sum(n for steps in self.seconds.values() for n, _ in steps)


# -- models ---------------------------------------------------------------------------------
def model_config(config_name: str) -> dict[str, Any]:
    """The ``model`` and ``engine`` sections of a built-in config."""
    return yaml.safe_load(builtin.builtin("config", config_name).read_text())


def build(name: str, variant: str, plan: Plan, device: str = "cpu") -> Any:
    """The model of its config, for one epoch (one per stage) in ``variant`` on ``device``.

    ``variant``: a precision, :data:`BEFORE` (float32, trained contiguous; see
    :func:`score_as_before`) or :data:`COMPILED` (``auto`` with ``engine.compile``).
    """
    config = model_config(MODELS[name])
    params = {k: v for k, v in config["model"].items() if k != "name"}
    if "gan_epochs" in params:
        params["gan_epochs"] = 1
    engine = EngineConfig.from_any(config.get("engine")).to_dict()
    dims = int(params.get("spatial_dims", 2))
    batch = plan.batch_2d if dims == 2 else plan.batch_3d
    engine.update(
        epochs=1,
        patience=None,
        monitor="val_loss",
        progress=False,
        precision=precision_of(variant),
        compile=variant == COMPILED,
        accelerator=device,
        batch_size=batch or engine["batch_size"],
    )
    if variant == BEFORE:
        engine["memory_format"] = "contiguous"
    return get_model(name, **params, engine=engine)


def precision_of(variant: str) -> str:
    """``engine.precision`` of a variant."""
    return {COMPILED: "auto", BEFORE: "32-true"}.get(variant, variant)


def score_as_before(detector: Any) -> None:
    """Score channels-last from now on, as every deep detector did before issue 30."""
    engine = {**detector.engine_config.to_dict(), "memory_format": "channels_last"}
    detector.set_params(engine=engine)


def phantoms(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``n`` normal phantoms ``(n, 1, *shape)`` in float32."""
    return make_phantoms(n, 0, shape, seed=seed).images.astype(np.float32)


def measure(
    name: str,
    shape: tuple[int, ...],
    variant: str,
    plan: Plan,
    memory: PeakMemory,
    count_flops: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    """One pass of a model at ``shape`` in ``variant``: training, scoring, peak memory."""
    memory.start()
    detector = build(name, variant, plan, device)
    batch = detector.engine_config.batch_size
    steps = plan.warmup + plan.timed + (plan.counted if count_flops else 0)
    train = phantoms(steps * batch, shape, seed=0)
    val = phantoms(batch, shape, seed=1)
    clock = StepClock(plan.warmup, plan.timed)
    with clock.installed():
        detector.fit(train, val)
    if variant == BEFORE:
        score_as_before(detector)
    voxels = int(np.prod(shape))
    n_score = plan.score_batches * detector.inference_batch_size(voxels)
    n_score = min(n_score, plan.score_images or n_score)
    images = phantoms(n_score, shape, seed=2)
    detector.score(images)  # warm-up: one-time kernel choices for these shapes
    score_seconds = min(_seconds(lambda: detector.score(images)) for _ in range(2))
    row = {
        "model": name,
        "config": MODELS[name],
        "shape": list(shape),
        "spatial_dims": len(shape),
        "variant": variant,
        "precision": precision_of(variant),
        "compile": variant == COMPILED,
        "compiled_training": all(clock.compiled),
        "compiled_scoring": compiled_for_scoring(detector),
        "memory_format": dict(detector.memory_formats_ or {}),
        "resolved_precision": "/".join(sorted(clock.precisions)),
        "batch_size": batch,
        "training_images_per_second": images_per_second(clock.seconds),
        "training_step_seconds": clock.seconds,
        "training_steps_timed": sum(len(s) for s in clock.seconds.values()),
        "scoring_images_per_second": n_score / score_seconds,
        "scoring_images": n_score,
        "peak_rss_mb": memory.peak_mb(),
        **memory.gpu_peak(),
    }
    if count_flops:
        row["training_gflop_per_image"] = (clock.flop_per_image() or 0.0) / 1e9
        row["scoring_gflop_per_image"] = scoring_flop(detector, images[:2]) / 1e9
    return row


def compiled_for_scoring(detector: Any) -> bool:
    """True when the detector scored through a ``torch.compile``-d network."""
    cached = detector.__dict__.get("_compiled_scoring")
    return cached is not None and cached[2] is not cached[0]


def scoring_flop(detector: Any, images: np.ndarray) -> float:
    """FLOPs of ``evaluate`` per image (the network and its maps)."""
    batch = torch.from_numpy(images).to(next(detector.network_.parameters()).device)
    with torch.inference_mode(), TotalFlops() as counter:
        detector.evaluate(detector.network_, batch)
    return counter.get_total_flops() / len(batch)


def measure_baseline(shape: tuple[int, ...], memory: PeakMemory) -> dict[str, Any]:
    """The no-model ``intensity`` baseline's fit and score rates (images/s) at ``shape``."""
    memory.start()
    config = model_config("intensity_head_ct_2d")["model"]
    detector = get_model("intensity", **{k: v for k, v in config.items() if k != "name"})
    train, images = phantoms(128, shape, seed=0), phantoms(256, shape, seed=2)
    detector.fit(train[:8])  # warm-up
    fit_seconds = _seconds(lambda: detector.fit(train))
    detector.score(images)
    score_seconds = min(_seconds(lambda: detector.score(images)) for _ in range(2))
    return {
        "model": "intensity",
        "shape": list(shape),
        "spatial_dims": len(shape),
        "precision": "n/a",
        "training_images_per_second": len(train) / fit_seconds,
        "scoring_images_per_second": len(images) / score_seconds,
        "peak_rss_mb": memory.peak_mb(),
    }


# -- the run --------------------------------------------------------------------------------
def cases(models: list[str], quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(model, shape) pairs: 2D models at each 2D size, ``resnet_ae`` at the 3D size."""
    found = []
    for name in models:
        dims = int(model_config(MODELS[name])["model"].get("spatial_dims", 2))
        if dims == 3:
            found.append((name, QUICK_3D if quick else SHAPE_3D))
        else:
            found.extend((name, shape) for shape in (QUICK_2D if quick else SHAPES_2D))
    return found


def row_key(row: dict[str, Any]) -> str:
    """``dae 64x64 32-true``, ``dae 64x64 32-true before``, ``dae 64x64 auto compile``."""
    return f"{row['model']} {'x'.join(map(str, row['shape']))} {row.get('variant', 'n/a')}"


def best_of(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several passes of the same precision, robust to other jobs' bursts.

    Training: each timed step (by stage and position, the same work in every pass) counts
    with its fastest time over the passes. Scoring: the fastest call. Peak memory: the
    highest. The passes' own rates are kept beside.
    """
    row = dict(passes[0])
    steps = {
        stage: [
            (batch, min(p["training_step_seconds"][stage][i][1] for p in passes))
            for i, (batch, _) in enumerate(timed)
        ]
        for stage, timed in passes[0]["training_step_seconds"].items()
    }
    row["training_step_seconds"] = steps
    row["training_images_per_second"] = images_per_second(steps)
    row["scoring_images_per_second"] = max(p["scoring_images_per_second"] for p in passes)
    for key in ("training_images_per_second", "scoring_images_per_second"):
        row[f"{key}_passes"] = [p[key] for p in passes]
    row["peak_rss_mb"] = max(p["peak_rss_mb"] for p in passes)
    if "peak_gpu_mb" in row:
        row["peak_gpu_mb"] = max(p["peak_gpu_mb"] for p in passes)
    formats = {json.dumps(p["memory_format"], sort_keys=True) for p in passes}
    if len(formats) > 1:  # each pass is a new detector, measured again only if not cached
        row["memory_format_passes"] = [p["memory_format"] for p in passes]
    return row


def images_per_second(steps: dict[str, list[tuple[int, float]]]) -> float:
    """Images over seconds of timed steps ``{stage: [(images, seconds), ...]}``."""
    images = sum(n for timed in steps.values() for n, _ in timed)
    return images / sum(seconds for timed in steps.values() for _, seconds in timed)


def add_ratios_and_shares(rows: dict[str, dict[str, Any]], peak: dict[str, float]) -> None:
    """Speed-ups over the float32 rows, and each row's share of its arithmetic's peak.

    ``{phase}_speedup`` is over :data:`BEFORE` (the issue's targets), ``{phase}_speedup_fp32``
    over float32 in the layouts ``auto`` measures for it (what forcing ``32-true`` gives now).
    """
    for row in rows.values():
        if row["precision"] not in PRECISIONS:
            continue
        before = rows[row_key({**row, "variant": BEFORE})]
        fp32 = rows[row_key({**row, "variant": "32-true"})]
        for phase in ("training", "scoring"):
            rate = row[f"{phase}_images_per_second"]
            row[f"{phase}_speedup"] = rate / before[f"{phase}_images_per_second"]
            row[f"{phase}_speedup_fp32"] = rate / fp32[f"{phase}_images_per_second"]
            flop = before.get(f"{phase}_gflop_per_image")
            if flop is None:
                continue
            kind = "bf16" if row["resolved_precision"].startswith("bf16") else "fp32"
            row[f"{phase}_gflop_per_image"] = flop
            row[f"{phase}_gflops"] = rate * flop
            row[f"{phase}_share_of_matmul_peak"] = rate * flop / peak[f"matmul_{kind}"]
            row[f"{phase}_share_of_conv_peak"] = rate * flop / peak[f"conv_{kind}"]


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of issue 30 at each size measured: the ratio and whether it is met."""
    found = []
    for (model, dims, phase), wanted in TARGETS.items():
        for row in rows.values():
            if (row["model"], row["spatial_dims"], row["precision"]) != (model, dims, "auto"):
                continue
            if row.get("compile"):  # the targets are for the default settings
                continue
            ratio = row[f"{phase}_speedup"]
            found.append(
                {
                    "model": model,
                    "shape": row["shape"],
                    "phase": phase,
                    "target": wanted,
                    "speedup": ratio,
                    "met": bool(ratio >= wanted),
                }
            )
    return found


def machine(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The CPU (and GPU), bf16 support and the threads and load of the run."""
    from medanomaly.training.precision import cpu_supports_bf16, supports_bf16

    gpu = {}
    if device == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(0), "gpu_bf16": supports_bf16("cuda")}
    return {
        "device": device,
        **gpu,
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_bf16": cpu_supports_bf16(),
        "auto_resolves_to": resolve_precision(EngineConfig(accelerator=device)),
        "threads": threads,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def run(
    models: list[str],
    plan: Plan,
    threads: int,
    quick: bool,
    device: str = "cpu",
    compiled: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Every measurement on ``threads`` torch threads; the results for ``results.json``.

    Args:
        models: Names from :data:`MODELS`.
        plan: How much each measurement runs.
        threads: Torch threads (CPU work).
        quick: Tiny sizes.
        device: ``cpu`` or ``cuda``.
        compiled: Models also measured with ``engine.compile`` (at their first size).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_all(models, plan, threads, quick, device, compiled)
    finally:
        torch.set_num_threads(before)


def measure_all(
    models: list[str],
    plan: Plan,
    threads: int,
    quick: bool,
    device: str = "cpu",
    compiled: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The machine's peak, each model's rows, the baseline, ratios and targets."""
    memory = PeakMemory()
    host = machine(threads, device)
    peak_before = machine_peak(quick, device)
    rows: dict[str, dict[str, Any]] = {}
    first_size: set[str] = set()
    for name, shape in cases(models, quick):
        order = plan.order
        if name in compiled and name not in first_size:
            order = _with_compile(order)
        first_size.add(name)
        passes: dict[str, list[dict[str, Any]]] = {p: [] for p in order}
        for index, variant in enumerate(order):
            row = measure(name, shape, variant, plan, memory, index == 0, device)
            passes[variant].append(row)
            log.info(
                "%s: training %.1f img/s, scoring %.1f img/s",
                row_key(row),
                row["training_images_per_second"],
                row["scoring_images_per_second"],
            )
        for variant in passes:
            best = best_of(passes[variant])
            rows[row_key(best)] = best
    baseline = measure_baseline(QUICK_2D[0] if quick else SHAPES_2D[0], memory)
    rows[row_key(baseline)] = baseline
    peak = better_peak(peak_before, machine_peak(quick, device))
    add_ratios_and_shares(rows, peak)
    host["load_average_at_end"] = list(os.getloadavg())
    return {
        "rows": {
            key: results_row(row, baseline=row["model"] == "intensity") for key, row in rows.items()
        },
        "peaks": {"gflops": peak, "before": peak_before},
        "targets": targets(rows),
        "memory": memory.source,
        "machine": host,
        "plan": plan._asdict(),
    }


def _with_compile(order: tuple[str, ...]) -> tuple[str, ...]:
    """``order`` with one :data:`COMPILED` pass in the middle (``..., auto, C, auto, ...``)."""
    middle = len(order) // 2
    return (*order[:middle], COMPILED, *order[middle:])


# -- the report -----------------------------------------------------------------------------
def _layouts(formats: dict[str, str] | None) -> str:
    """``contiguous / channels_last`` (training / scoring), ``–`` without a network."""
    if not formats:
        return "–"
    short = {"contiguous": "contiguous", "channels_last": "channels-last"}
    return " / ".join(short.get(formats.get(phase, ""), "?") for phase in ("training", "scoring"))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def table(results: dict[str, Any]) -> str:
    """The page's table (Markdown): rows, peaks and targets."""
    peak = results["peaks"]["gflops"]
    host = results["machine"]
    lines = [
        f"CPU: {host['cpu_model']} ({host['cores']} cores, {host['threads']} threads used; "
        f"bf16: {'yes' if host['cpu_bf16'] else 'no'}, `auto` -> `{host['auto_resolves_to']}`); "
        f"torch {host['torch']}; load average {host['load_average_at_start'][0]:.1f} at the "
        f"start, {host['load_average_at_end'][0]:.1f} at the end.",
        *(
            [f"GPU: {host['gpu']} (bf16: {'yes' if host['gpu_bf16'] else 'no'}); rows ran on it."]
            if host.get("device") == "cuda"
            else []
        ),
        "",
        f"Peak (GFLOP/s): matmul fp32 {peak['matmul_fp32']:.0f}, bf16 {peak['matmul_bf16']:.0f} "
        f"({peak['matmul_bf16'] / peak['matmul_fp32']:.2f}x); 3x3 conv fp32 "
        f"{peak['conv_fp32']:.0f}, bf16 {peak['conv_bf16']:.0f} "
        f"({peak['conv_bf16'] / peak['conv_fp32']:.2f}x).",
        "",
        "| model | size | precision | layout (train / score) | batch | training img/s "
        "| vs fp32 before / fp32 | scoring img/s | vs fp32 before / fp32 "
        "| share of peak, training (matmul / conv) | share, scoring | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"].values():
        speedups = [
            f"{row[f'{phase}_speedup']:.2f}x / {row[f'{phase}_speedup_fp32']:.2f}x"
            if f"{phase}_speedup" in row
            else "–"
            for phase in ("training", "scoring")
        ]
        precision = row["precision"]
        if row.get("resolved_precision") and row["resolved_precision"] != precision:
            precision = f"{precision} ({row['resolved_precision']})"
        if row.get("compile"):
            precision += ", compile"
        if row.get("variant") == BEFORE:
            precision += ", layouts before issue 30"
        shares = [
            f"{_percent(row.get(f'{phase}_share_of_matmul_peak'))} / "
            f"{_percent(row.get(f'{phase}_share_of_conv_peak'))}"
            if f"{phase}_share_of_matmul_peak" in row
            else "–"
            for phase in ("training", "scoring")
        ]
        cells = [
            row["model"] + (" (baseline)" if row["baseline"] else ""),
            "×".join(map(str, row["shape"])),
            precision,
            _layouts(row.get("memory_format")),
            str(row.get("batch_size", "–")),
            f"{row['training_images_per_second']:.1f}",
            speedups[0],
            f"{row['scoring_images_per_second']:.1f}",
            speedups[1],
            shares[0],
            shares[1],
            f"{row['peak_rss_mb']:.0f} MB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target (issue 30) | size | wanted | measured | met |", "|---|---|---|---|---|"]
    if not results["targets"]:
        lines.append("| (none of the targets' models ran) | | | | |")
    for t in results["targets"]:
        lines.append(
            f"| {t['model']} {t['phase']} | {'×'.join(map(str, t['shape']))} "
            f"| ≥ {t['target']:.1f}x | {t['speedup']:.2f}x | {'yes' if t['met'] else 'no'} |"
        )
    lines += ["", f"Peak memory: {results['memory']}."]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``table.md`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "table.md", table(results))


log = logging.getLogger("speed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed step")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="a subset"
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        choices=sorted(MODELS),
        default=list(COMPILE_DEFAULT),
        help="models also timed with engine.compile at their first size (default dae; "
        "none: --compile)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lightning_fabric", "lightning", "medanomaly"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = QUICK if args.quick else FULL
    compiled = tuple(args.compile)
    results = run(args.models, plan, args.threads, args.quick, args.device, compiled)
    results["command"] = "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:])
    write(args.out, results)
    print(table(results))


if __name__ == "__main__":
    main()

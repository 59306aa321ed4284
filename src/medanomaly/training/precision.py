"""Numeric precision of training and scoring: what ``engine.precision: auto`` means here.

``auto`` runs the network in bf16 mixed precision where the hardware computes bf16 natively
(CPUs with AVX512-BF16 or AMX, GPUs that support bf16), in 16-bit mixed precision on other
GPUs and in 32-bit elsewhere. Mixed precision runs convolutions and matrix products in the
16-bit type under ``torch.autocast``; the weights (so every saved model), losses, scores,
maps and thresholds stay float32, and a run trained in bf16 loads and scores on any machine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medanomaly.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true")
"""Values of ``engine.precision``: ``auto`` or a Lightning Fabric precision."""
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
"""Fabric's short names (YAML may give them as numbers)."""
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of CPUs that compute bf16 natively."""

CONVOLUTIONS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_warned: set[str] = set()


def canonical_precision(value: Any) -> str:
    """The full name of a precision setting (``32`` -> ``32-true``).

    Raises:
        ConfigError: ``value`` is not a precision (with a did-you-mean hint).
    """
    name = ALIASES.get(str(value), str(value))
    if name not in PRECISIONS:
        raise ConfigError(
            f"engine: precision must be one of {PRECISIONS}, got {value!r}."
            + did_you_mean(str(value), PRECISIONS)
        )
    return name


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), read once per process.

    Without these instructions bf16 is emulated and slower than float32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if all(hasattr(torch.cpu, probe) for probe in probes):
        return any(getattr(torch.cpu, probe)() for probe in probes)
    return bool(BF16_CPU_FLAGS & cpuinfo_flags())


def cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where the file is missing)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    return {
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    }


def supports_bf16(device_type: str) -> bool:
    """True when a device of this type (``cpu``, ``cuda``) computes bf16 natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_supports_bf16()


def choose_precision(requested: Any, device_type: str, strict: bool = False) -> str:
    """The Fabric precision a run uses on a device of ``device_type``.

    ``auto`` gives ``bf16-mixed`` where the device computes bf16 natively, ``16-mixed`` on
    other GPUs and ``32-true`` elsewhere. Any other setting is kept, except that a bf16
    setting on a device without bf16 falls back to ``32-true`` with one warning per process
    (``16-mixed`` on a CPU means ``bf16-mixed``, as in Fabric: CPUs have no float16 autocast).

    Args:
        requested: The ``engine.precision`` setting.
        device_type: ``cpu`` or ``cuda``.
        strict: Raise instead of falling back.

    Raises:
        ConfigError: An unknown precision, or (with ``strict``) bf16 on a device without it.
    """
    name = canonical_precision(requested)
    if name == "auto":
        if supports_bf16(device_type):
            return "bf16-mixed"
        return "16-mixed" if device_type == "cuda" else "32-true"
    if name == "16-mixed" and device_type == "cpu":
        name = "bf16-mixed"
    if name.startswith("bf16") and not supports_bf16(device_type):
        message = (
            f"engine.precision {requested!r} needs bf16 arithmetic, which this {device_type} "
            "lacks (no AVX512-BF16 or AMX)"
            if device_type == "cpu"
            else f"engine.precision {requested!r} needs bf16 arithmetic, which this GPU lacks"
        )
        if strict:
            raise ConfigError(f"{message}; set engine.precision to auto or 32-true")
        if message not in _warned:
            _warned.add(message)
            log.warning("%s: using 32-true (float32) instead", message)
        return "32-true"
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The type a scoring pass runs the network in: bf16 for ``bf16-mixed``, else ``None``.

    Scoring under ``16-mixed`` stays float32 (float16 has too little range to keep without
    the loss scaling that training uses).
    """
    return torch.bfloat16 if precision == "bf16-mixed" else None


class AutocastForward(nn.Module):
    """A network whose calls run under ``torch.autocast`` and return float32 tensors.

    What Lightning Fabric does for a training step, for scoring: the convolutions and matrix
    products run in ``dtype``, while the residuals, maps and scores computed from the outputs
    stay float32. Only calls of the network itself are autocast; its methods and submodules
    (reached through the wrapper, as with Fabric) run as they are, in float32.

    Args:
        module: The network (not copied: weights stay float32 and shared).
        dtype: ``torch.bfloat16`` (or ``torch.float16`` on a GPU).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the network under autocast; float outputs come back as float32."""
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, dtype=self.dtype):
            output = self.module(*args, **kwargs)
        return to_float32(output)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def to_float32(value: Any) -> Any:
    """``value`` with every 16-bit float tensor (also inside tuples, lists, dicts) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_float32(item) for item in value))
    if isinstance(value, tuple | list):
        return type(value)(to_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: to_float32(item) for key, item in value.items()}
    return value


@contextmanager
def float32_small_convolutions(network: nn.Module, active: bool = True) -> Iterator[None]:
    """Train the convolutions whose kernel spans a whole axis of their input in float32.

    On a CPU, bf16 weight gradients of such convolutions come out wrong (torch 2.13's
    oneDNN on an AMD EPYC with AVX512-BF16: a 3x3x3 kernel over a depth of 2 gave gradients
    of 1e30 and a NaN loss after one step; a kernel narrower than every side of its input
    gave none in 2 300 random 2D and 3D shapes). They sit at the coarsest levels of a
    network, so running them in float32 costs little. Their forward pass and input gradient
    are right in bf16: the guard acts only where a weight gradient is taken.

    Args:
        network: Its convolution layers are guarded inside the block.
        active: ``False`` leaves the network as it is (no bf16 training on a CPU).
    """
    if not active:
        yield
        return
    guard = _SmallConvolutionGuard()
    handles = []
    for module in network.modules():
        if isinstance(module, CONVOLUTIONS):
            handles.append(module.register_forward_pre_hook(guard.before))
            handles.append(module.register_forward_hook(guard.after, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def kernel_spans_an_axis(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module``'s kernel (with dilation) is at least as long as a side of ``x``."""
    kernel, dilation = module.kernel_size, module.dilation
    spatial = x.shape[x.dim() - len(kernel) :]
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    return any(side <= extent for side, extent in zip(spatial, extents, strict=True))


class _SmallConvolutionGuard:
    """Forward hooks that switch autocast off around one convolution call."""

    def __init__(self) -> None:
        self._open: list[torch.autocast | None] = []

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        needed = (
            torch.is_grad_enabled()
            and module.weight.requires_grad
            and torch.is_autocast_enabled(x.device.type)
            and kernel_spans_an_axis(module, x)
        )
        if not needed:
            self._open.append(None)
            return None
        context = torch.autocast(x.device.type, enabled=False)
        context.__enter__()
        self._open.append(context)
        return (x.float(), *args[1:])

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        context = self._open.pop()
        if context is not None:
            context.__exit__(None, None, None)

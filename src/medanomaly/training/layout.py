"""Memory layout of convolution networks and their inputs: what ``engine.memory_format`` means.

A convolution network runs with its weights and inputs either in torch's default layout
(``contiguous``, NCHW) or channels-last (NHWC; NDHWC in 3D). Which one is faster depends on
the network, the phase and the arithmetic: MONAI's ``BasicUNet`` at 64² on a 2-core AMD EPYC
(torch 2.13, bf16 autocast) trained fastest contiguous (1.82x float32) and scored fastest
channels-last (1.94x), the reverse of float32 (issue 30). So ``auto`` measures: once per
process and per (network class, spatial dims, phase, device type, precision, input shape),
it times a few passes of the phase's real work (the loss's forward and backward pass for
training, ``evaluate`` for scoring) on a tiny batch in each layout, keeps channels-last where
it is clearly faster (by :data:`MARGIN`), else contiguous, and caches the choice in
:data:`CHOSEN`. ``channels_last`` or ``contiguous`` force a layout.

Layouts change speed, not results beyond float rounding: weights saved from either layout
are the same float32 tensors (``state_dict`` values are copied out as they are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from medanomaly.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
"""Values of ``engine.memory_format``."""
LAYOUTS = ("contiguous", "channels_last")
"""The layouts ``auto`` chooses between (the first, the default, wins within the margin)."""
PHASES = ("training", "scoring")
MEASURE_IMAGES = 2
"""Images in the batch ``auto`` times (of the real input shape)."""
MEASURE_ROUNDS = 3
"""Timed passes per layout after one warm-up pass, interleaved between the layouts."""
MEASURE_BUDGET_S = 1.0
"""Stop timing once the passes took this long (at least one timed pass per layout)."""
MARGIN = 0.1
"""How much faster channels-last must time to be chosen over contiguous (0.1: 10 %).

Passes on a tiny batch on a busy machine vary by more than the gap between two close
layouts; below this margin the default layout stays.
"""


class LayoutKey(NamedTuple):
    """What a measured choice holds for."""

    network: str
    spatial_dims: int
    phase: str
    device_type: str
    precision: str
    input_shape: tuple[int, ...]


CHOSEN: dict[LayoutKey, str] = {}
"""Layouts measured in this process."""

_measuring = True


def canonical_memory_format(value: Any) -> str:
    """``value`` checked against :data:`MEMORY_FORMATS`.

    Raises:
        ConfigError: An unknown name (with a did-you-mean hint).
    """
    name = str(value)
    if name not in MEMORY_FORMATS:
        raise ConfigError(
            f"engine: memory_format must be one of {MEMORY_FORMATS}, got {value!r}."
            + did_you_mean(name, MEMORY_FORMATS)
        )
    return name


def is_measuring() -> bool:
    """True unless :func:`measuring` switched ``auto``'s timing off."""
    return _measuring


@contextmanager
def measuring(enabled: bool) -> Iterator[None]:
    """Switch ``auto``'s timing on or off inside the block (off: ``auto`` means contiguous).

    The test suite turns it off, so that no test's speed or float rounding depends on what
    a timing on a busy machine chose; the layout tests turn it back on.
    """
    global _measuring
    before, _measuring = _measuring, enabled
    try:
        yield
    finally:
        _measuring = before


def torch_format(layout: str, dims: int) -> torch.memory_format:
    """The torch memory format of ``layout`` for tensors of ``dims`` dimensions (4 or 5)."""
    if layout != "channels_last" or dims not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def to_layout(value: Any, layout: str) -> Any:
    """``value`` with every 4D/5D float tensor (also in tuples and lists) in ``layout``."""
    if isinstance(value, torch.Tensor):
        if value.dim() in (4, 5) and value.is_floating_point():
            return value.contiguous(memory_format=torch_format(layout, value.dim()))
        return value
    if isinstance(value, tuple | list):
        return type(value)(to_layout(item, layout) for item in value)
    return value


def set_network_layout(network: nn.Module, layout: str) -> nn.Module:
    """Convert the 4D/5D parameters and buffers of ``network`` to ``layout`` in place.

    Tensors of other ranks (biases, linear layers) are left alone, as ``Module.to`` does;
    a network holding both 2D and 3D convolutions gets each its own channels-last format.
    """

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() not in (4, 5):
            return tensor
        return tensor.contiguous(memory_format=torch_format(layout, tensor.dim()))

    return network._apply(convert)


def layout_of(network: nn.Module) -> str:
    """The layout of ``network``'s convolution weights (``contiguous`` without any)."""
    for parameter in network.parameters():
        if parameter.dim() in (4, 5) and not _is_degenerate(parameter):
            channels_last = torch_format("channels_last", parameter.dim())
            is_channels_last = parameter.is_contiguous(memory_format=channels_last)
            return "channels_last" if is_channels_last else "contiguous"
    return "contiguous"


def _is_degenerate(tensor: torch.Tensor) -> bool:
    """True when a tensor is contiguous in both layouts (e.g. one input channel, 1x1 kernel)."""
    channels_last = torch_format("channels_last", tensor.dim())
    return tensor.is_contiguous() and tensor.is_contiguous(memory_format=channels_last)


def has_convolutions(network: nn.Module) -> bool:
    """True when the network holds 4D/5D weights (whose layout matters)."""
    return any(p.dim() in (4, 5) for p in network.parameters())


def choose_layout(
    requested: str,
    network: nn.Module,
    example: torch.Tensor | tuple | list,
    phase: str,
    precision: str,
    work: Callable[[Any], Any],
) -> str:
    """The layout a phase runs ``network`` in: as forced, or the faster one measured.

    Args:
        requested: ``engine.memory_format``.
        network: Converted to each layout in turn while measuring (left in the last one;
            the caller sets the chosen one). Its buffers, gradients and train/eval modes
            are restored after the passes, and torch's random state is left untouched.
        example: A tiny batch of the real input shape (the images 4D/5D).
        phase: ``training`` (``work`` runs forward and backward) or ``scoring``.
        precision: The resolved precision (part of the cache key; ``work`` applies it).
        work: Runs the phase's work on a batch (already in the layout being timed).

    Returns:
        ``channels_last`` or ``contiguous``. ``auto`` without convolutions, with timing
        switched off (:func:`measuring`) or when a pass fails gives ``contiguous``.
    """
    if requested != "auto":
        return requested
    images = _images(example)
    if images is None or not has_convolutions(network) or not _measuring:
        return "contiguous"
    key = LayoutKey(
        f"{type(network).__module__}.{type(network).__qualname__}",
        images.dim() - 2,
        phase,
        images.device.type,
        precision,
        tuple(images.shape[1:]),
    )
    if key not in CHOSEN:
        try:
            seconds = time_layouts(network, example, work)
        except Exception as error:  # a layout the network cannot run loses; no fit fails here
            log.info("engine: memory layout not measured for %s (%s)", key.network, error)
            return "contiguous"
        CHOSEN[key] = faster_layout(seconds)
        log.info(
            "engine: %s %s in %s (%s)",
            key.network.rsplit(".", 1)[-1],
            phase,
            CHOSEN[key],
            ", ".join(f"{layout} {1e3 * s:.1f} ms" for layout, s in seconds.items()),
        )
    return CHOSEN[key]


def faster_layout(seconds: dict[str, float]) -> str:
    """``channels_last`` where it timed :data:`MARGIN` faster than ``contiguous``, else that."""
    if seconds["channels_last"] * (1.0 + MARGIN) < seconds["contiguous"]:
        return "channels_last"
    return "contiguous"


def _images(example: Any) -> torch.Tensor | None:
    """The 4D/5D float tensor of a batch (``images`` or ``(images, labels)``)."""
    if isinstance(example, tuple | list):
        example = example[0] if example else None
    if isinstance(example, torch.Tensor) and example.dim() in (4, 5):
        return example if example.is_floating_point() else None
    return None


def time_layouts(network: nn.Module, example: Any, work: Callable[[Any], Any]) -> dict[str, float]:
    """Fastest seconds of ``work`` per layout: one warm-up pass each, then interleaved rounds.

    At most :data:`MEASURE_ROUNDS` rounds, fewer once :data:`MEASURE_BUDGET_S` is spent.
    """
    device = _images(example).device
    best = dict.fromkeys(LAYOUTS, float("inf"))
    batches = {layout: to_layout(example, layout) for layout in LAYOUTS}
    with untouched(network):
        spent = 0.0
        for round_index in range(MEASURE_ROUNDS + 1):
            for layout in LAYOUTS:
                set_network_layout(network, layout)
                seconds = _timed(lambda layout=layout: work(batches[layout]), device)
                spent += seconds
                if round_index > 0:
                    best[layout] = min(best[layout], seconds)
            if round_index > 0 and spent > MEASURE_BUDGET_S:
                break
    return best


def _timed(call: Callable[[], Any], device: torch.device) -> float:
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@contextmanager
def untouched(network: nn.Module) -> Iterator[None]:
    """Restore buffers (batch-norm statistics), gradients, modes and random state after."""
    buffers = {name: b.detach().clone() for name, b in network.named_buffers()}
    modes = {module: module.training for module in network.modules()}
    grads = {p: p.grad for p in network.parameters()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        for module, training in modes.items():
            module.training = training
        for parameter, grad in grads.items():
            parameter.grad = grad

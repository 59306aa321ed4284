"""``engine.compile: true``: the network compiled with ``torch.compile``, or as it is.

Compilation happens on the first call, so a model whose network ``torch.compile`` cannot
handle fails only then. :func:`compile_network` therefore runs a probe (one pass of the
phase's real work on a tiny batch) right away: where it fails, the network runs uncompiled
with one warning line, or, inside :func:`strict_compiling` (``fit --strict``), the fit stops
with a :class:`~medanomaly.errors.ConfigError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from medanomaly.errors import ConfigError

log = logging.getLogger(__name__)

_strict: ContextVar[bool] = ContextVar("strict_compiling", default=False)
_warned: set[str] = set()


@contextmanager
def strict_compiling(enabled: bool = True) -> Iterator[None]:
    """Inside the block a network that fails to compile raises instead of running uncompiled."""
    token = _strict.set(enabled)
    try:
        yield
    finally:
        _strict.reset(token)


def compile_network(network: nn.Module, probe: Callable[[nn.Module], Any]) -> nn.Module:
    """``torch.compile(network)``, checked by ``probe(compiled)``; ``network`` if that fails.

    Args:
        network: The module to compile (its weights are shared with the compiled one).
        probe: Runs the phase's work through the compiled module once (compiling it).

    Raises:
        ConfigError: Compilation failed inside :func:`strict_compiling`.
    """
    try:
        compiled = torch.compile(network)
        probe(compiled)
    except Exception as error:  # any failure of the compiler means: run uncompiled
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = (
            f"engine.compile: torch.compile failed for {type(network).__name__} "
            f"({type(error).__name__}{': ' + reason[:200] if reason else ''})"
        )
        if _strict.get():
            raise ConfigError(f"{message}; set engine.compile to false") from error
        if message not in _warned:
            _warned.add(message)
            log.warning("%s: running it uncompiled", message)
        return network
    return compiled


def dynamic_batch(batch: Any) -> Any:
    """``batch`` with the images' batch dimension marked dynamic, so one graph fits all sizes."""
    images = batch[0] if isinstance(batch, tuple | list) else batch
    if isinstance(images, torch.Tensor) and images.dim() > 1:
        torch._dynamo.maybe_mark_dynamic(images, 0)
    return batch

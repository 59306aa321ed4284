"""Latent representation search (Kobayashi et al. 2020, Sec. II-B-3): refine z so G(z) fits x.

A VAE-type model maps an image to the latent mean ``z_1 = E(x)``; its decoder's output
``G(z_1)`` is often a blurred version of ``x``. The search starts at ``z_1`` and takes a fixed
number of gradient steps on ``z`` alone, minimising the reconstruction error
``L_AE(x, G(z_i))`` with every network parameter frozen, and returns the final ``z``. Kobayashi et
al. 2020
uses 100 steps with a learning rate of 1e-3; it does not name the optimiser of the search (only
that Adam trained every network), and this module uses Adam by default (``sgd`` on request).

The search is batched: the per-image errors are summed, so each image's ``z`` receives the
gradient of its own error only. It runs with gradients enabled even when called from inside
``torch.inference_mode()`` or ``torch.no_grad()`` (the scoring loop of
:class:`~medanomaly.detectors.deep.DeepDetector` runs in inference mode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medanomaly.detectors.scoring import per_image_sum, residual_map, structural_dissimilarity

LOSSES = ("l2", "l2+ssim")
OPTIMIZERS = ("adam", "sgd")


def reconstruction_error(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    loss: str = "l2",
    ssim_weight: float = 1.0,
    data_range: float = 1.0,
) -> torch.Tensor:
    """The reconstruction term ``L_AE`` per image ``(B,)``.

    ``l2`` is the sum over voxels (and channels) of the squared residual; ``l2+ssim`` adds
    ``ssim_weight`` times the sum over voxels of ``1 - SSIM`` (the project's MONAI-based
    local SSIM, :func:`~medanomaly.detectors.scoring.structural_dissimilarity`), so that one voxel's
    structural dissimilarity weighs like one voxel's squared error when ``ssim_weight`` is 1.

    Args:
        x: Images ``(B, C, *spatial)``.
        reconstruction: Their reconstructions, same shape.
        loss: ``l2`` or ``l2+ssim``.
        ssim_weight: Weight of the SSIM term (``l2+ssim`` only).
        data_range: Intensity range of the images for SSIM (1 for [0, 1], 2 for [-1, 1]).

    Returns:
        The error of each image.

    Raises:
        ValueError: ``loss`` is not one of :data:`LOSSES`.
    """
    _check_choice("loss", loss, LOSSES)
    error = per_image_sum(residual_map(x, reconstruction, "squared"))
    if loss == "l2+ssim" and ssim_weight:
        dissimilarity = structural_dissimilarity(x, reconstruction, data_range=data_range)
        error = error + ssim_weight * per_image_sum(dissimilarity)
    return error


def latent_search(
    decoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z0: torch.Tensor,
    steps: int = 100,
    lr: float = 1e-3,
    loss: str = "l2",
    ssim_weight: float = 1.0,
    data_range: float = 1.0,
    optimizer: str = "adam",
) -> torch.Tensor:
    """Refine latent vectors by gradient descent on the reconstruction error of ``x``.

    Only ``z`` is optimised: gradients are taken with respect to ``z`` alone
    (``torch.autograd.grad``), so no parameter of the decoder receives a gradient or changes.
    Put the network in eval mode first (the scoring loop does), or batch-norm layers would
    update their running statistics.

    Args:
        decoder: Maps latent vectors ``(B, *latent)`` to images shaped like ``x``.
        x: Target images ``(B, C, *spatial)``.
        z0: Starting latent vectors (the encoder's mean), ``(B, *latent)``.
        steps: Number of optimiser steps (Kobayashi et al. 2020: 100); 0 returns ``z0``.
        lr: Learning rate (Kobayashi et al. 2020: 1e-3).
        loss: ``l2`` or ``l2+ssim`` (see :func:`reconstruction_error`).
        ssim_weight: Weight of the SSIM term of ``l2+ssim``.
        data_range: Intensity range of the images, for SSIM.
        optimizer: ``adam`` (default) or ``sgd`` (plain gradient descent).

    Returns:
        The searched latent vectors, detached, same shape, dtype and device as ``z0``.

    Raises:
        ValueError: A setting is out of range, or ``x`` and ``z0`` hold different batch sizes.
    """
    _check_settings(x, z0, steps, lr, loss, optimizer)
    # leave inference mode: its tensors cannot take part in autograd, so clone the inputs out
    with torch.inference_mode(False), torch.enable_grad():
        target = x.detach().clone()
        z = z0.detach().clone().requires_grad_(True)
        step = _make_optimizer(optimizer, z, lr)
        for _ in range(steps):
            error = reconstruction_error(target, decoder(z), loss, ssim_weight, data_range)
            (z.grad,) = torch.autograd.grad(error.sum(), z)
            step.step()
        return z.detach()


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside a training wrapper (Lightning Fabric, DDP), else ``network``.

    A latent search calls the decoder many times without a backward pass through the
    parameters; a data-parallel wrapper would wait for gradients that never come.
    """
    inner = getattr(network, "module", None)
    return unwrap(inner) if isinstance(inner, nn.Module) and inner is not network else network


def _make_optimizer(name: str, z: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam([z], lr=lr)
    return torch.optim.SGD([z], lr=lr)


def _check_settings(
    x: torch.Tensor, z0: torch.Tensor, steps: int, lr: float, loss: str, optimizer: str
) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"latent search: steps must be an integer >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"latent search: lr must be > 0, got {lr!r}")
    _check_choice("loss", loss, LOSSES)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    if len(x) != len(z0):
        raise ValueError(
            f"latent search: {len(x)} images but {len(z0)} latent vectors; give one z per image"
        )


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"latent search: {what} must be one of {allowed}, got {value!r}")

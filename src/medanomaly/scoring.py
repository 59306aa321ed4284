"""Residual maps and image scores shared by the reconstruction-based detectors."""

from __future__ import annotations

import torch

RESIDUALS = ("squared", "abs")


def residual_map(
    x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "squared"
) -> torch.Tensor:
    """Voxel-wise residual ``(B, *spatial)``, summed over channels.

    Args:
        x: Input batch ``(B, C, *spatial)``.
        reconstruction: Reconstruction of ``x``, same shape.
        kind: ``squared`` (squared difference) or ``abs`` (L1 difference).
    """
    diff = x.float() - reconstruction.float()
    if kind == "squared":
        return diff.pow(2).sum(dim=1)
    if kind == "abs":
        return diff.abs().sum(dim=1)
    raise ValueError(f"residual must be one of {RESIDUALS}, got {kind!r}")


def per_image_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first."""
    return values.flatten(1).mean(dim=1)


def per_image_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first."""
    return values.flatten(1).sum(dim=1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per image, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)

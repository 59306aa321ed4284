"""Patch embedding network of Kobayashi et al. 2020 (metric learning on image patches).

Kobayashi et al. (2020) embed 1x32x32 patches with residual blocks of 64-128-256-512
filters, a max-pooling after each block, and a multilayer perceptron with one hidden layer
of 1024 units that outputs a 256-d embedding; the network is trained with the triplet margin
loss so that L2 distances between embeddings measure how different two patches look.
:data:`SEED_002_WIDTHS` holds those widths; the constructor defaults are 4 times narrower
(16-32-64-128, hidden 256, embedding 64), which train in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medanomaly.nets.layers import ResidualBlock, check_spatial_dims

SEED_002_WIDTHS = {"channels": (64, 128, 256, 512), "hidden_dim": 1024, "embedding_dim": 256}
"""The seed's widths, as keyword arguments of :class:`PatchEmbedding`."""

_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


class PatchEmbedding(nn.Module):
    """Residual blocks with max-pooling, then an MLP: patch ``(B, C, *patch)`` -> ``(B, D)``.

    Each block is followed by a max-pooling that halves every axis still at least 2 voxels
    long (axes already down to 1 voxel are left alone, so patches of any size from 1 voxel
    up work). The pooled feature map is flattened and passed through
    ``Linear(hidden_dim) -> ReLU -> Linear(embedding_dim)``.

    Args:
        spatial_dims: 2 or 3.
        patch_shape: Spatial shape of the patches, e.g. ``(32, 32)``.
        in_channels: Image channels.
        channels: Filters of the residual blocks (Kobayashi et al. 2020: 64, 128, 256, 512).
        hidden_dim: Hidden units of the MLP (Kobayashi et al. 2020: 1024).
        embedding_dim: Size of the embedding (Kobayashi et al. 2020: 256).
    """

    def __init__(
        self,
        spatial_dims: int,
        patch_shape: Sequence[int],
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_dim: int = 256,
        embedding_dim: int = 64,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        if len(self.patch_shape) != spatial_dims or min(self.patch_shape) < 1:
            raise ValueError(
                f"patch_shape must hold {spatial_dims} positive sides, got {patch_shape!r}"
            )
        if not channels:
            raise ValueError("channels must list at least one residual block width")
        layers: list[nn.Module] = []
        sides = list(self.patch_shape)
        previous = in_channels
        for width in channels:
            layers.append(ResidualBlock(spatial_dims, previous, int(width)))
            kernel = tuple(2 if side >= 2 else 1 for side in sides)
            layers.append(_MAX_POOL[spatial_dims](kernel))
            sides = [side // k for side, k in zip(sides, kernel, strict=True)]
            previous = int(width)
        self.features = nn.Sequential(*layers)
        flat = previous * int(torch.tensor(sides).prod())
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, embedding_dim),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed a batch of patches ``(B, C, *patch_shape)`` into ``(B, embedding_dim)``."""
        if tuple(patches.shape[2:]) != self.patch_shape:
            raise ValueError(
                f"patches have shape {tuple(patches.shape[2:])}, the network was built for "
                f"{self.patch_shape}"
            )
        return self.head(self.features(patches))

"""Dimension-generic layer factories: one call site serves 2D and 3D networks."""

from __future__ import annotations

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UPSAMPLE_MODE = {2: "bilinear", 3: "trilinear"}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise a clear ``ValueError``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _CONV[check_spatial_dims(spatial_dims)](*args, **kwargs)


def conv_transpose(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _CONV_T[check_spatial_dims(spatial_dims)](*args, **kwargs)


def batch_norm(spatial_dims: int, channels: int) -> nn.Module:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return _BATCH_NORM[check_spatial_dims(spatial_dims)](channels)


def dropout(spatial_dims: int, rate: float) -> nn.Module:
    """Channel dropout (``Dropout2d``/``Dropout3d``); identity when ``rate`` is 0."""
    if rate <= 0:
        return nn.Identity()
    return _DROPOUT[check_spatial_dims(spatial_dims)](rate)


def max_pool(spatial_dims: int, kernel_size: int = 2) -> nn.Module:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return _MAX_POOL[check_spatial_dims(spatial_dims)](kernel_size)


def upsample(spatial_dims: int, scale_factor: int = 2) -> nn.Module:
    """(Bi/tri)linear upsampling by ``scale_factor``."""
    mode = _UPSAMPLE_MODE[check_spatial_dims(spatial_dims)]
    return nn.Upsample(scale_factor=scale_factor, mode=mode, align_corners=False)


def output_activation(name: str) -> nn.Module:
    """Map ``'sigmoid'``, ``'tanh'`` or ``'none'`` to a module.

    Use ``sigmoid`` for inputs scaled to [0, 1], ``tanh`` for [-1, 1] and ``none`` for
    z-scored inputs.
    """
    table = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}
    if name not in table:
        raise ValueError(f"output_activation must be one of {sorted(table)}, got {name!r}")
    return table[name]()


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut.

    ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``: the basic block of ResNet-10/18/34,
    shared by the Lin et al. 2021 classifier, the Hjohlman 2022 autoencoder and the Kobayashi et
    al. 2020 patch embedding.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 halves the grid).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        d = check_spatial_dims(spatial_dims)
        self.body = nn.Sequential(
            conv(d, in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            batch_norm(d, out_channels),
            nn.ReLU(inplace=True),
            conv(d, out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            batch_norm(d, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(d, in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                batch_norm(d, out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(body(x) + shortcut(x))``."""
        return self.relu(self.body(x) + self.shortcut(x))

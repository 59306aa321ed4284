"""Lin et al.'s (2021) supervised CNNs, 2D or 3D: network A (VGG-like) and network B (ResNet-like).

Both end in a fully connected head that gives two logits (normal, abnormal). 2.5D input is
2D input whose channels are ``k`` adjacent slices (see :mod:`medanomaly.data.slabs`).

Each network names the layer Grad-CAM reads (``cam_layer``: the last convolutional stage)
and sorts its weights into ``conv_weights()`` and ``fc_weights()`` so that the two kinds can
get different L2 weight decay (Lin et al. 2021: 0.01 for convolutions, 0.001 for FC layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medanomaly.nets import layers
from medanomaly.nets.layers import ResidualBlock


def _conv_bn_relu(d: int, c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution, batch norm after it (Lin et al. 2021), ReLU."""
    return [
        layers.conv(d, c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        layers.batch_norm(d, c_out),
        nn.ReLU(inplace=True),
    ]


def _max_pool(d: int) -> nn.Module:
    """2x max-pooling that keeps odd sides (``ceil_mode``), so any input size works."""
    pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[layers.check_spatial_dims(d)]
    return pool(kernel_size=2, ceil_mode=True)


def fc_head(in_features: int, features: Sequence[int], dropout: float, classes: int) -> nn.Module:
    """Fully connected layers: ``features`` hidden layers (ReLU + dropout), then the logits."""
    widths = [in_features, *features]
    modules: list[nn.Module] = [nn.Flatten()]
    for f_in, f_out in zip(widths[:-1], widths[1:], strict=True):
        modules += [nn.Linear(f_in, f_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    modules.append(nn.Linear(widths[-1], classes))
    return nn.Sequential(*modules)


class _Classifier(nn.Module):
    """What both networks share: weight groups for the two weight decays."""

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose activations and gradients Grad-CAM combines."""
        raise NotImplementedError

    def fc_weights(self) -> list[nn.Parameter]:
        """Weights of the fully connected layers."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]

    def conv_weights(self) -> list[nn.Parameter]:
        """Kernels of the convolutions."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]


class VGGClassifier(_Classifier):
    """Network A of Lin et al. 2021 (VGG-like).

    Five modules of two 3x3 convolutions (batch norm + ReLU after each) and a 2x max-pool,
    channels 64 -> 128 -> 256 -> 512 -> 512, then four fully connected layers with dropout.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (``k`` for 2.5D input of ``k`` slices).
        input_size: Spatial size of the input (fixes the width of the first FC layer).
        channels: Output channels of each module.
        convs_per_module: Convolutions per module.
        fc_features: Widths of the hidden FC layers (the last FC layer gives the logits).
        dropout: Dropout rate between FC layers (Lin et al. 2021: 0.5).
        classes: Number of output logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        input_size: Sequence[int],
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        convs_per_module: int = 2,
        fc_features: Sequence[int] = (512, 256, 128),
        dropout: float = 0.5,
        classes: int = 2,
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *_conv_bn_relu(d, c_in, c_out),
                *[m for _ in range(convs_per_module - 1) for m in _conv_bn_relu(d, c_out, c_out)],
            )
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.pool = _max_pool(d)
        side = [_pooled(s, len(channels)) for s in input_size]
        self.head = fc_head(widths[-1] * math.prod(side), fc_features, dropout, classes)

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional module (before its pooling)."""
        return self.blocks[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)``."""
        for block in self.blocks:
            x = self.pool(block(x))
        return self.head(x)


def _pooled(size: int, times: int) -> int:
    """Side after ``times`` ceil-mode 2x poolings."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


class ResNetClassifier(_Classifier):
    """Network B of Lin et al. 2021 (ResNet-like).

    A 3x3 stem convolution and 2x max-pool, eight residual blocks in four stages of two
    (channels 64 -> 128 -> 256 -> 512, each later stage halving the grid): 1 + 16 + 3
    projection convolutions = 20 convolutional layers as in the paper. Global average pooling
    then feeds the same fully connected head as network A.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (``k`` for 2.5D input of ``k`` slices).
        channels: Channels of the stages (the stem has ``channels[0]``).
        blocks_per_stage: Residual blocks per stage.
        fc_features: Widths of the hidden FC layers.
        dropout: Dropout rate between FC layers.
        classes: Number of output logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: int = 2,
        fc_features: Sequence[int] = (512, 256, 128),
        dropout: float = 0.5,
        classes: int = 2,
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        self.stem = nn.Sequential(*_conv_bn_relu(d, in_channels, channels[0]), _max_pool(d))
        stages, c_in = [], channels[0]
        for index, c_out in enumerate(channels):
            blocks = [ResidualBlock(d, c_in, c_out, stride=1 if index == 0 else 2)]
            blocks += [ResidualBlock(d, c_out, c_out) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d](1)
        self.head = fc_head(c_in, fc_features, dropout, classes)

    @property
    def cam_layer(self) -> nn.Module:
        """The last residual stage (before global pooling)."""
        return self.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)``."""
        return self.head(self.pool(self.stages(self.stem(x))))

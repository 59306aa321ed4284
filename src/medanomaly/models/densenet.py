"""``densenet121``: MONAI's DenseNet121 as a supervised quality classifier, from scratch.

The supervised part of the fundus slide deck: DenseNet121, weighted cross-entropy, SGD at
learning rate 1e-3, a 60/20/20 split of good and bad images and the model of minimum
validation loss, with Grad-CAM heat maps. Nothing is downloaded: the weights start random.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121
from torch import nn
from torch.nn import functional

from medanomaly.detectors.registry import register
from medanomaly.models.classifier import SupervisedClassifier
from medanomaly.training.engine import EngineConfig, Optimizers

MIN_SIDE = 32
"""DenseNet121 halves the grid five times: smaller inputs are padded to this many voxels."""


class _DenseNet(nn.Module):
    """DenseNet121 giving two logits, with the hooks :class:`SupervisedClassifier` uses."""

    def __init__(self, spatial_dims: int, in_channels: int, dropout: float) -> None:
        super().__init__()
        self.net = DenseNet121(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=2,
            dropout_prob=dropout,
        )

    @property
    def cam_layer(self) -> nn.Module:
        """The last dense features (after the final norm), explained by Grad-CAM."""
        return self.net.features

    def conv_weights(self) -> list[nn.Parameter]:
        return [
            m.weight for m in self.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        ]

    def fc_weights(self) -> list[nn.Parameter]:
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; sides below :data:`MIN_SIDE` are zero-padded at the end up to it."""
        short = [max(MIN_SIDE - n, 0) for n in reversed(x.shape[2:])]
        if any(short):
            x = functional.pad(x, [p for n in short for p in (0, n)])
        return self.net(x)


@register("densenet121")
class DenseNet121Classifier(SupervisedClassifier):
    """Supervised DenseNet121 (MONAI, random start); P(abnormal) is the score.

    Training, scores and maps are those of :class:`SupervisedClassifier` (class-weighted
    cross-entropy, ``engine.monitor: val_loss`` keeps the epoch of minimum validation loss
    over good and bad validation images, Grad-CAM on the last dense block); the optimiser is
    SGD with momentum.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        dropout: Dropout before the last layer.
        momentum: SGD momentum.
        weight_decay: L2 weight decay of every weight.
        crop_size: Training random crop / inference centred crop (``None``: whole image).
        flip_axes: Spatial axes flipped at random in training.
        class_weight: ``"balanced"``, ``None`` or ``[w_normal, w_abnormal]``.
        map_method: ``grad_cam`` or ``occlusion``.
        threshold: Probability above which an image is called abnormal.
        engine: Training settings (``lr`` is the SGD learning rate).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dropout: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        crop_size: Sequence[int] | None = None,
        flip_axes: Sequence[int] = (),
        class_weight: str | Sequence[float] | None = "balanced",
        map_method: str = "grad_cam",
        threshold: float = 0.5,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, (), dropout, crop_size, flip_axes, class_weight,
            weight_decay, weight_decay, (), 1.0, map_method, None, None, threshold, engine,
        )  # fmt: skip
        self.momentum = momentum
        self.weight_decay = weight_decay

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """DenseNet121 for images ``(C, *spatial)``."""
        return _DenseNet(self.spatial_dims, input_shape[0], self.dropout)

    def _optimizers(self, network: nn.Module) -> Optimizers:
        """SGD with momentum (the slide deck: SGD at lr 1e-3)."""
        optimizer = torch.optim.SGD(
            network.parameters(),
            lr=self.engine_config.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        return {"sgd": optimizer}

"""A small anatomical segmentation U-Net for the fidelity scores of Kobayashi et al. 2020.

Kobayashi et al. 2020 measures how faithful reconstructions are with a segmentation network trained
on
normal anatomy of the same domain (:mod:`medanomaly.metrics.fidelity`). Users with
anatomical label maps make one here: MONAI's :class:`~monai.networks.nets.UNet` trained with
Dice + cross-entropy (:class:`~monai.losses.DiceCELoss`) by the project's
:class:`~medanomaly.training.engine.Engine` (seeds, devices, mixed precision, progress,
checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn
from torch.nn import functional
from torch.utils.data import TensorDataset

from medanomaly.data.sets import ImageSet
from medanomaly.training.engine import (
    Engine,
    EngineConfig,
    TrainingData,
    TrainingTask,
    seeded,
    split_indices,
)


def build_segmenter(
    spatial_dims: int,
    in_channels: int,
    n_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] | None = None,
    num_res_units: int = 2,
) -> nn.Module:
    """MONAI U-Net returning class logits ``(B, n_classes, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        n_classes: Output classes (background included).
        channels: Features per level.
        strides: Down-sampling between levels (default 2 each, one fewer than ``channels``).
        num_res_units: Residual units per level.
    """
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=n_classes,
        channels=tuple(channels),
        strides=strides,
        num_res_units=num_res_units,
    )


def train_segmenter(
    images: ImageSet | np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_classes: int,
    spatial_dims: int = 2,
    epochs: int = 50,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] | None = None,
    num_res_units: int = 2,
    val_fraction: float = 0.0,
    engine: EngineConfig | dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
) -> nn.Module:
    """Train a U-Net to segment anatomy from images and label maps.

    Args:
        images: Images ``(N, C, *spatial)``.
        labels: Integer label maps ``(N, *spatial)`` or ``(N, 1, *spatial)`` with values in
            ``[0, n_classes)`` (0 is usually the background).
        n_classes: Number of classes, background included.
        spatial_dims: 2 or 3.
        epochs: Training epochs (overrides ``engine.epochs``).
        channels: U-Net features per level; each level but the first halves the grid, so
            every side must be divisible by ``2 ** (len(channels) - 1)`` (with the default
            ``strides``).
        strides: Down-sampling between levels.
        num_res_units: Residual units per level.
        val_fraction: Share of the images held out; the weights of the epoch with the lowest
            validation loss are kept. 0 trains on everything and keeps the last epoch.
        engine: Other training settings (batch size, learning rate, seed, devices, ...) as
            an :class:`~medanomaly.training.engine.EngineConfig` or a dict; by default batch 16,
            Adam lr 1e-3, seed 0, and no early stopping unless the dict sets ``patience``.
        run_dir: Where the engine keeps ``checkpoint_segmenter.safetensors`` and its history.

    Returns:
        The trained network in eval mode (on the training device); it returns logits.

    Raises:
        ValueError: On mismatched shapes, labels out of range or sides the U-Net cannot
            halve often enough.
    """
    x, y = _check_training_data(images, labels, n_classes, spatial_dims)
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    _check_sides(x.shape[2:], strides)
    config = _engine_config(engine, epochs, val_fraction)
    with seeded(config.seed):
        network = build_segmenter(
            spatial_dims, x.shape[1], n_classes, channels, strides, num_res_units
        )
    data = _training_data(x, y, config)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)

    def per_image_ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = model(batch[0]).float()
        return functional.cross_entropy(logits, batch[1][:, 0], reduction="none").flatten(1).mean(1)

    task = TrainingTask(
        network=network,
        loss=lambda model, batch: criterion(model(batch[0]).float(), batch[1]),
        score=per_image_ce,
        keep_best=data.val_normal is not None,
        supervised=True,
    )
    Engine(config).fit(task, data, run_dir=run_dir, stage="segmenter")
    return network.eval()


def _engine_config(
    engine: EngineConfig | dict[str, Any] | None, epochs: int, val_fraction: float
) -> EngineConfig:
    """The engine settings: a dict is read with ``patience: None`` unless it sets one."""
    if not isinstance(engine, EngineConfig):
        engine = EngineConfig.from_any({"patience": None, **(engine or {})})
    return replace(engine, epochs=epochs, val_fraction=val_fraction)


def _check_training_data(
    images: ImageSet | np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    n_classes: int,
    spatial_dims: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``(N, C, *spatial)`` and labels as int64 ``(N, 1, *spatial)``."""
    if isinstance(images, ImageSet):
        images = images.images
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.dim() != spatial_dims + 2:
        raise ValueError(
            f"images must be (N, C, {', '.join('XYZ'[:spatial_dims])}) for spatial_dims="
            f"{spatial_dims}, got {tuple(x.shape)}"
        )
    if y.dim() == spatial_dims + 1:
        y = y.unsqueeze(1)
    if y.shape != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(
            f"labels {tuple(y.shape)} do not match images {tuple(x.shape)}: expected "
            "(N, *spatial) or (N, 1, *spatial)"
        )
    if n_classes < 2 or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) with n_classes >= 2; found values "
            f"{int(y.min())}..{int(y.max())}"
        )
    return x, y


def _check_sides(spatial: Sequence[int], strides: Sequence[int]) -> None:
    factor = math.prod(int(s) for s in strides)
    bad = [side for side in spatial if side % factor]
    if bad:
        raise ValueError(
            f"image sides {tuple(spatial)} must be divisible by {factor} (the U-Net's total "
            "down-sampling); pad or resize the images, or use fewer levels"
        )


def _training_data(x: torch.Tensor, y: torch.Tensor, config: EngineConfig) -> TrainingData:
    if config.val_fraction <= 0:
        return TrainingData(TensorDataset(x, y))
    keep, held = split_indices(len(x), config.val_fraction, config.seed)
    keep_t, held_t = torch.as_tensor(keep), torch.as_tensor(held)
    return TrainingData(
        TensorDataset(x[keep_t], y[keep_t]), TensorDataset(x[held_t], y[held_t]), None
    )

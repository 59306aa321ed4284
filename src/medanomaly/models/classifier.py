"""Supervised baseline (Lin et al. 2021): VGG-like and ResNet-like CNN classifiers, 2D / 2.5D / 3D.

When labels exist, a classifier shows how far supervision gets. Both detectors have the
interface of the unsupervised ones, with one difference: ``fit`` learns from normal *and*
abnormal images (``supervised = True``), so ``train`` must be labelled.

* Score: the softmax probability of "abnormal"; ``predict``: score > ``threshold`` (0.5).
* Map: Grad-CAM (default; one backward pass) or occlusion sensitivity (Lin et al.'s (2021) heat map;
  one forward pass per patch position), see :mod:`medanomaly.detectors.explain`.
* Training (Lin et al. 2021): class-weighted cross-entropy, Adam, L2 weight decay 0.01 on
  convolution kernels and 0.001 on fully connected weights (none on batch norm and biases),
  a step learning-rate decay, random flips and a random crop per image (the centred crop at
  inference; e.g. 164 -> 128 in the paper). ``engine.lr`` is the starting learning rate and
  ``engine.weight_decay`` is not used.
* Validation: ``val`` (labelled) or, without it, a stratified, patient-grouped
  ``engine.val_fraction`` of ``train``; its loss is the weighted cross-entropy over both
  classes, and ``engine.monitor`` / ``patience`` pick the epoch kept. With
  ``val_fraction: 0`` (Lin et al.'s (2021) final retraining on the whole training set) the last
  epoch is kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn import functional
from torch.utils.data import Dataset

from medanomaly.data.sets import ABNORMAL, NORMAL, ImageSet, as_image_set
from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.explain import grad_cam, occlusion_sensitivity
from medanomaly.detectors.registry import register
from medanomaly.errors import ConfigError, InvalidImageError, LabelError
from medanomaly.nets.classifiers import ResNetClassifier, VGGClassifier
from medanomaly.training.engine import Engine, EngineConfig, Optimizers, TrainingData, TrainingTask

MAP_METHODS = ("grad_cam", "occlusion")


@dataclass
class LabelledImages(Dataset):
    """An :class:`ImageSet` whose items are ``(image, label)`` pairs (supervised training)."""

    image_set: ImageSet

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.tensor(int(self.image_set.labels[index]), dtype=torch.int64)
        return self.image_set[index], label

    @property
    def images(self) -> np.ndarray:
        """The underlying image array ``(N, C, *spatial)``."""
        return self.image_set.images

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shape of each image (one grid)."""
        return self.image_set.shapes

    @property
    def ids(self) -> list[str]:
        """The images' names."""
        return self.image_set.ids

    def reseed(self, seed: int) -> None:
        """Reseed the image set's augmentation (called by the engine every epoch)."""
        self.image_set.reseed(seed)


def check_labels(images: ImageSet, what: str) -> None:
    """Raise :class:`LabelError` unless every image is labelled and both classes occur."""
    unknown = int(np.sum((images.labels != NORMAL) & (images.labels != ABNORMAL)))
    if unknown:
        raise LabelError(
            f"{what}: {unknown} of {len(images)} images have no label; a supervised classifier "
            "learns from labelled images (a manifest with a label column, or normal/ and "
            "abnormal/ folders)"
        )
    for value, name in ((NORMAL, "normal"), (ABNORMAL, "abnormal")):
        if not np.any(images.labels == value):
            raise LabelError(
                f"{what}: no {name} images among {len(images)}; a classifier needs both classes"
            )


def stratified_holdout(
    labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split into (kept, held-out) indices: stratified by label, never splitting a group.

    The held-out part is the first fold of scikit-learn's ``StratifiedGroupKFold`` with
    ``round(1 / fraction)`` folds; ``fraction`` 0 holds nothing out.
    """
    n = len(labels)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    n_splits = 0
    if fraction > 0 and n:
        largest_class = int(np.bincount(labels).max())
        n_splits = min(max(2, round(1 / fraction)), len(np.unique(groups)), largest_class)
    if n_splits < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than folds"
        warnings.simplefilter("ignore", UserWarning)
        kept, held = next(splitter.split(np.zeros(n), labels, groups))
    return np.sort(kept), np.sort(held)


def centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centred crop of ``size`` of a batch ``(B, C, *spatial)``."""
    starts = [(s - c) // 2 for s, c in zip(x.shape[2:], size, strict=True)]
    box = (slice(a, a + c) for a, c in zip(starts, size, strict=True))
    return x[(slice(None), slice(None), *box)]


def random_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """An independent random crop of ``size`` per image (draws from torch's global RNG)."""
    highs = [s - c + 1 for s, c in zip(x.shape[2:], size, strict=True)]
    starts = torch.stack([torch.randint(0, h, (len(x),)) for h in highs], dim=1).tolist()
    return torch.stack(
        [
            image[(slice(None), *(slice(a, a + c) for a, c in zip(start, size, strict=True)))]
            for image, start in zip(x, starts, strict=True)
        ]
    )


def random_flip(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip each image along each spatial axis of ``axes`` with probability 0.5."""
    for axis in axes:
        flip = (torch.rand(len(x)) < 0.5).to(x.device).view(-1, *([1] * (x.ndim - 1)))
        x = torch.where(flip, x.flip(axis + 2), x)
    return x


def uncrop(maps: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Put maps of the centred crop back on the full grid ``spatial`` (zero outside)."""
    out = maps.new_zeros((len(maps), *spatial))
    starts = [(s - c) // 2 for s, c in zip(spatial, maps.shape[1:], strict=True)]
    box = tuple(slice(a, a + c) for a, c in zip(starts, maps.shape[1:], strict=True))
    out[(slice(None), *box)] = maps
    return out


class SupervisedClassifier(DeepDetector):
    """Base of the CNN classifiers: labels, loss, optimiser, schedule, scores and maps.

    Subclasses give :meth:`build_network`. Arguments shared by both networks:

    Args:
        spatial_dims: 2 (also for 2.5D) or 3.
        in_channels: Image channels; ``k`` for 2.5D input of ``k`` slices.
        fc_features: Widths of the hidden fully connected layers (a last FC layer gives the
            two logits: four FC layers by default, as in Lin et al. 2021).
        dropout: Dropout between FC layers (Lin et al. 2021: 0.5).
        crop_size: Spatial size of the random training crop and of the centred inference
            crop (Lin et al. 2021: 128 from 164); ``None`` uses the whole image.
        flip_axes: Spatial axes flipped at random (probability 0.5 each) in training.
        class_weight: ``"balanced"`` (weights inversely proportional to the class counts of
            the training set, scikit-learn's rule), ``None`` or ``[w_normal, w_abnormal]``.
        conv_weight_decay: L2 weight decay of convolution kernels (Lin et al. 2021: 0.01).
        fc_weight_decay: L2 weight decay of fully connected weights (Lin et al. 2021: 0.001).
        lr_milestones: Epochs at which the learning rate is multiplied by ``lr_gamma``.
        lr_gamma: Learning-rate factor at each milestone.
        map_method: ``grad_cam`` or ``occlusion`` for :meth:`anomaly_map`.
        occlusion_patch: Side of the occlusion patch; ``None``: an eighth of the smallest
            side of the (cropped) input.
        occlusion_stride: Step of the occlusion patch; ``None``: half the patch.
        threshold: Probability above which an image is called abnormal.
        engine: Training settings.

    Attributes:
        supervised: True: ``fit`` needs labelled normal and abnormal images.
        class_weights_: The cross-entropy weights ``[normal, abnormal]`` used in training.
    """

    export_refusal = "its maps (Grad-CAM, occlusion) need gradients or many passes per image"

    supervised: ClassVar[bool] = True
    streams: ClassVar[bool] = False  # reads its labelled training set into memory

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        fc_features: Sequence[int] = (512, 256, 128),
        dropout: float = 0.5,
        crop_size: Sequence[int] | None = None,
        flip_axes: Sequence[int] = (),
        class_weight: str | Sequence[float] | None = "balanced",
        conv_weight_decay: float = 0.01,
        fc_weight_decay: float = 0.001,
        lr_milestones: Sequence[int] = (250,),
        lr_gamma: float = 1 / 3,
        map_method: str = "grad_cam",
        occlusion_patch: int | None = None,
        occlusion_stride: int | None = None,
        threshold: float = 0.5,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, 3.0, engine)
        self.fc_features = fc_features
        self.dropout = dropout
        self.crop_size = crop_size
        self.flip_axes = flip_axes
        self.class_weight = class_weight
        self.conv_weight_decay = conv_weight_decay
        self.fc_weight_decay = fc_weight_decay
        self.lr_milestones = lr_milestones
        self.lr_gamma = lr_gamma
        self.map_method = map_method
        self.occlusion_patch = occlusion_patch
        self.occlusion_stride = occlusion_stride
        self.threshold = threshold

    # -- shapes ---------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        """Any size works (ceil-mode pooling, global pooling)."""
        return 1

    def network_input_size(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial size the network sees: the crop, else the image."""
        spatial = tuple(input_shape[1:])
        return spatial if self.crop_size is None else tuple(int(c) for c in self.crop_size)

    def _check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        super()._check_input_shape(input_shape)
        self._check_settings()
        crop = self.network_input_size(input_shape)
        if len(crop) != self.spatial_dims or any(
            c < 1 or c > s for c, s in zip(crop, input_shape[1:], strict=True)
        ):
            raise InvalidImageError(
                "<input>",
                f"crop_size {tuple(crop)} does not fit images of spatial size "
                f"{tuple(input_shape[1:])}; resize the images or lower crop_size",
            )

    def _check_settings(self) -> None:
        if self.map_method not in MAP_METHODS:
            raise ConfigError(f"map_method must be one of {MAP_METHODS}, got {self.map_method!r}")
        bad_axes = [a for a in self.flip_axes if not 0 <= a < self.spatial_dims]
        if bad_axes:
            raise ConfigError(f"flip_axes {bad_axes} outside 0..{self.spatial_dims - 1}")

    # -- fitting --------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet | np.ndarray | torch.Tensor,
        val: ImageSet | np.ndarray | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> SupervisedClassifier:
        """Train on labelled normal and abnormal images.

        Args:
            train: An :class:`ImageSet` with labels 0 (normal) and 1 (abnormal); groups
                (patients) keep the automatic validation split patient-disjoint.
            val: Labelled validation images; ``None`` holds out ``engine.val_fraction`` of
                ``train`` (stratified, grouped; ``0`` trains on all of it).
            run_dir: Where to keep the checkpoint, history, config and final model.
            resume: Continue an interrupted run from ``run_dir``.

        Returns:
            ``self``, fitted.

        Raises:
            LabelError: If labels are missing or a class is absent.
        """
        return super().fit(train, val, run_dir=run_dir, resume=resume)  # type: ignore[return-value]

    def _training_data(self, train: Any, val: Any, cfg: EngineConfig) -> TrainingData:
        train_set = as_image_set(train, self.spatial_dims)
        check_labels(train_set, "fit: train")
        if val is None:
            kept, held = stratified_holdout(
                train_set.labels, train_set.groups, cfg.val_fraction, cfg.seed
            )
            val_set = train_set.subset(held)
            train_set = train_set.subset(kept, keep_augment=True)
            check_labels(train_set, "fit: train after holding out validation images")
        else:
            val_set = as_image_set(val, self.spatial_dims)
            if np.any(val_set.labels == -1):
                raise LabelError("fit: val has unlabelled images; label them or leave val out")
        abnormal = val_set.abnormal
        return TrainingData(
            LabelledImages(train_set),
            LabelledImages(val_set.normal),
            LabelledImages(abnormal) if len(abnormal) else None,
        )

    def train_network(
        self,
        engine: Engine,
        network: nn.Module,
        data: TrainingData,
        run_dir: str | Path | None,
        resume: bool,
    ) -> list[dict[str, float]]:
        """Minimise the class-weighted cross-entropy (see the module docstring)."""
        self.class_weights_ = self._class_weights(data.train.image_set.labels)
        has_val = len(data.val_normal) > 0 or data.val_abnormal is not None
        task = TrainingTask(
            network=network,
            loss=self.loss,
            score=self._score_only,
            optimizers=self._optimizers,
            keep_best=has_val,
            supervised=True,
            epoch_start=self._set_learning_rate,
        )
        return engine.fit(task, data, run_dir=run_dir, resume=resume, extra_state=self.config())

    def _class_weights(self, labels: np.ndarray) -> np.ndarray:
        if self.class_weight is None:
            return np.ones(2)
        if isinstance(self.class_weight, str):
            return compute_class_weight(self.class_weight, classes=np.array([0, 1]), y=labels)
        weights = np.asarray(self.class_weight, dtype=np.float64)
        if weights.shape != (2,):
            raise ConfigError(f"class_weight needs [normal, abnormal], got {self.class_weight}")
        return weights

    def _optimizers(self, network: nn.Module) -> Optimizers:
        """Adam (Lin et al. 2021: betas 0.9 / 0.999) with one weight decay per kind of layer."""
        conv, fc = network.conv_weights(), network.fc_weights()
        taken = {id(p) for p in (*conv, *fc)}
        groups = [
            {"params": conv, "weight_decay": self.conv_weight_decay},
            {"params": fc, "weight_decay": self.fc_weight_decay},
            {
                "params": [p for p in network.parameters() if id(p) not in taken],
                "weight_decay": 0.0,
            },
        ]
        lr = self.engine_config.lr
        return {"adam": torch.optim.Adam([g for g in groups if g["params"]], lr=lr)}

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (0-based): ``lr * lr_gamma ** (milestones passed)``."""
        passed = sum(epoch >= m for m in self.lr_milestones)
        return self.engine_config.lr * self.lr_gamma**passed

    def _set_learning_rate(self, epoch: int, optimizers: Optimizers) -> None:
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(epoch)

    def loss(self, network: nn.Module, batch: Any) -> torch.Tensor:
        """Class-weighted cross-entropy of an ``(images, labels)`` batch.

        In training mode each image gets a random crop and random flips; in evaluation
        mode the centred crop.
        """
        if not isinstance(batch, tuple | list):
            raise LabelError("a classifier's loss needs (images, labels) batches")
        images, labels = batch
        if network.training:
            images = random_flip(self._crop(images, random=True), self.flip_axes)
        else:
            images = self._crop(images, random=False)
        weight = torch.as_tensor(self.class_weights_, dtype=torch.float32, device=images.device)
        return functional.cross_entropy(network(images).float(), labels, weight=weight)

    def _crop(self, images: torch.Tensor, random: bool) -> torch.Tensor:
        if self.crop_size is None:
            return images
        size = [int(c) for c in self.crop_size]
        return random_crop(images, size) if random else centre_crop(images, size)

    def _set_threshold(self, normal: Any) -> None:
        """Fixed probability threshold; keeps the scores of the normal validation images."""
        images = normal.image_set if isinstance(normal, LabelledImages) else normal
        images = images.normal if isinstance(images, ImageSet) else images
        self.val_scores_ = self._run(images, with_maps=False)[0] if len(images) else np.zeros(0)
        self.threshold_ = float(self.threshold)
        self.threshold_rule_ = f"fixed probability {self.threshold:g}"

    # -- inference ------------------------------------------------------------------------
    def _probability(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """P(abnormal) of images already cropped."""
        return torch.softmax(network(images).float(), dim=1)[:, 1]

    def _score_only(self, network: nn.Module, x: Any) -> torch.Tensor:
        images = x[0] if isinstance(x, tuple | list) else x
        return self._probability(network, self._crop(images, random=False))

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """P(abnormal) and the Grad-CAM or occlusion map of each image (no reconstruction)."""
        images = self._crop(x, random=False)
        scores = self._probability(network, images)
        if self.map_method == "occlusion":
            maps = occlusion_sensitivity(
                lambda batch: self._probability(network, batch),
                images,
                self.occlusion_patch,
                self.occlusion_stride,
            )
        else:
            maps = grad_cam(network, network.cam_layer, images)
        return scores, uncrop(maps, x.shape[2:]), None

    def explain(self, x: ImageSet | np.ndarray | torch.Tensor, method: str) -> np.ndarray:
        """Maps ``(N, *spatial)`` by ``method`` (``grad_cam`` or ``occlusion``) on the input grid.

        Same as :meth:`anomaly_map` with ``map_method = method``, without refitting.
        """
        self.check_fitted()
        if method not in MAP_METHODS:
            raise ConfigError(f"method must be one of {MAP_METHODS}, got {method!r}")
        kept, self.map_method = self.map_method, method
        try:
            return self.anomaly_map(x)
        finally:
            self.map_method = kept

    # -- persistence ----------------------------------------------------------------------
    def saved_state(self) -> dict[str, Any]:
        """What :meth:`DeepDetector.saved_state` holds plus the class weights."""
        saved = super().saved_state()
        saved["class_weights"] = np.asarray(self.class_weights_).tolist()
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        super()._restore(saved)
        self.class_weights_ = np.asarray(saved.get("class_weights", [1.0, 1.0]))


@register("vgg_classifier")
class VGGClassifierDetector(SupervisedClassifier):
    """Lin et al.'s (2021) network A (VGG-like) as a detector; see :class:`SupervisedClassifier`.

    Args:
        spatial_dims: 2 (also 2.5D) or 3.
        in_channels: Image channels (``k`` slices for 2.5D).
        channels: Output channels of the five modules of two 3x3 convolutions + max-pool.
        convs_per_module: Convolutions per module.
        fc_features: Hidden FC widths.
        dropout: FC dropout.
        crop_size: Training random crop / inference centred crop.
        flip_axes: Randomly flipped axes in training.
        class_weight: Cross-entropy class weights.
        conv_weight_decay: L2 decay of convolution kernels.
        fc_weight_decay: L2 decay of FC weights.
        lr_milestones: Learning-rate decay epochs (Lin et al. 2021, network A: 250).
        lr_gamma: Decay factor (Lin et al. 2021, network A: 3e-4 -> 1e-4).
        map_method: ``grad_cam`` or ``occlusion``.
        occlusion_patch: Occlusion patch side.
        occlusion_stride: Occlusion step.
        threshold: Probability threshold.
        engine: Training settings.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        convs_per_module: int = 2,
        fc_features: Sequence[int] = (512, 256, 128),
        dropout: float = 0.5,
        crop_size: Sequence[int] | None = None,
        flip_axes: Sequence[int] = (),
        class_weight: str | Sequence[float] | None = "balanced",
        conv_weight_decay: float = 0.01,
        fc_weight_decay: float = 0.001,
        lr_milestones: Sequence[int] = (250,),
        lr_gamma: float = 1 / 3,
        map_method: str = "grad_cam",
        occlusion_patch: int | None = None,
        occlusion_stride: int | None = None,
        threshold: float = 0.5,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, fc_features, dropout, crop_size, flip_axes, class_weight,
            conv_weight_decay, fc_weight_decay, lr_milestones, lr_gamma, map_method,
            occlusion_patch, occlusion_stride, threshold, engine,
        )  # fmt: skip
        self.channels = channels
        self.convs_per_module = convs_per_module

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Network A for images ``(C, *spatial)`` (the crop fixes the first FC width)."""
        return VGGClassifier(
            self.spatial_dims,
            input_shape[0],
            self.network_input_size(input_shape),
            tuple(self.channels),
            self.convs_per_module,
            tuple(self.fc_features),
            self.dropout,
        )


@register("resnet_classifier")
class ResNetClassifierDetector(SupervisedClassifier):
    """Lin et al.'s (2021) network B (ResNet-like) as a detector; see :class:`SupervisedClassifier`.

    Args:
        spatial_dims: 2 (also 2.5D) or 3.
        in_channels: Image channels (``k`` slices for 2.5D).
        channels: Channels of the four stages of residual blocks.
        blocks_per_stage: Residual blocks per stage (2: eight blocks, as in Lin et al. 2021).
        fc_features: Hidden FC widths.
        dropout: FC dropout.
        crop_size: Training random crop / inference centred crop.
        flip_axes: Randomly flipped axes in training.
        class_weight: Cross-entropy class weights.
        conv_weight_decay: L2 decay of convolution kernels.
        fc_weight_decay: L2 decay of FC weights.
        lr_milestones: Learning-rate decay epochs (Lin et al. 2021, network B: 300).
        lr_gamma: Decay factor (Lin et al. 2021, network B: 3e-4 -> 5e-5).
        map_method: ``grad_cam`` or ``occlusion``.
        occlusion_patch: Occlusion patch side.
        occlusion_stride: Occlusion step.
        threshold: Probability threshold.
        engine: Training settings.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: int = 2,
        fc_features: Sequence[int] = (512, 256, 128),
        dropout: float = 0.5,
        crop_size: Sequence[int] | None = None,
        flip_axes: Sequence[int] = (),
        class_weight: str | Sequence[float] | None = "balanced",
        conv_weight_decay: float = 0.01,
        fc_weight_decay: float = 0.001,
        lr_milestones: Sequence[int] = (300,),
        lr_gamma: float = 1 / 6,
        map_method: str = "grad_cam",
        occlusion_patch: int | None = None,
        occlusion_stride: int | None = None,
        threshold: float = 0.5,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, fc_features, dropout, crop_size, flip_axes, class_weight,
            conv_weight_decay, fc_weight_decay, lr_milestones, lr_gamma, map_method,
            occlusion_patch, occlusion_stride, threshold, engine,
        )  # fmt: skip
        self.channels = channels
        self.blocks_per_stage = blocks_per_stage

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Network B for images ``(C, *spatial)``."""
        return ResNetClassifier(
            self.spatial_dims,
            input_shape[0],
            tuple(self.channels),
            self.blocks_per_stage,
            tuple(self.fc_features),
            self.dropout,
        )

"""Patch discriminator (Kobayashi et al. 2020): embedding distance of image and reconstruction.

Kobayashi et al. pair an image reconstruction network, which turns an image into a
normal-looking replica, with a discriminative network that embeds patches so that L2
distances between embeddings say how different two patches look. Both learn from normal
images only. The reconstructor is any registered reconstruction model, given as a ``model:``
block (like an ensemble member); it inherits ``spatial_dims``, ``in_channels`` and the
``engine`` block, and may override any of them::

    model:
      name: patch_discriminator
      reconstructor: {name: vae, latent_dim: 64, engine: {epochs: 100}}
      patch_size: 32
      stride: 16

``fit`` trains the reconstructor on the normal images, then the embedding network
(:class:`~medanomaly.nets.patch_embedding.PatchEmbedding`) with the triplet margin loss
(margin 1) on triplets of normal patches drawn by :class:`TripletPatches`: anchor = a patch at
a random position; positive = the same patch shifted by up to ``max_shift`` voxels per axis,
with its intensities scaled and offset a little; negative = a patch at another position of
the same image, at least ``negative_min_distance`` voxels away along some axis (Kobayashi et al.
2020), or
with probability ``negative_other_image`` a patch of another image. The embedding network is
trained by the project's :class:`~medanomaly.training.engine.Engine` (stage ``embedding``), so it
has
checkpoints, resume, seeding and progress like every other network. Triplets are cut from
the stored images: the random augmentation of a training ``ImageSet`` (flips, affine) serves
the reconstructor; the positive's shift and intensity change are the embedding's augmentation.

Abnormality map: patches of the input and of its reconstruction are cut at every position of
a grid with step ``stride`` (the last position is added so that the windows reach the far edge)
and embedded; the L2 distance between the two embeddings of a position is given to every
voxel of that window, and each voxel's value is the mean over the windows covering it. That
raw distance map is then z-scored per image (Kobayashi et al. 2020) with the mean and population SD
of its
foreground voxels (every voxel when ``foreground_threshold`` is ``None``; otherwise voxels
where some channel of the input exceeds the threshold, with enclosed holes filled so that dark
lesions stay in), and background voxels are set to the foreground minimum.
``anomaly_map``/``detect`` return the z-scored map; :meth:`distance_maps` returns the raw one.

Image score: per-image z-scoring removes the level of the distances, so a uniformly bad image
would look like a normal one. By default (``score_from: raw``) the score is the mean of the
top ``top_fraction`` (1 %) of the *raw* distance map inside the foreground; ``score_from:
zscore`` reduces the z-scored map instead (how peaked the map is within its image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional
from torch.utils.data import Dataset

from medanomaly._version import __version__
from medanomaly.data.sets import ImageSet, as_image_set
from medanomaly.detectors.base import (
    INFERENCE_VOXELS,
    MODEL_FILE,
    AnomalyResult,
    BaseDetector,
    fit_or_load,
)
from medanomaly.detectors.deep import inference_network
from medanomaly.detectors.registry import build_nested, get_model_class, nested_block, register
from medanomaly.detectors.scoring import every_voxel_if_empty, patch_starts, top_fraction_mean
from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.nets.patch_embedding import PatchEmbedding
from medanomaly.training.engine import (
    Engine,
    EngineConfig,
    TrainingData,
    TrainingTask,
    resolve_precision,
    scoring_network,
    seeded,
    split_indices,
)

log = logging.getLogger(__name__)

DEFAULT_RECONSTRUCTOR = {"name": "cae"}
EMBEDDING_STAGE = "embedding"
SCORE_SOURCES = ("raw", "zscore")
PATCH_VOXELS_PER_BATCH = 2**20  # patch voxels per forward pass of the embedding network
PATCH_VOXELS_PER_CHUNK = 2**25  # patch voxels cut out of one chunk of images
VALIDATION_SEED_OFFSET = 7919
_CONV_T = {2: functional.conv_transpose2d, 3: functional.conv_transpose3d}


# -- patch geometry ---------------------------------------------------------------------------
def as_shape(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int (same side on every axis) or one int per axis, as a tuple of positive ints.

    Raises:
        ConfigError: If the value has the wrong length or a side below 1.
    """
    sides = [value] * spatial_dims if isinstance(value, int | np.integer) else list(value)
    if len(sides) != spatial_dims or any(int(s) < 1 for s in sides):
        raise ConfigError(
            f"patch_discriminator: {name} must be a positive int or {spatial_dims} positive "
            f"ints, got {value!r}"
        )
    return tuple(int(s) for s in sides)


def clip_patch_shape(
    patch_shape: tuple[int, ...], stride: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Clip the patch (and the stride with it) to the image grid, logging what changed."""
    clipped = tuple(min(p, s) for p, s in zip(patch_shape, spatial, strict=True))
    if clipped != patch_shape:
        log.warning(
            "patch_discriminator: patch_size %s is larger than the images %s; using patches "
            "of %s (a side equal to the image side leaves one position along that axis)",
            patch_shape,
            spatial,
            clipped,
        )
    return clipped, tuple(min(s, p) for s, p in zip(stride, clipped, strict=True))


def extract_patches(
    images: torch.Tensor, patch_shape: tuple[int, ...], starts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Patches ``(B, P, C, *patch_shape)`` at every combination of ``starts`` (row-major).

    Uses :meth:`torch.Tensor.unfold` (a view) per axis, then keeps the wanted windows.
    """
    dims = len(patch_shape)
    view = images
    for axis, (size, index) in enumerate(zip(patch_shape, starts, strict=True)):
        view = view.unfold(2 + axis, size, 1).index_select(2 + axis, index)
    # (B, C, n_1..n_d, p_1..p_d) -> (B, n_1..n_d, C, p_1..p_d)
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    view = view.permute(order)
    return view.reshape(images.shape[0], -1, images.shape[1], *patch_shape)


def spread_to_grid(
    values: torch.Tensor,
    starts: Sequence[torch.Tensor],
    patch_shape: tuple[int, ...],
    spatial: tuple[int, ...],
) -> torch.Tensor:
    """Per-window values ``(B, n_1, ..., n_d)`` -> per-voxel mean over covering windows.

    Each window's value is placed at its first voxel on a grid of window origins and summed
    over the window by a transposed convolution with a kernel of ones (the ``fold`` of
    :func:`torch.nn.functional.fold`, in 2D and 3D); dividing by the same sum of ones gives
    the mean over the windows that cover each voxel.
    """
    origins = [side - patch + 1 for side, patch in zip(spatial, patch_shape, strict=True)]
    index = torch.meshgrid(*starts, indexing="ij")
    grid = values.new_zeros(values.shape[0], *origins)
    grid[(slice(None), *index)] = values
    ones = torch.zeros_like(grid[:1])
    ones[(slice(None), *index)] = 1.0
    kernel = values.new_ones(1, 1, *patch_shape)
    transpose = _CONV_T[len(spatial)]
    sums = transpose(grid.unsqueeze(1), kernel)[:, 0]
    counts = transpose(ones.unsqueeze(1), kernel)[:, 0]
    return sums / counts


def foreground_of(images: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean foreground ``(B, *spatial)``: some channel above ``threshold``, holes filled.

    Enclosed holes are filled (:func:`scipy.ndimage.binary_fill_holes`) so that dark lesions
    inside the body stay in the foreground. Every voxel counts with ``threshold=None``, and
    for an image without any voxel above the threshold.
    """
    shape = (images.shape[0], *images.shape[2:])
    if threshold is None:
        return torch.ones(shape, dtype=torch.bool, device=images.device)
    above = (images > threshold).any(dim=1).cpu().numpy()
    filled = np.stack([ndimage.binary_fill_holes(mask) for mask in above])
    filled[~filled.reshape(len(filled), -1).any(axis=1)] = True
    return torch.from_numpy(filled).to(images.device)


def zscore_maps(maps: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Per-image z-score with the mean and population SD of the foreground voxels.

    Background voxels get the foreground minimum. A constant map (SD at float precision
    of zero) becomes all zeros. An empty foreground counts as every voxel.
    """
    flat = maps.flatten(1).double()
    weight = every_voxel_if_empty(foreground).flatten(1).double()
    count = weight.sum(dim=1, keepdim=True)
    mean = (flat * weight).sum(dim=1, keepdim=True) / count
    sd = (((flat - mean) ** 2 * weight).sum(dim=1, keepdim=True) / count).sqrt()
    flat_sd = sd <= 1e-6 * mean.abs().clamp_min(1e-12)
    z = (flat - mean) / torch.where(flat_sd, torch.ones_like(sd), sd)
    z = torch.where(flat_sd, torch.zeros_like(z), z)
    inside = weight.bool()
    floor = z.masked_fill(~inside, math.inf).min(dim=1, keepdim=True).values
    return torch.where(inside, z, floor).float().view_as(maps)


# -- triplets ---------------------------------------------------------------------------------
class TripletPatches(Dataset):
    """Triplets (anchor, positive, negative) of patches of normal images, for metric learning.

    Item ``i`` uses image ``i % N`` and draws everything from a generator seeded by
    ``(seed, i)``, so a triplet depends only on the seed and its index (reproducible under
    any sampler order and in any DataLoader worker); the engine calls :meth:`reseed` before
    every epoch, so each epoch sees new triplets.

    Args:
        images: Normal images ``(N, C, *spatial)``.
        patch_shape: Spatial shape of the patches (at most the image shape).
        max_shift: The positive is the anchor's window shifted by up to this many voxels
            along each axis (clipped to the image).
        intensity_scale: The positive's intensities are multiplied by a factor drawn from
            ``[1 - intensity_scale, 1 + intensity_scale]``.
        intensity_offset: ... and shifted by an offset drawn from ``[-offset, offset]``.
        blur_sigma: ... and smoothed by a Gaussian whose SD (voxels) is drawn from
            ``[0, blur_sigma]`` (0: never).
        negative_min_distance: A negative from the anchor's image starts at least this many
            voxels away along some axis.
        negative_other_image: Probability that the negative comes from another image (at a
            random position). Where an image has no position far enough from the anchor,
            the negative always comes from another image.
        triplets_per_image: Items per image (the dataset has ``N * triplets_per_image``).
        seed: Seed of the first epoch (and of a validation set, which is never reseeded).

    Raises:
        ConfigError: If no negative can be drawn (one image with a single position).
    """

    def __init__(
        self,
        images: np.ndarray,
        patch_shape: tuple[int, ...],
        max_shift: int = 3,
        intensity_scale: float = 0.1,
        intensity_offset: float = 0.05,
        negative_min_distance: int = 16,
        negative_other_image: float = 0.0,
        triplets_per_image: int = 16,
        seed: int = 0,
        blur_sigma: float = 0.0,
    ) -> None:
        self.images = np.asarray(images, dtype=np.float32)
        self.patch_shape = tuple(patch_shape)
        self.limits = np.asarray(self.images.shape[2:]) - np.asarray(self.patch_shape)
        if (self.limits < 0).any():
            raise ConfigError(
                f"patches {self.patch_shape} do not fit images {self.images.shape[2:]}"
            )
        self.max_shift = max_shift
        self.intensity_scale = intensity_scale
        self.intensity_offset = intensity_offset
        self.blur_sigma = blur_sigma
        self.negative_min_distance = negative_min_distance
        self.negative_other_image = negative_other_image
        self.triplets_per_image = triplets_per_image
        self.seed = seed
        self.same_image_negatives = int(self.limits.max()) >= negative_min_distance
        if not self.same_image_negatives and len(self.images) < 2:
            raise ConfigError(
                "patch_discriminator: the patches cover the image, so negatives must come "
                "from other images, but there is only one training image; use more images "
                "or a smaller patch_size"
            )

    def __len__(self) -> int:
        return len(self.images) * self.triplets_per_image

    def reseed(self, seed: int) -> None:
        """Draw the next epoch's triplets from ``seed`` (the engine calls this per epoch)."""
        self.seed = int(seed)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Return the triplet ``(3, C, *patch_shape)``: anchor, positive, negative."""
        rng = np.random.default_rng([self.seed, int(index)])
        image = int(index) % len(self.images)
        start = self._random_start(rng)
        anchor = self._crop(image, start)
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=len(start))
        scale = rng.uniform(1.0 - self.intensity_scale, 1.0 + self.intensity_scale)
        offset = rng.uniform(-self.intensity_offset, self.intensity_offset)
        positive = self._crop(image, np.clip(start + shift, 0, self.limits)) * scale + offset
        if self.blur_sigma > 0:
            sigma = rng.uniform(0.0, self.blur_sigma)
            positive = ndimage.gaussian_filter(positive, (0.0,) + (sigma,) * len(start))
        negative = self._crop(*self._negative(rng, image, start))
        return torch.from_numpy(np.stack([anchor, positive, negative]).astype(np.float32))

    def _random_start(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.limits + 1)

    def _crop(self, image: int, start: np.ndarray) -> np.ndarray:
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_shape, strict=True))
        return self.images[(image, slice(None), *window)]

    def _negative(
        self, rng: np.random.Generator, image: int, start: np.ndarray
    ) -> tuple[int, np.ndarray]:
        """Image and start of the negative patch."""
        other = not self.same_image_negatives or rng.random() < self.negative_other_image
        if other and len(self.images) > 1:
            return (image + int(rng.integers(1, len(self.images)))) % len(self.images), (
                self._random_start(rng)
            )
        for _ in range(100):
            candidate = self._random_start(rng)
            if np.abs(candidate - start).max() >= self.negative_min_distance:
                return image, candidate
        # rare (anchor in the middle of a small image): the farthest corner along each axis
        return image, np.where(start * 2 <= self.limits, self.limits, 0)


# -- the detector -----------------------------------------------------------------------------
@register("patch_discriminator")
class PatchDiscriminator(BaseDetector):
    """Reconstructor + patch embedding network; map = embedding distance, z-scored per image.

    Args:
        reconstructor: ``model:`` block of the reconstruction model, e.g. ``{name: vae,
            latent_dim: 64}`` (default ``{name: cae}``); any registered model whose
            ``detect`` returns reconstructions (cae, vae, ssae, fanogan, dagmm, introvae...).
        spatial_dims: 2 or 3, passed to the reconstructor unless its block sets it.
        in_channels: Image channels, passed on likewise.
        patch_size: Side of the patches (Kobayashi et al. 2020: 32), or one side per axis. Larger
            than the
            images: clipped to them (logged).
        stride: Step between patch positions of the map, at most ``patch_size`` (Kobayashi et al.
            2020
            scores every pixel, i.e. stride 1; the cost grows as ``1 / stride ** dims``).
        channels: Filters of the embedding network's residual blocks (Kobayashi et al. 2020: 64,
            128,
            256, 512; the default is 4 times narrower for CPUs, see
            :data:`~medanomaly.nets.patch_embedding.SEED_002_WIDTHS`).
        hidden_dim: Hidden units of its MLP (Kobayashi et al. 2020: 1024).
        embedding_dim: Embedding size (Kobayashi et al. 2020: 256).
        margin: Margin of the triplet loss (Kobayashi et al. 2020: 1).
        max_shift: Largest shift (voxels per axis) between anchor and positive.
        intensity_scale: Largest relative intensity scaling of the positive.
        intensity_offset: Largest intensity offset of the positive.
        positive_blur: Largest SD (voxels) of a Gaussian blur of the positive (0: none, as
            Kobayashi et al. 2020). Reconstructions are smoother than the images; a blur-invariant
            embedding measures what differs in content rather than in sharpness.
        negative_min_distance: Smallest distance (voxels, along some axis) between the
            anchor and a negative from the same image; ``None``: half the patch side.
        negative_other_image: Probability of drawing the negative from another image
            (Kobayashi et al. 2020: 0, negatives are cropped from the same image).
        triplets_per_image: Triplets per training image and epoch.
        foreground_threshold: Voxels whose value (in every channel) is at most this, and
            that are not enclosed by the rest, are background: left out of the z-score
            statistics and of the score, and set to the foreground minimum in the map.
            ``None``: every voxel counts.
        top_fraction: Share of the foreground voxels averaged into the image score.
        score_from: ``raw`` (the distance map, keeps the between-image level) or ``zscore``
            (the z-scored map).
        threshold_sd: ``k`` of the threshold mean + k * SD of normal validation scores.
        engine: Training settings of the embedding network, and the base of the
            reconstructor's (an ``engine`` entry in its block is merged onto them).
    """

    export_refusal = "it compares patch embeddings of the image and its reconstruction in NumPy"

    streams = False  # reads its training set into memory to cut triplet patches

    def __init__(
        self,
        reconstructor: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        patch_size: int | Sequence[int] = 32,
        stride: int | Sequence[int] = 8,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_dim: int = 256,
        embedding_dim: int = 64,
        margin: float = 1.0,
        max_shift: int = 3,
        intensity_scale: float = 0.1,
        intensity_offset: float = 0.05,
        positive_blur: float = 0.0,
        negative_min_distance: int | None = None,
        negative_other_image: float = 0.0,
        triplets_per_image: int = 16,
        foreground_threshold: float | None = None,
        top_fraction: float = 0.01,
        score_from: str = "raw",
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        self.reconstructor = reconstructor
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.stride = stride
        self.channels = channels
        self.hidden_dim = hidden_dim
        self.embedding_dim = embedding_dim
        self.margin = margin
        self.max_shift = max_shift
        self.intensity_scale = intensity_scale
        self.intensity_offset = intensity_offset
        self.positive_blur = positive_blur
        self.negative_min_distance = negative_min_distance
        self.negative_other_image = negative_other_image
        self.triplets_per_image = triplets_per_image
        self.foreground_threshold = foreground_threshold
        self.top_fraction = top_fraction
        self.score_from = score_from
        self.threshold_sd = threshold_sd
        self.engine = engine

    # -- settings ---------------------------------------------------------------------------
    @property
    def engine_config(self) -> EngineConfig:
        """The resolved training settings of the embedding network."""
        return EngineConfig.from_any(self.engine)

    def reconstructor_block(self) -> dict[str, Any]:
        """The reconstructor's full ``model:`` block, with the inherited settings filled in."""
        inherited = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "engine": self.engine_config.to_dict(),
        }
        block = self.reconstructor or DEFAULT_RECONSTRUCTOR
        return nested_block(block, self.name, "the 'reconstructor' block", inherited)

    def _build_reconstructor(self) -> BaseDetector:
        return build_nested(self.reconstructor_block(), self.name, "reconstructor")

    def _check_settings(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of range."""
        patch = as_shape(self.patch_size, self.spatial_dims, "patch_size")
        stride = as_shape(self.stride, self.spatial_dims, "stride")
        if any(s > p for s, p in zip(stride, patch, strict=True)):
            raise ConfigError(
                f"patch_discriminator: stride {stride} is larger than patch_size {patch}; "
                "voxels between the patches would get no value"
            )
        if self.score_from not in SCORE_SOURCES:
            raise ConfigError(
                f"patch_discriminator: score_from must be one of {SCORE_SOURCES}, "
                f"got {self.score_from!r}"
            )
        checks = {
            "top_fraction must lie in (0, 1]": 0.0 < self.top_fraction <= 1.0,
            "margin must be positive": self.margin > 0,
            "max_shift must be >= 0": self.max_shift >= 0,
            "triplets_per_image must be >= 1": self.triplets_per_image >= 1,
            "negative_other_image must lie in [0, 1]": 0.0 <= self.negative_other_image <= 1.0,
            "intensity_scale must lie in [0, 1)": 0.0 <= self.intensity_scale < 1.0,
            "positive_blur must be >= 0": self.positive_blur >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(f"patch_discriminator: {message}")

    def _resolve_geometry(self, spatial: tuple[int, ...]) -> None:
        """Set ``patch_shape_`` and ``stride_`` for images of ``spatial`` shape."""
        patch = as_shape(self.patch_size, self.spatial_dims, "patch_size")
        stride = as_shape(self.stride, self.spatial_dims, "stride")
        self.patch_shape_, self.stride_ = clip_patch_shape(patch, stride, spatial)

    def _triplets(self, images: np.ndarray, seed: int) -> TripletPatches:
        distance = self.negative_min_distance
        if distance is None:
            distance = max(1, max(self.patch_shape_) // 2)
        return TripletPatches(
            images,
            self.patch_shape_,
            self.max_shift,
            self.intensity_scale,
            self.intensity_offset,
            distance,
            self.negative_other_image,
            self.triplets_per_image,
            seed,
            self.positive_blur,
        )

    def build_network(self) -> PatchEmbedding:
        """The embedding network for patches of ``patch_shape_``."""
        return PatchEmbedding(
            self.spatial_dims,
            self.patch_shape_,
            self.in_channels,
            tuple(self.channels),
            self.hidden_dim,
            self.embedding_dim,
        )

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet | np.ndarray | torch.Tensor,
        val: ImageSet | np.ndarray | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> PatchDiscriminator:
        """Fit the reconstructor, then the embedding network, on normal images.

        Args:
            train: Normal training images ``(N, C, *spatial)``; images of an ``ImageSet``
                labelled abnormal are left out.
            val: Validation images: the reconstructor validates on them, the embedding
                network on triplets of their normal images, and the threshold comes from the
                scores of their normal images. ``None`` holds out ``engine.val_fraction`` of
                ``train`` (the same images for both networks).
            run_dir: The reconstructor keeps its run in ``run_dir/reconstructor_<name>``; the
                embedding network writes ``checkpoint_embedding.safetensors`` and
                ``history_embedding.csv``; the fitted detector goes to
                ``run_dir/model.safetensors``.
            resume: Continue an interrupted run (a finished reconstructor is loaded).

        Returns:
            ``self``, fitted.
        """
        self._check_settings()
        cfg = self.engine_config
        train_set, val_set = self._split(train, val, cfg)
        self._check_channels(train_set)
        self._resolve_geometry(tuple(train_set.images.shape[2:]))
        self.run_config_ = self._run_config(run_dir)
        reconstructor = self._fit_reconstructor(train_set, val_set, run_dir, resume)
        self.reconstructor_ = reconstructor
        val_normal = val_set.subset(val_set.labels != 1)
        with seeded(cfg.seed):
            network = self.build_network()
        engine = Engine(cfg)
        self.history_ = engine.fit(
            self._task(network),
            self._triplet_data(train_set, val_normal, cfg.seed),
            run_dir=run_dir,
            resume=resume,
            extra_state=self.config(),
            stage=EMBEDDING_STAGE,
        )
        self.network_ = inference_network(network, self.spatial_dims)
        self.input_shape_ = tuple(train_set.images.shape[1:])
        self.is_main_process_ = engine.is_global_zero and reconstructor.is_main_process_
        self._set_threshold(val_normal if len(val_normal) else train_set)
        if run_dir is not None and self.is_main_process_:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def _split(self, train: Any, val: Any, cfg: EngineConfig) -> tuple[ImageSet, ImageSet]:
        train_set = as_image_set(train, self.spatial_dims)
        if (train_set.labels == 1).any():
            log.info("fit: leaving out %d images labelled abnormal", int(train_set.labels.sum()))
            train_set = train_set.subset(train_set.labels != 1, keep_augment=True)
        if len(train_set) == 0:
            raise ConfigError("patch_discriminator: no normal training images")
        if val is None:
            keep, held = split_indices(len(train_set), cfg.val_fraction, cfg.seed, cfg.val_min)
            return train_set.subset(keep, keep_augment=True), train_set.subset(held)
        return train_set, as_image_set(val, self.spatial_dims)

    def _check_channels(self, images: ImageSet) -> None:
        channels = images.images.shape[1]
        if channels != self.in_channels:
            raise InvalidImageError(
                "<input>", f"images have {channels} channels, the model expects {self.in_channels}"
            )

    def _fit_reconstructor(
        self, train: ImageSet, val: ImageSet, run_dir: str | Path | None, resume: bool
    ) -> BaseDetector:
        reconstructor = self._build_reconstructor()
        folder = None if run_dir is None else Path(run_dir) / f"reconstructor_{reconstructor.name}"
        return fit_or_load(reconstructor, train, val, folder, resume)

    def _triplet_data(self, train: ImageSet, val_normal: ImageSet, seed: int) -> TrainingData:
        training = self._triplets(train.images, seed)
        validation = None
        if len(val_normal) > 1 or (len(val_normal) == 1 and training.same_image_negatives):
            validation = self._triplets(val_normal.images, seed + VALIDATION_SEED_OFFSET)
        else:
            log.info(
                "patch_discriminator: %d normal validation image(s) cannot give triplets with "
                "patches of %s; the embedding epochs are ranked by the training loss",
                len(val_normal),
                self.patch_shape_,
            )
        return TrainingData(training, validation, None)

    def _task(self, network: nn.Module) -> TrainingTask:
        criterion = nn.TripletMarginLoss(margin=self.margin, p=2.0, reduction="none")

        def losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            embedded = model(batch.flatten(0, 1)).view(batch.shape[0], 3, -1).float()
            return criterion(embedded[:, 0], embedded[:, 1], embedded[:, 2])

        return TrainingTask(
            network=network, loss=lambda model, batch: losses(model, batch).mean(), score=losses
        )

    def _set_threshold(self, normal: ImageSet) -> None:
        self._learn_threshold(self._run(normal, keep_maps=False)[0])

    # -- inference --------------------------------------------------------------------------
    def detect(self, x: ImageSet | np.ndarray | torch.Tensor) -> AnomalyResult:
        """Scores, z-scored maps, labels and the reconstructor's reconstructions."""
        self.check_fitted()
        scores, maps, _, recons = self._run(x, keep_maps=True)
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=maps,
            reconstructions=recons,
            threshold=self.threshold_,
        )

    def score(self, x: ImageSet | np.ndarray | torch.Tensor) -> np.ndarray:
        """One anomaly score per image (no maps kept in memory)."""
        self.check_fitted()
        return self._run(x, keep_maps=False)[0]

    def distance_maps(
        self, x: ImageSet | np.ndarray | torch.Tensor, reconstructions: np.ndarray | None = None
    ) -> np.ndarray:
        """The raw (not z-scored) embedding-distance maps ``(N, *spatial)``.

        ``reconstructions``: compare with these instead of the reconstructor's.
        """
        return self.patch_maps(x, reconstructions)[2]

    def patch_maps(
        self, x: ImageSet | np.ndarray | torch.Tensor, reconstructions: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores, z-scored maps and raw distance maps in one pass.

        ``reconstructions``: compare with these instead of the reconstructor's.
        """
        self.check_fitted()
        recons = None if reconstructions is None else np.asarray(reconstructions, np.float32)
        scores, z, raw, _ = self._run(x, keep_maps=True, reconstructions=recons)
        return scores, z, raw

    def detect_reconstructed(
        self, x: ImageSet | np.ndarray | torch.Tensor, reconstructions: np.ndarray
    ) -> AnomalyResult:
        """Like :meth:`detect`, against reconstructions made elsewhere.

        The embedding network is trained on normal patches only and never sees a
        reconstruction, so one trained detector can compare images with the reconstructions
        of another model or of a latent search (Kobayashi et al. 2020 pairs its patch discriminator
        with
        VAE, IntroVAE and IntroVAE + latent search).

        Args:
            x: Images ``(N, C, *spatial)`` of the training shape.
            reconstructions: Their reconstructions, the same shape.

        Returns:
            Scores, z-scored maps, labels at the detector's threshold and the given
            reconstructions (``distance_maps(x, reconstructions)``: the raw maps).
        """
        recons = np.asarray(reconstructions, dtype=np.float32)
        scores, maps, _ = self.patch_maps(x, recons)
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=maps,
            reconstructions=recons,
            threshold=self.threshold_,
        )

    def _run(
        self, x: Any, keep_maps: bool, reconstructions: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Scores, z-scored maps, raw maps and reconstructions, in chunks of images.

        ``reconstructions`` given: used instead of the reconstructor's.
        """
        images = as_image_set(x, self.spatial_dims)
        self._check_shape(images)
        if len(images) == 0:
            raise InvalidImageError("<input>", "no images to score")
        if reconstructions is not None and reconstructions.shape != images.images.shape:
            raise InvalidImageError(
                images.ids[0] if images.ids else "<input>",
                f"reconstructions have shape {reconstructions.shape}, the images "
                f"{images.images.shape}",
            )
        step = self._chunk_size(tuple(images.images.shape[1:]))
        parts = [
            self._score_chunk(
                images.images[start : start + step],
                keep_maps,
                None if reconstructions is None else reconstructions[start : start + step],
            )
            for start in range(0, len(images), step)
        ]
        scores = np.concatenate([part[0] for part in parts]).astype(np.float64)
        if not keep_maps:
            return scores, None, None, None
        z, raw, recons = (np.concatenate([part[i] for part in parts]) for i in (1, 2, 3))
        return scores, z, raw, recons

    def _chunk_size(self, shape: tuple[int, ...]) -> int:
        """Images per chunk, bounded by their voxels and by the voxels of their patches.

        At most ``INFERENCE_VOXELS`` image voxels and ``PATCH_VOXELS_PER_CHUNK`` voxels of
        cut-out patches (the bound that matters with a small stride); at least one image.
        """
        positions = math.prod(
            len(patch_starts(side, patch, step))
            for side, patch, step in zip(shape[1:], self.patch_shape_, self.stride_, strict=True)
        )
        patch_voxels = positions * shape[0] * math.prod(self.patch_shape_)
        by_image = INFERENCE_VOXELS // max(math.prod(shape), 1)
        return max(1, min(by_image, PATCH_VOXELS_PER_CHUNK // max(patch_voxels, 1)))

    def _check_shape(self, images: ImageSet) -> None:
        if tuple(images.images.shape[1:]) != self.input_shape_:
            raise InvalidImageError(
                images.ids[0] if images.ids else "<input>",
                f"image shape {tuple(images.images.shape[1:])} differs from the training "
                f"shape {self.input_shape_}; apply the same preprocessing as for training",
            )

    def _reconstruct(self, chunk: np.ndarray) -> np.ndarray:
        """The reconstructor's reconstructions of ``chunk``, checked."""
        recons = self.reconstructor_.detect(chunk).reconstructions
        if recons is None:
            raise ConfigError(
                f"patch_discriminator: the reconstructor {self.reconstructor_.name!r} returns "
                "no reconstructions; use a reconstruction model (cae, vae, ssae, fanogan, ...)"
            )
        recons = np.asarray(recons, dtype=np.float32)
        if recons.shape != chunk.shape:
            raise ConfigError(
                f"patch_discriminator: reconstructions have shape {recons.shape[1:]}, the "
                f"images {chunk.shape[1:]}"
            )
        return recons

    def _score_chunk(
        self, chunk: np.ndarray, keep_maps: bool, recons: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """Scores (and z-scored maps, raw maps, reconstructions) of a chunk of images."""
        if recons is None:
            recons = self._reconstruct(chunk)
        device = next(self.network_.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
        raw = self.raw_maps(x, torch.from_numpy(recons).to(device))
        foreground = foreground_of(x, self.foreground_threshold)
        z = zscore_maps(raw, foreground)
        source = raw if self.score_from == "raw" else z
        scores = top_fraction_mean(source, foreground, self.top_fraction).cpu().numpy()
        if not keep_maps:
            return (scores,)
        return scores, z.cpu().numpy(), raw.cpu().numpy(), recons

    def raw_maps(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Embedding distance between patches of ``x`` and ``reconstruction`` per voxel.

        Args:
            x: Images ``(B, C, *spatial)`` on the network's device.
            reconstruction: Their reconstructions, same shape.

        Returns:
            The raw distance maps ``(B, *spatial)`` (mean over the windows covering a voxel).
        """
        spatial = tuple(x.shape[2:])
        starts = [
            torch.as_tensor(patch_starts(side, patch, step), device=x.device)
            for side, patch, step in zip(spatial, self.patch_shape_, self.stride_, strict=True)
        ]
        distances = self._patch_distances(
            extract_patches(x.float(), self.patch_shape_, starts),
            extract_patches(reconstruction.float(), self.patch_shape_, starts),
        )
        grid = distances.view(x.shape[0], *(len(s) for s in starts))
        return spread_to_grid(grid, starts, self.patch_shape_, spatial)

    def _patch_distances(self, patches: torch.Tensor, recon_patches: torch.Tensor) -> torch.Tensor:
        """L2 distances ``(B, P)`` between the embeddings of matching patches."""
        batch, positions = patches.shape[:2]
        flat = patches.flatten(0, 1)
        flat_recon = recon_patches.flatten(0, 1)
        step = max(1, PATCH_VOXELS_PER_BATCH // max(flat[0].numel(), 1))
        distances = []
        self.network_.eval()
        network = scoring_network(self.network_, self.engine_config)
        with torch.inference_mode():
            for start in range(0, len(flat), step):
                a = network(flat[start : start + step]).float()
                b = network(flat_recon[start : start + step]).float()
                distances.append(torch.linalg.vector_norm(a - b, dim=1))
        return torch.cat(distances).view(batch, positions)

    # -- persistence ------------------------------------------------------------------------
    def resolved_settings(self) -> dict[str, Any]:
        """The precision the embedding network trains in on this machine."""
        return {"precision": resolve_precision(self.engine_config)}

    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name, reconstructor, ...}, engine: {...}}``."""
        params = {k: yaml_plain(v) for k, v in self.get_params().items() if k != "engine"}
        params["reconstructor"] = yaml_plain(dict(self.reconstructor or DEFAULT_RECONSTRUCTOR))
        return {"model": {"name": self.name, **params}, "engine": self.engine_config.to_dict()}

    def saved_state(self) -> dict[str, Any]:
        """Constructor arguments, the reconstructor's saved state and the embedding weights."""
        params = self.config()["model"]
        params.pop("name")
        return {
            "model": self.name,
            "params": {**params, "engine": self.engine_config.to_dict()},
            "config": getattr(self, "run_config_", None) or self.config(),
            "version": __version__,
            "reconstructor": self.reconstructor_.saved_state(),
            "state_dict": {k: v.cpu() for k, v in self.network_.state_dict().items()},
            "input_shape": list(self.input_shape_),
            "patch_shape": list(self.patch_shape_),
            "stride": list(self.stride_),
            **self._threshold_state(),
            "history": getattr(self, "history_", []),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        state = saved["reconstructor"]
        reconstructor = get_model_class(state["model"])(**state["params"])
        reconstructor._restore(state)
        self.reconstructor_ = reconstructor
        self.input_shape_ = tuple(saved["input_shape"])
        self.patch_shape_ = tuple(saved["patch_shape"])
        self.stride_ = tuple(saved["stride"])
        network = self.build_network()
        network.load_state_dict(saved["state_dict"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.network_ = inference_network(network.to(device), self.spatial_dims)
        self._restore_threshold(saved)
        self.history_ = saved.get("history", [])
        self.run_config_ = saved.get("config", {})


def yaml_plain(value: Any) -> Any:
    """Tuples -> lists and NumPy scalars -> Python values (YAML-friendly), recursively."""
    if isinstance(value, tuple | list):
        return [yaml_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value

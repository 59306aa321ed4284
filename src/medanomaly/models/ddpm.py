"""Denoising diffusion model as an anomaly detector (Ho et al. 2020; Wyatt et al. 2022).

A diffusion model learns, on normal images only, to predict the noise that was mixed into
an image at any level ``t`` of a noise schedule (MONAI's ``DiffusionModelUNet`` and
``DDPMScheduler``). To score an image it is noised part of the way, to level ``t0``, and
denoised back in ``ddim_steps`` deterministic DDIM steps (Song et al. 2021): the model can only
bring back what normal anatomy looks like, so it "heals" a lesion, and the anomaly map is
the residual |x - x̂| inside the foreground (eroded, median-filtered as for ``dae``).

Choices the literature made, all arguments here:

- ``noise``: ``gaussian`` (Ho et al. 2020), ``simplex`` (Wyatt et al. 2022, AnoDDPM: smooth
  multi-scale noise that hides large lesions) or ``coarse`` (the DAE's lattice, Kascenas et
  al. 2022), used alike in training and scoring.
- ``t0`` may list several levels and ``noise_draws`` several noise draws; the maps of all are
  averaged (Graham et al. 2023 score reconstructions from several noise levels).
- ``patched``: noise and denoise one patch at a time, the rest of the image kept clean as
  context, and stitch the map from the patches (Behrendt et al. 2023, pDDPM); training then
  noises one random patch per image and takes the loss inside it.

Scoring draws its noise from a generator seeded with ``noise_seed``, one field per draw shared
by every image, so that scores are reproducible and do not depend on how images are batched.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.noise import (
    NOISE_KINDS,
    SIMPLEX_OCTAVES,
    SIMPLEX_PERSISTENCE,
    unit_noise,
)
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import (
    SCORE_REDUCTIONS,
    SIGNED_RESIDUALS,
    erode_mask,
    foreground_mask,
    median_filter,
    reduce_inside,
    signed_residual,
)
from medanomaly.errors import ConfigError, check_choice
from medanomaly.training.engine import EngineConfig
from medanomaly.training.layout import layout_of, to_layout

CPU_CHANNELS = (16, 32, 64, 64)
"""Widths of the CPU-sized network (Wyatt et al. 2022 and Behrendt et al. 2023: 128 and up)."""
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
PREDICTIONS = ("epsilon", "sample")
LOSSES = ("l2", "l1")


@register("ddpm")
class DiffusionDetector(DeepDetector):
    """Diffusion model healing noised images; the map is the residual of the healed image.

    Trained on normal images to predict the noise mixed in at random levels; to score, an
    image is noised to ``t0`` and healed back in ``ddim_steps`` deterministic DDIM steps; the
    map is |x - x̂| averaged over every ``t0`` and noise draw, kept inside the eroded
    foreground and median-filtered; the score is its 99th percentile (``score_reduce``).
    Scoring costs ``len(t0) * noise_draws * ddim_steps`` network calls per image (times the
    patches with ``patched``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (all are noised and denoised).
        channels: Widths of the U-Net's levels (each level but the last halves the grid).
        num_res_blocks: Residual blocks per level.
        norm_groups: Group-normalisation groups (every width must be divisible by it).
        attention_levels: Self-attention at each level (``None``: none; MONAI's middle block
            always has one).
        timesteps: Levels of the noise schedule (Ho et al. 2020: 1000).
        schedule: MONAI's beta schedule: ``linear_beta`` (Ho et al. 2020), ``scaled_linear_beta``,
            ``sigmoid_beta`` or ``cosine``.
        noise: ``gaussian``, ``simplex`` (Wyatt et al. 2022) or ``coarse`` (Kascenas et al.
            2022); each field is scaled to SD 1 and used as the forward-process noise.
        noise_grid: Lattice points (``coarse``) or cycles of the coarsest octave (``simplex``)
            per side; ``None``: 16 and 4.
        noise_octaves: Simplex octaves (Wyatt et al.: 6; octaves finer than 2 voxels per cycle
            are left out).
        noise_persistence: Weight ratio of successive simplex octaves (Wyatt et al.: 0.8).
        prediction: What the network predicts: ``epsilon``, the noise (Ho et al. 2020), or
            ``sample``, the clean image (Behrendt et al. 2023); healing uses either.
        loss_norm: Training loss of that prediction: ``l2`` (Ho et al. 2020) or ``l1`` (Behrendt
            et al. 2023).
        train_t_max: Train on levels 1 to this (``None``: every level); scoring never goes above
            the largest ``t0``, so a smaller model may spend its capacity there.
        t0: Level (0 to ``timesteps``) the image is noised to before denoising, or a list of
            levels whose maps are averaged (Graham et al. 2023); 0 returns the input.
        ddim_steps: DDIM steps from ``t0`` back to a clean image (network calls per draw).
        noise_draws: Noise draws per level whose maps are averaged.
        noise_seed: Seed of the scoring noise (and of the validation loss's draws).
        patched: Noise and denoise one patch at a time with the rest of the image as context
            (Behrendt et al. 2023); the map is stitched from the patches.
        patch_size: Side of the patches (``None``: half the image side, rounded up); scoring
            tiles the image with a grid of them, each voxel in exactly one patch.
        foreground_threshold: Voxels with any channel above it are foreground (where the map is
            read and the score taken); ``None``: every voxel.
        erode: The map is kept only inside the foreground eroded by this many voxels.
        median_size: Width of the median filter of the map; ``None``: 5 in 2D, 3 in 3D.
        residual: ``abs`` (|x - x̂|), ``positive`` (only what is brighter than the healed
            image) or ``negative``.
        score_reduce: Image score from the map inside the eroded foreground: ``percentile``,
            ``top``, ``sum``, ``mean`` or ``max``.
        score_value: The percentile (0-100) or share (0-1).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
        map_score: Score from the standardised, smoothed map instead (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps ``score_reduce``.
    """

    scores_any_size = True  # convolutional: images of another size are padded to the grid

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = CPU_CHANNELS,
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        attention_levels: Sequence[bool] | None = None,
        timesteps: int = 1000,
        schedule: str = "linear_beta",
        noise: str = "gaussian",
        noise_grid: int | None = None,
        noise_octaves: int = SIMPLEX_OCTAVES,
        noise_persistence: float = SIMPLEX_PERSISTENCE,
        prediction: str = "epsilon",
        loss_norm: str = "l2",
        train_t_max: int | None = None,
        t0: int | Sequence[int] = 250,
        ddim_steps: int = 5,
        noise_draws: int = 1,
        noise_seed: int = 0,
        patched: bool = False,
        patch_size: int | None = None,
        foreground_threshold: float | None = None,
        erode: int = 2,
        median_size: int | None = None,
        residual: str = "abs",
        score_reduce: str = "percentile",
        score_value: float = 99.0,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.norm_groups = norm_groups
        self.attention_levels = attention_levels
        self.timesteps = timesteps
        self.schedule = schedule
        self.noise = noise
        self.noise_grid = noise_grid
        self.noise_octaves = noise_octaves
        self.noise_persistence = noise_persistence
        self.prediction = prediction
        self.loss_norm = loss_norm
        self.train_t_max = train_t_max
        self.t0 = t0
        self.ddim_steps = ddim_steps
        self.noise_draws = noise_draws
        self.noise_seed = noise_seed
        self.patched = patched
        self.patch_size = patch_size
        self.foreground_threshold = foreground_threshold
        self.erode = erode
        self.median_size = median_size
        self.residual = residual
        self.score_reduce = score_reduce
        self.score_value = score_value

    # -- network --------------------------------------------------------------------------
    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """MONAI's ``DiffusionModelUNet``, image channels in, predicted noise out."""
        from monai.networks.nets import DiffusionModelUNet  # heavy: only when a model is built

        self._check_settings()
        channels = tuple(int(c) for c in self.channels)
        attention = self.attention_levels or (False,) * len(channels)
        if len(attention) != len(channels):
            raise ConfigError(
                f"ddpm: attention_levels needs one entry per level of channels {list(channels)}"
            )
        if any(c % self.norm_groups for c in channels):
            raise ConfigError(
                f"ddpm: every width of channels {list(channels)} must be divisible by "
                f"norm_groups={self.norm_groups}"
            )
        return DiffusionModelUNet(
            spatial_dims=self.spatial_dims,
            in_channels=input_shape[0],
            out_channels=input_shape[0],
            num_res_blocks=int(self.num_res_blocks),
            channels=channels,
            attention_levels=tuple(bool(a) for a in attention),
            norm_num_groups=int(self.norm_groups),
        )

    def _check_settings(self) -> None:
        check_choice(self.name, "noise", self.noise, NOISE_KINDS)
        check_choice(self.name, "schedule", self.schedule, SCHEDULES)
        check_choice(self.name, "prediction", self.prediction, PREDICTIONS)
        check_choice(self.name, "loss_norm", self.loss_norm, LOSSES)
        check_choice(self.name, "score_reduce", self.score_reduce, SCORE_REDUCTIONS)
        check_choice(self.name, "residual", self.residual, SIGNED_RESIDUALS)
        bad = [t for t in self.t0_levels if not 0 <= t <= self.timesteps]
        if bad or not self.t0_levels:
            raise ConfigError(f"ddpm: t0 must lie in 0..timesteps={self.timesteps}, got {self.t0}")
        if self.ddim_steps < 1 or self.noise_draws < 1:
            raise ConfigError("ddpm: ddim_steps and noise_draws must be >= 1")
        if self.train_t_max is not None and not 1 <= self.train_t_max <= self.timesteps:
            raise ConfigError(
                f"ddpm: train_t_max must lie in 1..timesteps={self.timesteps}, "
                f"got {self.train_t_max}"
            )

    @property
    def size_multiple(self) -> int:
        """Each side must be divisible by this: the network halves the grid per level but one."""
        return 2 ** (len(self.channels) - 1)

    @property
    def t0_levels(self) -> list[int]:
        """The noise levels ``t0`` as a list."""
        return [int(self.t0)] if isinstance(self.t0, int) else [int(t) for t in self.t0]

    @property
    def median_width(self) -> int:
        """The median filter's width (5 in 2D, 3 in 3D unless set)."""
        if self.median_size is not None:
            return int(self.median_size)
        return 5 if self.spatial_dims == 2 else 3

    def alphas_bar(self, device: torch.device) -> torch.Tensor:
        """Cumulative signal share of each level ``(timesteps + 1,)``; level 0 is the image."""
        return _alphas_bar(int(self.timesteps), self.schedule).to(device)

    def network_output(
        self, network: nn.Module, x: torch.Tensor, levels: torch.Tensor
    ) -> torch.Tensor:
        """The network's prediction (float32) for ``x`` at ``levels`` ``(B,)`` (1 and up).

        Images whose sides are not multiples of :attr:`size_multiple` are padded (edge
        values) for the network and cropped back.
        """
        spatial = x.shape[2:]
        extra = [(-side) % self.size_multiple for side in spatial]
        if any(extra):
            pad = [p for e in reversed(extra) for p in (0, e)]
            x = functional.pad(x, pad, mode="replicate")
        x = to_layout(x, layout_of(network))  # as the network's weights
        predicted = network(x, levels - 1).float()  # MONAI counts levels from 0
        return predicted[(..., *(slice(0, side) for side in spatial))]

    def draw_noise(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Unit noise of this model's kind shaped like ``like``."""
        return unit_noise(
            self.noise,
            like,
            self.noise_grid,
            self.noise_octaves,
            self.noise_persistence,
            generator,
        )

    # -- training -------------------------------------------------------------------------
    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Error of the prediction (noise or clean image) at random levels (Ho et al. 2020).

        With ``patched`` one patch of the scoring grid per image is noised and the loss is
        taken inside it (Behrendt et al. 2023). In eval mode (the validation loss) the levels,
        the noise and the patches come from a generator seeded with ``noise_seed``, so that
        epochs are compared on the same draws.
        """
        clean = x.float()
        generator = None
        if not network.training:
            generator = torch.Generator(device=x.device).manual_seed(int(self.noise_seed))
        top = int(self.train_t_max or self.timesteps)
        levels = torch.randint(1, top + 1, (len(x),), generator=generator, device=x.device)
        noise = self.draw_noise(clean, generator)
        noisy = self.noised(clean, noise, levels)
        target = noise if self.prediction == "epsilon" else clean
        if self.patched:
            inside = self.random_patches(clean, generator)
            noisy = torch.where(inside, noisy, clean)
        error = self.network_output(network, noisy, levels) - target
        error = error.abs() if self.loss_norm == "l1" else error.pow(2)
        if not self.patched:
            return error.mean()
        return (error * inside).sum() / (inside.sum() * x.shape[1]).clamp_min(1)

    def noised(
        self, clean: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor
    ) -> torch.Tensor:
        """``sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε`` at each image's level (0: the image itself)."""
        alpha = self.alphas_bar(clean.device)[levels].view(-1, *([1] * (clean.dim() - 1)))
        return alpha.sqrt() * clean + (1 - alpha).sqrt() * noise

    def patch_side(self, spatial: Sequence[int]) -> list[int]:
        """Side of the patches along each axis (``patch_size`` or half the side, rounded up)."""
        if self.patch_size is not None:
            return [min(int(self.patch_size), side) for side in spatial]
        return [-(-side // 2) for side in spatial]

    def random_patches(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One patch of the scoring grid per image, drawn at random: masks ``(B, 1, *spatial)``."""
        grid = torch.cat(patch_grid(x.shape[2:], self.patch_side(x.shape[2:]), x.device))
        drawn = torch.randint(0, len(grid), (len(x),), generator=generator, device=x.device)
        return grid[drawn]

    # -- scoring --------------------------------------------------------------------------
    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, median-filtered residual maps inside the eroded foreground, healed images.

        The residuals (and the healed images) are averaged over every level of ``t0`` and
        every noise draw.
        """
        self._check_settings()
        clean = x.float()
        foreground = foreground_mask(x, self.foreground_threshold)
        runs = list(itertools.product(self.t0_levels, range(int(self.noise_draws))))
        residual = torch.zeros_like(clean[:, 0])
        healed = torch.zeros_like(clean)
        for level, draw in runs:
            image = self.heal(network, clean, level, self.scoring_noise(clean, draw), foreground)
            residual += signed_residual(clean, image, self.residual)
            healed += image
        core = erode_mask(foreground, self.erode)
        maps = median_filter(residual / len(runs) * core, self.median_width)
        scores = reduce_inside(maps, core, self.score_reduce, self.score_value)
        return scores, maps, healed / len(runs)

    def scoring_noise(self, clean: torch.Tensor, draw: int) -> torch.Tensor:
        """Draw ``draw``'s noise field, seeded by ``noise_seed``, shared by every image."""
        generator = torch.Generator(device=clean.device)
        generator.manual_seed(int(self.noise_seed) * 1_000 + int(draw))
        return self.draw_noise(clean[:1], generator).expand_as(clean)

    def heal(
        self,
        network: nn.Module,
        clean: torch.Tensor,
        level: int,
        noise: torch.Tensor,
        foreground: torch.Tensor,
    ) -> torch.Tensor:
        """``clean`` noised to ``level`` and denoised back (patch by patch with ``patched``).

        Patches without foreground in any image of the batch are left as they are.
        """
        if level == 0:
            return clean
        if not self.patched:
            return self.denoise(network, clean, level, noise)
        healed = clean.clone()
        for inside in patch_grid(clean.shape[2:], self.patch_side(clean.shape[2:]), clean.device):
            if not (foreground.unsqueeze(1) & inside).any():
                continue
            healed = torch.where(inside, self.denoise(network, clean, level, noise, inside), healed)
        return healed

    def denoise(
        self,
        network: nn.Module,
        clean: torch.Tensor,
        level: int,
        noise: torch.Tensor,
        inside: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Partial noising to ``level``, then ``ddim_steps`` DDIM steps (η = 0) back to level 0.

        MONAI's ``DDIMScheduler.step`` walks a fixed stride from the top of the schedule;
        healing starts anywhere, so the update (Song et al. 2021, eq. 12) is written here on
        the same schedule. With ``inside`` only that region is noised and updated; the rest
        stays ``clean`` as context (Behrendt et al. 2023).
        """
        alphas = self.alphas_bar(clean.device)
        batch = len(clean)
        sample = self.noised(clean, noise, torch.full((batch,), level, device=clean.device))
        if inside is not None:
            sample = torch.where(inside, sample, clean)
        path = ddim_levels(level, int(self.ddim_steps))
        for now, after in itertools.pairwise(path):
            levels = torch.full((batch,), now, device=clean.device)
            output = self.network_output(network, sample, levels)
            eps, estimate = self.noise_and_image(sample, output, alphas[now])
            sample = alphas[after].sqrt() * estimate + (1 - alphas[after]).sqrt() * eps
            if inside is not None:
                sample = torch.where(inside, sample, clean)
        return sample

    def noise_and_image(
        self, sample: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and the clean image that ``sample`` at ``ᾱ = alpha`` holds, by the network.

        One of them is the network's ``output`` (``prediction``), the other follows from
        ``sample = sqrt(ᾱ) x + sqrt(1 - ᾱ) ε``.
        """
        if self.prediction == "epsilon":
            return output, (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
        return (sample - alpha.sqrt() * output) / (1 - alpha).sqrt(), output


def ddim_levels(t0: int, steps: int) -> list[int]:
    """The levels a DDIM path visits from ``t0`` down to 0, evenly spaced, ``steps`` calls."""
    steps = max(1, min(int(steps), int(t0)))
    return sorted({round(t0 * (steps - j) / steps) for j in range(steps + 1)}, reverse=True)


def patch_grid(
    spatial: Sequence[int], sides: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Masks ``(1, 1, *spatial)`` of a grid of patches that tile the image, each voxel once.

    Patches start at multiples of ``sides``; the last one along an axis is cut at the border.
    """
    starts = [range(0, n, p) for n, p in zip(spatial, sides, strict=True)]
    masks = []
    for corner in itertools.product(*starts):
        inside = torch.zeros((1, 1, *spatial), dtype=torch.bool, device=device)
        box = tuple(slice(c, c + p) for c, p in zip(corner, sides, strict=True))
        inside[(0, 0, *box)] = True
        masks.append(inside)
    return masks


@functools.cache
def _alphas_bar(timesteps: int, schedule: str) -> torch.Tensor:
    """ᾱ of levels 0 (1.0: no noise) to ``timesteps`` from MONAI's scheduler."""
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=timesteps, schedule=schedule)
    return torch.cat([torch.ones(1), scheduler.alphas_cumprod.float()])

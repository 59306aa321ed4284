"""IntroVAE (Huang et al. 2018) as the image reconstruction network of Kobayashi et al. 2020.

The encoder E (inference model) and decoder G (generator) of a VAE play a min-max game on the
KL regulariser L_REG = KL(q(z|x) || N(0, I)): E keeps L_REG small for real images and pushes
it above a margin ``m`` for generated ones, G tries to make its images look real to E
(Kobayashi et al. 2020, eq. 4-7). Two Adam optimisers, one per player, take turns on every batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.latent_search import latent_search, reconstruction_error, unwrap
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import gaussian_kl, per_image_sum, residual_map
from medanomaly.errors import ConfigError
from medanomaly.nets import VariationalAutoencoder
from medanomaly.training.engine import (
    Backward,
    Engine,
    EngineConfig,
    Optimizers,
    TrainingData,
    TrainingTask,
)

MODES = ("encode", "decode", "reconstruct")


class IntroVAENetwork(VariationalAutoencoder):
    """The project's :class:`~medanomaly.nets.VariationalAutoencoder`, routed by mode.

    ``forward(inputs, mode)`` sends every encoder and decoder call through the module itself
    so that data-parallel training sees each of them: ``encode`` (image -> (mu, logvar)),
    ``decode`` (z -> image) and ``reconstruct`` (image -> (G(z), mu, logvar), as the VAE).
    The weights and their names are those of the plain VAE.
    """

    def forward(self, inputs: torch.Tensor, mode: str = "reconstruct") -> Any:
        """Dispatch on ``mode``: ``encode``, ``decode`` or ``reconstruct``."""
        if mode == "encode":
            return self.encode(inputs)
        if mode == "decode":
            return self.decode(inputs)
        if mode == "reconstruct":
            return super().forward(inputs)
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of E: the convolutional encoder and the two layers giving mu, logvar."""
        for module in (self.encoder, self.fc_hidden, self.fc_stats):
            yield from module.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of G: the layers from z to the feature map and the decoder."""
        for module in (self.fc_decode, self.decoder):
            yield from module.parameters()


def encoder_loss(
    kl_real: torch.Tensor,
    kl_fakes: Sequence[torch.Tensor],
    reconstruction: torch.Tensor,
    margin: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Kobayashi et al. 2020 eq. 6: L_E = L_REG(z) + alpha * sum_s [m - L_REG(z_s)]^+ + beta * L_AE.

    Each term is averaged over its own samples (the expectation of the equation).

    Args:
        kl_real: L_REG of the real images' posteriors ``(B,)``.
        kl_fakes: L_REG of the posteriors of each kind of generated image (reconstructions,
            prior samples), one tensor per kind.
        reconstruction: L_AE(x, x_r) per image ``(B,)``.
        margin: ``m``.
        alpha: Weight of the margin (hinge) terms.
        beta: Weight of the reconstruction term.

    Returns:
        The scalar encoder loss.
    """
    hinge = sum(torch.relu(margin - kl).mean() for kl in kl_fakes)
    return kl_real.mean() + alpha * hinge + beta * reconstruction.mean()


def decoder_loss(
    kl_fakes: Sequence[torch.Tensor], reconstruction: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Generator loss (Kobayashi et al. 2020 eq. 7), each term averaged.

    L_G = alpha * sum_s L_REG(z_s) + beta * L_AE.
    """
    return alpha * sum(kl.mean() for kl in kl_fakes) + beta * reconstruction.mean()


def _sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw z = mu + sigma * eps (the reparameterisation trick)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def _kl(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mu, logvar = pair
    return gaussian_kl(mu.float(), logvar.float())


@register("introvae")
class IntroVAE(DeepDetector):
    """Introspective VAE (Kobayashi et al. 2020); score = error of the decoded latent mean.

    Training follows Kobayashi et al. 2020 eq. 4-7 on every batch, with z ~ q(z|x)
    (reparameterised),
    ``x_r = G(z)``, ``x_p = G(z_p)`` with ``z_p ~ N(0, I)``, ``z_s = E(x_s)`` for
    ``s`` in {r, p} and L_REG = KL(q || N(0, I)) summed over latent dimensions:

    * encoder step (Adam over E only; ``x_r``, ``x_p`` detached, so the hinge reaches E only):
      ``L_E = L_REG(z) + alpha * sum_s [m - L_REG(z_s)]^+ + beta * L_AE(x, x_r)``;
    * decoder step (Adam over G only; ``x_r`` re-generated from the same ``z``, ``x_p``
      kept, as G has not changed yet; both encoded by the updated E without detaching, as
      in the original IntroVAE):
      ``L_G = alpha * sum_s L_REG(z_s) + beta * L_AE(x, x_r)``.

    ``L_AE`` is the sum over voxels of the squared residual plus ``ssim_weight`` times the
    sum over voxels of 1 - SSIM (Kobayashi et al. 2020 adds SSIM to the L2 loss without giving a
    weight).
    The engine owns epochs, checkpoints, resume and early stopping; its validation loss is
    ``L_AE + L_REG`` of the normal validation images decoded from their latent mean, the
    logged training loss the same quantity for the sampled z.

    At scoring time the latent mean is decoded (optionally refined first by a latent
    representation search, ``latent_steps``); the map is the squared residual and the score
    its sum over the image. ``map_score`` works as for every reconstruction model.

    Kobayashi et al.'s (2020) settings (2D brain MRI 256x256 in [-1, 1], tanh output): alpha 0.5,
    beta 0.04, m 120, Adam with learning rates 1e-4 (encoder) and 5e-3 (decoder), batch 120,
    200 epochs, a 128x4x4 latent from residual blocks (32 to 512 channels), latent search of
    100 steps at lr 1e-3. The defaults here follow the numbers except where noted:

    * the network is the project's VAE (four conv-BN-ReLU-max-pool modules, a vector latent
      of ``latent_dim`` = 128 instead of a 128x4x4 map, transposed-convolution decoder),
      without dropout (the paper's encoder has none) and a LeakyReLU slope of 0.2 (unstated);
    * ``output_activation`` is ``sigmoid`` for [0, 1] images (the project's convention; the
      LGG config uses [-1, 1] with ``tanh`` as the paper does);
    * the hinge is applied per image and averaged (the original IntroVAE code hinges the
      batch mean and averages the two generated kinds, i.e. half our alpha);
    * ``ssim_weight`` 1 (unstated in the paper); ``prior_samples`` (unstated) = batch size;
    * L_AE and L_REG are sums over voxels and latent dimensions, so the balance of beta
      against m depends on the image size: at a quarter of the paper's pixels, a 4x beta keeps
      the paper's balance (see the config ``introvae_lgg_2d``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Channels of the four encoder modules.
        hidden_dim: Width of the fully connected layer before the latent.
        latent_dim: Latent size.
        dropout: Dropout of each encoder module.
        negative_slope: Decoder LeakyReLU slope.
        output_activation: ``sigmoid`` ([0, 1] inputs), ``tanh`` ([-1, 1]) or ``none``; also
            sets the SSIM data range (2 for ``tanh``, else 1).
        margin: ``m``, the KL that E demands of generated images (Kobayashi et al. 2020: 120).
        alpha: Weight of the adversarial KL terms (Kobayashi et al. 2020: 0.5).
        beta: Weight of the reconstruction term (Kobayashi et al. 2020: 0.04).
        ssim_weight: Weight of the 1 - SSIM term in L_AE (0: plain L2).
        prior_samples: Number of ``z_p ~ N(0, I)`` per training step; ``None``: batch size.
        encoder_lr: Adam learning rate of E (Kobayashi et al. 2020: 1e-4); ``None`` uses
            ``engine.lr``.
        decoder_lr: Adam learning rate of G (Kobayashi et al. 2020: 5e-3); ``None`` uses
            ``engine.lr``.
        latent_steps: Steps of latent representation search at scoring (and validation)
            time, minimising L_AE; 0 turns it off (Kobayashi et al. 2020: 100).
        latent_lr: Learning rate of that search (Kobayashi et al. 2020: 1e-3).
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings (``lr`` only when ``encoder_lr``/``decoder_lr`` are None).
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the model's own
            score.
    """

    @property
    def exportable(self) -> bool:  # type: ignore[override]
        """Without a latent search: the search is an optimisation per image, not a graph."""
        return not self.latent_steps

    export_refusal = "its latent representation search (latent_steps) optimises each image"

    has_latent = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_dim: int = 256,
        latent_dim: int = 128,
        dropout: float | Sequence[float] = 0.0,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
        margin: float = 120.0,
        alpha: float = 0.5,
        beta: float = 0.04,
        ssim_weight: float = 1.0,
        prior_samples: int | None = None,
        encoder_lr: float | None = 1e-4,
        decoder_lr: float | None = 5e-3,
        latent_steps: int = 0,
        latent_lr: float = 1e-3,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.channels = channels
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.output_activation = output_activation
        self.margin = margin
        self.alpha = alpha
        self.beta = beta
        self.ssim_weight = ssim_weight
        self.prior_samples = prior_samples
        self.encoder_lr = encoder_lr
        self.decoder_lr = decoder_lr
        self.latent_steps = latent_steps
        self.latent_lr = latent_lr

    # -- network --------------------------------------------------------------------------
    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Encoder and decoder (the project's VAE) for images of ``input_shape``."""
        self._check_params()
        return IntroVAENetwork(
            self.spatial_dims,
            input_shape[1:],
            input_shape[0],
            tuple(self.channels),
            self.hidden_dim,
            self.latent_dim,
            self.dropout,
            self.negative_slope,
            self.output_activation,
        )

    def _check_params(self) -> None:
        for name in ("margin", "alpha", "beta", "ssim_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"introvae: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("encoder_lr", "decoder_lr", "latent_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"introvae: {name} must be > 0, got {value}")
        if self.prior_samples is not None and self.prior_samples < 1:
            raise ConfigError(f"introvae: prior_samples must be >= 1, got {self.prior_samples}")
        if self.latent_steps < 0:
            raise ConfigError(f"introvae: latent_steps must be >= 0, got {self.latent_steps}")

    # -- losses ---------------------------------------------------------------------------
    @property
    def data_range(self) -> float:
        """Intensity range of the images, for SSIM: 2 with a tanh output, else 1."""
        return 2.0 if self.output_activation == "tanh" else 1.0

    @property
    def reconstruction_kind(self) -> str:
        """``l2+ssim`` when the SSIM term is on, else ``l2``."""
        return "l2+ssim" if self.ssim_weight > 0 else "l2"

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """L_AE per image: sum of squared residuals + ssim_weight * sum of (1 - SSIM)."""
        return reconstruction_error(
            x, reconstruction, self.reconstruction_kind, self.ssim_weight, self.data_range
        )

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Validation objective: mean over the batch of L_AE + L_REG, decoding the mean."""
        mu, logvar = network(x, "encode")
        reconstruction = network(mu, "decode")
        return (self.reconstruction_loss(x, reconstruction) + _kl((mu, logvar))).mean()

    # -- training -------------------------------------------------------------------------
    def make_optimizers(self, network: nn.Module) -> Optimizers:
        """One Adam optimiser over E's parameters and one over G's."""
        config = self.engine_config
        decay = config.weight_decay
        return {
            "encoder": torch.optim.Adam(
                network.encoder_parameters(), lr=self.encoder_lr or config.lr, weight_decay=decay
            ),
            "decoder": torch.optim.Adam(
                network.decoder_parameters(), lr=self.decoder_lr or config.lr, weight_decay=decay
            ),
        }

    def training_step(
        self,
        model: nn.Module,
        x: torch.Tensor,
        optimizers: Optimizers,
        backward: Backward,
        index: int,
    ) -> torch.Tensor:
        """One encoder step (eq. 6), then one decoder step (eq. 7), on a batch ``x``.

        Args:
            model: The network (possibly wrapped by the engine).
            x: A batch of normal images.
            optimizers: ``{"encoder": ..., "decoder": ...}`` from :meth:`make_optimizers`.
            backward: The engine's backward (handles mixed-precision scaling).
            index: Batch index within the epoch (unused: both players step every batch).

        Returns:
            The batch mean of L_AE + L_REG for the sampled z, for the training history.
        """
        mu, logvar = model(x, "encode")
        z = _sample(mu, logvar)
        n_prior = self.prior_samples or len(x)
        z_p = torch.randn(n_prior, mu.shape[1], device=mu.device, dtype=mu.dtype)
        x_r, x_p = model(z, "decode"), model(z_p, "decode")
        ae = self.reconstruction_loss(x, x_r)
        kl_real = _kl((mu, logvar))
        kl_fakes = [_kl(model(image.detach(), "encode")) for image in (x_r, x_p)]
        loss_e = encoder_loss(kl_real, kl_fakes, ae, self.margin, self.alpha, self.beta)
        optimizers["encoder"].zero_grad(set_to_none=True)
        backward(loss_e)
        optimizers["encoder"].step()
        # G is unchanged so far: x_p's graph still holds; x_r's ran through the updated E
        x_r = model(z.detach(), "decode")
        kl_fakes = [_kl(model(image, "encode")) for image in (x_r, x_p)]
        loss_g = decoder_loss(kl_fakes, self.reconstruction_loss(x, x_r), self.alpha, self.beta)
        optimizers["decoder"].zero_grad(set_to_none=True)
        backward(loss_g)
        optimizers["decoder"].step()
        return (ae + kl_real).mean().detach()

    def train_network(
        self,
        engine: Engine,
        network: nn.Module,
        data: TrainingData,
        run_dir: str | Path | None,
        resume: bool,
    ) -> list[dict[str, float]]:
        """Train E and G with their own Adam optimisers in one engine run."""
        score, refresh = self._validation_scoring(data.train)
        task = TrainingTask(
            network=network,
            loss=self.loss,
            score=score,
            optimizers=self.make_optimizers,
            step=self.training_step,
            before_validation=refresh,
        )
        return engine.fit(task, data, run_dir=run_dir, resume=resume, extra_state=self.config())

    # -- scoring --------------------------------------------------------------------------
    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum of squared residuals per image, squared-residual maps and reconstructions."""
        net = unwrap(network)
        z = net.encode(x)[0]
        if self.latent_steps:
            z = latent_search(
                net.decode,
                x,
                z,
                self.latent_steps,
                self.latent_lr,
                self.reconstruction_kind,
                self.ssim_weight,
                self.data_range,
            )
        reconstruction = net.decode(z)
        maps = residual_map(x, reconstruction, "squared")
        return per_image_sum(maps), maps, reconstruction

    def latent(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The latent mean of each image."""
        return unwrap(network).encode(x)[0]

"""f-AnoGAN (Schlegl et al. 2019), as in the UAD slide deck: WGAN-GP, then an izi_f encoder.

Stage 1 trains a Wasserstein GAN with gradient penalty on normal images (generator G and
critic D). Stage 2 freezes both and trains an encoder E so that G(E(x)) reconstructs x, with
the izi_f loss: image residual plus kappa times the residual of the critic's features. The
anomaly score is that same loss per image; the map is the image residual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.latent_search import unwrap
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import per_image_mean, residual_map
from medanomaly.nets import layers
from medanomaly.training.engine import (
    Backward,
    Engine,
    EngineConfig,
    Optimizers,
    TrainingData,
    TrainingTask,
)

GAN_STAGE = "gan"


def _down_stack(spatial_dims: int, in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """Strided convolutions + LeakyReLU, each halving the grid (no batch norm: WGAN-GP)."""
    widths = [in_channels, *channels]
    blocks: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
        blocks += [
            layers.conv(spatial_dims, c_in, c_out, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
    return nn.Sequential(*blocks, nn.Flatten())


class FAnoGANNetwork(nn.Module):
    """Generator, critic and encoder of f-AnoGAN for 2D or 3D images.

    ``forward(inputs, mode)`` routes every computation through the module itself so that
    data-parallel training sees each call: ``generate`` (z -> image), ``critic``
    (image -> (score, features)) and ``reconstruct`` (image -> (G(E(x)), f(x), f(G(E(x))))).

    Args:
        spatial_dims: 2 or 3.
        spatial_size: Image grid, each side divisible by 16.
        in_channels: Image channels.
        channels: Feature channels of the four critic/encoder blocks (the generator mirrors them).
        latent_dim: Size of z.
        output_activation: ``sigmoid`` for [0, 1] images, ``tanh`` for [-1, 1], ``none``.
    """

    def __init__(
        self,
        spatial_dims: int,
        spatial_size: Sequence[int],
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        latent_dim: int = 128,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        down = 2 ** len(channels)
        if len(spatial_size) != d or any(s % down for s in spatial_size):
            raise ValueError(f"spatial_size must have {d} sides divisible by {down}")
        self.latent_dim = latent_dim
        self.start_shape = (channels[-1], *(s // down for s in spatial_size))
        n_features = math.prod(self.start_shape)
        self.critic_features = _down_stack(d, in_channels, channels)
        self.critic_head = nn.Linear(n_features, 1)
        self.encoder = nn.Sequential(
            _down_stack(d, in_channels, channels), nn.Linear(n_features, latent_dim)
        )
        self.generator_fc = nn.Linear(latent_dim, n_features)
        widths = [*channels[::-1], channels[0]]
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [
                layers.upsample(d, 2),
                layers.conv(d, c_in, c_out, kernel_size=3, padding=1, bias=False),
                layers.batch_norm(d, c_out),
                nn.ReLU(),
            ]
        blocks += [
            layers.conv(d, widths[-1], in_channels, kernel_size=3, padding=1),
            layers.output_activation(output_activation),
        ]
        self.generator = nn.Sequential(*blocks)
        self.frozen_gan = False

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """G(z)."""
        return self.generator(self.generator_fc(z).view(-1, *self.start_shape))

    def critic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x) of shape (B,), critic features (B, F))."""
        features = self.critic_features(x)
        return self.critic_head(features).squeeze(1), features

    def forward(self, inputs: torch.Tensor, mode: str = "reconstruct") -> Any:
        """Dispatch on ``mode``: ``generate``, ``critic`` or ``reconstruct``."""
        if mode == "generate":
            return self.generate(inputs)
        if mode == "critic":
            return self.critic(inputs)
        if mode == "reconstruct":
            reconstruction = self.generate(self.encoder(inputs))
            return reconstruction, self.critic(inputs)[1], self.critic(reconstruction)[1]
        raise ValueError(f"unknown mode {mode!r}")

    def freeze_gan(self) -> None:
        """Freeze G and D (stage 2): no gradients, and batch norm statistics stay fixed."""
        self.frozen_gan = True
        for module in (self.generator, self.generator_fc, self.critic_features, self.critic_head):
            module.requires_grad_(False)
        self.encoder.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> FAnoGANNetwork:
        """Like ``nn.Module.train``, but a frozen generator stays in eval mode."""
        super().train(mode)
        if self.frozen_gan:
            self.generator.eval()
        return self


def gradient_penalty(network: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty: (||grad_x D(x_hat)|| - 1)^2 on random interpolates of real and fake.

    The penalty runs the plain critic in float32, also in a mixed-precision run: it
    differentiates the critic twice (``create_graph``), which Lightning Fabric refuses
    through its wrapped outputs (every backward must pass ``fabric.backward``), and a 16-bit
    input gradient would need the loss scale that only the outer backward gets (PyTorch's
    AMP examples scale the inner gradient of a gradient penalty for that reason).
    """
    real, fake = real.float(), fake.float()
    shape = (len(real),) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        score, _ = unwrap(network)(mixed, "critic")
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


@register("fanogan")
class FAnoGAN(DeepDetector):
    """f-AnoGAN: WGAN-GP on normal images, then an izi_f encoder; score = izi_f residual.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Critic/encoder channels (four blocks; the generator mirrors them).
        latent_dim: Size of z.
        output_activation: ``sigmoid`` ([0, 1] inputs), ``tanh`` ([-1, 1]) or ``none``.
        gan_epochs: Epochs of the WGAN-GP stage; ``None`` uses ``engine.epochs``. The
            encoder stage uses ``engine`` as it is (with early stopping).
        gan_lr: Adam learning rate of the GAN stage (betas 0.0, 0.9).
        n_critic: Critic steps per generator step.
        gp_weight: Weight of the gradient penalty (lambda, 10 in WGAN-GP).
        kappa: Weight of the critic-feature residual in the izi_f loss and the score.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings (the encoder stage; the GAN stage takes ``gan_*``).
        map_score: Score from the standardised, smoothed map (see
            :class:`~medanomaly.detectors.scoring.MapScoring`); ``None`` keeps the model's own
            score.
    """

    exportable = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        latent_dim: int = 128,
        output_activation: str = "sigmoid",
        gan_epochs: int | None = None,
        gan_lr: float = 1e-4,
        n_critic: int = 5,
        gp_weight: float = 10.0,
        kappa: float = 1.0,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        map_score: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine, map_score)
        self.channels = channels
        self.latent_dim = latent_dim
        self.output_activation = output_activation
        self.gan_epochs = gan_epochs
        self.gan_lr = gan_lr
        self.n_critic = n_critic
        self.gp_weight = gp_weight
        self.kappa = kappa

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Generator, critic and encoder for images of ``input_shape``."""
        return FAnoGANNetwork(
            self.spatial_dims,
            input_shape[1:],
            input_shape[0],
            tuple(self.channels),
            self.latent_dim,
            self.output_activation,
        )

    # -- stage 2 (and scoring): izi_f ---------------------------------------------------------
    def _izi_f(self, network: nn.Module, x: torch.Tensor):
        reconstruction, features, features_rec = network(x, "reconstruct")
        maps = residual_map(x, reconstruction, "squared")
        feature_residual = (features.float() - features_rec.float()).pow(2).mean(dim=1)
        return per_image_mean(maps) + self.kappa * feature_residual, maps, reconstruction

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """izi_f loss of the encoder stage, averaged over the batch."""
        return self._izi_f(network, x)[0].mean()

    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """izi_f score per image, squared image residual and G(E(x))."""
        return self._izi_f(network, x)

    # -- stage 1: WGAN-GP ---------------------------------------------------------------------
    def _gan_optimizers(self, network: nn.Module) -> Optimizers:
        critic = [*network.critic_features.parameters(), *network.critic_head.parameters()]
        generator = [*network.generator_fc.parameters(), *network.generator.parameters()]
        betas = (0.0, 0.9)
        return {
            "critic": torch.optim.Adam(critic, lr=self.gan_lr, betas=betas),
            "generator": torch.optim.Adam(generator, lr=self.gan_lr, betas=betas),
        }

    def _gan_step(
        self,
        model: nn.Module,
        x: torch.Tensor,
        optimizers: Optimizers,
        backward: Backward,
        index: int,
    ) -> torch.Tensor:
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        fake = model(z, "generate").detach()
        critic_loss = model(fake, "critic")[0].mean() - model(x, "critic")[0].mean()
        critic_loss = critic_loss + self.gp_weight * gradient_penalty(model, x, fake)
        optimizers["critic"].zero_grad(set_to_none=True)
        backward(critic_loss)
        optimizers["critic"].step()
        if index % self.n_critic == 0:
            z = torch.randn(len(x), self.latent_dim, device=x.device)
            generator_loss = -model(model(z, "generate"), "critic")[0].mean()
            optimizers["generator"].zero_grad(set_to_none=True)
            backward(generator_loss)
            optimizers["generator"].step()
        return critic_loss.detach()

    def _wasserstein_gap(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Validation 'loss' of the GAN stage: D(fake) - D(real), the negated W estimate."""
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        return network(network(z, "generate"), "critic")[0].mean() - network(x, "critic")[0].mean()

    def train_network(
        self,
        engine: Engine,
        network: nn.Module,
        data: TrainingData,
        run_dir: str | Path | None,
        resume: bool,
    ) -> list[dict[str, float]]:
        """Train the WGAN-GP, freeze it, then train the encoder with izi_f."""
        config = engine.config
        gan_config = replace(config, epochs=self.gan_epochs or config.epochs, patience=None)
        network.encoder.requires_grad_(False)
        gan_task = TrainingTask(
            network=network,
            loss=self._wasserstein_gap,
            score=lambda net, x: -net(x, "critic")[0],
            optimizers=self._gan_optimizers,
            step=self._gan_step,
            keep_best=False,
        )
        self.gan_history_ = Engine(gan_config).fit(
            gan_task, data, run_dir, resume, self.config(), stage=GAN_STAGE
        )
        network.freeze_gan()
        return super().train_network(engine, network, data, run_dir, resume)

"""Deep autoencoding Gaussian mixture model detector (the UAD slide deck; Zong et al., ICLR 2018).

The UAD slide deck tried DAGMM on 2D head CT and reports that it "did not work". The original model
feeds the raw latent code and two reconstruction-error features into a Gaussian mixture.
On images the error features are tiny and nearly constant (the cosine similarity of an
image and its reconstruction is 0.99x for every image) next to a latent code of arbitrary
scale, so the mixture ignores them; and with batches of 16-30 images the per-batch
covariances are singular, so the energy term is lowered most by making the latent
dimensions collinear, which ruins the reconstructions. What was done to make it work
(phantom AUROC of the energy at 32x32, 200 training images, 30 epochs, in brackets):

- standardise the whole feature vector ``[z_c, log error, log cosine distance]`` with a
  batch norm without learnable scale (batch statistics in training, running statistics
  when scoring), so that no feature dominates and ``eps * I`` means the same for all of
  them (without it: 0.51);
- take the logarithm of the relative Euclidean error and of the cosine *distance*
  ``1 - cos``: both span orders of magnitude and their logs are closer to Gaussian
  (raw features: 0.97 instead of 0.99);
- regularise each covariance as ``Sigma + eps * I`` with a large ``eps`` (1.0, in units of
  the standardised features) so that collinear latents buy little energy (eps 1e-3: 0.70,
  0.1: 0.67, 0.3: 0.97, 1.0: 0.99), and compute the energy from a Cholesky factor
  (log-determinant and triangular solve);
- keep the paper's reconstruction term, the squared L2 distance per image (a sum over
  voxels, not a per-voxel mean); with a mean the energy outweighs it by the number of
  voxels and the autoencoder stops learning (0.65);
- fix the mixture for scoring: after training, ``phi_``, ``mu_`` and ``cov_`` are
  estimated once over all normal training images with the trained network in eval mode,
  instead of per batch.

On the phantoms the energy is as good as the plain reconstruction error of the same
autoencoder trained without the energy term (0.99), not better, and it needs more epochs
(the energy term slows the autoencoder: 0.72-0.99 over seeds at 30 epochs, 0.99 at 50).
On head CT (``docs/benchmarks/head_ct.md``) it trains stably but is the weakest model of
the UAD slide deck:
energy AUROC 0.68 +- 0.06 under 2 x 5 CV and 0.71 on the fixed split, where the mean
squared residual of the same network reaches 0.86. The latent code barely separates
haemorrhage (per-feature AUROC 0.37-0.75), and the energy is two-sided: it also flags
slices that are reconstructed unusually well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medanomaly.data.sets import ImageSet, as_cases
from medanomaly.detectors.base import MODEL_FILE
from medanomaly.detectors.deep import DeepDetector
from medanomaly.detectors.registry import register
from medanomaly.detectors.scoring import residual_map
from medanomaly.errors import NotFittedError
from medanomaly.nets import layers
from medanomaly.training.engine import EngineConfig

GMM_KEY = "gmm"
_TINY = 1e-8


def reconstruction_features(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per image ``[log relative Euclidean error, log cosine distance]`` ``(B, 2)``.

    Args:
        x: Input batch ``(B, C, *spatial)``.
        reconstruction: Its reconstruction, same shape.
    """
    a, b = x.flatten(1).float(), reconstruction.flatten(1).float()
    relative = (a - b).norm(dim=1) / (a.norm(dim=1) + _TINY)
    cosine = nn.functional.cosine_similarity(a, b, dim=1, eps=_TINY)
    distance = (1.0 - cosine).clamp_min(0.0)  # rounding can put cos a hair above 1
    return torch.stack([torch.log(relative + _TINY), torch.log(distance + _TINY)], dim=1)


def gmm_parameters(
    features: torch.Tensor, gamma: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixture weights, means and covariances (``+ eps * I``) from soft memberships.

    Args:
        features: ``(N, D)`` samples.
        gamma: ``(N, K)`` membership probabilities (rows sum to 1).
        eps: Added to each covariance's diagonal.

    Returns:
        ``phi (K,)``, ``mu (K, D)`` and ``cov (K, D, D)``.
    """
    weight = gamma.sum(dim=0) + _TINY
    phi = weight / len(features)
    mu = gamma.T @ features / weight[:, None]
    centred = features[:, None, :] - mu[None]  # (N, K, D)
    cov = torch.einsum("nk,nki,nkj->kij", gamma, centred, centred) / weight[:, None, None]
    return phi, mu, cov + eps * torch.eye(features.shape[1], dtype=cov.dtype, device=cov.device)


def sample_energy(
    features: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of each sample under the mixture ``(N,)``.

    Uses the Cholesky factor ``L`` of each covariance: the Mahalanobis term is
    ``|L^-1 (z - mu)|^2`` (triangular solve) and ``log det Sigma = 2 sum log diag L``.
    """
    chol = torch.linalg.cholesky(cov)  # (K, D, D)
    centred = (features[:, None, :] - mu[None]).permute(1, 2, 0)  # (K, D, N)
    solved = torch.linalg.solve_triangular(chol, centred, upper=False)
    mahalanobis = solved.pow(2).sum(dim=1).T  # (N, K)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)  # (K,)
    dims = features.shape[1]
    log_density = -0.5 * (mahalanobis + log_det + dims * math.log(2.0 * math.pi))
    return -torch.logsumexp(torch.log(phi + _TINY) + log_density, dim=1)


def covariance_penalty(cov: torch.Tensor) -> torch.Tensor:
    """The singularity penalty of the paper: sum over components of ``sum_j 1 / Sigma_jj``."""
    return (1.0 / torch.diagonal(cov, dim1=-2, dim2=-1)).sum()


class CompressionNetwork(nn.Module):
    """Convolutional autoencoder with a flat latent ``z_c`` (the DAGMM compression network).

    Encoder: strided convolution + batch norm + LeakyReLU blocks, then a linear layer to
    ``latent_dim``; the decoder mirrors it with transposed convolutions.

    Args:
        spatial_dims: 2 or 3.
        spatial_size: Input grid; each side divisible by ``2 ** len(channels)``.
        in_channels: Image channels.
        channels: Encoder block channels (each halves the grid).
        latent_dim: Size of ``z_c``.
        negative_slope: LeakyReLU slope.
        output_activation: ``sigmoid``, ``tanh`` or ``none``.
    """

    def __init__(
        self,
        spatial_dims: int,
        spatial_size: Sequence[int],
        in_channels: int,
        channels: Sequence[int],
        latent_dim: int,
        negative_slope: float,
        output_activation: str,
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims)
        widths = [in_channels, *channels]
        self.feature_shape = (widths[-1], *(s // 2 ** len(channels) for s in spatial_size))
        n_features = math.prod(self.feature_shape)
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            encoder += _block(d, layers.conv, c_in, c_out, negative_slope)
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), nn.Linear(n_features, latent_dim))
        self.expand = nn.Sequential(nn.Linear(latent_dim, n_features), nn.LeakyReLU(negative_slope))
        back = widths[::-1]
        decoder: list[nn.Module] = []
        for c_in, c_out in zip(back[:-2], back[1:-1], strict=True):
            decoder += _block(d, layers.conv_transpose, c_in, c_out, negative_slope)
        decoder += [
            layers.conv_transpose(d, back[-2], back[-1], kernel_size=4, stride=2, padding=1),
            layers.output_activation(output_activation),
        ]
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, z_c)``."""
        z = self.encoder(x)
        return self.decoder(self.expand(z).view(-1, *self.feature_shape)), z


def _block(d: int, factory, c_in: int, c_out: int, negative_slope: float) -> list[nn.Module]:
    return [
        factory(d, c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
        layers.batch_norm(d, c_out),
        nn.LeakyReLU(negative_slope),
    ]


class DAGMMNetwork(nn.Module):
    """Compression network, feature standardisation and estimation network.

    Args:
        compression: The autoencoder giving ``(reconstruction, z_c)``.
        latent_dim: Size of ``z_c``.
        n_components: Mixture components ``K``.
        hidden_dim: Width of the estimation network's hidden layer.
        dropout: Dropout of the estimation network (paper: 0.5).
    """

    def __init__(
        self,
        compression: CompressionNetwork,
        latent_dim: int,
        n_components: int,
        hidden_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.compression = compression
        self.standardise = nn.BatchNorm1d(latent_dim + 2, affine=False)
        self.estimation = nn.Sequential(
            nn.Linear(latent_dim + 2, hidden_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, n_components),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, standardised features (B, D), memberships (B, K))``."""
        reconstruction, z = self.compression(x)
        features = torch.cat([z.float(), reconstruction_features(x, reconstruction)], dim=1)
        features = self.standardise(features)
        # memberships in float32 under autocast too: the mixture weights are their means
        # and must sum to 1 (bf16 memberships missed by 1e-4)
        memberships = torch.softmax(self.estimation(features).float(), dim=1)
        return reconstruction, features, memberships


@register("dagmm")
class DAGMM(DeepDetector):
    """Deep autoencoding Gaussian mixture model (Zong et al. 2018), made to work on images.

    Features per image: the compression network's latent ``z_c``, the log relative
    Euclidean reconstruction error and the log cosine distance between image and
    reconstruction, standardised (see the module docstring for why). The estimation network
    maps them to memberships of ``n_components`` Gaussians whose parameters are computed per
    batch during training. Loss: squared reconstruction error per image (sum over voxels, as
    in the paper) + ``lambda_energy`` * mean sample energy
    + ``lambda_cov`` * sum of 1 / diag(Sigma). After training the mixture is estimated once
    over the normal training images (``phi_``, ``mu_``, ``cov_``), and the threshold is
    recomputed with it. Score: sample energy; map: squared reconstruction residual.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Compression encoder channels; sides must be divisible by
            ``2 ** len(channels)``.
        latent_dim: Size of ``z_c``.
        n_components: Mixture components ``K`` (paper: 4).
        hidden_dim: Estimation network hidden width (paper: 10).
        estimation_dropout: Estimation network dropout (paper: 0.5).
        lambda_energy: Weight of the mean sample energy (paper: 0.1).
        lambda_cov: Weight of the covariance penalty (paper: 0.005).
        cov_eps: ``eps`` of ``Sigma + eps * I``, in units of the standardised features
            (variance 1); large on purpose, see the module docstring.
        negative_slope: LeakyReLU slope.
        output_activation: ``sigmoid`` ([0, 1] inputs), ``tanh`` ([-1, 1]) or ``none``.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Training settings.
    """

    export_refusal = "its energy needs a Cholesky factorisation, which ONNX has no operator for"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        latent_dim: int = 8,
        n_components: int = 4,
        hidden_dim: int = 10,
        estimation_dropout: float = 0.5,
        lambda_energy: float = 0.1,
        lambda_cov: float = 0.005,
        cov_eps: float = 1.0,
        negative_slope: float = 0.2,
        output_activation: str = "sigmoid",
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, threshold_sd, engine)
        self.channels = channels
        self.latent_dim = latent_dim
        self.n_components = n_components
        self.hidden_dim = hidden_dim
        self.estimation_dropout = estimation_dropout
        self.lambda_energy = lambda_energy
        self.lambda_cov = lambda_cov
        self.cov_eps = cov_eps
        self.negative_slope = negative_slope
        self.output_activation = output_activation

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        """Sides must be divisible by 2 ** number of encoder blocks."""
        return 2 ** len(self.channels)

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        """Build compression + estimation networks for images of ``input_shape``."""
        compression = CompressionNetwork(
            self.spatial_dims,
            input_shape[1:],
            input_shape[0],
            tuple(self.channels),
            self.latent_dim,
            self.negative_slope,
            self.output_activation,
        )
        return DAGMMNetwork(
            compression,
            self.latent_dim,
            self.n_components,
            self.hidden_dim,
            self.estimation_dropout,
        )

    # -- training -------------------------------------------------------------------------
    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Squared L2 error + lambda_energy * mean energy + lambda_cov * penalty (batch GMM).

        The reconstruction term is the paper's ``||x - x'||^2`` per image (summed over
        voxels), averaged over the batch.
        """
        reconstruction, features, gamma = network(x)
        with torch.autocast(x.device.type, enabled=False):
            phi, mu, cov = gmm_parameters(features.float(), gamma.float(), self.cov_eps)
            energy = sample_energy(features.float(), phi, mu, cov)
            squared_error = (reconstruction.float() - x.float()).pow(2).flatten(1).sum(dim=1)
            return (
                squared_error.mean()
                + self.lambda_energy * energy.mean()
                + self.lambda_cov * covariance_penalty(cov)
            )

    def fit(
        self,
        train: ImageSet | np.ndarray | torch.Tensor,
        val: ImageSet | np.ndarray | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> DAGMM:
        """Train the networks, then fix the mixture on the normal training images.

        Arguments as :meth:`DeepDetector.fit`. The threshold and ``val_scores_`` are
        recomputed with the fixed mixture on the same validation normals the base used.
        """
        for name in ("phi_", "mu_", "cov_"):
            self.__dict__.pop(name, None)  # a refit must not score with an old mixture
        super().fit(train, val, run_dir=run_dir, resume=resume)
        data = self._training_data(train, val, self.engine_config)
        self._fit_mixture(data.train)
        self._set_threshold(data.val_normal if len(data.val_normal) else data.train)
        if run_dir is not None and self.is_main_process_:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def _fit_mixture(self, train: ImageSet) -> None:
        """Estimate ``phi_``, ``mu_``, ``cov_`` over ``train`` (without augmentation)."""
        images = as_cases(train, self.spatial_dims).subset(np.arange(len(train)))
        device = next(self.network_.parameters()).device
        features, gammas = [], []
        self.network_.eval()
        network = self.scoring_network()  # the features scoring will see
        with torch.no_grad():
            for batch in DataLoader(images, batch_size=self.engine_config.batch_size):
                _, f, gamma = network(batch.to(device))
                features.append(f.double().cpu())
                gammas.append(gamma.double().cpu())
        phi, mu, cov = gmm_parameters(torch.cat(features), torch.cat(gammas), self.cov_eps)
        self.phi_, self.mu_, self.cov_ = phi.numpy(), mu.numpy(), cov.numpy()

    # -- scoring --------------------------------------------------------------------------
    def evaluate(
        self, network: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample energies, squared-residual maps and reconstructions of a batch.

        Before the mixture is fixed (validation during training) the batch's own mixture
        is used.
        """
        reconstruction, features, gamma = network(x)
        with torch.autocast(x.device.type, enabled=False):
            features = features.double()
            if hasattr(self, "phi_"):
                params = [torch.as_tensor(p, device=x.device) for p in self.mixture]
            else:
                params = gmm_parameters(features, gamma.double(), self.cov_eps)
            energy = sample_energy(features, *params).float()
        return energy, residual_map(x, reconstruction, "squared"), reconstruction

    @property
    def mixture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fixed mixture ``(phi_, mu_, cov_)`` used for scoring."""
        return self.phi_, self.mu_, self.cov_

    # -- persistence ----------------------------------------------------------------------
    def saved_state(self) -> dict[str, Any]:
        """What :meth:`DeepDetector.saved_state` holds plus the fixed mixture."""
        saved = super().saved_state()
        if hasattr(self, "phi_"):  # absent at the base's save before the mixture exists
            saved[GMM_KEY] = {"phi": self.phi_, "mu": self.mu_, "cov": self.cov_}
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        if GMM_KEY not in saved:
            raise NotFittedError(
                "this DAGMM file was written before its Gaussian mixture was estimated "
                "(training was interrupted); fit again or resume the run"
            )
        super()._restore(saved)
        gmm = saved[GMM_KEY]
        self.phi_, self.mu_, self.cov_ = (
            np.asarray(gmm[k], dtype=np.float64) for k in ("phi", "mu", "cov")
        )

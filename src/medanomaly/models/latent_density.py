"""How unlikely an image's latent vector is under the normal training images.

A reconstruction error mostly follows what is hard to draw (edges, surfaces, texture); an
image can be drawn well and still be unlike every normal image, e.g. a gland that is simply
larger. This detector trains an autoencoder with a latent vector (``vae``, ``cae``,
``introvae``, ``resnet_ae``) on normal images, fits a density to the latent vectors of the
normal training images, and scores an image by the density of its own vector: the
Mahalanobis distance under one Gaussian (Ledoit-Wolf shrunk covariance, steady with few
images in many dimensions) or the negative log-likelihood under a Gaussian mixture. With
``combine: sum`` the latent score and the autoencoder's own score, each standardised by its
mean and SD on the held-out normal images, are added. The anomaly map is the autoencoder's.

A YAML config nests the autoencoder as a ``model:`` block, which inherits ``spatial_dims``,
``in_channels`` and the ``engine`` block (an ``engine`` entry inside it is merged on top)::

    model:
      name: latent_density
      encoder: {name: vae, latent_dim: 8}
      density: gaussian
      combine: sum
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.mixture import GaussianMixture

from medanomaly._version import __version__
from medanomaly.data.sets import ImageSet, as_cases
from medanomaly.detectors.base import (
    MODEL_FILE,
    AnomalyResult,
    BaseDetector,
    fit_or_load,
    standardisation,
)
from medanomaly.detectors.registry import build_nested, get_model_class, nested_block, register
from medanomaly.errors import ConfigError, check_choice
from medanomaly.training.engine import EngineConfig, split_indices

DENSITIES = ("gaussian", "gmm")
COMBINATIONS = ("latent", "sum")
DEFAULT_ENCODER = {"name": "vae"}


@register("latent_density")
class LatentDensity(BaseDetector):
    """An autoencoder's latent vectors, scored by their density under the normal ones.

    Args:
        encoder: ``model:`` block of the autoencoder (default the Chung & Choi 2023 ``vae``).
        encoder_run: Use the autoencoder already trained in this run (a run directory or
            ``model.safetensors``, e.g. from ``medanomaly fit``) instead of training ``encoder``; it
            must have been trained on the same normal images, without the validation ones.
        spatial_dims: 2 or 3, passed to the encoder unless its block sets it.
        in_channels: Image channels, passed on likewise.
        density: ``gaussian`` (Mahalanobis distance) or ``gmm`` (negative log-likelihood
            under a mixture of ``components`` full-covariance Gaussians).
        components: Mixture components of ``gmm``.
        combine: ``latent`` (the latent score alone) or ``sum`` (plus the encoder's own
            score, both standardised on the held-out normal images).
        threshold_sd: ``k`` of the threshold mean + k * SD of the normal validation scores.
        engine: Training settings of the encoder (and the validation hold-out).
    """

    export_refusal = "its latent density is a scikit-learn model (a Gaussian or a mixture)"

    def __init__(
        self,
        encoder: Mapping[str, Any] | None = None,
        encoder_run: str | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        density: str = "gaussian",
        components: int = 2,
        combine: str = "latent",
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        self.encoder = encoder
        self.encoder_run = encoder_run
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.density = density
        self.components = components
        self.combine = combine
        self.threshold_sd = threshold_sd
        self.engine = engine

    @property
    def engine_config(self) -> EngineConfig:
        """The resolved training settings."""
        return EngineConfig.from_any(self.engine)

    def encoder_block(self) -> dict[str, Any]:
        """The encoder's full ``model:`` block, with the inherited settings filled in."""
        inherited = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "engine": self.engine_config.to_dict(),
        }
        return nested_block(self.encoder or DEFAULT_ENCODER, self.name, "the encoder", inherited)

    def _check_settings(self) -> None:
        check_choice(self.name, "density", self.density, DENSITIES)
        check_choice(self.name, "combine", self.combine, COMBINATIONS)
        if self.density == "gmm" and int(self.components) < 1:
            raise ConfigError(f"{self.name}: components must be >= 1, got {self.components}")

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet | np.ndarray,
        val: ImageSet | np.ndarray | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> LatentDensity:
        """Train the encoder on normal images, then fit the latent density and the threshold.

        Args:
            train: Normal training images (images labelled abnormal are left out).
            val: Validation images (its normal ones standardise the scores and set the
                threshold; the encoder's training uses them as usual); ``None`` holds out
                ``engine.val_fraction`` of ``train``.
            run_dir: The encoder keeps its run in ``run_dir/encoder_<name>``.
            resume: Load a finished encoder or resume its interrupted training.

        Returns:
            ``self``, fitted.
        """
        self._check_settings()
        train_set = as_cases(train, self.spatial_dims)
        train_set = train_set.subset(train_set.labels != 1, keep_augment=True)
        if val is None:
            cfg = self.engine_config
            keep, held = split_indices(len(train_set), cfg.val_fraction, cfg.seed, cfg.val_min)
            train_set, val = train_set.subset(keep, keep_augment=True), train_set.subset(held)
        val_set = as_cases(val, self.spatial_dims)
        normal = val_set.subset(val_set.labels != 1)
        self.run_config_ = self._run_config(run_dir)
        if self.encoder_run is not None:
            self.encoder_ = BaseDetector.load(self.encoder_run)
        else:
            encoder = build_nested(self.encoder_block(), self.name, "encoder")
            folder = None if run_dir is None else Path(run_dir) / f"encoder_{encoder.name}"
            self.encoder_ = fit_or_load(encoder, train_set, val_set, folder, resume)
        self.history_ = self.encoder_.history_
        self.is_main_process_ = self.encoder_.is_main_process_
        self._fit_density(self._latents(train_set.subset(np.arange(len(train_set)))))
        self._standardise(normal if len(normal) else train_set.subset(np.arange(len(train_set))))
        if run_dir is not None and self.is_main_process_:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def _latents(self, images: ImageSet | np.ndarray) -> np.ndarray:
        if not self.encoder_.has_latent:
            raise ConfigError(
                f"{self.name}: the encoder {self.encoder_.name!r} has no latent vector; use "
                "vae, cae, introvae or resnet_ae"
            )
        return self.encoder_.embed(images)

    def _fit_density(self, latents: np.ndarray) -> None:
        if self.density == "gaussian":
            estimate = LedoitWolf().fit(latents)
            self.latent_mean_ = estimate.location_
            self.latent_precision_ = estimate.precision_
            self.mixture_ = None
        else:
            self.mixture_ = GaussianMixture(
                int(self.components),
                covariance_type="full",
                reg_covar=1e-4,
                random_state=self.engine_config.seed,
            ).fit(latents)

    def _standardise(self, normal: ImageSet) -> None:
        """Mean and SD of both scores on the normal images, then the threshold."""
        latent = self.latent_scores(self._latents(normal))
        own = self.encoder_.score(normal)
        self.stats_ = {"latent": standardisation(latent), "encoder": standardisation(own)}
        self._learn_threshold(self._combine(latent, own))

    def calibrate(self, normal: ImageSet | np.ndarray) -> LatentDensity:
        """Re-standardise both scores and reset the threshold on held-out normal images.

        Call it after changing ``combine``; the encoder and the density stay as fitted.
        """
        self.check_fitted()
        self._check_settings()
        self._standardise(as_cases(normal, self.spatial_dims))
        return self

    # -- scoring ----------------------------------------------------------------------------
    def latent_scores(self, latents: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (``gaussian``) or negative log-likelihood (``gmm``)."""
        if self.mixture_ is not None:
            return -self.mixture_.score_samples(latents)
        centred = latents - self.latent_mean_
        return np.sqrt(np.einsum("ij,jk,ik->i", centred, self.latent_precision_, centred))

    def _combine(self, latent: np.ndarray, own: np.ndarray) -> np.ndarray:
        z_latent = _standard(latent, self.stats_["latent"])
        if self.combine == "latent":
            return z_latent
        return z_latent + _standard(own, self.stats_["encoder"])

    def detect(self, x: ImageSet | np.ndarray) -> AnomalyResult:
        """Scores from the latent density; maps and reconstructions from the encoder."""
        self.check_fitted()
        result = self.encoder_.detect(x)
        scores = self._combine(self.latent_scores(self._latents(x)), result.scores)
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=result.maps,
            reconstructions=result.reconstructions,
            threshold=self.threshold_,
        )

    def score(self, x: ImageSet | np.ndarray) -> np.ndarray:
        """Scores only (the encoder keeps no maps)."""
        self.check_fitted()
        return self._combine(self.latent_scores(self._latents(x)), self.encoder_.score(x))

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name: latent_density, encoder, ...}, engine}``."""
        params = {k: v for k, v in self.get_params().items() if k != "engine"}
        params["encoder"] = dict(self.encoder or DEFAULT_ENCODER)
        return {"model": {"name": self.name, **params}, "engine": self.engine_config.to_dict()}

    def saved_state(self) -> dict[str, Any]:
        """Constructor arguments, the encoder's saved state, the density and the threshold."""
        params = self.config()["model"]
        params.pop("name")
        density = (
            {"mixture": _mixture_arrays(self.mixture_)}
            if self.mixture_ is not None
            else {"mean": self.latent_mean_, "precision": self.latent_precision_}
        )
        return {
            "model": self.name,
            "params": {**params, "engine": self.engine_config.to_dict()},
            "config": getattr(self, "run_config_", None) or self.config(),
            "version": __version__,
            "encoder": self.encoder_.saved_state(),
            "density": density,
            "stats": self.stats_,
            **self._threshold_state(),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        state = saved["encoder"]
        self.encoder_ = get_model_class(state["model"])(**state["params"])
        self.encoder_._restore(state)
        density = saved["density"]
        self.mixture_ = _mixture_from(density["mixture"]) if "mixture" in density else None
        if self.mixture_ is None:
            self.latent_mean_ = np.asarray(density["mean"])
            self.latent_precision_ = np.asarray(density["precision"])
        self.stats_ = {k: tuple(v) for k, v in saved["stats"].items()}
        self._restore_threshold(saved)
        self.history_ = self.encoder_.history_
        self.run_config_ = saved.get("config", {})


_MIXTURE_FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")


def _mixture_arrays(mixture: GaussianMixture) -> dict[str, Any]:
    """A fitted mixture as its settings and arrays (saved without pickling)."""
    return {"params": mixture.get_params(), **{k: getattr(mixture, k) for k in _MIXTURE_FITTED}}


def _mixture_from(saved: dict[str, Any]) -> GaussianMixture:
    """The mixture :func:`_mixture_arrays` describes, ready to score."""
    if isinstance(saved, GaussianMixture):  # a trusted legacy pickle
        return saved
    mixture = GaussianMixture(**saved["params"])
    for name in _MIXTURE_FITTED:
        setattr(mixture, name, np.asarray(saved[name]))
    return mixture


def _standard(values: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - stats[0]) / stats[1]

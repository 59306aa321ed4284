"""``quality``: a no-model normative detector of standard image-quality measures.

Like MRIQC's image-quality metrics (Esteban et al. 2017) and the no-reference measures of
fundus quality screening (Şevik et al. 2014), each image is reduced to a short vector of
plain measures taken inside its foreground; a robust Gaussian fitted to the normal training
images says how unusual a vector is. Works in 2D and 3D, with any number of channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.covariance import LedoitWolf, MinCovDet

from medanomaly.data.sets import Cases
from medanomaly.detectors.registry import register
from medanomaly.errors import ConfigError, check_choice, did_you_mean
from medanomaly.models.baselines import SD_FLOOR, StatisticDetector, _chunks
from medanomaly.training.engine import EngineConfig

COVARIANCES = ("ledoit_wolf", "mcd")
HISTOGRAM_BINS = 64
SATURATION_SHARE = 0.01
"""A value within this share of the range from either end of ``value_range`` is saturated."""
EDGE_WIDTH = 2
"""The foreground is eroded by this many voxels for sharpness and noise (its edge is no detail)."""
PER_CHANNEL = ("brightness", "contrast", "saturated_high", "saturated_low", "sharpness", "snr")
GLOBAL = ("entropy", "foreground_fraction")


@register("quality")
class QualityBaseline(StatisticDetector):
    """Mahalanobis distance of image-quality measures from those of normal images.

    The measures, all inside the foreground (voxels with any channel above
    ``foreground_threshold``):

    * per channel: ``brightness`` (mean), ``contrast`` (RMS contrast: the SD),
      ``saturated_high`` and ``saturated_low`` (share of voxels within 1 % of the top or
      bottom of ``value_range``: over- and under-exposure), ``sharpness`` (log of the variance
      of the Laplacian, as in Pech-Pacheco et al. 2000) and ``snr`` (log of the mean over the
      SD of the high-pass residual, the image minus its Gaussian blur with sigma 1 voxel);
    * ``entropy`` of the channel mean's histogram (64 bins over ``value_range``, in bits);
    * ``foreground_fraction``: the share of the frame that is foreground.

    Fit: the measures of the normal training images are standardised and a robust Gaussian is
    fitted to them (``ledoit_wolf``: scikit-learn's shrunk covariance, fine with fewer images
    than measures; ``mcd``: minimum covariance determinant, which ignores outlying training
    images). Score: the Mahalanobis distance. Map: each voxel's absolute intensity z-score
    against the normal images' per-channel mean and SD (averaged over channels, 0 outside the
    foreground): where the image is brighter or darker than normal. Give it images on a fixed
    scale (e.g. 8-bit values divided by 255), not rescaled per image, or brightness and
    contrast are lost.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        covariance: ``ledoit_wolf`` or ``mcd``.
        value_range: ``(low, high)`` of the image values, for saturation and entropy.
        foreground_threshold: Voxels with any channel above it are foreground; ``None``: all.
        threshold_sd: ``k`` of the default threshold mean + k * SD of normal validation scores.
        engine: Only ``val_fraction`` and ``seed`` are used (``seed`` also seeds ``mcd``).
        features: Keep only these measures (names as :meth:`measure_names`, e.g.
            ``[sharpness_c1]``: the green channel's sharpness alone, whose Mahalanobis
            distance is then its absolute z-score); ``None``: all.

    Raises:
        ConfigError: A name in ``features`` is not a measure of ``in_channels`` channels.
    """

    exportable = False
    export_refusal = "its image-quality measures and their Mahalanobis distance run in NumPy"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        covariance: str = "ledoit_wolf",
        value_range: tuple[float, float] | list[float] = (0.0, 1.0),
        foreground_threshold: float | None = None,
        threshold_sd: float = 3.0,
        engine: EngineConfig | dict[str, Any] | None = None,
        features: list[str] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, foreground_threshold, threshold_sd, engine)
        self.covariance = covariance
        self.value_range = value_range
        self.features = features
        self._columns()  # unknown names fail when the detector is built

    def all_measure_names(self) -> list[str]:
        """Names of every measure this detector can take, before ``features`` selects."""
        names = [f"{m}_c{c}" for m in PER_CHANNEL for c in range(self.in_channels)]
        return [*names, *GLOBAL]

    def measure_names(self) -> list[str]:
        """Names of the measures used, in the order of :meth:`measures`' columns."""
        names = self.all_measure_names()
        return [names[i] for i in self._columns()]

    def _columns(self) -> list[int]:
        """Positions of the kept measures among :meth:`all_measure_names`."""
        names = self.all_measure_names()
        if self.features is None:
            return list(range(len(names)))
        if not self.features:
            raise ConfigError(f"{self.name}: features is empty; give measure names or leave it out")
        for feature in self.features:
            if feature not in names:
                raise ConfigError(
                    f"{self.name}: unknown measure {feature!r} for {self.in_channels} "
                    f"channel(s).{did_you_mean(str(feature), names)}"
                )
        return [names.index(feature) for feature in self.features]

    def measures(self, x: torch.Tensor) -> np.ndarray:
        """The quality measures ``(B, n_measures)`` of a batch ``(B, C, *spatial)``."""
        images = x.double().numpy()
        inside = self.foreground(x).numpy()
        table = np.stack(
            [self._measures(image, mask) for image, mask in zip(images, inside, strict=True)]
        )
        return table[:, self._columns()]

    def _measures(self, image: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """Measures of one image ``(C, *spatial)`` inside ``inside``."""
        low, high = (float(v) for v in self.value_range)
        margin = SATURATION_SHARE * (high - low)
        if not inside.any():
            inside = np.ones_like(inside)
        core = ndimage.binary_erosion(inside, iterations=EDGE_WIDTH)
        core = core if core.any() else inside
        per_channel = []
        for channel in image:
            values = channel[inside]
            detail = ndimage.laplace(channel)[core]
            residual = (channel - ndimage.gaussian_filter(channel, 1.0))[core]
            per_channel.append(
                [
                    values.mean(),
                    values.std(),
                    np.mean(values >= high - margin),
                    np.mean(values <= low + margin),
                    np.log(detail.var() + SD_FLOOR),
                    np.log((abs(values.mean()) + SD_FLOOR) / (residual.std() + SD_FLOOR)),
                ]
            )
        counts, _ = np.histogram(image.mean(axis=0)[inside], HISTOGRAM_BINS, (low, high))
        share = counts[counts > 0] / max(counts.sum(), 1)
        entropy = float(-(share * np.log2(share)).sum())
        by_measure = np.asarray(per_channel).T.ravel()  # measure-major, as measure_names
        return np.concatenate([by_measure, [entropy, inside.mean()]])

    def fit_statistics(self, images: np.ndarray | Cases) -> None:
        """Standardise the normal measures and fit the robust Gaussian; intensity moments."""
        check_choice(self.name, "covariance", self.covariance, COVARIANCES)
        features, sums, squares, count = [], 0.0, 0.0, 0.0
        for x in _chunks(images):
            features.append(self.measures(x))
            inside = self.foreground(x).unsqueeze(1).double()
            values = x.double() * inside
            dims = [0, *range(2, x.dim())]
            sums = sums + values.sum(dim=dims)
            squares = squares + (values * values).sum(dim=dims)
            count = count + inside.sum().item()
        table = np.concatenate(features)
        self.center_ = table.mean(axis=0)
        scale = table.std(axis=0)
        self.scale_ = np.where(scale > SD_FLOOR, scale, 1.0)
        standard = (table - self.center_) / self.scale_
        estimator = (
            MinCovDet(random_state=self.engine_config.seed)
            if self.covariance == "mcd"
            else LedoitWolf()
        )
        estimator.fit(standard)
        self.location_ = estimator.location_
        self.precision_ = estimator.precision_
        mean = (sums / max(count, 1.0)).numpy()
        self.intensity_mean_ = mean
        self.intensity_sd_ = np.sqrt(np.maximum((squares / max(count, 1.0)).numpy() - mean**2, 0))
        self.intensity_sd_ = np.maximum(self.intensity_sd_, SD_FLOOR)

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mahalanobis distances of the measures and intensity z-score maps."""
        standard = (self.measures(x) - self.center_) / self.scale_
        offset = standard - self.location_
        squared = np.einsum("ij,jk,ik->i", offset, self.precision_, offset)
        scores = torch.from_numpy(np.sqrt(np.maximum(squared, 0.0)))
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mean = torch.from_numpy(self.intensity_mean_).view(shape)
        sd = torch.from_numpy(self.intensity_sd_).view(shape)
        z = ((x.double() - mean) / sd).abs().mean(dim=1)
        maps = torch.where(self.foreground(x), z, torch.zeros_like(z)).float()
        return scores, maps

    def statistics(self) -> dict[str, np.ndarray]:
        """The measures' standardisation, the Gaussian and the intensity moments."""
        return {
            "center_": self.center_,
            "scale_": self.scale_,
            "location_": self.location_,
            "precision_": self.precision_,
            "intensity_mean_": self.intensity_mean_,
            "intensity_sd_": self.intensity_sd_,
        }

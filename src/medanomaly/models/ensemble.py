"""Score ensemble and fusion: detectors trained on the same normals, standardised, weighted.

Each member's scores are turned into z-scores with the mean and SD of its scores on the
held-out normal validation images, and the ensemble score is the mean of those z-scores
(the UAD slide deck's suggestion of "ensembles of scores"). Members that err on different images
(different architectures, residuals or seeds) average out each other's misses. Maps are
standardised the same way, with the mean and SD of the member's validation maps.

Fusion: ``weights`` gives each member a weight (the ensemble score is the weighted mean of
the z-scores, maps likewise); ``weights: validation`` chooses them on the validation images
(normal against abnormal, highest AUROC over a grid of weights summing to 1, ties to the most
even weights), e.g. to fuse a model with a no-model statistic (``intensity``).

A YAML config lists the members as ``model:`` blocks; each inherits ``spatial_dims``,
``in_channels`` and the ``engine`` block of the ensemble, and may override any of them
(an ``engine`` entry inside a member is merged onto the ensemble's)::

    model:
      name: ensemble
      members:
        - {name: cae, residual: squared}
        - {name: cae, residual: ssim, engine: {seed: 1}}
      weights: validation   # or [0.7, 0.3]; default equal weights
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from medanomaly.errors import ConfigError
from medanomaly.training.engine import EngineConfig, split_indices

DEFAULT_MEMBERS = ({"name": "cae"}, {"name": "cae", "residual": "ssim"})
WEIGHT_STEP = 0.1
"""Grid step of the weights chosen on validation (two members; 0.25 for more)."""


def weight_grid(n_members: int) -> list[tuple[float, ...]]:
    """Every weight vector of ``n_members`` non-negative weights summing to 1 on a grid."""
    step = WEIGHT_STEP if n_members <= 2 else 0.25
    ticks = round(1.0 / step)
    return [
        tuple(c / ticks for c in combo)
        for combo in itertools.product(range(ticks + 1), repeat=n_members)
        if sum(combo) == ticks
    ]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def choose_weights(z_scores: Sequence[np.ndarray], labels: np.ndarray) -> tuple[float, ...]:
    """The weights whose weighted z-score has the highest AUROC on labelled validation cases.

    Ties go to the most even weights (then to the first in grid order).

    Raises:
        ConfigError: If the validation cases are not both normal and abnormal.
    """
    labels = np.asarray(labels)
    known = labels != -1
    if set(labels[known].tolist()) != {0, 1}:
        raise ConfigError(
            "fusion: choosing weights on validation needs normal and abnormal validation "
            f"cases, got {int(np.sum(labels == 0))} normal and {int(np.sum(labels == 1))} "
            "abnormal"
        )
    stacked = np.stack([np.asarray(z, dtype=np.float64)[known] for z in z_scores])

    def key(weights: tuple[float, ...]) -> tuple[float, float]:
        fused = np.asarray(weights) @ stacked
        return auroc(labels[known], fused), -float(np.ptp(weights))

    return max(weight_grid(len(z_scores)), key=key)


@register("ensemble")
class Ensemble(BaseDetector):
    """Mean of the validation-standardised scores of several detectors.

    Args:
        members: ``model:`` blocks of the members (each with a ``name``); default a CAE
            scored by squared residual and one scored by structural dissimilarity.
        spatial_dims: 2 or 3, passed to every member that does not set it.
        in_channels: Image channels, passed on likewise.
        threshold_sd: ``k`` of the threshold mean + k * SD of the ensemble's normal
            validation scores.
        weights: One weight per member (``None``: equal), or ``"validation"`` to choose
            them on the validation images (see :func:`choose_weights`).
        engine: Training settings shared by the members (a member's ``engine`` entry is
            merged onto them).
    """

    export_refusal = "it scores its members one by one; export each member instead"

    def __init__(
        self,
        members: Sequence[Mapping[str, Any]] | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        threshold_sd: float = 3.0,
        weights: Sequence[float] | str | None = None,
        engine: EngineConfig | dict[str, Any] | None = None,
    ) -> None:
        if isinstance(weights, str) and weights != "validation":
            raise ConfigError(f"ensemble: weights must be a list or 'validation', got {weights!r}")
        self.members = members
        self.weights = weights
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.threshold_sd = threshold_sd
        self.engine = engine

    # -- members ----------------------------------------------------------------------------
    @property
    def engine_config(self) -> EngineConfig:
        """The resolved shared training settings."""
        return EngineConfig.from_any(self.engine)

    def member_blocks(self) -> list[dict[str, Any]]:
        """Each member's full ``model:`` block, with the inherited settings filled in."""
        blocks = list(self.members or DEFAULT_MEMBERS)
        if not blocks:
            raise ConfigError("ensemble: 'members' is empty; list at least one model block")
        inherited = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "engine": self.engine_config.to_dict(),
        }
        return [
            nested_block(block, self.name, f"member {index + 1}", inherited)
            for index, block in enumerate(blocks)
        ]

    def _build_members(self) -> list[BaseDetector]:
        return [build_nested(block, self.name, "member") for block in self.member_blocks()]

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet | np.ndarray,
        val: ImageSet | np.ndarray | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> Ensemble:
        """Fit every member on ``train`` (normal images) and standardise on ``val``.

        Args:
            train: Normal training images.
            val: Validation images (normal ones standardise the scores and set the
                threshold); ``None`` holds out ``engine.val_fraction`` of ``train``, the same
                images for every member.
            run_dir: Each member keeps its run in ``run_dir/member_<i>_<name>``.
            resume: Resume interrupted members; finished members are loaded, not retrained.

        Returns:
            ``self``, fitted.
        """
        members = self._build_members()
        train_set = as_cases(train, self.spatial_dims)
        if val is None:
            cfg = self.engine_config
            keep, held = split_indices(len(train_set), cfg.val_fraction, cfg.seed, cfg.val_min)
            train_set, val = train_set.subset(keep, keep_augment=True), train_set.subset(held)
        val_set = as_cases(val, self.spatial_dims)
        normal = val_set.subset(val_set.labels != 1)
        if len(normal) == 0:
            raise ConfigError("ensemble: the validation images hold no normal image")
        self.run_config_ = self._run_config(run_dir)
        self.members_ = [
            self._fit_member(i, m, train_set, val_set, run_dir, resume)
            for i, m in enumerate(members)
        ]
        self.history_ = self.members_[0].history_
        self.is_main_process_ = all(m.is_main_process_ for m in self.members_)
        self._standardise(normal, val_set)
        if run_dir is not None and self.is_main_process_:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def _fit_member(
        self,
        index: int,
        member: BaseDetector,
        train: ImageSet,
        val: ImageSet,
        run_dir: str | Path | None,
        resume: bool,
    ) -> BaseDetector:
        folder = None if run_dir is None else Path(run_dir) / f"member_{index + 1}_{member.name}"
        return fit_or_load(member, train, val, folder, resume)

    @classmethod
    def from_fitted(
        cls,
        members: Sequence[BaseDetector],
        val: ImageSet,
        weights: Sequence[float] | str | None = None,
        threshold_sd: float = 3.0,
    ) -> Ensemble:
        """Fuse detectors fitted elsewhere, standardised (and weighted) on ``val``.

        Args:
            members: Fitted detectors of the same images.
            val: Validation images (normal ones standardise; with ``"validation"`` weights,
                normal and abnormal ones choose the weights).
            weights: As the constructor's.
            threshold_sd: As the constructor's.
        """
        blocks = [member.config()["model"] for member in members]
        fused = cls(
            members=blocks,
            spatial_dims=members[0].spatial_dims,
            threshold_sd=threshold_sd,
            weights=weights,
        )
        fused.members_ = list(members)
        fused.history_ = []
        val_set = as_cases(val, fused.spatial_dims)
        fused._standardise(val_set.subset(val_set.labels != 1), val_set)
        return fused

    def _standardise(self, normal: ImageSet, val: ImageSet) -> None:
        """Score and map statistics of each member on the normal validation images."""
        results = [member.detect(normal) for member in self.members_]
        self.score_stats_ = [standardisation(r.scores) for r in results]
        self.map_stats_ = [standardisation(r.maps) for r in results]
        self.weights_ = self._resolve_weights(val)
        self._learn_threshold(self._combine_scores([r.scores for r in results]))

    def _resolve_weights(self, val: ImageSet) -> tuple[float, ...]:
        n = len(self.members_)
        if self.weights is None:
            return (1.0 / n,) * n
        if self.weights == "validation":
            z = self._z_scores([m.score(val) for m in self.members_])
            return choose_weights(z, val.labels)
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                f"ensemble: weights {list(weights)} must be {n} non-negative numbers, not all 0"
            )
        return tuple(w / sum(weights) for w in weights)

    def _z_scores(self, scores: list[np.ndarray]) -> list[np.ndarray]:
        return [(s - mean) / sd for s, (mean, sd) in zip(scores, self.score_stats_, strict=True)]

    # -- inference --------------------------------------------------------------------------
    def _combine_scores(self, scores: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.weights_) @ np.stack(self._z_scores(scores))

    def detect(self, x: ImageSet | np.ndarray) -> AnomalyResult:
        """Combined scores and maps; ``reconstructions`` are the first member's, if any."""
        self.check_fitted()
        results = [member.detect(x) for member in self.members_]
        scores = self._combine_scores([r.scores for r in results])
        z_maps = [
            (r.maps - mean) / sd for r, (mean, sd) in zip(results, self.map_stats_, strict=True)
        ]
        maps = sum(w * m for w, m in zip(self.weights_, z_maps, strict=True)).astype(np.float32)
        return AnomalyResult(
            scores=scores,
            labels=(scores > self.threshold_).astype(np.int64),
            maps=maps,
            reconstructions=results[0].reconstructions,
            threshold=self.threshold_,
        )

    def score(self, x: ImageSet | np.ndarray) -> np.ndarray:
        """Combined scores only (members keep no maps in memory)."""
        self.check_fitted()
        return self._combine_scores([member.score(x) for member in self.members_])

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved config: ``{model: {name: ensemble, members, ...}, engine: {...}}``."""
        params = {k: v for k, v in self.get_params().items() if k != "engine"}
        params["members"] = [dict(m) for m in (self.members or DEFAULT_MEMBERS)]
        return {"model": {"name": self.name, **params}, "engine": self.engine_config.to_dict()}

    def saved_state(self) -> dict[str, Any]:
        """Constructor arguments, each member's saved state and the standardisation."""
        params = self.config()["model"]
        params.pop("name")
        return {
            "model": self.name,
            "params": {**params, "engine": self.engine_config.to_dict()},
            "config": getattr(self, "run_config_", None) or self.config(),
            "version": __version__,
            "members": [member.saved_state() for member in self.members_],
            "score_stats": self.score_stats_,
            "map_stats": self.map_stats_,
            "weights": list(self.weights_),
            **self._threshold_state(),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        self.members_ = []
        for state in saved["members"]:
            member = get_model_class(state["model"])(**state["params"])
            member._restore(state)
            self.members_.append(member)
        self.score_stats_ = [tuple(s) for s in saved["score_stats"]]
        self.map_stats_ = [tuple(s) for s in saved["map_stats"]]
        n = len(self.members_)
        self.weights_ = tuple(saved.get("weights") or (1.0 / n,) * n)
        self._restore_threshold(saved)
        self.history_ = self.members_[0].history_
        self.run_config_ = saved.get("config", {})

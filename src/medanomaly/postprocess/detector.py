"""A detector whose maps (and optionally scores) pass through a post-processing chain.

:func:`medanomaly.config.build_detector` wraps the detector of any config with a
``postprocess:`` list in :class:`PostProcessed`; the run saves the wrapper, so ``score``,
``evaluate``, ``screen``, ``cv`` and ``compare`` all apply the same steps the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly._version import __version__
from medanomaly.data.sets import Cases, ImageSet, as_cases
from medanomaly.detectors.base import (
    MODEL_FILE,
    AnomalyResult,
    BaseDetector,
)
from medanomaly.detectors.registry import get_model, get_model_class, register
from medanomaly.errors import ConfigError
from medanomaly.postprocess.chain import PostProcess

log = logging.getLogger(__name__)

DEFAULT_STEPS = ({"smooth": {"sigma": 1.0}}, {"score": {"reduce": "percentile", "value": 99.0}})
"""Steps of a ``postprocessed`` detector built without any (smoothing, then a new score)."""


@register("postprocessed")
class PostProcessed(BaseDetector):
    """Any detector followed by post-processing steps of its maps.

    Args:
        model: The inner detector's ``model:`` block (with ``name``); default the
            ``intensity`` baseline.
        postprocess: The steps in YAML form (see :mod:`medanomaly.postprocess.steps`);
            default :data:`DEFAULT_STEPS`.
        spatial_dims: Passed to the inner detector unless its block sets it.
        threshold_sd: ``k`` of the threshold mean + k * SD of the normal validation scores,
            used when a ``score`` step recomputes the scores (else the inner detector's
            threshold is kept).
        engine: The inner detector's training settings.
    """

    def __init__(
        self,
        model: Mapping[str, Any] | None = None,
        postprocess: Sequence[Any] | None = None,
        spatial_dims: int | None = None,
        threshold_sd: float = 3.0,
        engine: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.postprocess = postprocess
        self.spatial_dims = spatial_dims
        self.threshold_sd = threshold_sd
        self.engine = engine
        self._chain = PostProcess(DEFAULT_STEPS if postprocess is None else postprocess)
        params = dict(model or {"name": "intensity"})
        if spatial_dims is not None:
            params.setdefault("spatial_dims", spatial_dims)
        name = params.pop("name", None)
        if not name:
            raise ConfigError("postprocessed: the inner model block has no 'name'")
        try:
            self._inner = get_model(name, **params, engine=engine)
        except TypeError as error:
            raise ConfigError(f"model {name!r}: {error}") from error
        self.spatial_dims = self._inner.spatial_dims

    @property
    def inner(self) -> BaseDetector:
        """The wrapped detector."""
        return self._inner

    @property
    def chain(self) -> PostProcess:
        """The post-processing steps."""
        return self._chain

    # The wrapper declares what its inner detector declares, and shares its fitted state.
    @property
    def baseline(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.baseline

    @property
    def supervised(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.supervised

    @property
    def has_latent(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.has_latent

    @property
    def scores_any_size(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.scores_any_size

    @property
    def streams(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.streams

    @property
    def foreground_threshold(self) -> float | None:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.foreground_threshold

    @property
    def in_channels(self) -> int:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.in_channels

    @property
    def history_(self) -> list[dict[str, float]]:  # type: ignore[override]
        """The inner detector's training history."""
        return self._inner.history_

    @property
    def is_main_process_(self) -> bool:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.is_main_process_

    @property
    def input_shape_(self) -> tuple[int, ...] | None:  # type: ignore[override]
        """As the inner detector."""
        return self._inner.input_shape_

    def resolved_settings(self) -> dict[str, Any]:
        """As the inner detector."""
        return self._inner.resolved_settings()

    def embed(self, x: Any) -> np.ndarray:
        """The inner detector's latent vectors."""
        return self._inner.embed(x)

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: Any,
        val: Any = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
    ) -> PostProcessed:
        """Fit the inner detector, then set the threshold on post-processed scores."""
        self.run_config_ = self._run_config(run_dir)
        self._inner.fit(train, val, run_dir=run_dir, resume=resume)
        self._calibrate(train, val)
        if run_dir is not None:
            self.save(Path(run_dir) / MODEL_FILE)
        return self

    def _calibrate(self, train: Any, val: Any) -> None:
        if self._chain.scorer is None:
            self.val_scores_ = np.asarray(self._inner.val_scores_, dtype=np.float64)
            self.threshold_ = float(self._inner.threshold_)
            self.threshold_rule_ = self._inner.threshold_rule_
            return
        source = as_cases(val if val is not None else train, self.spatial_dims)
        if val is None:
            log.warning(
                "postprocessed: no validation images given; the threshold of the "
                "post-processed scores rests on the training normals"
            )
        normal = source.subset(source.labels != 1)
        self.threshold_ = 0.0  # detect needs one; replaced below
        self._learn_threshold(self.detect(normal).scores)

    # -- inference --------------------------------------------------------------------------
    def detect(self, x: Any) -> AnomalyResult:
        """The inner detector's result with post-processed maps (and scores)."""
        self.check_fitted()
        cases = as_cases(x, self.spatial_dims)
        result = self._inner.detect(cases)
        result = AnomalyResult(
            result.scores, result.labels, result.maps, result.reconstructions, self.threshold_
        )
        groups = cases.groups if isinstance(cases, ImageSet) else None
        return self._chain.apply(result, _images(cases), groups)

    def score(self, x: Any) -> np.ndarray:
        """Post-processed scores (the inner detector's own scores without a score step)."""
        if self._chain.scorer is None:
            self.check_fitted()
            return np.asarray(self._inner.score(x), dtype=np.float64)
        return self.detect(x).scores

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The inner detector's config with the ``postprocess`` list beside it."""
        return {**self._inner.config(), "postprocess": [*self._chain.config]}

    def saved_state(self) -> dict[str, Any]:
        """The inner detector's saved state, the steps and the threshold."""
        return {
            "model": self.name,
            "params": {
                "model": self._inner.config()["model"],
                "postprocess": [*self._chain.config],
                "threshold_sd": self.threshold_sd,
                "engine": None if self.engine is None else dict(self.engine),
            },
            "config": self.run_config_,
            "version": __version__,
            "inner": self._inner.saved_state(),
            **self._threshold_state(),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        state = saved["inner"]
        self._inner = get_model_class(state["model"])(**state["params"])
        self._inner._restore(state)
        self._restore_threshold(saved)
        self.run_config_ = saved.get("config", {})


class _CaseImages(Sequence):
    """Each case's image ``(C, *spatial)`` read on demand (a streamed set stays streamed)."""

    def __init__(self, cases: Cases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self.cases.batch([index])[0])


def _images(cases: Cases) -> Sequence[np.ndarray]:
    if isinstance(cases, ImageSet):
        return cases.images
    return _CaseImages(cases)

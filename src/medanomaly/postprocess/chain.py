"""A list of post-processing steps, built from its YAML form and applied case by case."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medanomaly.detectors.base import AnomalyResult
from medanomaly.errors import ConfigError, did_you_mean
from medanomaly.postprocess.steps import STEPS, Step


def _split_item(item: Any, index: int) -> tuple[str, dict[str, Any]]:
    """``(name, arguments)`` of one entry: ``name`` or ``{name: {arguments}}``."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping) and len(item) == 1:
        name, args = next(iter(item.items()))
        if args is None or isinstance(args, Mapping):
            return str(name), dict(args or {})
    raise ConfigError(
        f"postprocess entry {index + 1} must be a name or a one-key mapping "
        f"name: {{arguments}}, got {item!r}"
    )


def build_step(name: str, args: Mapping[str, Any] | None = None) -> Step:
    """One step from its name and arguments.

    Raises:
        ConfigError: Unknown step or argument (with a did-you-mean hint), or a bad value.
    """
    if name not in STEPS:
        raise ConfigError(
            f"unknown post-processing step {name!r}.{did_you_mean(name, STEPS)} "
            f"Available: {', '.join(STEPS)}."
        )
    cls = STEPS[name]
    known = [p for p in inspect.signature(cls).parameters]
    for arg in args or {}:
        if arg not in known:
            raise ConfigError(
                f"post-processing step {name!r}: unknown argument {arg!r}."
                f"{did_you_mean(arg, known)} Arguments: {', '.join(known) or 'none'}."
            )
    try:
        return cls(**dict(args or {}))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"post-processing step {name!r}: {error}") from error


class PostProcess:
    """Steps applied in order to every case's map (and, with a ``score`` step, its score).

    Args:
        config: The YAML list form, e.g. ``[{smooth: {sigma: 1}}, {rim: {width: 3}}]``;
            ``None`` or ``[]`` for none.
    """

    def __init__(self, config: Sequence[Any] | None = None) -> None:
        if config is not None and (isinstance(config, str | bytes | Mapping)):
            raise ConfigError(f"postprocess must be a list of steps, got {config!r}")
        self.config = [item for item in (config or [])]
        self.steps = [build_step(*_split_item(item, i)) for i, item in enumerate(self.config)]
        scorers = [s for s in self.steps if s.sets_score]
        if len(scorers) > 1 or (scorers and self.steps[-1] is not scorers[0]):
            raise ConfigError("postprocess: a 'score' step may only come last, once")
        self.scorer = scorers[0] if scorers else None

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __repr__(self) -> str:
        return f"PostProcess({self.config!r})"

    def map_of(
        self, anomaly_map: np.ndarray, image: np.ndarray, reconstruction: np.ndarray | None
    ) -> np.ndarray:
        """One case's processed map."""
        out = np.asarray(anomaly_map, dtype=np.float32)
        for step in self.steps:
            out = step.apply(out, image, reconstruction)
        return out

    def apply(self, result: AnomalyResult, images: Sequence[np.ndarray]) -> AnomalyResult:
        """The result with processed maps (and scores, with a ``score`` step).

        Args:
            result: A detector's result on the cases.
            images: Each case's image ``(C, *spatial)``, in the order of ``result``.

        Returns:
            A new result; ``labels`` follow ``result.threshold``.
        """
        if not self.steps:
            return result
        recon = result.reconstructions
        maps = [
            self.map_of(result.maps[i], images[i], None if recon is None else recon[i])
            for i in range(len(result.scores))
        ]
        scores = np.asarray(result.scores, dtype=np.float64)
        if self.scorer is not None:
            scores = np.array(
                [self.scorer.reduce_map(m, images[i]) for i, m in enumerate(maps)],
                dtype=np.float64,
            )
        return AnomalyResult(
            scores=scores,
            labels=(scores > result.threshold).astype(np.int64),
            maps=_stack(maps),
            reconstructions=recon,
            threshold=result.threshold,
        )


def _stack(maps: list[np.ndarray]) -> np.ndarray:
    """One array of maps, or an object array when they differ in shape."""
    if len({m.shape for m in maps}) <= 1:
        return np.stack(maps) if maps else np.zeros((0,), dtype=np.float32)
    out = np.empty(len(maps), dtype=object)
    out[:] = maps
    return out

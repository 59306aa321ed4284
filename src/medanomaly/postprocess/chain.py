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
        """One case's processed map (a group step sees the case as its own group)."""
        return self._case_run(
            self.steps, np.asarray(anomaly_map, np.float32), image, reconstruction
        )

    @staticmethod
    def _case_run(
        steps: Sequence[Step], out: np.ndarray, image: np.ndarray, recon: np.ndarray | None
    ) -> np.ndarray:
        for step in steps:
            out = (
                step.apply_group([out], [image])[0]
                if step.per_group
                else step.apply(out, image, recon)
            )
        return out

    def apply(
        self,
        result: AnomalyResult,
        images: Sequence[np.ndarray],
        groups: Sequence[Any] | None = None,
    ) -> AnomalyResult:
        """The result with processed maps (and scores, with a ``score`` step).

        Args:
            result: A detector's result on the cases.
            images: Each case's image ``(C, *spatial)``, in the order of ``result``.
            groups: Each case's group (patient), for ``group_scale``; ``None``: every case
                is its own group.

        Returns:
            A new result; ``labels`` follow ``result.threshold``.
        """
        if not self.steps:
            return result
        maps = [np.asarray(m, dtype=np.float32) for m in result.maps]
        for steps in self._runs():
            if steps[0].per_group:
                maps = _by_group(steps[0], maps, images, groups)
            else:
                maps = self._case_steps(steps, maps, images, result.reconstructions)
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
            reconstructions=result.reconstructions,
            threshold=result.threshold,
        )

    def _runs(self) -> list[list[Step]]:
        """The steps cut into runs of case steps and lone group steps (one image read a run)."""
        runs: list[list[Step]] = []
        for step in self.steps:
            if step.per_group or not runs or runs[-1][0].per_group:
                runs.append([step])
            else:
                runs[-1].append(step)
        return runs

    def _case_steps(
        self,
        steps: list[Step],
        maps: list[np.ndarray],
        images: Sequence[np.ndarray],
        recon: np.ndarray | None,
    ) -> list[np.ndarray]:
        return [
            self._case_run(steps, m, images[i], None if recon is None else recon[i])
            for i, m in enumerate(maps)
        ]


def _by_group(
    step: Step,
    maps: list[np.ndarray],
    images: Sequence[np.ndarray],
    groups: Sequence[Any] | None,
) -> list[np.ndarray]:
    """A group step applied to each group's maps together."""
    keys = list(range(len(maps))) if groups is None else [str(g) for g in groups]
    if len(keys) != len(maps):
        raise ValueError(f"{len(keys)} groups for {len(maps)} maps")
    out = list(maps)
    for key in dict.fromkeys(keys):
        index = [i for i, k in enumerate(keys) if k == key]
        processed = step.apply_group([maps[i] for i in index], [images[i] for i in index])
        for i, m in zip(index, processed, strict=True):
            out[i] = m
    return out


def _stack(maps: list[np.ndarray]) -> np.ndarray:
    """One array of maps, or an object array when they differ in shape."""
    if len({m.shape for m in maps}) <= 1:
        return np.stack(maps) if maps else np.zeros((0,), dtype=np.float32)
    out = np.empty(len(maps), dtype=object)
    out[:] = maps
    return out

"""The spec of ``medanomaly compare``: data, protocol, level, candidates, post-processing.

A spec is YAML::

    data:
      path: ../shared/data/head_ct_hemorrhage/manifest.csv   # folder or manifest
      label_names: {hemorrhage: 1}                          # load_dataset arguments
      transforms: [...]
    protocol:
      kind: kfold        # kfold (val_fraction) | val_groups (n_val) | split_column
      folds: 5
      repeats: 2
      val_fraction: 0.2
      seed: 0
      select_fraction: 0.5   # share of each validation part that only chooses the winner
    level: image         # image | pixel | both
    threshold: f1        # image-level threshold rule on each validation part
    ci: bootstrap        # optional: 95 % stratified bootstrap CI of each fold's test AUROC
    candidates:
      intensity: {config: intensity_head_ct_2d}     # a built-in config name, or a file
      dae: {config: dae_head_ct_2d, set: [engine.epochs=20]}
      cae_small: {model: {name: cae, ...}, engine: {...}}
      dae+intensity: {fusion: [dae, intensity]}
      dae_mse: {rescore: dae, set: [model.foreground_threshold=null]}  # dae's network, re-scored
    postprocess:         # choices searched on the validation part, each a list of steps
      - []
      - [{smooth: {sigma: 1}}]
    subgroups: kind      # optional: a manifest column; test AUROC of the normals against
                         # the abnormal cases of each of its values (auroc_<value>)

Every name (model, transform, post-processing step, fusion member) is checked when the spec
is read, before anything trains. A spec is a file or the name of a built-in spec
(``head_ct``; ``medanomaly config list --specs``). Paths in a spec file are taken as given,
else relative to the spec's folder; a built-in spec's data path is relative to the current
folder (or replaced by ``--data``). A candidate's ``config:`` is a file, else a built-in
config name (``medanomaly config list``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from medanomaly.builtin import resolve
from medanomaly.config import SECTIONS, apply_overrides, build_detector, load_config
from medanomaly.errors import ConfigError, check_choice, did_you_mean
from medanomaly.postprocess import PostProcess
from medanomaly.transforms.compose import build_transforms

PROTOCOLS = ("kfold", "val_groups", "split_column")
LEVELS = ("image", "pixel", "both")
SPEC_KEYS = (
    "data",
    "protocol",
    "level",
    "threshold",
    "ci",
    "candidates",
    "postprocess",
    "subgroups",
)
CI_KINDS = ("none", "bootstrap")
CANDIDATE_KEYS = ("config", "set", "fusion", "rescore", *SECTIONS)


@dataclass(frozen=True)
class Protocol:
    """How the labelled cases are split (see :mod:`medanomaly.model_selection.splits`).

    Attributes:
        kind: ``kfold``, ``val_groups`` or ``split_column``.
        folds: Test folds per repeat.
        repeats: Repeats with a different shuffling of the groups.
        val_fraction: Share of a training part held out for validation (``kfold``).
        n_val: Validation groups drawn from a training part (``val_groups``).
        seed: Seed of the splits.
        select_fraction: Share of each validation part (by groups) that only chooses
            between candidates; the rest tunes them (see
            :mod:`medanomaly.model_selection.selection`).
    """

    kind: str = "kfold"
    folds: int = 5
    repeats: int = 1
    val_fraction: float = 0.2
    n_val: int = 4
    seed: int = 0
    select_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_choice("protocol", "kind", self.kind, PROTOCOLS)
        if self.kind != "split_column" and (self.folds < 2 or self.repeats < 1):
            raise ConfigError(f"protocol: need folds >= 2 and repeats >= 1, got {self.folds}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"protocol: val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.select_fraction < 1.0:
            raise ConfigError(
                f"protocol: select_fraction must lie in (0, 1), got {self.select_fraction}"
            )


@dataclass(frozen=True)
class Candidate:
    """One row of the comparison: a detector config, or a fusion of other candidates.

    A ``rescore`` candidate is another candidate's fitted detector with some ``model.*``
    arguments changed (``set``), e.g. another score of the same network: it is not trained
    again; its ``config`` is the source's with those changes.
    """

    name: str
    config: dict[str, Any] | None = None
    fusion: tuple[str, ...] = ()
    baseline: bool = False
    """The detector declares itself a no-model baseline (fusions: decided by their weights)."""
    supervised: bool = False
    """The detector declares that it learns from normal and abnormal cases."""
    rescore: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def is_fusion(self) -> bool:
        """True for a fusion of other candidates."""
        return bool(self.fusion)


@dataclass(frozen=True)
class Spec:
    """A parsed, checked spec."""

    data: Path
    data_options: dict[str, Any]
    protocol: Protocol
    level: str
    threshold: str
    candidates: tuple[Candidate, ...]
    postprocess: tuple[tuple[Any, ...], ...] = ((),)
    source: dict[str, Any] = field(default_factory=dict)
    subgroups: str | None = None
    ci: str = "none"

    @property
    def pixel(self) -> bool:
        """True when pixel metrics are computed (and choose post-processing)."""
        return self.level in ("pixel", "both")

    def candidate(self, name: str) -> Candidate:
        """The candidate called ``name``."""
        return next(c for c in self.candidates if c.name == name)


def _path(value: str | Path, base: Path) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return path
    return base / path


def _candidate(
    name: str,
    block: Any,
    base: Path,
    data_options: dict[str, Any],
    overrides: tuple[str, ...] = (),
) -> Candidate:
    if not isinstance(block, dict):
        raise ConfigError(f"candidate {name!r}: give a mapping (config:, model:, fusion:)")
    unknown = sorted(set(block) - set(CANDIDATE_KEYS))
    if unknown:
        hint = did_you_mean(unknown[0], CANDIDATE_KEYS)
        raise ConfigError(f"candidate {name!r}: unknown keys {unknown}.{hint}")
    if "fusion" in block:
        members = block["fusion"]
        if not isinstance(members, list) or len(members) < 2:
            raise ConfigError(f"candidate {name!r}: fusion needs a list of 2+ candidate names")
        return Candidate(name, None, tuple(str(m) for m in members))
    if "rescore" in block:
        return _rescore_candidate(name, block)
    config = load_config(_path(block["config"], base)) if "config" in block else {}
    for section in SECTIONS:
        if section in block:
            config[section] = block[section]
    if "model" not in config:
        raise ConfigError(f"candidate {name!r}: give config: FILE or a model: block")
    config = apply_overrides(config, [*(str(s) for s in block.get("set") or []), *overrides])
    config["data"] = dict(data_options)  # every candidate sees the same input
    config.pop("evaluation", None)
    if _names_encoder_run(config["model"]):
        raise ConfigError(
            f"candidate {name!r}: encoder_run reuses an encoder fitted outside the folds, on "
            "cases that may be in their test parts; inside compare give the encoder's model "
            "block instead, so that it is fitted in each fold"
        )
    detector = build_detector(config)  # unknown model / argument / step: fail now
    return Candidate(name, config, baseline=detector.baseline, supervised=detector.supervised)


def _names_encoder_run(block: Any) -> bool:
    """True when a model block, or one nested in it, sets ``encoder_run``."""
    if isinstance(block, dict):
        if block.get("encoder_run") is not None:
            return True
        return any(_names_encoder_run(v) for v in block.values())
    if isinstance(block, list):
        return any(_names_encoder_run(v) for v in block)
    return False


def _rescore_candidate(name: str, block: dict[str, Any]) -> Candidate:
    extra = sorted(set(block) - {"rescore", "set"})
    if extra:
        raise ConfigError(f"candidate {name!r}: a rescore candidate takes only set:, not {extra}")
    overrides = tuple(str(s) for s in block.get("set") or [])
    if not overrides or any(not s.startswith("model.") for s in overrides):
        raise ConfigError(
            f"candidate {name!r}: rescore needs set: [model.NAME=VALUE, ...] (the arguments "
            "changed on the fitted detector)"
        )
    return Candidate(name, None, rescore=str(block["rescore"]), overrides=overrides)


def resolve_rescores(candidates: list[Candidate]) -> list[Candidate]:
    """Give each ``rescore`` candidate its source's config with its ``set`` changes.

    Raises:
        ConfigError: The source is unknown, a fusion or itself a rescore; or a changed
            argument is unknown to the model.
    """
    plain = {c.name: c for c in candidates if not c.is_fusion and c.rescore is None}
    resolved = []
    for candidate in candidates:
        if candidate.rescore is not None:
            source = plain.get(candidate.rescore)
            if source is None:
                raise ConfigError(
                    f"candidate {candidate.name!r}: rescore source {candidate.rescore!r} is not "
                    f"a model or baseline candidate.{did_you_mean(candidate.rescore, plain)}"
                )
            config = apply_overrides(copy.deepcopy(source.config), list(candidate.overrides))
            detector = build_detector(config)
            candidate = replace(
                candidate,
                config=config,
                baseline=detector.baseline,
                supervised=detector.supervised,
            )
        resolved.append(candidate)
    return resolved


def _check_fusions(candidates: list[Candidate]) -> None:
    plain = {c.name for c in candidates if not c.is_fusion}
    for candidate in candidates:
        for member in candidate.fusion:
            if member not in plain:
                raise ConfigError(
                    f"candidate {candidate.name!r}: fusion member {member!r} is not a model or "
                    f"baseline candidate.{did_you_mean(member, plain)}"
                )


def parse_spec(
    raw: dict[str, Any],
    base: Path,
    data: str | Path | None = None,
    overrides: tuple[str, ...] = (),
) -> Spec:
    """Check a spec (as read from YAML) and resolve its paths and candidates.

    Args:
        raw: The spec.
        base: Folder of the spec file (relative paths are tried against it).
        data: Overrides ``data.path`` (any folder or manifest laid out alike).
        overrides: ``section.key=value`` changes applied to every candidate that has a config
            (after its own ``set``), e.g. ``engine.epochs=5`` (``compare --set``).

    Raises:
        ConfigError: On anything unknown or inconsistent (with a did-you-mean hint).
    """
    if not isinstance(raw, dict):
        raise ConfigError("a compare spec must be a mapping")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"spec: unknown keys {unknown}.{did_you_mean(unknown[0], SPEC_KEYS)}")
    raw_data = raw.get("data") or {}
    if isinstance(raw_data, str):  # `data: FOLDER_OR_MANIFEST` alone
        raw_data = {"path": raw_data}
    if not isinstance(raw_data, dict):
        raise ConfigError(f"spec: data must be a path or a mapping with path:, got {raw_data!r}")
    data_block = dict(raw_data)
    path = data if data is not None else data_block.pop("path", None)
    data_block.pop("path", None)
    if path is None:
        raise ConfigError("spec: data.path is missing (or pass --data)")
    build_transforms(data_block.get("transforms"))
    level = str(raw.get("level", "image"))
    check_choice("spec", "level", level, LEVELS)
    protocol_block = dict(raw.get("protocol") or {})
    bad = sorted(set(protocol_block) - set(Protocol.__dataclass_fields__))
    if bad:
        raise ConfigError(f"protocol: unknown keys {bad}")
    blocks = raw.get("candidates") or {}
    if not isinstance(blocks, dict) or not blocks:
        raise ConfigError("spec: candidates must map names to candidate blocks")
    if any(item.split(".", 1)[0] == "data" for item in overrides):
        raise ConfigError(
            "compare --set: every candidate reads the spec's data block; change it there"
        )
    candidates = [
        _candidate(str(n), b, base, data_block, tuple(overrides)) for n, b in blocks.items()
    ]
    candidates = resolve_rescores(candidates)
    _check_fusions(candidates)
    choices = raw.get("postprocess") or [[]]
    if not isinstance(choices, list):
        raise ConfigError("spec: postprocess must be a list of choices (each a list of steps)")
    for choice in choices:
        PostProcess(choice)
    subgroups = raw.get("subgroups")
    if subgroups is not None and not isinstance(subgroups, str):
        raise ConfigError(f"spec: subgroups names one manifest column, got {subgroups!r}")
    ci = str(raw.get("ci") or "none")
    check_choice("spec", "ci", ci, CI_KINDS)
    return Spec(
        data=_path(path, base),
        data_options=data_block,
        protocol=Protocol(**protocol_block),
        level=level,
        threshold=str(raw.get("threshold", "f1")),
        candidates=tuple(candidates),
        postprocess=tuple(tuple(c or []) for c in choices),
        source=raw,
        subgroups=subgroups,
        ci=ci,
    )


def load_spec(
    path: str | Path, data: str | Path | None = None, overrides: tuple[str, ...] = ()
) -> Spec:
    """Read and check a spec file or built-in spec (see the module docstring).

    Raises:
        MissingFileError: ``path`` is neither a file nor a built-in spec name (did-you-mean).
        ConfigError: The spec is invalid.
    """
    source = resolve("spec", path)
    file = Path(path).expanduser()
    base = file.resolve().parent if file.is_file() else Path.cwd()  # built-in: the user's folder
    try:
        raw = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read spec: {error}") from error
    return parse_spec(raw, base, data, overrides)

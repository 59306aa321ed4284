"""``medanomaly compare``: which detector works on my data, under an honest protocol.

For each fold of the spec's protocol (patient-grouped; see
:mod:`medanomaly.model_selection.splits`) every candidate is fitted on the normal cases of the
training part (:func:`medanomaly.jobs.fit.fit_run`); a supervised one (its detector declares
``supervised = True``, e.g. ``vgg_classifier``) on all its labelled cases, normal and
abnormal. The validation part is halved by groups (:mod:`medanomaly.model_selection.selection`):

* the **tuning half** chooses the epoch (the engine's validation set), the post-processing
  (pixel AP at pixel level, else image AUROC) and a fusion's weights;
* the **selection half** scores each tuned candidate once: the *selection figure*, on which
  the one-standard-error rule chooses between candidates, per fold and over all folds;
* the image threshold (the spec's rule) and the pixel cut-off (best Dice) are learnt on the
  whole validation part: they do not enter the selection figure.

Only then is the test part scored. The candidate chosen over all folds is refitted on all the
data's training part into ``OUT/best`` (a run directory for ``score``, ``evaluate`` and
``screen``), with the spec's threshold rule learnt on its own validation part.

Outputs: ``OUT/results.json`` (``rows``: name -> selection, test and gap figures with
``baseline`` and ``supervised``; ``decisions``: each fold's choice), ``results.md``,
``report.html``, ``folds/<fold>/<candidate>/`` (runs and ``record.json``; a finished record is
never recomputed, so rerunning the command resumes) and ``best/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medanomaly.data.listing import list_cases, manifest_column
from medanomaly.data.loading import LoadReport, load_cases
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import MODEL_FILE, AnomalyResult, BaseDetector, standardisation
from medanomaly.detectors.thresholds import LABELLED_RULES, parse_rule, rule_threshold
from medanomaly.errors import ConfigError
from medanomaly.jobs.fit import fit_run
from medanomaly.metrics.blocks import foreground_masks, known_masks
from medanomaly.metrics.image import bootstrap_auroc_ci, image_metrics
from medanomaly.metrics.pixel import case_histograms, pixel_metrics
from medanomaly.model_selection.runs import default_threshold_unused, start_or_resume, summarise
from medanomaly.model_selection.selection import (
    N_BOOT,
    ap_replicates,
    auroc_replicates,
    decide_fold,
    decide_overall,
    resamples,
)
from medanomaly.model_selection.spec import Candidate, Spec, load_spec
from medanomaly.model_selection.splits import (
    FoldSplit,
    carve_validation,
    column_splits,
    make_splits,
    val_group_splits,
    with_selection_half,
)
from medanomaly.models.ensemble import Ensemble, weight_grid
from medanomaly.postprocess import PostProcess
from medanomaly.reports.files import json_ready, write_json

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
RECORD_FILE = "record.json"
SPEC_FILE = "spec.json"
BEST_DIR = "best"
IMAGE_KEYS = ("auroc", "auprc", "f1", "sensitivity", "specificity")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "dice_at_val_threshold")
SELECTION_KEYS = ("selection_metric", "test_metric", "tune_metric")

Echo = Callable[[str], None]


@dataclass
class Labelled:
    """The labelled cases of the spec's data, with what the pixel metrics need."""

    images: ImageSet
    groups: np.ndarray
    known: np.ndarray
    foreground: np.ndarray | None
    report: LoadReport
    subgroups: np.ndarray | None = None
    """The spec's ``subgroups`` column per case (``None`` without one)."""
    grouped: bool = True
    """The data names each case's patient (a ``group`` column or patient folders)."""
    split_column: list[str | None] | None = None
    """Each case's value in the manifest's ``split`` column (``None`` without the column)."""


@dataclass
class Outputs:
    """A candidate's raw result on a fold's validation and test parts (before choices)."""

    val: AnomalyResult
    test: AnomalyResult
    detector: BaseDetector | None = None


class FoldParts:
    """A fold's parts as sets of cases, made once per fold and shared by its candidates.

    The deterministic transforms ran once, when :func:`load_labelled` read the data; each
    part is cut from those arrays the first time a candidate asks for it and kept until the
    fold ends (the :class:`_FoldRunner` holding it is dropped), so that memory holds one
    fold's parts at a time. The training parts keep the set's random augmentation, which the
    engine draws anew every epoch.
    """

    def __init__(self, images: ImageSet, split: FoldSplit) -> None:
        self.images, self.split = images, split

    def training(self, supervised: bool) -> ImageSet:
        """The training part's labelled cases (``supervised``), else its normal cases."""
        return self.labelled_training if supervised else self.normal_training

    @cached_property
    def normal_training(self) -> ImageSet:
        """The training part's normal cases, with augmentation."""
        train = self.split.train
        return self.images.subset(train[self.images.labels[train] == 0], keep_augment=True)

    @cached_property
    def labelled_training(self) -> ImageSet:
        """Every labelled case of the training part, with augmentation."""
        return self.images.subset(self.split.train, keep_augment=True)

    @cached_property
    def tune(self) -> ImageSet:
        """The validation part's tuning half (ranks the epochs)."""
        return self.images.subset(self.split.tune)

    @cached_property
    def val(self) -> ImageSet:
        """The whole validation part."""
        return self.images.subset(self.split.val)

    @cached_property
    def test(self) -> ImageSet:
        """The test part."""
        return self.images.subset(self.split.test)


@dataclass
class GalleryPick:
    """The telling test cases of one candidate in the first fold, kept for the gallery.

    Made from the candidate's post-processed test result when the fold runs, so that the
    winner's gallery needs no second scoring of that fold.
    """

    index: list[int]
    """Positions in the fold's test part, in gallery order."""
    scores: np.ndarray
    maps: np.ndarray
    reconstructions: np.ndarray | None = None

    @classmethod
    def of(cls, labels: np.ndarray, test: AnomalyResult) -> GalleryPick:
        """The pick of :func:`~medanomaly.reports.figures.gallery_indices` from ``test``."""
        from medanomaly.reports.figures import gallery_indices

        index = gallery_indices(labels, test.scores, per_group=2)
        recon = test.reconstructions
        return cls(
            index,
            np.asarray(test.scores)[index],
            np.asarray(test.maps)[index],
            None if recon is None else np.asarray(recon)[index],
        )


@dataclass
class Tuned:
    """What tuning on a fold's tuning half chose, with the results it already computed."""

    choice: int
    value: float
    tune: AnomalyResult
    """The tuning half's result under the chosen post-processing (reused, not recomputed)."""
    weights: tuple[float, ...] = field(default_factory=tuple)


# -- data and splits ------------------------------------------------------------------------
def load_labelled(spec: Spec, strict: bool = False, num_workers: int | None = None) -> Labelled:
    """Read the spec's data in memory (augmentation attached), labelled cases only.

    Args:
        spec: The spec (its data block).
        strict: Raise on the first unreadable case instead of skipping it.
        num_workers: Worker processes of the first pass (``None``: the data block's, else
            the cores available).
    """
    options = {k: v for k, v in spec.data_options.items() if k != "label_names"}
    if num_workers is not None:
        options["num_workers"] = num_workers
    listed = list_cases(spec.data, spec.data_options.get("label_names"))
    images, report = load_cases(
        listed, spec.data, **options, stream=False, augment=True, strict=strict
    )
    unlabelled = images.labels == -1
    for i in np.flatnonzero(unlabelled):
        report.skipped.append((images.ids[i], "no label (compare needs labelled cases)"))
    if unlabelled.any():
        images = images.subset(~unlabelled, keep_augment=True)
    by_id = {str(c.path): c for c in listed}
    grouped = all(by_id[i].group for i in images.ids if i in by_id)
    if not grouped:
        log.warning(
            "compare: %s names no patient (no group column): each case is its own group, so "
            "slices of one patient may fall in several parts (results say grouped: false)",
            spec.data,
        )
    groups = np.asarray(images.groups if images.groups is not None else images.ids).astype(str)
    column = [by_id[i].split if i in by_id else None for i in images.ids]
    known = known_masks(spec.data, spec.data_options.get("label_names"), images)
    foreground = None
    if spec.pixel:
        _check_pixel(images, known)
        foreground = foreground_masks(images)[0]
    subgroups = subgroup_column(spec, images.ids) if spec.subgroups else None
    split_column = column if any(column) else None
    return Labelled(images, groups, known, foreground, report, subgroups, grouped, split_column)


def subgroup_column(spec: Spec, ids: list[str]) -> np.ndarray:
    """The manifest's ``spec.subgroups`` value of every case in ``ids``.

    Raises:
        ConfigError: No manifest, no such column, or a case without a value.
    """
    values = manifest_column(spec.data, str(spec.subgroups))
    missing = [i for i in ids if not values.get(str(i))]
    if missing:
        raise ConfigError(
            f"{spec.data}: {len(missing)} case(s) have no {spec.subgroups!r} value, e.g. "
            f"{missing[0]}"
        )
    return np.asarray([values[str(i)] for i in ids])


def subgroup_aurocs(
    labels: np.ndarray, scores: np.ndarray, subgroups: np.ndarray
) -> dict[str, float | None]:
    """AUROC of the normal cases against the abnormal cases of each subgroup value.

    ``None`` for a value whose abnormal cases or whose normals are absent here.
    """
    result: dict[str, float | None] = {}
    for value in sorted(set(subgroups[labels == 1].tolist())):
        keep = (labels == 0) | ((labels == 1) & (subgroups == value))
        ok = 0 < int(np.sum(labels[keep])) < int(keep.sum())
        result[str(value)] = (
            float(image_metrics(labels[keep], scores[keep], 0.0)["auroc"]) if ok else None
        )
    return result


def _check_pixel(images: ImageSet, known: np.ndarray) -> None:
    n_abnormal = int(np.sum(images.labels == 1))
    n_masked = int(np.sum(known & (images.labels == 1)))
    if images.masks is None or n_masked == 0:
        raise ConfigError(
            f"pixel-level protocol: {n_abnormal} abnormal case(s), {n_masked} with a lesion "
            "mask; give a mask column (or choose level: image)"
        )


def protocol_splits(spec: Spec, data: Labelled) -> list[FoldSplit]:
    """The spec's folds, each with its selection half, checked before anything trains.

    Raises:
        ConfigError: A group in two parts, a ``split`` column under another protocol, or a
            part that cannot support the protocol (the message names the fold and counts).
    """
    p, labels = spec.protocol, data.images.labels
    if p.kind == "split_column":
        splits = column_splits(labels, data.split_column or [None] * len(labels), data.groups)
    elif data.split_column is not None:
        raise ConfigError(
            f"{spec.data}: the manifest has a split column, which protocol {p.kind!r} would "
            "ignore (its test rows would be trained on); use protocol kind: split_column, or "
            "remove the column"
        )
    elif p.kind == "val_groups":
        splits = val_group_splits(labels, data.groups, p.folds, p.n_val, p.repeats, p.seed)
    else:
        splits = make_splits(labels, data.groups, p.folds, p.repeats, p.val_fraction, p.seed)
    splits = [
        with_selection_half(s, labels, data.groups, p.select_fraction, p.seed * 1000 + i)
        for i, s in enumerate(splits)
    ]
    for split in splits:
        check_parts(spec, data, split)
    return splits


def _counts(data: Labelled, index: np.ndarray) -> tuple[int, int, int]:
    """Normal, abnormal and abnormal-with-a-known-mask cases at ``index``."""
    labels = data.images.labels[index]
    masked = int(np.sum(data.known[index] & (labels == 1))) if data.known is not None else 0
    return int(np.sum(labels == 0)), int(np.sum(labels == 1)), masked


def check_parts(spec: Spec, data: Labelled, split: FoldSplit) -> None:
    """Refuse a fold whose parts cannot support the spec (before any candidate trains).

    The tuning and selection halves each need normal cases and, for the metric they rank by,
    abnormal ones (image AUROC) or abnormal cases with a lesion mask (pixel AP); the test
    part needs both classes; a labelled threshold rule needs both in the validation part.

    Raises:
        ConfigError: Naming the fold, the part and its counts.
    """
    need = "abnormal cases with a lesion mask" if spec.pixel else "abnormal cases"
    parts = {"tuning half": split.tune, "selection half": split.select, "test part": split.test}
    for part, index in parts.items():
        normal, abnormal, masked = _counts(data, index)
        in_validation = part != "test part"
        wanted = masked if spec.pixel and in_validation else abnormal
        least = 2 if part == "tuning half" else 1
        if normal < least or wanted < 1:
            where = f"the {part} of its validation part" if in_validation else "its test part"
            raise ConfigError(
                f"compare: fold {split.name}: {where} holds {normal} normal and {abnormal} "
                f"abnormal case(s) ({masked} with a lesion mask); it needs at least {least} "
                f"normal and 1 of the {need if in_validation else 'abnormal cases'} (give the "
                "validation part more groups with val_fraction or n_val, or use fewer folds)"
            )
    rule = parse_rule(spec.threshold)[0]
    normal, abnormal, _ = _counts(data, split.val)
    if rule in LABELLED_RULES and abnormal == 0:
        raise ConfigError(
            f"compare: fold {split.name}: threshold {spec.threshold} needs abnormal validation "
            f"cases, the validation part holds {normal} normal and none abnormal"
        )


# -- choices on validation ------------------------------------------------------------------
def _pixel_index(data: Labelled, index: np.ndarray) -> np.ndarray:
    """Positions in ``index`` of the cases whose lesion mask is known."""
    return np.flatnonzero(data.known[index])


def _pixel_parts(
    data: Labelled, index: np.ndarray, result: AnomalyResult
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps, lesion masks and foregrounds of the cases at ``index`` whose mask is known."""
    keep = _pixel_index(data, index)
    return result.maps[keep], data.images.masks[index][keep], data.foreground[index][keep]


def validation_metric(
    spec: Spec, data: Labelled, index: np.ndarray, result: AnomalyResult
) -> float:
    """The metric choices are made on: pixel AP (pixel levels), else image AUROC.

    Raises:
        ConfigError: The cases hold a single class, or no lesion voxel in the foreground.
    """
    if spec.pixel:
        block = pixel_metrics(*_pixel_parts(data, index, result), per_image=False)
        if block["average_precision"] is None:
            raise ConfigError(
                f"compare: {len(index)} validation case(s) hold no lesion voxel inside the "
                "foreground; pixel AP is undefined (check the masks and the foreground rule)"
            )
        return float(block["average_precision"])
    labels = data.images.labels[index]
    if len(set(labels.tolist())) < 2:
        raise ConfigError("compare: a validation part holds a single class; cannot choose")
    return float(image_metrics(labels, result.scores, 0.0)["auroc"])


def selection_replicates(
    spec: Spec, data: Labelled, index: np.ndarray, result: AnomalyResult, key: str
) -> list[float]:
    """Bootstrap replicates of the selection figure (resamples shared by a fold's candidates)."""
    if spec.pixel:
        maps, masks, foreground = _pixel_parts(data, index, result)
        draws = resamples(data.images.labels[index][_pixel_index(data, index)], N_BOOT, key)
        return ap_replicates(*case_histograms(maps, masks, foreground), draws).tolist()
    labels = data.images.labels[index]
    return auroc_replicates(labels, result.scores, resamples(labels, N_BOOT, key)).tolist()


def _processed(
    chain: PostProcess, result: AnomalyResult, data: Labelled, index: np.ndarray
) -> AnomalyResult:
    return chain.apply(result, data.images.images[index], data.groups[index])


def choose_postprocess(
    spec: Spec, data: Labelled, index: np.ndarray, result: AnomalyResult
) -> tuple[int, float]:
    """Index of the post-processing choice with the best metric on ``index``, and the metric.

    Args:
        spec: The spec (its ``postprocess`` choices).
        data: The labelled cases.
        index: The cases ``result`` holds (a fold's tuning half).
        result: Their raw result.
    """
    tuned = tune_postprocess(spec, data, index, result)
    return tuned.choice, tuned.value


def tune_postprocess(spec: Spec, data: Labelled, index: np.ndarray, result: AnomalyResult) -> Tuned:
    """:func:`choose_postprocess`, keeping the processed result of the choice for later."""
    best: Tuned | None = None
    for choice, steps in enumerate(spec.postprocess):
        processed = _processed(PostProcess(steps), result, data, index)
        value = validation_metric(spec, data, index, processed)
        if best is None or value > best.value:  # ties: the first (simplest) choice
            best = Tuned(choice, value, processed)
    assert best is not None  # a spec holds at least one choice
    return best


def dice_counts(
    maps: np.ndarray, masks: np.ndarray, foreground: np.ndarray, cutoff: float
) -> dict[str, int]:
    """Voxel counts of ``map > cutoff`` against the lesion masks, inside the foreground."""
    flagged = (maps > cutoff) & foreground
    lesion = masks.astype(bool) & foreground
    return {
        "tp": int(np.sum(flagged & lesion)),
        "fp": int(np.sum(flagged & ~lesion)),
        "fn": int(np.sum(~flagged & lesion)),
    }


def dice_of(counts: dict[str, int]) -> float | None:
    """Dice from voxel counts (``None`` without lesion or flagged voxels)."""
    denominator = 2 * counts["tp"] + counts["fp"] + counts["fn"]
    return 2 * counts["tp"] / denominator if denominator else None


# -- one candidate in one fold --------------------------------------------------------------
def _threshold(spec: Spec, labels: np.ndarray, scores: np.ndarray) -> float:
    rule, params = parse_rule(spec.threshold)
    if rule is None:
        raise ConfigError("compare: threshold 'run' is not a validation rule; use e.g. f1")
    return rule_threshold(rule, params, labels, scores, 0.05)


def _positions(split: FoldSplit, part: np.ndarray) -> np.ndarray:
    """Positions of ``part``'s cases within the fold's validation part."""
    return np.flatnonzero(np.isin(split.val, part))


def merged(parts: list[tuple[np.ndarray, AnomalyResult]], n: int) -> AnomalyResult:
    """One result of ``n`` cases from results of some of them, each at its positions."""
    first = parts[0][1]

    def assemble(values: list[np.ndarray]) -> np.ndarray:
        shapes = {np.asarray(v).shape[1:] for v in values}
        dtype = np.asarray(values[0]).dtype if len(shapes) == 1 else object
        out = np.empty((n, *shapes.pop()) if len(shapes) == 1 else n, dtype=dtype)
        for (index, _), value in zip(parts, values, strict=True):
            for j, i in enumerate(index):
                out[i] = value[j]
        return out

    maps = [r.maps for _, r in parts]
    recons = [r.reconstructions for _, r in parts]
    return AnomalyResult(
        scores=assemble([r.scores for _, r in parts]),
        labels=assemble([r.labels for _, r in parts]),
        maps=assemble(maps) if any(np.asarray(m).size for m in maps) else first.maps,
        reconstructions=None if any(r is None for r in recons) else assemble(recons),
        threshold=first.threshold,
    )


def processed_validation(
    spec: Spec, data: Labelled, split: FoldSplit, val: AnomalyResult, tuned: Tuned
) -> AnomalyResult:
    """The validation part's result under the tuned choice, from its halves.

    The tuning half was processed while tuning; only the selection half is processed here.
    The halves share no patient group, so steps per group (``group_scale``) see the same
    cases as on the whole part.
    """
    chain = PostProcess(spec.postprocess[tuned.choice])
    tune, select = _positions(split, split.tune), _positions(split, split.select)
    selected = _processed(chain, val.take(select), data, split.select)
    return merged([(tune, tuned.tune), (select, selected)], len(split.val))


def evaluate_choice(
    spec: Spec,
    data: Labelled,
    split: FoldSplit,
    outputs: Outputs,
    choice: int | Tuned,
) -> tuple[dict[str, Any], AnomalyResult]:
    """Apply a tuned post-processing choice; selection and test figures; the thresholds.

    The selection figure (and its bootstrap replicates) comes from the selection half; the
    image threshold and the pixel cut-off from the whole validation part. ``choice`` is the
    index of the choice, or what :func:`tune_postprocess` returned (whose processed tuning
    half is then reused).
    """
    if not isinstance(choice, Tuned):
        chain = PostProcess(spec.postprocess[choice])
        tune = outputs.val.take(_positions(split, split.tune))
        choice = Tuned(choice, np.nan, _processed(chain, tune, data, split.tune))
    chain = PostProcess(spec.postprocess[choice.choice])
    val = processed_validation(spec, data, split, outputs.val, choice)
    test = _processed(chain, outputs.test, data, split.test)
    labels = data.images.labels
    threshold = _threshold(spec, labels[split.val], val.scores)
    image = image_metrics(labels[split.test], test.scores, threshold)
    select = val.take(_positions(split, split.select))
    record: dict[str, Any] = {
        "postprocess": list(spec.postprocess[choice.choice]),
        "threshold": threshold,
        **{k: image[k] for k in IMAGE_KEYS},
        "selection_metric": validation_metric(spec, data, split.select, select),
        "selection_boot": selection_replicates(spec, data, split.select, select, split.name),
        "confusion": image["confusion_matrix"],
        "cases": {
            "id": [data.images.ids[i] for i in split.test],
            "label": labels[split.test].tolist(),
            "score": np.asarray(test.scores).tolist(),
            "flag": (np.asarray(test.scores) > threshold).astype(int).tolist(),
        },
    }
    if spec.pixel:
        record.update(_pixel_record(data, split, val, test))
    record["test_metric"] = record["pixel_ap"] if spec.pixel else record["auroc"]
    if data.subgroups is not None:
        record["subgroup_auroc"] = subgroup_aurocs(
            labels[split.test], np.asarray(test.scores), data.subgroups[split.test]
        )
    return record, test


def _pixel_record(
    data: Labelled, split: FoldSplit, val: AnomalyResult, test: AnomalyResult
) -> dict[str, Any]:
    val_block = pixel_metrics(*_pixel_parts(data, split.val, val), per_image=False)
    cutoff = val_block["best_dice_threshold"]
    test_parts = _pixel_parts(data, split.test, test)
    test_block = pixel_metrics(*test_parts, per_image=False)
    counts = dice_counts(*test_parts, np.inf if cutoff is None else cutoff)
    return {
        "pixel_cutoff": cutoff,
        "pixel_auroc": test_block["auroc"],
        "pixel_ap": test_block["average_precision"],
        "dice_at_val_threshold": dice_of(counts),
        "dice_counts": counts,
    }


def is_supervised(spec: Spec, candidate: Candidate) -> bool:
    """True when the candidate's detector (a fusion: any member's) declares ``supervised``."""
    if candidate.is_fusion:
        return any(is_supervised(spec, spec.candidate(m)) for m in candidate.fusion)
    return candidate.supervised


def training_cases(
    spec: Spec, candidate: Candidate, images: ImageSet, train: np.ndarray
) -> ImageSet:
    """What a candidate learns from: all labelled ``train`` cases if supervised, else normals.

    A fusion is refitted as one ensemble on the normals (its members are fitted one by one in
    the folds).
    """
    supervised = not candidate.is_fusion and is_supervised(spec, candidate)
    keep = train if supervised else train[images.labels[train] == 0]
    return images.subset(keep, keep_augment=True)


def fit_candidate(
    candidate: Candidate,
    data: Labelled,
    split: FoldSplit,
    folder: Path,
    spec: Spec,
    parts: FoldParts | None = None,
) -> Outputs:
    """Fit a candidate (epochs ranked on the tuning half); raw validation and test results.

    The validation part is scored once, with the weights of the chosen epoch: its tuning
    and selection halves, the threshold and the post-processing all take their cases from
    that one result.

    Args:
        candidate: A model or baseline candidate.
        data: The labelled cases.
        split: The fold.
        folder: The candidate's run directory in this fold.
        spec: The spec.
        parts: The fold's parts shared by its candidates (``None``: cut here).
    """
    parts = parts or FoldParts(data.images, split)
    supervised = not candidate.is_fusion and is_supervised(spec, candidate)
    train = parts.training(supervised)
    detector = fit_run(candidate.config, train, folder, val=parts.tune, resume=True).detector
    return Outputs(
        val=detector.detect(parts.val), test=detector.detect(parts.test), detector=detector
    )


def _stats(result: AnomalyResult, normal: np.ndarray) -> tuple[tuple, tuple]:
    score = standardisation(result.scores[normal])
    maps = standardisation(result.maps[normal]) if result.maps.size else (0.0, 1.0)
    return score, maps


def fused(results: list[AnomalyResult], stats: list, weights: tuple[float, ...]) -> AnomalyResult:
    """Weighted sum of the members' z-scored scores and maps (as :class:`Ensemble` does)."""
    parts = list(zip(weights, results, stats, strict=True))
    scores = sum(w * (r.scores - s[0][0]) / s[0][1] for w, r, s in parts)
    maps = sum(w * (r.maps - s[1][0]) / s[1][1] for w, r, s in parts)
    recon = results[0].reconstructions
    scores = np.asarray(scores, dtype=np.float64)
    return AnomalyResult(scores, np.zeros(len(scores), np.int64), maps, recon, 0.0)


def member_stats(data: Labelled, split: FoldSplit, members: list[Outputs]) -> list:
    """Each member's standardisation, from the normal cases of the tuning half."""
    tune = _positions(split, split.tune)
    normal = data.images.labels[split.val][tune] == 0
    return [_stats(m.val.take(tune), normal) for m in members]


def fuse_in_fold(
    spec: Spec, data: Labelled, split: FoldSplit, members: list[Outputs]
) -> tuple[Outputs, tuple[float, ...], int, float]:
    """Choose weights and post-processing jointly on the tuning half; the fused outputs."""
    outputs, tuned = tune_fusion(spec, data, split, members)
    return outputs, tuned.weights, tuned.choice, tuned.value


def tune_fusion(
    spec: Spec, data: Labelled, split: FoldSplit, members: list[Outputs]
) -> tuple[Outputs, Tuned]:
    """:func:`fuse_in_fold`, keeping the processed tuning half of the choice for later."""
    stats = member_stats(data, split, members)
    tune = _positions(split, split.tune)
    best: tuple[float, float, Tuned] | None = None
    for weights in weight_grid(len(members)):
        val = fused([m.val.take(tune) for m in members], stats, weights)
        tuned = tune_postprocess(spec, data, split.tune, val)
        key = (tuned.value, -float(np.ptp(weights)))
        if best is None or key > best[:2]:
            tuned.weights = weights
            best = (*key, tuned)
    assert best is not None
    weights = best[2].weights
    outputs = Outputs(
        val=fused([m.val for m in members], stats, weights),
        test=fused([m.test for m in members], stats, weights),
    )
    return outputs, best[2]


# -- the driver -----------------------------------------------------------------------------
def _record_path(out: Path, split: FoldSplit, name: str) -> Path:
    return out / "folds" / split.name / _safe(name) / RECORD_FILE


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class _FoldRunner:
    """Runs every candidate of one fold; keeps members' outputs for the fusions.

    Its :class:`FoldParts` and the outputs live as long as the runner: one fold.
    """

    def __init__(
        self,
        spec: Spec,
        data: Labelled,
        split: FoldSplit,
        out: Path,
        picks: dict[str, GalleryPick] | None = None,
    ) -> None:
        self.spec, self.data, self.split, self.out = spec, data, split, out
        self.parts = FoldParts(data.images, split)
        self.outputs: dict[str, Outputs] = {}
        self.picks = picks
        """Where each candidate's :class:`GalleryPick` goes (``None``: not kept)."""

    def member(self, name: str) -> Outputs:
        if name not in self.outputs:
            folder = _record_path(self.out, self.split, name).parent
            detector = BaseDetector.load(folder)
            self.outputs[name] = Outputs(
                detector.detect(self.parts.val), detector.detect(self.parts.test), detector
            )
        return self.outputs[name]

    def rescored(self, candidate: Candidate, folder: Path) -> Outputs:
        """The source candidate's fitted detector with the changed arguments, recalibrated.

        Its default threshold is relearnt from the fold's normal validation cases; it is
        saved in ``folder`` as a run directory (for fusions and ``OUT/best``).
        """
        source = self.spec.candidate(candidate.rescore)
        detector = BaseDetector.load(_record_path(self.out, self.split, source.name).parent)
        detector.set_params(**model_changes(source.config, candidate.config))
        tune = self.parts.tune
        detector.calibrate(tune.subset(tune.labels == 0))
        detector.write_run_config(folder, candidate.config.get("data"))
        detector.save(folder / MODEL_FILE)
        return Outputs(detector.detect(self.parts.val), detector.detect(self.parts.test), detector)

    def run(self, candidate: Candidate) -> dict[str, Any]:
        path = _record_path(self.out, self.split, candidate.name)
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        try:
            record = self._run(candidate, path.parent)
        except Exception as error:  # one candidate's failure must not stop the others
            record = {"error": f"{type(error).__name__}: {error}"}
            (path.parent).mkdir(parents=True, exist_ok=True)
            (path.parent / "error.txt").write_text(traceback.format_exc())
            return {"fold": self.split.name, "candidate": candidate.name, **record}
        record.update(fold=self.split.name, candidate=candidate.name)
        record["seconds"] = time.perf_counter() - start
        write_json(path, record)
        return json_ready(record)

    def _run(self, candidate: Candidate, folder: Path) -> dict[str, Any]:
        spec, data, split = self.spec, self.data, self.split
        if candidate.is_fusion:
            members = [self.member(name) for name in candidate.fusion]
            outputs, tuned = tune_fusion(spec, data, split, members)
            extra = {"weights": dict(zip(candidate.fusion, tuned.weights, strict=True))}
        else:
            if candidate.rescore is not None:
                outputs = self.rescored(candidate, folder)
            else:
                outputs = fit_candidate(candidate, data, split, folder, spec, self.parts)
            self.outputs[candidate.name] = outputs
            tune = outputs.val.take(_positions(split, split.tune))
            tuned = tune_postprocess(spec, data, split.tune, tune)
            extra = {
                "epochs": len(outputs.detector.history_),
                "epoch_monitor": outputs.detector.resolved_settings().get("epoch_monitor"),
            }
        record, test = evaluate_choice(spec, data, split, outputs, tuned)
        if self.picks is not None:
            self.picks[candidate.name] = GalleryPick.of(data.images.labels[split.test], test)
        return {**record, **extra, "choice": tuned.choice, "tune_metric": tuned.value}


def compare(
    spec: Spec | str | Path,
    out: str | Path,
    data: str | Path | None = None,
    refit: bool = True,
    echo: Echo | None = None,
    progress: bool = True,
    strict: bool = False,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Run a comparison; write ``results.json``, ``results.md``, ``report.html`` and ``best/``.

    Args:
        spec: A :class:`Spec`, the path of a spec file or a built-in spec name.
        out: Output folder; rerunning with the same arguments resumes.
        data: Overrides the spec's data (a folder or manifest laid out alike).
        refit: Refit the candidate chosen on validation into ``OUT/best``.
        echo: Called with one line per finished candidate-fold.
        progress: Show a progress bar over folds x candidates.
        strict: Raise on the first unreadable case instead of skipping it.
        num_workers: Worker processes of the first pass over the data.

    Returns:
        The results written to ``OUT/results.json`` (``chosen`` is ``None`` when no candidate
        finished every fold).
    """
    from medanomaly.reports.compare import results_table, write_compare_report

    out = Path(out)
    if not isinstance(spec, Spec):
        spec = load_spec(spec, data)
    parse_rule(spec.threshold)
    labelled = load_labelled(spec, strict, num_workers)
    splits = protocol_splits(spec, labelled)
    start_or_resume(out, SPEC_FILE, spec_state(spec, splits), "comparison")
    picks: dict[str, GalleryPick] = {}
    records = run_folds(spec, labelled, splits, out, echo, progress, picks)
    levels = {c.name: complexity(spec, c) for c in spec.candidates}
    decisions = [
        {"fold": split.name, **decide_fold({n: rs[i] for n, rs in records.items()}, levels)}
        for i, split in enumerate(splits)
    ]
    rows = {c.name: summarise_candidate(spec, c, records[c.name]) for c in spec.candidates}
    winner, steps = decide_overall(records, levels)
    results = {
        "rows": rows,
        "chosen": winner,
        "selection": {
            "metric": "pixel AP" if spec.pixel else "image AUROC",
            "rule": "one standard error over the folds; no-model < single model < fusion",
            "steps": steps,
        },
        "decisions": decisions,
        "per_fold_choice": per_fold_choice(decisions, records),
        "protocol": {**spec.protocol.__dict__, "level": spec.level, "threshold": spec.threshold},
        "grouped": labelled.grouped,
        "n_cases": len(labelled.images),
        "n_normal": int(np.sum(labelled.images.labels == 0)),
        "n_abnormal": int(np.sum(labelled.images.labels == 1)),
        "n_groups": int(np.unique(labelled.groups).size),
        "folds": [s.name for s in splits],
        "skipped": labelled.report.skipped_records(),
        "data": str(spec.data),
    }
    if winner is not None:
        pick = picks.get(winner)
        winner_gallery(spec, labelled, splits[0], out, winner, records[winner][0], pick)
    if refit and winner is not None:
        results["best"] = refit_best(spec, labelled, rows[winner], winner, out, splits)
    write_json(out / RESULTS_FILE, results)
    (out / "results.md").write_text(results_table(results))
    write_compare_report(out, results, records)
    return json_ready(results)


def run_folds(
    spec: Spec,
    data: Labelled,
    splits: list[FoldSplit],
    out: Path,
    echo: Echo | None,
    progress: bool,
    picks: dict[str, GalleryPick] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every candidate's record in every fold (finished records are read back, not rerun).

    Each fold's parts are cut once for all its candidates and dropped when the fold ends.
    ``picks`` receives the gallery pick of every candidate run in the first fold.
    """
    records: dict[str, list[dict[str, Any]]] = {c.name: [] for c in spec.candidates}
    # members and rescore sources first
    order = sorted(spec.candidates, key=lambda c: (c.is_fusion, c.rescore is not None))
    bar = tqdm(total=len(splits) * len(order), desc="compare", disable=not progress)
    with bar, default_threshold_unused():  # the spec's rule replaces each fit's own
        for number, split in enumerate(splits):
            runner = _FoldRunner(spec, data, split, out, picks if number == 0 else None)
            for candidate in order:
                bar.set_postfix_str(f"{split.name} {candidate.name}")
                record = runner.run(candidate)
                records[candidate.name].append(record)
                bar.update()
                if echo is not None:
                    echo(_line(record))
    return records


def complexity(spec: Spec, candidate: Candidate) -> int:
    """0 for a no-model candidate, 1 for a single model, 2 for a fusion."""
    if candidate.is_fusion:
        return 2
    return 0 if candidate.baseline else 1


def per_fold_choice(
    decisions: list[dict[str, Any]], records: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The test figure of what each fold chose on its own selection half.

    This is the honest estimate of the whole procedure (tuning, then choosing by the rule):
    no row of the table is picked by looking at test figures.
    """
    chosen = [d["chosen"] for d in decisions]
    values = [
        None if name is None else records[name][i].get("test_metric")
        for i, name in enumerate(chosen)
    ]
    return {"chosen": chosen, "test_metric": summarise(values)}


def winner_gallery(
    spec: Spec,
    data: Labelled,
    split: FoldSplit,
    out: Path,
    name: str,
    record: dict[str, Any],
    pick: GalleryPick | None = None,
) -> list[Path]:
    """Input | reconstruction | map of the winner's telling test cases of the first fold.

    ``pick`` is what the fold kept when it ran; without it (a resumed run) the winner's
    first-fold run is scored again.
    """
    from medanomaly.reports.figures import save_gallery
    from medanomaly.reports.files import FIGURES_DIR

    pick = pick or _rescored_pick(spec, data, split, out, name, record)
    labels = data.images.labels[split.test]
    chosen = pick.index
    ids = [data.images.ids[split.test[i]] for i in chosen]
    return save_gallery(
        out / FIGURES_DIR / "gallery",
        data.images.images[split.test][chosen],
        pick.reconstructions,
        pick.maps,
        [
            f"{Path(c).name} label {labels[i]} score {score:.3g}"
            for c, i, score in zip(ids, chosen, pick.scores, strict=True)
        ],
        [f"{k:02d}_{_safe(Path(c).stem)}" for k, c in enumerate(ids)],
    )


def _rescored_pick(
    spec: Spec, data: Labelled, split: FoldSplit, out: Path, name: str, record: dict[str, Any]
) -> GalleryPick:
    """The gallery pick of ``name`` in ``split``, from its saved run (or its members')."""
    runner = _FoldRunner(spec, data, split, out)
    candidate = spec.candidate(name)
    if candidate.is_fusion:
        members = [runner.member(m) for m in candidate.fusion]
        stats = member_stats(data, split, members)
        weights = tuple(record["weights"][m] for m in candidate.fusion)
        test = fused([m.test for m in members], stats, weights)
    else:
        test = runner.member(name).test
    test = _processed(PostProcess(record["postprocess"]), test, data, split.test)
    return GalleryPick.of(data.images.labels[split.test], test)


def spec_state(spec: Spec, splits: list[FoldSplit]) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return json_ready(
        {
            "data": str(spec.data),
            "data_options": spec.data_options,
            "protocol": spec.protocol.__dict__,
            "level": spec.level,
            "threshold": spec.threshold,
            "candidates": {c.name: c.config or {"fusion": list(c.fusion)} for c in spec.candidates},
            "postprocess": [list(c) for c in spec.postprocess],
            "splits": {
                s.name: [s.train.tolist(), s.tune.tolist(), s.select.tolist(), s.test.tolist()]
                for s in splits
            },
        }
    )


def _line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"{record['fold']} {record['candidate']}: FAILED {record['error']}"
    auroc = record.get("auroc")
    text = f"AUROC {auroc:.3f}" if auroc is not None else "AUROC n/a"
    if "dice_at_val_threshold" in record and record["dice_at_val_threshold"] is not None:
        text += f", Dice {record['dice_at_val_threshold']:.3f}"
    text += f", selection {record['selection_metric']:.3f}"
    return f"{record['fold']} {record['candidate']}: {text} ({record.get('seconds', 0):.0f} s)"


# -- aggregation ----------------------------------------------------------------------------
def _is_baseline(spec: Spec, candidate: Candidate, records: list[dict[str, Any]]) -> bool:
    if not candidate.is_fusion:
        return candidate.baseline
    models = [m for m in candidate.fusion if not _is_baseline(spec, spec.candidate(m), [])]
    weights = [r.get("weights", {}) for r in records if "error" not in r]
    return not any(w.get(m, 0.0) > 0 for w in weights for m in models)


def summarise_candidate(
    spec: Spec, candidate: Candidate, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """One ``rows`` entry: flags, then selection, test and gap figures as mean ± SD over folds.

    ``gap`` is the selection figure minus the test figure of the same metric, fold by fold:
    how optimistic the figure the choice rested on was.
    """
    ok = [r for r in records if "error" not in r]
    keys = [*SELECTION_KEYS, *IMAGE_KEYS] + (list(PIXEL_KEYS) if spec.pixel else [])
    row: dict[str, Any] = {
        "baseline": _is_baseline(spec, candidate, records),
        "supervised": is_supervised(spec, candidate),
        "level": complexity(spec, candidate),
    }
    row.update({k: summarise([r.get(k) for r in ok]) for k in keys})
    row["gap"] = summarise([_gap(r) for r in ok])
    values = sorted({v for r in ok for v in r.get("subgroup_auroc", {})})
    row.update(
        {f"auroc_{v}": summarise([r.get("subgroup_auroc", {}).get(v) for r in ok]) for v in values}
    )
    row["model"] = "fusion" if candidate.is_fusion else candidate.config["model"]["name"]
    row["seconds"] = float(sum(r.get("seconds", 0.0) for r in ok))
    row["postprocess"] = [r["postprocess"] for r in ok]
    row["thresholds"] = [r["threshold"] for r in ok]
    row["confusion"] = [r.get("confusion") for r in ok]
    if spec.pixel:
        row["pooled_dice_at_val_threshold"] = pooled_dice(ok)
    if candidate.is_fusion:
        row["weights"] = [r["weights"] for r in ok]
        row["members"] = list(candidate.fusion)
    if spec.ci == "bootstrap":
        row["auroc_ci"] = [auroc_ci(r) for r in ok]
    row["errors"] = [{"fold": r["fold"], "error": r["error"]} for r in records if "error" in r]
    return row


def _gap(record: dict[str, Any]) -> float | None:
    test = record.get("test_metric")
    return None if test is None else record["selection_metric"] - test


def auroc_ci(record: dict[str, Any], n_boot: int = 1000) -> list[float | None]:
    """95 % stratified bootstrap CI ``[low, high]`` of a fold's test AUROC (``ci: bootstrap``).

    Computed from the fold's stored test labels and scores, so a resumed run gets it too.
    """
    cases = record["cases"]
    return list(bootstrap_auroc_ci(cases["label"], cases["score"], n_boot=n_boot))


def pooled_dice(records: list[dict[str, Any]]) -> float | None:
    """Dice over the test folds of the first repeat, each fold flagged at its own cut-off.

    Voxel counts add up across folds whatever each fold's map scale, so this pooled figure
    is sound; pooled pixel AUROC and AP are not reported, since they would rank voxels of
    differently scaled fold models against each other (the rows give their mean over folds).
    """
    first = [r for r in records if r["fold"].startswith("r1_")]
    total = {k: sum(r["dice_counts"][k] for r in first) for k in ("tp", "fp", "fn")}
    return dice_of(total) if first else None


def model_changes(source: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` arguments of ``config`` that differ from ``source``'s (a rescore's)."""
    before, after = source["model"], config["model"]
    return {k: v for k, v in after.items() if k != "name" and before.get(k) != v}


def reuse_column_run(
    out: Path, splits: list[FoldSplit], name: str, postprocess: list[Any], folder: Path
) -> bool:
    """With the ``split_column`` protocol, copy the one fold's run of ``name`` to ``folder``.

    That run was fitted on the same training part that a refit would use, with its epoch
    ranked on the column's tuning half; it is reused when the chosen post-processing is
    empty (nothing to add to the run) and the run directory holds a model. Returns whether
    it was copied.
    """
    source = _record_path(out, splits[0], name).parent
    if len(splits) != 1 or postprocess or not (source / MODEL_FILE).exists():
        return False
    ignore = shutil.ignore_patterns(RECORD_FILE, "error.txt")
    shutil.copytree(source, folder, ignore=ignore, dirs_exist_ok=True)
    return True


def refit_best(
    spec: Spec,
    data: Labelled,
    row: dict[str, Any],
    name: str,
    out: Path,
    splits: list[FoldSplit],
) -> dict[str, Any]:
    """Refit the chosen candidate on all the data's training part into ``OUT/best``.

    The training part's normal cases, or all its labelled cases for a supervised candidate.
    The validation part is a grouped share (``protocol.val_fraction``) of all cases; with the
    ``split_column`` protocol it is the column's validation part (never its test part), and
    the fold's own run is reused where it is the same fit (:func:`reuse_column_run`). The
    post-processing is the one chosen in most folds, a fusion's weights their mean over the
    folds. The threshold is the spec's rule learnt on that validation part, so
    ``score --run OUT/best`` flags what the returned ``flags`` say for the last fold's test
    cases (for ``split_column`` the fold's own record).
    """
    folder = out / BEST_DIR
    candidate = spec.candidate(name)
    choice = Counter(json.dumps(p) for p in row["postprocess"]).most_common(1)[0][0]
    postprocess = json.loads(choice)
    labels = data.images.labels
    column = spec.protocol.kind == "split_column"
    if column:
        train, val = splits[0].train, splits[0].val
        tune = splits[0].tune
    else:
        index = np.arange(len(labels))
        train, val = carve_validation(
            index, labels, data.groups, spec.protocol.val_fraction, spec.protocol.seed
        )
        tune = val
    images = data.images
    if not (column and reuse_column_run(out, splits, name, postprocess, folder)):
        config = _best_config(spec, candidate, row, postprocess)
        cases = training_cases(spec, candidate, images, train)
        fit_run(config, cases, folder, val=images.subset(tune), resume=True)
    detector = BaseDetector.load(folder)
    scores = detector.score(images.subset(val))
    threshold = _threshold(spec, labels[val], scores)
    rule = f"{spec.threshold} on {len(val)} validation cases"
    detector.set_threshold(threshold, rule).save(folder / MODEL_FILE)
    last = splits[-1]
    flags = BaseDetector.load(folder).predict(images.subset(last.test))
    return {
        "candidate": name,
        "run_dir": str(folder),
        "postprocess": postprocess,
        "threshold": threshold,
        "threshold_rule": rule,
        "flags": {
            "fold": last.name,
            "id": [images.ids[i] for i in last.test],
            "flag": np.asarray(flags).astype(int).tolist(),
        },
    }


def _best_config(
    spec: Spec, candidate: Candidate, row: dict[str, Any], postprocess: list[Any]
) -> dict[str, Any]:
    if not candidate.is_fusion:
        return {**candidate.config, "postprocess": postprocess}
    members = []
    for member in candidate.fusion:
        config = spec.candidate(member).config
        members.append({**config["model"], "engine": config.get("engine") or {}})
    weights = [float(np.mean([w[m] for w in row["weights"]])) for m in candidate.fusion]
    first = spec.candidate(candidate.fusion[0]).config["model"]
    model = {
        "name": Ensemble.name,
        "members": members,
        "weights": weights,
        "spatial_dims": first.get("spatial_dims", 2),
        "in_channels": first.get("in_channels", 1),
    }
    return {"model": model, "data": dict(spec.data_options), "postprocess": postprocess}

"""Repeated, patient-grouped, stratified k-fold cross-validation of a detector config.

For each repeat, ``StratifiedGroupKFold`` (a different ``random_state`` per repeat) splits
the labelled cases into ``folds`` test folds; a patient (``group``) never appears on both
sides. For each fold:

1. A validation part (``val_fraction`` of the training folds, grouped and stratified) is
   carved out of the training folds.
2. The detector is trained on the **normal** images of the remaining training part only
   (a supervised classifier, ``supervised = True``, on all of them).
   The validation part is passed as ``val`` to ``fit``; it selects the epoch whose weights
   are kept: the lowest normal validation loss (``engine.monitor: val_loss``) or the highest
   validation AUROC, normal against abnormal validation images (``val_auroc``, the UAD slide deck).
3. The threshold is chosen on the validation part (default ``f1``, as in the UAD slide deck).
4. Only then is the test fold scored; its metrics are saved atomically to
   ``OUT/folds/rR_fF/fold.json``. A fold with that file is never recomputed, and a fold
   interrupted during training resumes from its checkpoint.

``OUT/metrics.json`` holds every metric as ``{"mean", "sd", "n", "folds"}`` (sample SD over
the folds where the metric is defined), ``OUT/splits.csv`` the fold assignment of every case,
``OUT/report.html`` the box plots, per-fold table and out-of-fold per-case table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.config import build_detector
from medanomaly.data.listing import list_cases, split_parts
from medanomaly.data.loading import LoadReport, load_cases
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.detectors.thresholds import describe_rule, parse_rule, rule_threshold
from medanomaly.errors import ConfigError
from medanomaly.io.atomic import atomic_write_text
from medanomaly.jobs.fit import check_precision, fit_run
from medanomaly.jobs.score import score_in_chunks
from medanomaly.metrics.blocks import (
    IMAGE_KEYS,
    foreground_masks,
    image_block,
    known_masks,
    pixel_block,
)
from medanomaly.metrics.image import image_metrics, predict_abnormal
from medanomaly.model_selection.runs import default_threshold_unused, start_or_resume, summarise
from medanomaly.model_selection.splits import FoldSplit, make_splits
from medanomaly.outputs.writers import write_scores_csv
from medanomaly.reports import figures as figs
from medanomaly.reports.evaluation import case_table, summary_line
from medanomaly.reports.files import (
    FIGURES_DIR,
    METRICS_FILE,
    REPORT_FILE,
    SCORES_FILE,
    json_ready,
    write_json,
)
from medanomaly.reports.html import Facts, Figure, Figures, Table, write_report

log = logging.getLogger(__name__)

CV_FILE = "cv.json"
SPLITS_FILE = "splits.csv"
FOLD_FILE = "fold.json"
FOLDS_DIR = "folds"
PIXEL_KEYS = ("auroc", "average_precision", "best_dice")
BOX_KEYS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "accuracy")

Echo = Callable[[str], None]


@dataclass(frozen=True)
class CVSettings:
    """Cross-validation settings (the ``evaluation:`` block of a config, or arguments).

    Attributes:
        folds: Test folds per repeat (k).
        repeats: Repeats with a different shuffling of the groups.
        threshold: Threshold rule on the validation part: ``f1`` (default, the UAD slide deck),
            ``youden`` (Chung & Choi 2023), ``mean_sd[:k=..]`` (Hjohlman 2022),
            ``percentile[:q=..]``,
            ``conformal[:alpha=..]`` or ``run`` (the detector's own mean + k·SD).
        alpha: Default level of the conformal rule.
        val_fraction: Share of the training folds (by groups) held out for validation.
        seed: Seed of the splits (repeat ``r`` uses ``seed + r``).
    """

    folds: int = 5
    repeats: int = 2
    threshold: str = "f1"
    alpha: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2 or self.repeats < 1:
            raise ConfigError(f"cv: need folds >= 2 and repeats >= 1, got {self.folds}x")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"cv: val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"cv: alpha must lie in (0, 1), got {self.alpha}")
        parse_rule(self.threshold)

    @classmethod
    def from_config(cls, config: dict[str, Any], **given: Any) -> CVSettings:
        """Settings from the config's ``evaluation`` block, overridden by non-``None`` args."""
        block = dict(config.get("evaluation") or {})
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"evaluation: unknown keys {unknown}")
        block.update({k: v for k, v in given.items() if v is not None})
        return cls(**block)


def splits_csv(splits: list[FoldSplit], images: ImageSet, groups: np.ndarray) -> str:
    """The fold assignment as CSV text: ``repeat,fold,part,index,id,group,label``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["repeat", "fold", "part", "index", "id", "group", "label"])
    for split in splits:
        for part in ("train", "val", "test"):
            for i in getattr(split, part):
                row = [split.repeat + 1, split.fold + 1, part, int(i), images.ids[i]]
                writer.writerow([*row, groups[i], int(images.labels[i])])
    return buffer.getvalue()


def read_splits(out: str | Path) -> list[dict[str, str]]:
    """Read ``OUT/splits.csv`` back as a list of rows."""
    with open(Path(out) / SPLITS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


# -- resumable state ------------------------------------------------------------------------
def _split_key(text: str) -> str:
    """Digest of what must match on resume: repeat, fold, part, index and label of every row."""
    rows = csv.reader(io.StringIO(text))
    key = "\n".join(",".join((r[0], r[1], r[2], r[3], r[6])) for r in rows)
    return hashlib.sha256(key.encode()).hexdigest()


# -- one fold -------------------------------------------------------------------------------
def _fold_threshold(
    detector: BaseDetector, settings: CVSettings, labels: np.ndarray, scores: np.ndarray
) -> tuple[float, str]:
    rule, params = parse_rule(settings.threshold)
    name = describe_rule(rule, params, settings.alpha)
    if rule is None:
        return float(detector.threshold_), name
    return rule_threshold(rule, params, labels, scores, settings.alpha), name


def _fold_pixel(
    detector: BaseDetector, test: ImageSet, include: np.ndarray, maps: np.ndarray | None
) -> dict[str, Any] | None:
    if maps is None or test.masks is None:
        return None
    fg, rule = foreground_masks(test)
    return pixel_block(maps, test.masks, fg, rule, include & (test.labels != -1))[0]


def run_fold(
    split: FoldSplit,
    images: ImageSet,
    config: dict[str, Any],
    settings: CVSettings,
    fold_dir: Path,
    mask_known: np.ndarray,
) -> dict[str, Any]:
    """Train, threshold and test one fold; write ``fold.json`` and ``scores.csv``.

    Args:
        split: The fold's parts.
        images: The labelled set (with training augmentation attached).
        config: The detector config (``model``/``engine``/``data``).
        settings: Cross-validation settings.
        fold_dir: The fold's run directory.
        mask_known: Bool per case of ``images``: lesion mask known (for pixel metrics).

    Returns:
        The fold record (also in ``fold_dir/fold.json``).
    """
    labels = images.labels
    supervised = build_detector(config).supervised
    keep = split.train if supervised else split.train[labels[split.train] == 0]
    train = images.subset(keep, keep_augment=True)
    val, test = images.subset(split.val), images.subset(split.test)
    start = time.perf_counter()
    detector = fit_run(config, train, fold_dir, val=val, resume=True).detector
    val_scores = detector.score(val)
    threshold, rule = _fold_threshold(detector, settings, val.labels, val_scores)
    scores, maps = score_in_chunks(detector, test, keep_maps=test.masks is not None)
    source = "validation part of the training folds"
    record: dict[str, Any] = {
        "repeat": split.repeat + 1,
        "fold": split.fold + 1,
        "run_dir": str(fold_dir),
        "image": image_block(test.labels, scores, threshold, rule, source, n_boot=0),
        "validation": {
            "auroc": image_metrics(val.labels, val_scores, threshold)["auroc"],
            "n_normal": int(np.sum(val.labels == 0)),
            "n_abnormal": int(np.sum(val.labels == 1)),
        },
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "epochs": len(detector.history_),
        "seconds": time.perf_counter() - start,
        "history": detector.history_,
        "cases": {
            "id": list(test.ids),
            "label": test.labels.tolist(),
            "score": scores.tolist(),
        },
    }
    pixel = _fold_pixel(detector, test, mask_known[split.test], maps)
    if pixel is not None:
        record["pixel"] = pixel
    result = AnomalyResult(
        scores, predict_abnormal(scores, threshold), np.empty(0), None, threshold
    )
    write_scores_csv(fold_dir / SCORES_FILE, test.ids, test.labels, result)
    write_json(fold_dir / FOLD_FILE, record)
    return json_ready(record)


# -- aggregation ----------------------------------------------------------------------------
def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metric blocks of the cv ``metrics.json`` from the fold records."""
    image: dict[str, Any] = {
        key: summarise([r["image"][key] for r in records]) for key in (*IMAGE_KEYS, "threshold")
    }
    image["confusion_matrix"] = {
        cell: int(sum(r["image"]["confusion_matrix"][cell] for r in records))
        for cell in ("tn", "fp", "fn", "tp")
    }
    out: dict[str, Any] = {"image": image}
    if any("pixel" in r for r in records):
        out["pixel"] = {
            key: summarise([(r.get("pixel") or {}).get(key) for r in records]) for key in PIXEL_KEYS
        }
        out["pixel"]["foreground_rule"] = next(
            r["pixel"]["foreground_rule"] for r in records if "pixel" in r
        )
    out["validation"] = {"auroc": summarise([r["validation"]["auroc"] for r in records])}
    return out


# -- report ---------------------------------------------------------------------------------
def _summary_table(metrics: dict[str, Any]) -> Table:
    rows = []
    for level in ("image", "pixel", "validation"):
        for key, value in (metrics.get(level) or {}).items():
            if isinstance(value, dict) and "mean" in value:
                defined = [v for v in value["folds"] if v is not None]
                low = min(defined) if defined else None
                high = max(defined) if defined else None
                rows.append([f"{level}.{key}", value["mean"], value["sd"], low, high, value["n"]])
    columns = ["metric", "mean", "sd", "min", "max", "folds"]
    return Table("Metrics over folds (test folds)", columns, rows, sortable=False)


def _fold_table(records: list[dict[str, Any]]) -> Table:
    columns = ["repeat", "fold", "n_train", "n_val", "n_test", "epochs", "threshold"]
    columns += ["val_auroc", *IMAGE_KEYS, "pixel_auroc", "seconds"]
    rows = []
    for r in records:
        image = r["image"]
        rows.append(
            [r["repeat"], r["fold"], r["n_train"], r["n_val"], r["n_test"], r["epochs"]]
            + [image["threshold"], r["validation"]["auroc"]]
            + [image[k] for k in IMAGE_KEYS]
            + [(r.get("pixel") or {}).get("auroc"), round(float(r["seconds"]), 1)]
        )
    note = (
        "Threshold and val_auroc come from each fold's validation part; the other metrics "
        "from its test fold. Click a header to sort."
    )
    return Table("Per-fold results", columns, rows, note=note)


def _oof_table(records: list[dict[str, Any]]) -> Table:
    ids, labels, scores, preds, lead = [], [], [], [], {"repeat": [], "fold": []}
    thresholds = []
    for r in records:
        cases, threshold = r["cases"], r["image"]["threshold"]
        n = len(cases["id"])
        ids += cases["id"]
        labels += cases["label"]
        scores += cases["score"]
        preds += predict_abnormal(cases["score"], threshold).tolist()
        thresholds += [threshold] * n
        lead["repeat"] += [r["repeat"]] * n
        lead["fold"] += [r["fold"]] * n
    table = case_table(
        ids,
        np.array(labels),
        np.array(scores),
        np.array(preds),
        extra={"threshold": np.array(thresholds)},
        lead=lead,
    )
    table.title = "Per-case test scores (each case once per repeat)"
    return table


def _cv_figures(records: list[dict[str, Any]], metrics: dict[str, Any], folder: Path) -> list:
    first = records[0]
    curves = [(r["cases"]["label"], r["cases"]["score"], r["image"]["threshold"]) for r in records]
    names = [f"r{r['repeat']} f{r['fold']}" for r in records]
    boxes = {k: metrics["image"][k]["folds"] for k in BOX_KEYS}
    if "pixel" in metrics:
        boxes["pixel auroc"] = metrics["pixel"]["auroc"]["folds"]
    made = [
        Figure(
            figs.plot_fold_boxplot(boxes, folder / "fold_boxplot.png"),
            "Per-fold test metrics",
            "One dot per fold; AUROC first.",
        ),
        Figure(
            figs.plot_roc(curves, folder / "roc_folds.png", names, "ROC curve per test fold"),
            "ROC per fold",
            "Each dot marks the fold's threshold chosen on its validation part.",
        ),
        Figure(
            figs.plot_confusion_matrix(
                metrics["image"]["confusion_matrix"],
                folder / "confusion_matrix.png",
                "Confusion matrix (all test folds)",
            ),
            "Confusion matrix",
            "Summed over all folds and repeats.",
        ),
        Figure(
            figs.plot_training_curves(
                [r.get("history") or [] for r in records], folder / "training_curves.png"
            ),
            "Training curves",
            "All folds: normal train/validation loss and mean validation scores per epoch.",
        ),
        Figure(
            figs.plot_score_histograms(
                np.array(first["cases"]["label"]),
                np.array(first["cases"]["score"]),
                first["image"]["threshold"],
                folder / "score_histogram_r1_f1.png",
                "Test scores of repeat 1, fold 1",
            ),
            "Score histograms (repeat 1, fold 1)",
            "Scores of different folds come from different models and are not pooled.",
        ),
    ]
    return [f for f in made if f.path is not None]


def _write_cv_report(out: Path, metrics: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    cv = metrics["cv"]
    grouping = (
        "grouped by patient"
        if cv["grouped"]
        else "one group per image (the data has no group column)"
    )
    facts = [
        ("design", f"{cv['repeats']} x {cv['folds']}-fold, stratified, {grouping}"),
        ("image level", summary_line(metrics["image"])),
        ("threshold rule", f"{cv['threshold_rule']} on each fold's validation part"),
        ("cases (normal / abnormal)", f"{metrics['n_normal']} / {metrics['n_abnormal']}"),
        ("patient groups", cv["n_groups"]),
        ("model selection", cv["model_selection"]),
    ]
    blocks = [
        Facts("Cross-validation", facts),
        _summary_table(metrics),
        Figures("Figures", _cv_figures(records, metrics, out / FIGURES_DIR)),
        _fold_table(records),
        _oof_table(records),
    ]
    subtitle = f"data {metrics['data']} · model {metrics['model']}"
    return write_report(out / REPORT_FILE, "medanomaly cross-validation", blocks, subtitle)


# -- driver ---------------------------------------------------------------------------------
def _load(
    data: str | Path | ImageSet, config: dict[str, Any], strict: bool
) -> tuple[ImageSet, LoadReport, np.ndarray, bool]:
    """The labelled cases (augmentation attached), their known masks, and if groups are named.

    Returns:
        ``(images, report, known, grouped)``: ``known`` marks the cases whose lesion mask is
        known; ``grouped`` says whether the data names each case's patient.
    """
    if isinstance(data, ImageSet):
        images, report, grouped = data, LoadReport(), data.groups is not None
    else:  # the folds of a labelled set are cut in memory
        options = dict(config.get("data") or {})
        listed = list_cases(data, options.pop("label_names", None))
        if split_parts(listed, data) is not None:
            raise ConfigError(
                f"{data}: the manifest has a split column, which the folds of cv would ignore "
                "(its test rows would be trained on); use fit, which honours it, or compare "
                "with protocol kind: split_column, or remove the column"
            )
        grouped = all(case.group for case in listed)
        options["stream"] = False
        images, report = load_cases(listed, data, **options, strict=strict, augment=True)
    unlabelled = images.labels == -1
    for i in np.flatnonzero(unlabelled):
        report.skipped.append((images.ids[i], "no label (cv needs labelled cases)"))
    if unlabelled.any():
        images = images.subset(~unlabelled, keep_augment=True)
    if isinstance(data, ImageSet):
        known = np.ones(len(images), dtype=bool)
    else:
        known = known_masks(data, (config.get("data") or {}).get("label_names"), images)
    return images, report, known, grouped


def _fold_message(record: dict[str, Any], total: int, loaded: bool) -> str:
    image = record["image"]
    auroc, f1 = image["auroc"], image["f1"]
    text = f"AUROC {auroc:.3f}" if auroc is not None else "AUROC n/a"
    text += f", F1 {f1:.3f}" if f1 is not None else ", F1 n/a"
    how = "finished before, loaded" if loaded else f"{record['seconds']:.0f} s"
    return (
        f"repeat {record['repeat']} fold {record['fold']} ({total} in all): {text}, "
        f"threshold {image['threshold']:.4g} ({how})"
    )


def cross_validate(
    config: dict[str, Any],
    data: str | Path | ImageSet,
    out: str | Path,
    folds: int | None = None,
    repeats: int | None = None,
    threshold: str | None = None,
    alpha: float | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    strict: bool = False,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Repeated, grouped, stratified k-fold cross-validation; resumable.

    Arguments left ``None`` come from the config's ``evaluation:`` block, else from
    :class:`CVSettings`' defaults (5 folds, 2 repeats, ``f1`` threshold, 20 % validation).

    Args:
        config: Detector config (``model``, ``engine``, ``data`` and optional ``evaluation``).
        data: Labelled manifest or folder (read with ``config['data']``), or an ImageSet.
        out: Output folder; re-running with the same arguments resumes.
        folds: Test folds per repeat.
        repeats: Number of repeats.
        threshold: Threshold rule on each fold's validation part.
        alpha: Level of the conformal rule.
        val_fraction: Share of the training folds used for validation.
        seed: Seed of the splits.
        strict: Raise on the first unreadable case, and on a precision this machine lacks.
        echo: Called with one progress line per fold (e.g. ``print``).

    Returns:
        The metrics written to ``OUT/metrics.json``.
    """
    out = Path(out)
    settings = CVSettings.from_config(
        config,
        folds=folds,
        repeats=repeats,
        threshold=threshold,
        alpha=alpha,
        val_fraction=val_fraction,
        seed=seed,
    )
    if strict:
        check_precision(config)
    images, report, known, grouped = _load(data, config, strict)
    if not grouped:
        log.warning(
            "cv: the data names no patient (no group column): each case is its own group, so "
            "slices of one patient may fall in several folds (metrics say grouped: false)"
        )
    groups = np.asarray(images.groups if images.groups is not None else images.ids).astype(str)
    splits = make_splits(
        images.labels,
        groups,
        settings.folds,
        settings.repeats,
        settings.val_fraction,
        settings.seed,
    )
    model_config = {k: v for k, v in config.items() if k != "evaluation"}
    split_text = splits_csv(splits, images, groups)
    state = {
        "config": model_config,
        "settings": asdict(settings),
        "data": str(data),
        "splits": _split_key(split_text),
    }
    start_or_resume(out, CV_FILE, state, "cross-validation", unchecked=("data",))
    if not (out / SPLITS_FILE).exists():
        atomic_write_text(out / SPLITS_FILE, split_text)
    with default_threshold_unused(parse_rule(settings.threshold)[0] is not None):
        records = [
            _fold(split, images, model_config, settings, out, known, len(splits), echo)
            for split in splits
        ]
    metrics = aggregate(records)
    metrics.update(_cv_facts(settings, images, groups, report, records, data, config))
    metrics["cv"]["grouped"] = grouped
    _write_cv_report(out, metrics, records)
    write_json(out / METRICS_FILE, metrics)
    return json_ready(metrics)


def _fold(
    split: FoldSplit,
    images: ImageSet,
    config: dict[str, Any],
    settings: CVSettings,
    out: Path,
    known: np.ndarray,
    total: int,
    echo: Echo | None,
) -> dict[str, Any]:
    """One fold's record: loaded from ``fold.json`` if it finished before, else computed."""
    fold_dir = out / FOLDS_DIR / split.name
    done = fold_dir / FOLD_FILE
    loaded = done.exists()
    if loaded:
        record = json.loads(done.read_text())
    else:
        record = run_fold(split, images, config, settings, fold_dir, known)
    if echo is not None:
        echo(_fold_message(record, total, loaded))
    return record


def _train_on(config: dict[str, Any]) -> str:
    """Which training images each fold's detector saw, in words."""
    detector = build_detector(config)
    if detector.supervised:
        return "normal and abnormal images of the training part (a supervised classifier)"
    return "normal images of the training part only"


def _model_selection(config: dict[str, Any]) -> str:
    """How each fold's epoch was chosen, in words."""
    monitor = (config.get("engine") or {}).get("monitor", "val_loss")
    if monitor == "val_auroc":
        return "epoch with the highest validation AUROC (ties: lower normal validation loss)"
    return "epoch with the lowest normal validation loss (early stopping)"


def _cv_facts(
    settings: CVSettings,
    images: ImageSet,
    groups: np.ndarray,
    report: LoadReport,
    records: list[dict[str, Any]],
    data: str | Path | ImageSet,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The non-metric parts of the cv ``metrics.json``."""
    rule, params = parse_rule(settings.threshold)
    return {
        "cv": {
            **asdict(settings),
            "threshold_rule": describe_rule(rule, params, settings.alpha),
            "n_groups": int(np.unique(groups).size),
            "splitter": "sklearn StratifiedGroupKFold, random_state = seed + repeat",
            "sd": "sample standard deviation (ddof=1) over the folds where defined",
            "model_selection": _model_selection(config),
            "train_on": _train_on(config),
            "seconds": float(sum(r["seconds"] for r in records)),
        },
        "n_cases": len(images),
        "n_normal": int(np.sum(images.labels == 0)),
        "n_abnormal": int(np.sum(images.labels == 1)),
        "skipped": report.skipped_records(),
        "data": "<ImageSet>" if isinstance(data, ImageSet) else str(data),
        "model": (config.get("model") or {}).get("name"),
        "folds": [
            {"repeat": r["repeat"], "fold": r["fold"], "run_dir": r["run_dir"]} for r in records
        ],
    }

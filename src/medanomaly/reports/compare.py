"""The tables and the HTML report of ``medanomaly compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve  # noqa: E402

from medanomaly.reports import figures as figs  # noqa: E402
from medanomaly.reports.files import FIGURES_DIR, REPORT_FILE  # noqa: E402
from medanomaly.reports.html import (  # noqa: E402
    Facts,
    Figure,
    Figures,
    Table,
    Text,
    write_report,
)

LEADER_KEYS = (
    "selection_metric",
    "test_metric",
    "gap",
    "auroc",
    "auprc",
    "f1",
    "pixel_auroc",
    "pixel_ap",
    "dice_at_val_threshold",
)
HEADERS = {"selection_metric": "selection", "test_metric": "test", "gap": "gap"}


def _ms(value: Any) -> str:
    if not isinstance(value, dict) or value.get("mean") is None:
        return "n/a"
    if value.get("n") == 1:  # one test part (a split column): no spread to show
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {value['sd']:.3f}"


PROTOCOL_FIELDS = {
    "kfold": ("folds", "repeats", "val_fraction", "select_fraction", "seed"),
    "val_groups": ("folds", "repeats", "n_val", "select_fraction", "seed"),
    "split_column": ("select_fraction",),
}


def protocol_line(protocol: dict[str, Any]) -> str:
    """The protocol's kind with only the settings it uses, e.g. ``kfold (folds 5, ...)``."""
    kind = protocol["kind"]
    used = [f"{k} {protocol[k]}" for k in PROTOCOL_FIELDS.get(kind, ()) if k in protocol]
    used += [f"{k} {protocol[k]}" for k in ("level", "threshold") if k in protocol]
    return f"{kind} ({', '.join(used)})"


def _weights(row: dict[str, Any]) -> str:
    if "weights" not in row or not row["weights"]:
        return ""
    members = row["members"]
    means = [np.mean([w[m] for w in row["weights"]]) for m in members]
    return ", ".join(f"{m} {v:.2f}" for m, v in zip(members, means, strict=True))


def _ci(row: dict[str, Any]) -> str:
    """Each fold's bootstrap CI of the test AUROC (spec ``ci: bootstrap``)."""
    return "; ".join(
        "n/a" if low is None else f"{low:.3f}–{high:.3f}" for low, high in row["auroc_ci"]
    )


def _keys(results: dict[str, Any]) -> list[str]:
    rows = list(results["rows"].values())
    keys = [k for k in LEADER_KEYS if any(isinstance(r.get(k), dict) for r in rows)]
    subgroups = sorted(
        {k for r in rows for k, v in r.items() if k.startswith("auroc_") and isinstance(v, dict)}
    )
    at = keys.index("auroc") + 1 if "auroc" in keys else len(keys)
    return keys[:at] + subgroups + keys[at:]  # per-subgroup AUROC (spec subgroups) after AUROC


def _order(results: dict[str, Any]) -> list[str]:
    rows = results["rows"]

    def key(name: str) -> float:
        value = rows[name]["selection_metric"]["mean"]
        return -(value if value is not None else -np.inf)

    return sorted(rows, key=key)


def _label(name: str, row: dict[str, Any]) -> str:
    """The row's name, marked when it learnt from labelled abnormal cases too."""
    return f"{name} (supervised)" if row.get("supervised") else name


def _steps(steps: list[dict[str, Any]]) -> list[str]:
    """The one-standard-error decisions in words, one per step."""
    return [
        f"{s['challenger']} {'replaced' if s['replaced'] else 'did not replace'} "
        f"{s['incumbent']}: advantage {s['advantage']:+.3f}, one SE {s['se']:.3f}"
        for s in steps
    ]


def _fold_choices(results: dict[str, Any]) -> str:
    per_fold = results["per_fold_choice"]
    chosen = ", ".join(f"{d['fold']} {d['chosen'] or 'none'}" for d in results["decisions"])
    return (
        f"Each fold's own choice on its selection half: {chosen}; their test "
        f"{results['selection']['metric']}: {_ms(per_fold['test_metric'])} (the honest "
        "estimate of tuning and choosing together)."
    )


def results_table(results: dict[str, Any]) -> str:
    """``results.md``: the leaderboard (test folds; ordered by the selection figure)."""
    keys = _keys(results)
    with_ci = any("auroc_ci" in r for r in results["rows"].values())
    pooled = any("pooled_dice_at_val_threshold" in r for r in results["rows"].values())
    metric = results["selection"]["metric"]
    grouped = "" if results["grouped"] else " **Not grouped**: the data names no patient."
    lines = [
        f"# medanomaly compare: {results['data']}",
        "",
        f"Protocol: {protocol_line(results['protocol'])}; {results['n_cases']} cases "
        f"({results['n_normal']} normal / {results['n_abnormal']} abnormal, "
        f"{results['n_groups']} groups).{grouped} Figures are mean ± SD over "
        f"{len(results['folds'])} fold(s). `selection` is the {metric} on each validation "
        f"part's selection half, after tuning on the other half; `test` the same metric on "
        "the test folds; `gap` = selection - test. Chosen by the one-standard-error rule "
        f"(no-model < single model < fusion): **{results['chosen']}**.",
        "",
        *[f"- {line}" for line in _steps(results["selection"]["steps"])],
        "",
        _fold_choices(results),
        "",
        "| row | baseline | "
        + " | ".join(HEADERS.get(k, k) for k in keys)
        + (" | test AUROC 95 % CI" if with_ci else "")
        + (" | pooled Dice" if pooled else "")
        + " | weights | seconds | errors |",
        "|---|---|" + "---|" * (len(keys) + 3 + with_ci + pooled),
    ]
    for name in _order(results):
        row = results["rows"][name]
        cells = [_ms(row.get(k)) for k in keys]
        if with_ci:
            cells.append(_ci(row) if "auroc_ci" in row else "")
        if pooled:
            value = row.get("pooled_dice_at_val_threshold")
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(
            f"| {_label(name, row)}{' (chosen)' if name == results['chosen'] else ''} | "
            f"{'yes' if row['baseline'] else 'no'} | "
            + " | ".join(cells)
            + f" | {_weights(row)} | "
            f"{row['seconds']:.0f} | {len(row['errors'])} |"
        )
    errors = [(n, e) for n, r in results["rows"].items() for e in r["errors"]]
    if errors:
        lines += ["", "Failed folds:", ""]
        lines += [f"- {n}, fold {e['fold']}: {e['error']}" for n, e in errors]
    return "\n".join(lines) + "\n"


def plot_pr(
    curves: list[tuple[np.ndarray, np.ndarray]], names: list[str], path: Path, title: str
) -> Path | None:
    """Precision-recall curves, one per candidate (AP in the legend)."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    drawn = 0
    for (labels, scores), name in zip(curves, names, strict=True):
        if len(set(np.asarray(labels).tolist())) < 2:
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        ap = average_precision_score(labels, scores)
        ax.plot(recall, precision, lw=1.2, label=f"{name} (AP {ap:.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.set(title=title)
    ax.legend(loc="lower left", fontsize=7)
    return figs.save_figure(fig, path)


def pooled_cases(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold labels and scores of the first repeat, each in its fold's threshold units.

    Scores of different folds come from different models; subtracting each fold's validation
    threshold puts every fold's cut-off at 0 before the folds are pooled.
    """
    labels, scores = [], []
    for r in records:
        if "error" in r or not r["fold"].startswith("r1_"):
            continue
        labels += r["cases"]["label"]
        scores += (np.asarray(r["cases"]["score"]) - r["threshold"]).tolist()
    return np.asarray(labels), np.asarray(scores)


def write_compare_report(
    out: Path, results: dict[str, Any], records: dict[str, list[dict[str, Any]]]
) -> Path:
    """``report.html``: leaderboard, per-fold points, ROC and PR curves, winner's gallery."""
    folder = out / FIGURES_DIR
    order = _order(results)
    keys = _keys(results)
    columns = ["row", "baseline", *(HEADERS.get(k, k) for k in keys), "weights", "seconds"]
    columns.append("failed folds")
    table_rows = [
        [
            _label(name, results["rows"][name]),
            "yes" if results["rows"][name]["baseline"] else "no",
            *[_ms(results["rows"][name].get(k)) for k in keys],
            _weights(results["rows"][name]),
            round(results["rows"][name]["seconds"], 1),
            len(results["rows"][name]["errors"]),
        ]
        for name in order
    ]
    pooled = {n: pooled_cases(records[n]) for n in order}
    metric = "pixel_ap" if "pixel_ap" in keys else "auroc"
    points = {n: results["rows"][n][metric]["folds"] for n in order}
    made = [
        Figure(
            figs.plot_fold_boxplot(points, folder / "folds.png", f"Per-fold test {metric}"),
            "Per-fold test values",
            f"One dot per fold: test {metric} of each candidate.",
        ),
        Figure(
            figs.plot_roc(
                [(y, s, 0.0) for y, s in pooled.values()],
                folder / "roc.png",
                order,
                "ROC, out-of-fold (repeat 1)",
            ),
            "ROC curves",
            "Out-of-fold test scores of repeat 1, in each fold's threshold units; "
            "the dot is the validation threshold.",
        ),
        Figure(
            plot_pr(list(pooled.values()), order, folder / "pr.png", "Precision-recall"),
            "Precision-recall curves",
            "Same pooled scores as the ROC curves.",
        ),
    ]
    gallery = [
        Figure(p, p.stem.split("_", 1)[1], f"{results['chosen']}, test fold {results['folds'][0]}")
        for p in sorted((folder / "gallery").glob("*.png"))
    ]
    best = results.get("best") or {}
    facts = [
        ("chosen on validation", results["chosen"]),
        ("selection", f"{results['selection']['metric']}, {results['selection']['rule']}"),
        *(("decision", line) for line in _steps(results["selection"]["steps"])),
        ("each fold's own choice", _fold_choices(results)),
        ("grouped by patient", "yes" if results["grouped"] else "no"),
        ("protocol", protocol_line(results["protocol"])),
        ("cases", f"{results['n_normal']} normal / {results['n_abnormal']} abnormal"),
        ("groups", results["n_groups"]),
        ("best run", best.get("run_dir", "not refitted")),
    ]
    blocks = [
        Facts("Comparison", facts),
        Table("Leaderboard (test folds, mean ± SD)", columns, table_rows),
        Figures("Figures", [f for f in made if f.path is not None]),
        Figures(
            f"Gallery of the winner ({results['chosen']})",
            gallery,
            "Top-scoring and lowest-scoring abnormal and normal test cases of the first fold.",
        ),
        Text(
            "Protocol",
            "Each validation part is halved by patient groups: the tuning half chose the "
            "epoch, the post-processing and a fusion's weights; the selection half only "
            "scored the tuned candidates, and the winner was chosen on those figures by the "
            "one-standard-error rule. Thresholds and pixel cut-offs come from the whole "
            "validation part. Test folds only gave the numbers.",
        ),
    ]
    return write_report(out / REPORT_FILE, "medanomaly compare", blocks, str(results["data"]))

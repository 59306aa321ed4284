"""End-to-end demo on synthetic phantoms: train a CAE, score, print AUROC, draw pictures."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medanomaly.data.phantoms import make_phantoms
from medanomaly.models.cae import CAE
from medanomaly.outputs.writers import save_maps, write_scores_csv


def run_demo(
    out: str | Path,
    n_train: int = 400,
    n_test: int = 60,
    shape: tuple[int, ...] = (64, 64),
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train a CAE on normal phantoms and score normal and abnormal ones.

    Args:
        out: Folder for the run (checkpoint, history, model), ``scores.csv`` and
            ``pictures/`` (input | reconstruction | difference map of a few cases).
        n_train: Normal training phantoms.
        n_test: Test phantoms of each kind (normal and abnormal).
        shape: Phantom grid (2D or 3D).
        epochs: Training epochs.
        seed: Seed of phantoms and training.
        progress: Show the progress bar.

    Returns:
        ``{"auroc": ..., "seconds": ..., "threshold": ...}``.
    """
    out = Path(out)
    start = time.perf_counter()
    train = make_phantoms(n_train, 0, shape, seed=seed)
    test = make_phantoms(n_test, n_test, shape, seed=seed + 1)
    detector = CAE(
        spatial_dims=len(shape),
        engine={"epochs": epochs, "batch_size": 16, "seed": seed, "progress": progress},
    )
    detector.fit(train, run_dir=out / "run")
    result = detector.detect(test)
    auroc = float(roc_auc_score(test.labels, result.scores))
    write_scores_csv(out / "scores.csv", test.ids, test.labels, result)
    shown = _examples(test.labels, result.scores)
    save_maps(
        out / "pictures", [test.ids[i] for i in shown], test.images[shown], result.take(shown)
    )
    return {
        "auroc": auroc,
        "seconds": time.perf_counter() - start,
        "threshold": detector.threshold_,
    }


def _examples(labels: np.ndarray, scores: np.ndarray, per_class: int = 3) -> list[int]:
    """The highest-scoring abnormal and lowest-scoring normal cases."""
    abnormal = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    return [
        *abnormal[np.argsort(-scores[abnormal])][:per_class],
        *normal[np.argsort(scores[normal])][:per_class],
    ]

"""Slow real-data check: the the UAD slide deck CAE pipeline learns something on real head CT."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_data  # noqa: I001
from sklearn.metrics import roc_auc_score

from medanomaly.config import apply_overrides, build_detector, load_config
from medanomaly.data.loading import load_dataset

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
CONFIG = "cae_head_ct_2d"


def _manifest(tmp_path, folder):
    lines = ["path,label,group"]
    for row in (folder / "labels.csv").read_text().splitlines()[1:]:
        case, label = (v.strip() for v in row.split(","))
        lines.append(f"{folder / (case + '.png')},{label},{case}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.csv"


def test_cae_on_head_ct_separates_hemorrhage(tmp_path, request):
    folder = real_data("head_ct_hemorrhage")
    config = load_config(CONFIG)
    # val_min=0: this quick 25-epoch check trains on 63 of the 70 normals as it did before
    # engine.val_min; holding out the default 20 leaves 50, too few for 25 epochs (AUROC 0.557
    # here; the head CT benchmark at 150 epochs loses nothing: 0.759 -> 0.755)
    overrides = ["engine.epochs=25", "engine.progress=false", "engine.val_min=0"]
    config = apply_overrides(config, overrides)
    data, report = load_dataset(_manifest(tmp_path, folder), **config["data"])
    assert not report and data.images.shape == (200, 1, 64, 64)
    normal = np.flatnonzero(data.labels == 0)
    train, test_normal = normal[:70], normal[70:]
    test = np.concatenate([test_normal, np.flatnonzero(data.labels == 1)])
    detector = build_detector(config).fit(data.subset(train))
    auroc = roc_auc_score(data.labels[test], detector.score(data.subset(test)))
    assert auroc > 0.6, auroc

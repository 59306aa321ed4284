"""``medanomaly compare`` with a supervised candidate: it learns from labelled abnormal cases."""

import json

import numpy as np
import torch
from test_evaluate_cli import write_phantom_manifest

from medanomaly.model_selection import compare as compare_module
from medanomaly.model_selection.compare import compare, load_labelled, training_cases
from medanomaly.model_selection.spec import parse_spec

VGG = {
    "name": "vgg_classifier",
    "spatial_dims": 2,
    "channels": [4, 8],
    "convs_per_module": 1,
    "fc_features": [8],
    "crop_size": [28, 28],
    "flip_axes": [1],
}


def _spec(manifest):
    return {
        "data": {"path": str(manifest), "transforms": [{"min_max": {}}]},
        "protocol": {"kind": "kfold", "folds": 3, "repeats": 1, "val_fraction": 0.5},
        "level": "image",
        "candidates": {
            "intensity": {"model": {"name": "intensity", "spatial_dims": 2}},
            "vgg": {"model": VGG, "engine": {"epochs": 2, "batch_size": 8, "progress": False}},
        },
    }


def test_a_supervised_candidate_fits_on_normal_and_abnormal_training_cases(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    manifest = write_phantom_manifest(tmp_path / "data", n_normal=24, n_abnormal=16)
    spec = parse_spec(_spec(manifest), tmp_path)
    seen: dict[str, list[np.ndarray]] = {}
    fit_run = compare_module.fit_run

    def spy(config, train, out, **kwargs):
        seen.setdefault(config["model"]["name"], []).append(np.asarray(train.labels))
        return fit_run(config, train, out, **kwargs)

    monkeypatch.setattr(compare_module, "fit_run", spy)
    results = compare(spec, tmp_path / "out", progress=False)
    rows = results["rows"]
    assert rows["vgg"]["supervised"] is True and rows["vgg"]["baseline"] is False
    assert rows["intensity"]["supervised"] is False and rows["intensity"]["baseline"] is True
    assert rows["vgg"]["errors"] == [] and rows["vgg"]["auroc"]["n"] == 3
    assert all(set(labels.tolist()) == {0, 1} for labels in seen["vgg_classifier"])
    assert all(set(labels.tolist()) == {0} for labels in seen["intensity"])
    chosen = rows[results["chosen"]]["model"]
    assert len(seen[chosen]) == 4  # 3 folds, then the refit into best/
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"]["vgg"]["supervised"] is True
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| vgg (supervised)" in table and "| intensity (supervised)" not in table


def test_training_cases_keep_abnormal_cases_only_for_supervised_candidates(tmp_path):
    manifest = write_phantom_manifest(tmp_path / "data", n_normal=6, n_abnormal=4)
    raw = _spec(manifest)
    raw["candidates"]["both"] = {"fusion": ["intensity", "vgg"]}
    spec = parse_spec(raw, tmp_path)
    images = load_labelled(spec).images
    index = np.arange(len(images))
    labels = {c.name: training_cases(spec, c, images, index).labels for c in spec.candidates}
    assert sorted(labels["vgg"].tolist()) == sorted(images.labels.tolist())
    assert set(labels["intensity"].tolist()) == {0} and set(labels["both"].tolist()) == {0}
    assert compare_module.is_supervised(spec, spec.candidate("both"))

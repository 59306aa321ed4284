"""``medanomaly export``: ONNX graphs that score as the run does, and refusals in one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from medanomaly.cli import main
from medanomaly.data.phantoms import make_phantoms, write_phantom_scans
from medanomaly.detectors.base import EXPORT_FILE, BaseDetector
from medanomaly.detectors.exported import ONNX_FILE, ExportedDetector
from medanomaly.detectors.registry import get_model, get_model_class, list_models
from medanomaly.jobs.export import export_run
from medanomaly.outputs.archive import run_identity
from medanomaly.outputs.writers import read_scores_csv

pytest.importorskip("onnxruntime", reason="pip install 'medanomaly[export]'")

ENGINE = {"epochs": 1, "batch_size": 8, "progress": False, "seed": 0, "val_fraction": 0.25}

# the parity targets (cae, vae, dae in 2D, resnet_ae in 3D) and a no-model baseline
MODELS = {
    "cae": ({"spatial_dims": 2, "channels": [8, 16], "latent_channels": 4}, (32, 32)),
    "vae": (
        {"spatial_dims": 2, "channels": [4, 8, 8, 8], "hidden_dim": 16, "latent_dim": 4},
        (32, 32),
    ),
    "dae": (
        {
            "spatial_dims": 2,
            "features": [4, 4, 8, 8, 8, 4],
            "norm_groups": 2,
            "foreground_threshold": 0.1,
        },
        (32, 32),
    ),
    "resnet_ae": (
        {
            "spatial_dims": 3,
            "depth": 10,
            "channels": [4, 4, 8, 8],
            "latent_dim": 16,
            "foreground_threshold": 0.1,
        },
        (16, 16, 16),
    ),
    "intensity": ({"spatial_dims": 2, "foreground_threshold": 0.1}, (32, 32)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


BF16_RTOL = 2e-2
"""How far a run scoring under bf16 autocast (``precision: auto`` on a CPU with bf16) may be
from its float32 graph; with float32 scoring the two agree to 1e-5."""


def _float32(detector):
    """The fitted detector scoring in float32, as the exported graph does."""
    if "engine" in detector.get_params():
        detector = copy.copy(detector)
        detector.set_params(engine={**ENGINE, "precision": "32-true"})
    return detector


def _fit(name, folder):
    params, shape = MODELS[name]
    engine = ENGINE if "engine" in get_model_class(name)._param_names() else None
    detector = get_model(name, **params, engine=engine)
    detector.fit(make_phantoms(12, 0, shape, seed=0), run_dir=folder)
    return detector, shape


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_export_scores_and_maps_as_the_run(tmp_path, name):
    detector, shape = _fit(name, tmp_path / "run")
    done = export_run(tmp_path / "run", tmp_path / "exported")
    assert done.model == name and done.input_shape == (1, *shape)
    exported = BaseDetector.load(tmp_path / "exported")
    assert isinstance(exported, ExportedDetector)
    cases = make_phantoms(3, 3, shape, seed=1)  # a batch of 6: not the traced batch of 2
    as_run, found = detector.detect(cases), exported.detect(cases)
    expected = _float32(detector).detect(cases)
    np.testing.assert_allclose(found.maps, expected.maps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found.scores, as_run.scores, rtol=BF16_RTOL, atol=1e-4)
    assert np.array_equal(found.labels, as_run.labels)
    assert exported.threshold_ == detector.threshold_
    assert exported.threshold_rule_ == detector.threshold_rule_


def test_the_export_describes_preprocessing_threshold_model_and_source(tmp_path):
    detector, _ = _fit("cae", tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "exported")
    description = json.loads((tmp_path / "exported" / EXPORT_FILE).read_text())
    assert description["graph"]["inputs"]["image"]["shape"] == ["batch", 1, 32, 32]
    assert description["input"] == {"spatial_dims": 2, "channels": 1, "shape": [1, 32, 32]}
    assert description["threshold"]["value"] == detector.threshold_
    assert description["threshold"]["rule"] == "mean_sd(k=3)" == detector.threshold_rule_
    assert description["threshold"]["k"] == 3.0
    assert description["threshold"]["n"] == len(detector.val_scores_) > 0
    assert description["model"]["name"] == "cae"
    assert description["model"]["reference"] == "the UAD slide deck"
    assert description["source_run"]["digest"] == run_identity(tmp_path / "run")
    assert description["preprocessing"] == detector.run_config_.get("data", {})
    assert (tmp_path / "exported" / ONNX_FILE).stat().st_size > 1000
    readme = (tmp_path / "exported" / "README.md").read_text()
    assert "onnxruntime" in readme and "medanomaly score --run" in readme


def test_score_on_an_export_equals_score_on_the_run(tmp_path, capsys):
    """The round trip through the command line, on NIfTI scans read with the run's preprocessing."""
    scans = write_phantom_scans(tmp_path / "scans", n_train=16, n_test=6, shape=(16, 16, 16))
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {name: cae, spatial_dims: 3, channels: [4, 8], latent_channels: 4}\n"
        "engine: {epochs: 1, batch_size: 8, progress: false, val_fraction: 0.25}\n"
        "data: {transforms: [{min_max: {}}]}\n"
    )
    run, exported = tmp_path / "run", tmp_path / "exported"
    assert (
        main(["fit", "--config", str(config), "--data", str(scans["train"]), "--out", str(run)])
        == 0
    )
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    assert "exported cae" in capsys.readouterr().out
    for source, table in ((run, "run.csv"), (exported, "export.csv")):
        args = ["score", "--run", str(source), "--data", str(scans["test"])]
        maps = tmp_path / f"maps_{table[:-4]}"
        assert main([*args, "--out", str(tmp_path / table), "--maps", str(maps)]) == 0
    by_run, by_export = (read_scores_csv(tmp_path / t) for t in ("run.csv", "export.csv"))
    assert [r["id"] for r in by_run] == [r["id"] for r in by_export]
    np.testing.assert_allclose(
        [float(r["score"]) for r in by_export], [float(r["score"]) for r in by_run], rtol=BF16_RTOL
    )
    assert [r["prediction"] for r in by_export] == [r["prediction"] for r in by_run]
    assert [r["threshold"] for r in by_export] == [r["threshold"] for r in by_run]
    maps = sorted((tmp_path / "maps_export").glob("*_map.nii.gz"))
    assert len(maps) == 6 == len(list((tmp_path / "maps_run").glob("*_map.nii.gz")))


def test_a_model_that_cannot_be_exported_is_refused_in_one_line(tmp_path, capsys):
    detector = get_model("quality", spatial_dims=2, engine=ENGINE)
    detector.fit(make_phantoms(12, 0, (32, 32), seed=0), run_dir=tmp_path / "run")
    code = main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "quality cannot be exported" in err
    assert "Mahalanobis" in err and not (tmp_path / "x").exists()


def test_a_latent_search_is_not_exportable_and_says_why():
    searching = get_model("vae", spatial_dims=2, latent_steps=5)
    assert not searching.exportable and get_model("vae", spatial_dims=2).exportable
    assert "latent representation search" in searching.export_refusal


def test_every_model_declares_whether_it_exports():
    for name in list_models():
        cls = get_model_class(name)
        assert isinstance(cls.export_refusal, str) and cls.export_refusal, name
    exportable = {n for n in list_models() if get_model_class(n).exportable is True}
    assert {"cae", "dae", "intensity", "volume"} <= exportable
    assert get_model("resnet_ae").exportable
    assert not get_model("resnet_ae", patch_size=[16, 16, 16]).exportable
    assert not {"quality", "dagmm", "ensemble", "latent_density"} & exportable

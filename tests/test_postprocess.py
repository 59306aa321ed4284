"""Post-processing as a library stage: each step, its config, and the same result everywhere."""

import numpy as np
import pytest
import torch
import yaml

from medanomaly.config import build_detector
from medanomaly.data.phantoms import make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.errors import ConfigError
from medanomaly.jobs.fit import fit_run
from medanomaly.jobs.score import score_run
from medanomaly.postprocess import STEPS, PostProcess, PostProcessed, build_step

STEP_CONFIGS = {
    "positive": "positive",
    "smooth": {"smooth": {"sigma": 1.5}},
    "median": {"median": {"size": 3}},
    "foreground": {"foreground": {"threshold": 0.05}},
    "rim": {"rim": {"width": 2, "threshold": 0.05}},
    "case_scale": {"case_scale": {"q": 75.0, "threshold": 0.05}},
    "group_scale": {"group_scale": {"q": 75.0, "threshold": 0.05}},
    "score": {"score": {"reduce": "max", "threshold": 0.05}},
}


def test_every_step_has_a_test_config():
    assert set(STEP_CONFIGS) == set(STEPS)


def test_steps_do_what_they_say():
    image = np.zeros((1, 9, 9), np.float32)
    image[0, 2:7, 2:7] = 1.0
    recon = np.full_like(image, 0.5)
    recon[0, 4, 4] = 2.0
    anomaly_map = np.ones((9, 9), np.float32)
    positive = build_step("positive").apply(anomaly_map, image, recon)
    assert positive[4, 4] == 0 and positive[3, 3] == 1 and positive[0, 0] == 0
    fg = build_step("foreground", {"threshold": 0.5}).apply(anomaly_map, image, None)
    assert fg.sum() == 25
    ramp = np.arange(81, dtype=np.float32).reshape(9, 9)
    rim = build_step("rim", {"width": 1, "threshold": 0.5}).apply(ramp, image, None)
    assert rim[2, 2] == ramp[image[0] > 0.5].min() and rim[4, 4] == ramp[4, 4]
    scaled = build_step("case_scale", {"q": 50.0, "threshold": 0.5}).apply(ramp + 1, image, None)
    assert np.median(scaled[image[0] > 0.5]) == pytest.approx(1.0)
    spike = np.zeros((9, 9), np.float32)
    spike[4, 4] = 9.0
    assert build_step("median", {"size": 3}).apply(spike, image, None).max() == 0
    smooth = build_step("smooth", {"sigma": 1.0}).apply(spike, image, None)
    assert smooth.sum() == pytest.approx(9.0, rel=1e-3) and smooth.max() < 9


def test_group_scale_gives_one_scale_per_group():
    image = np.ones((1, 4, 4), np.float32)
    maps = np.stack([np.full((4, 4), v, np.float32) for v in (1.0, 3.0, 10.0, 30.0)])
    result = AnomalyResult(np.zeros(4), np.zeros(4, np.int64), maps, None, 0.0)
    chain = PostProcess(
        [{"group_scale": {"q": 50.0, "threshold": 0.5}}, {"score": {"reduce": "max"}}]
    )
    grouped = chain.apply(result, [image] * 4, groups=["a", "a", "b", "b"])
    # within a patient the order and ratio are kept; across patients one cut-off suits both
    np.testing.assert_allclose(grouped.scores, [0.5, 1.5, 0.5, 1.5])
    alone = chain.apply(result, [image] * 4)  # no groups: each case is its own group
    np.testing.assert_allclose(alone.scores, [1.0, 1.0, 1.0, 1.0])
    by_case = PostProcess(
        [{"case_scale": {"q": 50.0, "threshold": 0.5}}, {"score": {"reduce": "max"}}]
    )
    np.testing.assert_allclose(alone.scores, by_case.apply(result, [image] * 4).scores)
    with pytest.raises(ValueError, match="3 groups for 4 maps"):
        chain.apply(result, [image] * 4, groups=["a", "a", "b"])


def test_postprocessed_detector_passes_the_groups_of_an_image_set(phantoms):
    steps = [{"group_scale": {"q": 75.0, "threshold": 0.05}}, {"score": {"reduce": "mean"}}]
    config = {
        "model": {"name": "intensity", "spatial_dims": 2, "foreground_threshold": 0.05},
        "engine": {"val_fraction": 0.25},
        "postprocess": steps,
    }
    normal = phantoms.subset(phantoms.labels == 0)
    detector = build_detector(config).fit(normal)
    groups = np.repeat(np.arange(len(phantoms) // 6), 6)[: len(phantoms)].astype(str)
    grouped = ImageSet(phantoms.images, phantoms.labels, phantoms.ids, groups=groups)
    raw = detector.inner.detect(grouped)
    raw = AnomalyResult(raw.scores, raw.labels, raw.maps, raw.reconstructions, 0.0)
    expected = PostProcess(steps).apply(raw, grouped.images, groups)
    np.testing.assert_allclose(detector.detect(grouped).scores, expected.scores, rtol=1e-6)
    assert not np.allclose(detector.detect(phantoms).scores, expected.scores)


def test_unknown_steps_and_arguments_get_did_you_mean_errors():
    with pytest.raises(ConfigError, match="Did you mean 'smooth'"):
        PostProcess([{"smoth": {"sigma": 1}}])
    with pytest.raises(ConfigError, match="Did you mean 'sigma'"):
        PostProcess([{"smooth": {"sigma_": 1}}])
    with pytest.raises(ConfigError, match="may only come last"):
        PostProcess(["score", "positive"])
    with pytest.raises(ConfigError, match="unknown post-processing step"):
        build_detector({"model": {"name": "intensity"}, "postprocess": ["blur"]})


@pytest.fixture(scope="module")
def phantoms():
    data = make_phantoms(24, 6, (32, 32), seed=4)
    return data


@pytest.mark.parametrize("step", sorted(STEP_CONFIGS))
def test_each_step_is_identical_through_score_and_through_compare(step, phantoms, tmp_path):
    """``score`` loads the saved run; ``compare`` applies the chain to the inner result."""
    torch.set_num_threads(1)
    steps = [STEP_CONFIGS[step]] + ([] if step == "score" else [{"score": {"reduce": "mean"}}])
    config = {
        "model": {"name": "intensity", "spatial_dims": 2, "foreground_threshold": 0.05},
        "engine": {"val_fraction": 0.25},
        "postprocess": steps,
    }
    normal = phantoms.subset(phantoms.labels == 0)
    run = fit_run(
        config, normal.subset(np.arange(16)), tmp_path / "run", val=normal.subset(np.arange(16, 24))
    )
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["postprocess"] == steps
    loaded = BaseDetector.load(tmp_path / "run")
    assert isinstance(loaded, PostProcessed)
    # compare's path: the inner detector's raw result, then the chain
    raw = run.detector.inner.detect(phantoms)
    raw = AnomalyResult(raw.scores, raw.labels, raw.maps, raw.reconstructions, 0.0)
    by_compare = PostProcess(steps).apply(raw, phantoms.images)
    np.testing.assert_allclose(loaded.detect(phantoms).maps, by_compare.maps, rtol=1e-6)
    # score's path: the run directory on files
    folder = tmp_path / "data"
    folder.mkdir()
    for i, image in enumerate(phantoms.images):
        np.save(folder / f"case{i:03d}.npy", image[0])
    score_run(tmp_path / "run", folder, tmp_path / "scores.csv")
    table = np.genfromtxt(tmp_path / "scores.csv", delimiter=",", names=True, dtype=None)
    np.testing.assert_allclose(table["score"], by_compare.scores, rtol=1e-5)

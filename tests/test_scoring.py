"""Residuals, structural dissimilarity, coarse noise, median filter, scores of standard maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medanomaly import BaseDetector, get_model
from medanomaly.detectors import scoring
from medanomaly.detectors.noise import coarse_noise
from medanomaly.detectors.scoring import MapScoring, median_filter, residual_map
from medanomaly.errors import ConfigError


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1, 16, 16, 16)])
def test_ssim_residual_is_zero_for_a_perfect_copy_and_covers_the_grid(shape):
    x = torch.rand(shape)
    assert residual_map(x, x, "ssim").abs().max() < 1e-5
    changed = x.clone()
    changed[(..., *[slice(4, 8)] * (len(shape) - 2))] = 1.0
    dissimilarity = residual_map(x, changed, "ssim")
    assert dissimilarity.shape == (shape[0], *shape[2:])
    inside = dissimilarity[(..., *[slice(4, 8)] * (len(shape) - 2))]
    assert inside.mean() > 5 * dissimilarity.mean() / 2 > 0


def test_coarse_noise_is_smooth_and_scaled():
    torch.manual_seed(0)
    noise = coarse_noise(torch.zeros(64, 1, 64, 64), std=0.2, grid=8)
    assert noise.shape == (64, 1, 64, 64)
    assert 0.1 < noise.std() < 0.25
    neighbours = (noise[..., 1:] - noise[..., :-1]).abs().mean()
    assert neighbours < 0.3 * noise.abs().mean()  # white noise: about 1.1


def test_map_scoring_standardises_each_voxel_by_the_normal_residuals():
    rng = np.random.default_rng(0)
    normal = rng.random((20, 8, 8)).astype(np.float32) * 0.1
    normal[:, 0, :] += 5.0  # a row that is badly reconstructed in every normal image
    scoring = MapScoring(smooth=1, reduce="max")
    scale = scoring.statistics(normal)
    lesion, edge = normal[:2].copy(), normal[:2].copy()
    lesion[:, 4, 4] += 1.0
    edge[:, 0, 0] += 1.0  # the same excess where normals always err: less surprising
    scores = scoring.reduce_maps(scoring.transform(torch.from_numpy(np.r_[lesion, edge]), scale))
    assert scores[:2].min() > scores[2:].max()


def test_map_scoring_rejects_bad_settings():
    with pytest.raises(ConfigError, match="Did you mean 'top'"):
        MapScoring(reduce="tpo")
    with pytest.raises(ConfigError, match="odd width"):
        MapScoring(smooth=4)
    with pytest.raises(ConfigError, match="unknown keys"):
        MapScoring.from_any({"smoth": 3})


def test_cae_with_map_scoring_detects_phantom_lesions_and_round_trips(
    tiny2d, tiny2d_unseen, tmp_path
):
    engine = {"epochs": 15, "batch_size": 4, "progress": False}
    detector = get_model("cae", map_score={"smooth": 3}, engine=engine).fit(tiny2d.normal)
    assert detector.map_scale_.shape == (32, 32)
    result = detector.detect(tiny2d_unseen)  # none of these trained the model
    # measured on these unseen phantoms with engine seeds 0, 1, 2: 0.875, 0.958, 0.979
    assert roc_auc_score(tiny2d_unseen.labels, result.scores) > 0.8
    np.testing.assert_allclose(result.scores, detector.score(tiny2d_unseen), rtol=1e-5)
    detector.save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    np.testing.assert_allclose(loaded.score(tiny2d_unseen), result.scores, rtol=1e-5)


def test_validation_auroc_is_measured_on_the_map_score(tiny2d, tiny2d_val20):
    engine = {"epochs": 4, "batch_size": 4, "progress": False, "monitor": "val_auroc"}
    detector = get_model("cae", map_score={"smooth": 3}, engine=engine)
    detector.fit(tiny2d.normal, val=tiny2d_val20)
    best = max(row["val_auroc"] for row in detector.history_)
    # the kept epoch's final scores (scale recomputed from the same weights) give that AUROC
    scores = detector.score(tiny2d_val20)
    assert roc_auc_score(tiny2d_val20.labels, scores) == pytest.approx(best, abs=1e-9)


def test_masked_percentile_equals_torch_quantile_of_each_foreground():
    """One batched computation (ONNX-exportable) gives exactly the per-image quantiles."""
    from medanomaly.detectors.scoring import masked_percentile

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 9, 7, generator=generator)
    foreground = torch.rand(6, 9, 7, generator=generator) > 0.6
    foreground[0] = False  # an empty foreground counts as every voxel
    foreground[1] = False
    foreground[1, 4, 3] = True  # one voxel
    for q in (0.0, 37.5, 50.0, 99.0, 100.0):
        found = masked_percentile(maps, foreground, q)
        rows = [maps[0].flatten(), *(m[f] for m, f in zip(maps[1:], foreground[1:], strict=True))]
        expected = torch.stack([torch.quantile(r.double(), q / 100) for r in rows]).float()
        assert torch.equal(found, expected), q


@pytest.mark.parametrize(
    ("shape", "size"),
    [((3, 17, 13), 3), ((3, 17, 13), 5), ((2, 6, 7, 5), 3), ((2, 9, 9), 7), ((2, 4, 5, 6), 5)],
)
def test_median_filter_equals_scipys_with_the_border_replicated(shape, size):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(size))
    maps[maps < 0.3] = 0.0  # ties, as in maps that are zero outside the foreground
    expected = ndimage.median_filter(
        maps.numpy(), size=(1,) + (size,) * (len(shape) - 1), mode="nearest"
    )
    np.testing.assert_array_equal(median_filter(maps, size).numpy(), expected)


def test_median_filter_works_chunk_by_chunk(monkeypatch):
    maps = torch.rand(5, 12, 12, generator=torch.Generator().manual_seed(0))
    whole = median_filter(maps, 5)
    monkeypatch.setattr(scoring, "MEDIAN_CHUNK_VOXELS", 144 * 2)  # chunks of 2 maps, then 1
    torch.testing.assert_close(median_filter(maps, 5), whole, rtol=0, atol=0)


@pytest.mark.parametrize("count", [3, 9, 25, 27])
def test_the_selection_network_puts_the_median_in_the_middle(count):
    network = scoring.selection_network(count)
    rng = np.random.default_rng(count)
    for values in rng.integers(0, 5, size=(500, count)).tolist():  # many ties
        wires = list(values)
        for i, j in network:
            wires[i], wires[j] = min(wires[i], wires[j]), max(wires[i], wires[j])
        assert wires[count // 2] == sorted(values)[count // 2]
    assert len(scoring.selection_network(25)) == 113  # pruned from Batcher's 32-wire network


def test_a_nan_in_a_window_makes_its_median_nan():
    maps = torch.rand(1, 9, 9)
    maps[0, 4, 4] = float("nan")
    filtered = median_filter(maps, 5)
    assert filtered.isnan().sum() == 25 and filtered[0, 2:7, 2:7].isnan().all()

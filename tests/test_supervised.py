"""Supervised baseline (Lin et al. 2021): VGG-/ResNet-like classifiers, 2.5D slabs, occlusion,
Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import real_data  # noqa: I001
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from medanomaly import BaseDetector, get_model
from medanomaly.data.sets import ImageSet
from medanomaly.data.slabs import stack_slices, to_slabs, volume_slabs
from medanomaly.detectors.explain import grad_cam, occlusion_sensitivity, patch_starts
from medanomaly.errors import ConfigError, InvalidImageError, LabelError
from medanomaly.io.safe_files import load_state
from medanomaly.models.classifier import (
    centre_crop,
    random_crop,
    stratified_holdout,
    uncrop,
)
from medanomaly.nets.classifiers import ResNetClassifier, VGGClassifier
from medanomaly.training.engine import TrainingTask, _evaluate, batch_size

NAMES = ("vgg_classifier", "resnet_classifier")
SMALL = {
    "vgg_classifier": {"channels": (4, 8, 8, 16, 16), "fc_features": (16, 8)},
    "resnet_classifier": {"channels": (4, 8, 8, 16), "fc_features": (16, 8)},
}
ENGINE = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}


def _blobs(n: int, seed: int, side: int = 32, size: int = 6) -> ImageSet:
    """n noise images and n with a bright square at a random place (masks mark the square)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.5, 0.1, (2 * n, 1, side, side)).astype(np.float32)
    masks = np.zeros((2 * n, side, side), bool)
    for i in range(n, 2 * n):
        r, c = rng.integers(2, side - size - 2, 2)
        images[i, 0, r : r + size, c : c + size] += 0.5
        masks[i, r : r + size, c : c + size] = True
    labels = np.r_[np.zeros(n), np.ones(n)].astype(np.int64)
    return ImageSet(images, labels=labels, masks=masks)


# -- networks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims, channels, size", [(2, 1, 40), (2, 5, 33), (3, 1, 16)])
def test_networks_give_two_logits_in_2d_25d_and_3d(spatial_dims, channels, size):
    x = torch.randn(2, channels, *([size] * spatial_dims))
    vgg = VGGClassifier(spatial_dims, channels, [size] * spatial_dims, (4, 8, 8, 8, 8), 2, (8,))
    resnet = ResNetClassifier(spatial_dims, channels, (4, 8, 8, 8), 2, (8,))
    for network in (vgg, resnet):
        assert network(x).shape == (2, 2)


def test_networks_have_the_seed_001_layer_counts():
    vgg = VGGClassifier(2, 5, (128, 128))
    resnet = ResNetClassifier(2, 5)
    assert len(vgg.conv_weights()) == 10 and len(vgg.fc_weights()) == 4
    assert len(resnet.conv_weights()) == 20 and len(resnet.fc_weights()) == 4
    assert [b[0].out_channels for b in vgg.blocks] == [64, 128, 256, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 10


# -- detectors: 2D, 2.5D, 3D ------------------------------------------------------------------
def _slab_set(tiny3d) -> ImageSet:
    return to_slabs(tiny3d, k=3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["2d", "2.5d", "3d"])
def test_detectors_fit_score_and_map_in_every_mode(name, mode, tiny2d, tiny3d):
    data = {"2d": tiny2d, "2.5d": _slab_set(tiny3d), "3d": tiny3d}[mode]
    dims = 3 if mode == "3d" else 2
    detector = get_model(
        name, spatial_dims=dims, in_channels=data.images.shape[1], engine=ENGINE, **SMALL[name]
    )
    result = detector.fit(data).detect(data)
    assert detector.supervised
    assert result.scores.shape == (len(data),)
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    assert result.maps.shape == (len(data), *data.images.shape[2:])
    assert result.reconstructions is None and detector.threshold_ == 0.5
    np.testing.assert_array_equal(detector.predict(data), (result.scores > 0.5).astype(int))


def test_fit_needs_labels_of_both_classes(tiny2d):
    detector = get_model("vgg_classifier", engine=ENGINE, **SMALL["vgg_classifier"])
    with pytest.raises(LabelError, match="no abnormal images"):
        detector.fit(tiny2d.normal)
    with pytest.raises(LabelError, match="have no label"):
        detector.fit(tiny2d.images)
    with pytest.raises(LabelError, match="unlabelled"):
        detector.fit(tiny2d, val=tiny2d.images[:4])


def test_bad_settings_are_named(tiny2d):
    with pytest.raises(InvalidImageError, match="crop_size"):
        get_model("resnet_classifier", crop_size=(40, 40), engine=ENGINE).fit(tiny2d)
    with pytest.raises(ConfigError, match="map_method"):
        get_model("resnet_classifier", map_method="saliency", engine=ENGINE).fit(tiny2d)


def test_same_seed_same_model_and_other_seed_differs(tiny2d):
    params = {
        **SMALL["resnet_classifier"],
        "crop_size": (28, 28),
        "flip_axes": (0, 1),
        "engine": {**ENGINE, "epochs": 3, "val_fraction": 0.25},
    }
    first = get_model("resnet_classifier", **params).fit(tiny2d)
    second = get_model("resnet_classifier", **params).fit(tiny2d)
    np.testing.assert_array_equal(first.score(tiny2d), second.score(tiny2d))
    assert first.history_ == second.history_
    params["engine"] = {**params["engine"], "seed": 1}
    other = get_model("resnet_classifier", **params).fit(tiny2d)
    assert not np.array_equal(other.score(tiny2d), first.score(tiny2d))


def test_validation_split_is_stratified_and_keeps_groups_apart():
    labels = np.array([0] * 12 + [1] * 8)
    groups = np.repeat(np.arange(10), 2)
    kept, held = stratified_holdout(labels, groups, 0.2, seed=0)
    assert set(labels[held]) == {0, 1}
    assert not set(groups[kept]) & set(groups[held])
    assert len(stratified_holdout(labels, groups, 0.0, seed=0)[1]) == 0


def test_training_uses_class_weights_decays_and_lr_schedule(tiny2d):
    detector = get_model(
        "vgg_classifier",
        lr_milestones=(1,),
        lr_gamma=0.1,
        engine={**ENGINE, "lr": 1e-3, "val_fraction": 0.0, "patience": None},
        **SMALL["vgg_classifier"],
    ).fit(tiny2d)
    np.testing.assert_allclose(detector.class_weights_, [18 / 24, 18 / 12])  # n / (2 n_c)
    assert detector.learning_rate(0) == pytest.approx(1e-3)
    assert detector.learning_rate(1) == pytest.approx(1e-4)
    groups = detector._optimizers(detector.network_)["adam"].param_groups
    decays = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert decays == {0.0: 10 * 2 + 3, 0.001: 3, 0.01: 10}  # BN weight+bias, FC biases


def test_batches_of_images_and_labels_are_counted_by_images():
    assert batch_size(torch.zeros(5, 1, 4, 4)) == 5
    assert batch_size([torch.zeros(3, 1, 4, 4), torch.zeros(3)]) == 3


def test_supervised_validation_loss_covers_both_classes():
    def pairs(label: int, n: int) -> list:
        return [(torch.zeros(1, 4, 4), torch.tensor(label)) for _ in range(n)]

    loaders = {
        "val_normal": DataLoader(pairs(0, 4), batch_size=3),
        "val_abnormal": DataLoader(pairs(1, 2), batch_size=3),
    }
    for supervised, expected in ((True, 2 / 6), (False, 0.0)):
        task = TrainingTask(
            network=nn.Identity(),
            loss=lambda _m, batch: batch[1].float().mean(),
            score=lambda _m, batch: torch.zeros(batch_size(batch)),
            supervised=supervised,
        )
        assert _evaluate(nn.Identity(), task, loaders)["val_loss"] == pytest.approx(expected)


def test_learning_rate_decay_reaches_the_optimiser_and_the_checkpoint(tiny2d, tmp_path):
    engine = {**ENGINE, "lr": 1e-3, "val_fraction": 0.0, "patience": None}
    detector = get_model(
        "resnet_classifier", lr_milestones=(1,), lr_gamma=0.1, engine=engine,
        **SMALL["resnet_classifier"],
    ).fit(tiny2d, run_dir=tmp_path)  # fmt: skip
    saved = load_state(tmp_path / "checkpoint.safetensors")
    lrs = [g["lr"] for g in saved["optimizers"]["adam"]["param_groups"]]
    assert lrs == pytest.approx([1e-4] * 3)  # conv, FC and no-decay groups, all decayed
    assert len(detector.history_) == 2 and "val_loss" not in detector.history_[0]


def test_save_and_load_keep_the_class_weights(tiny2d, tmp_path):
    detector = get_model("resnet_classifier", engine=ENGINE, **SMALL["resnet_classifier"])
    detector.fit(tiny2d).save(tmp_path / "model.safetensors")
    loaded = BaseDetector.load(tmp_path / "model.safetensors")
    np.testing.assert_allclose(loaded.class_weights_, detector.class_weights_)
    np.testing.assert_allclose(loaded.anomaly_map(tiny2d), detector.anomaly_map(tiny2d), atol=1e-6)


# -- crops and 2.5D slabs ---------------------------------------------------------------------
def test_crops_and_uncrop():
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    torch.testing.assert_close(centre_crop(x, (4, 4)), x[:, :, 1:5, 1:5])
    torch.manual_seed(0)
    crops = random_crop(x, (4, 4))
    assert crops.shape == (2, 1, 4, 4)
    placed = uncrop(torch.ones(2, 4, 4), (6, 6))
    assert placed.sum() == 32 and placed[:, 0].sum() == 0 and placed[:, 1:5, 1:5].all()


def test_stack_slices_takes_neighbours_and_repeats_the_edges():
    volume = np.arange(4 * 4 * 6, dtype=np.float32).reshape(1, 4, 4, 6)
    slab = stack_slices(volume, 0, k=3)
    np.testing.assert_array_equal(slab, volume[0][..., [0, 0, 1]].transpose(2, 0, 1))
    assert volume_slabs(volume, k=5).shape == (6, 5, 4, 4)
    assert stack_slices(np.stack([volume[0], -volume[0]]), 2, k=3, axis=0).shape == (6, 4, 6)
    with pytest.raises(ValueError, match="odd"):
        stack_slices(volume, 0, k=4)


def test_to_slabs_keeps_labels_and_takes_masks_at_the_centre_slice(tiny3d):
    slabs = to_slabs(tiny3d, k=5, index=7)
    assert slabs.images.shape == (12, 5, 16, 16)
    np.testing.assert_array_equal(slabs.labels, tiny3d.labels)
    np.testing.assert_array_equal(slabs.masks, tiny3d.masks[..., 7])
    np.testing.assert_array_equal(slabs.images[:, 2], tiny3d.images[:, 0, ..., 7])


# -- explanations -----------------------------------------------------------------------------
def test_patch_positions_cover_the_whole_axis():
    assert patch_starts(10, 4, 3) == [0, 3, 6]
    assert patch_starts(11, 4, 3) == [0, 3, 6, 7]
    assert patch_starts(3, 4, 2) == [0]


@pytest.mark.parametrize("spatial", [(24, 24), (12, 12, 12)])
def test_occlusion_map_peaks_on_the_region_the_prediction_uses(spatial):
    blob = tuple(slice(4, 8) for _ in spatial)
    image = torch.zeros(1, 1, *spatial)
    image[(0, 0, *blob)] = 1.0

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(8 * (x[(slice(None), 0, *blob)].flatten(1).mean(1) - 0.5))

    heat = occlusion_sensitivity(predict, image, patch=4, stride=2)[0]
    assert heat.shape == spatial
    peak = np.unravel_index(int(heat.argmax()), spatial)
    assert all(3 <= p <= 8 for p in peak)
    assert float(heat[(0,) * len(spatial)]) == 0.0  # far from the blob: no change


def test_grad_cam_follows_the_evidence_in_2d_and_3d():
    for spatial in [(16, 16), (8, 8, 8)]:
        d = len(spatial)
        layer = (nn.Conv2d if d == 2 else nn.Conv3d)(1, 1, 1, bias=False)
        nn.init.ones_(layer.weight)
        pool = (nn.AdaptiveAvgPool2d if d == 2 else nn.AdaptiveAvgPool3d)(1)
        network = nn.Sequential(layer, pool, nn.Flatten(), nn.Linear(1, 2))
        with torch.no_grad():
            network[-1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        image = torch.zeros(1, 1, *spatial)
        image[(0, 0, *([slice(2, 5)] * d))] = 1.0
        with torch.inference_mode():  # as inside detect(): Grad-CAM records a graph itself
            cam = grad_cam(network, layer, image)[0]
        assert cam.shape == spatial
        assert cam[(slice(2, 5),) * d].min() > cam.max() * 0.5 > 0
        assert cam[(slice(6, None),) * d].max() < 1e-6


def test_trained_classifier_occlusion_map_finds_the_discriminative_blob():
    train, test = _blobs(20, seed=0), _blobs(6, seed=1)
    detector = get_model(
        "vgg_classifier",
        channels=(8, 16, 16, 32, 32),
        fc_features=(32, 16),
        map_method="occlusion",
        occlusion_patch=6,
        occlusion_stride=2,
        engine={"epochs": 15, "batch_size": 8, "lr": 3e-3, "progress": False,
                "val_fraction": 0.0, "patience": None},
    ).fit(train)  # fmt: skip
    result = detector.detect(test)
    assert roc_auc_score(test.labels, result.scores) > 0.9
    abnormal = np.flatnonzero(test.labels == 1)
    hits = [test.masks[i].flat[int(np.argmax(result.maps[i]))] for i in abnormal]
    assert np.mean(hits) >= 5 / 6
    assert detector.explain(test, "grad_cam").shape == result.maps.shape
    assert detector.map_method == "occlusion"


# -- real data ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_vgg_classifier_learns_head_ct_hemorrhage(tmp_path):
    from medanomaly.data.loading import load_dataset

    folder = real_data("head_ct_hemorrhage")
    rows = (folder / "labels.csv").read_text().splitlines()[1:]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label\n" + "".join(f"{folder}/{r.split(',')[0]}.png,{r.split(',')[1].strip()}\n"
                                 for r in rows)
    )  # fmt: skip
    transforms = [
        {"crop": {"foreground": True, "threshold": 10.0, "margin": 2}},
        {"resize": {"shape": [40, 40], "mode": "area"}},
        {"min_max": {"output": [0.0, 1.0]}},
    ]
    images, _ = load_dataset(manifest, transforms=transforms, strict=True)
    test = np.r_[0:20, 100:120]
    train = np.setdiff1d(np.arange(len(images)), test)
    detector = get_model(
        "vgg_classifier",
        channels=(8, 16, 32, 32, 32),
        fc_features=(32, 16),
        crop_size=(36, 36),
        flip_axes=(1,),
        engine={"epochs": 25, "batch_size": 16, "lr": 1e-3, "progress": False,
                "val_fraction": 0.0, "patience": None},
    ).fit(images.subset(train))  # fmt: skip
    scores = detector.score(images.subset(test))
    assert roc_auc_score(images.labels[test], scores) > 0.7

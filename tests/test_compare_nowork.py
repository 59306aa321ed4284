"""``compare`` does no work twice: one preprocessing per case, one scoring per candidate-fold."""

import hashlib
from collections import Counter

import numpy as np
import pytest
from monai.data import get_track_meta
from test_evaluate_cli import write_phantom_manifest

from medanomaly.data.loading import ArrayAugment
from medanomaly.detectors.deep import DeepDetector
from medanomaly.image import MedicalImage
from medanomaly.model_selection import compare as compare_module
from medanomaly.model_selection.compare import compare, load_labelled, protocol_splits
from medanomaly.model_selection.spec import parse_spec
from medanomaly.models.baselines import IntensityBaseline
from medanomaly.postprocess import PostProcess
from medanomaly.transforms import build_transforms
from medanomaly.transforms._base import RandomTransform, Transform

EPOCHS = 2
BATCH = 8
CAE = {
    "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
    "engine": {"epochs": EPOCHS, "batch_size": BATCH, "progress": False, "patience": 100},
}
CHOICES = [[], [{"smooth": {"sigma": 1.0}}], [{"rim": {"width": 2, "threshold": 0.05}}]]


class CountCalls(Transform):
    """Deterministic, does nothing, remembers each image it saw."""

    name = "count_calls"
    seen: list[str] = []

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, image: MedicalImage) -> MedicalImage:
        CountCalls.seen.append(hashlib.sha1(image.array.tobytes()).hexdigest())
        return image


class CountDraws(RandomTransform):
    """Random (so it is training augmentation), does nothing, counts its draws."""

    name = "count_draws"
    draws = 0

    def __call__(self, image: MedicalImage) -> MedicalImage:
        CountDraws.draws += 1
        return image


@pytest.fixture
def counting(monkeypatch):
    """The two counting transforms, registered under their YAML names, counts at zero."""
    from medanomaly.transforms import compose

    monkeypatch.setitem(compose.TRANSFORMS, CountCalls.name, CountCalls)
    monkeypatch.setitem(compose.TRANSFORMS, CountDraws.name, CountDraws)
    CountCalls.seen, CountDraws.draws = [], 0


def _spec(manifest, candidates, transforms, level="image"):
    return {
        "data": {"path": str(manifest), "transforms": transforms},
        "protocol": {"kind": "kfold", "folds": 3, "repeats": 1, "val_fraction": 0.5},
        "level": level,
        "candidates": candidates,
        "postprocess": CHOICES,
    }


def _drawn_per_epoch(n: int) -> int:
    """Training cases drawn in one epoch: whole batches only, once there are more than one."""
    return n if n <= BATCH else n // BATCH * BATCH


def test_each_case_is_preprocessed_once_for_every_candidate_and_fold(
    tmp_path, counting, one_torch_thread
):
    """Two trained candidates and a fusion, three folds: the deterministic transforms run
    once per case; the random ones are drawn anew for every training case in every epoch."""
    manifest = write_phantom_manifest(tmp_path / "data", n_normal=24, n_abnormal=12)
    candidates = {
        "cae": CAE,
        "cae_ssim": {**CAE, "model": {**CAE["model"], "residual": "ssim"}},
        "both": {"fusion": ["cae", "cae_ssim"]},
    }
    transforms = [{"count_calls": {}}, {"min_max": {}}, {"count_draws": {}}]
    spec = parse_spec(_spec(manifest, candidates, transforms), tmp_path)
    data = load_labelled(spec)
    labels = data.images.labels
    normals = [int(np.sum(labels[s.train] == 0)) for s in protocol_splits(spec, data)]
    assert CountDraws.draws == 0  # loading draws nothing
    CountCalls.seen = []
    results = compare(spec, tmp_path / "out", refit=False, progress=False)
    assert all(row["errors"] == [] for row in results["rows"].values())
    assert len(CountCalls.seen) == 36 and len(set(CountCalls.seen)) == 36  # once per case
    # both trained candidates, every epoch of every fold, each case a batch takes
    assert CountDraws.draws == 2 * EPOCHS * sum(_drawn_per_epoch(n) for n in normals)


def _note_the_fold(monkeypatch) -> list[str]:
    """The name of the fold whose candidate runs now, ``after`` once the folds are done."""
    fold = ["before"]
    run, run_folds = compare_module._FoldRunner.run, compare_module.run_folds

    def run_noting_the_fold(self, candidate):
        fold[0] = self.split.name
        return run(self, candidate)

    def folds_then_after(*args, **kwargs):
        records = run_folds(*args, **kwargs)
        fold[0] = "after"
        return records

    monkeypatch.setattr(compare_module._FoldRunner, "run", run_noting_the_fold)
    monkeypatch.setattr(compare_module, "run_folds", folds_then_after)
    return fold


def _record_scoring(monkeypatch, fold, calls):
    """Record ``(fold, class, ids)`` of every ``detect`` and ``score`` of the detectors."""
    for cls in (DeepDetector, IntensityBaseline):
        for method in ("detect", "score"):
            real = getattr(cls, method)

            def counted(self, x, real=real):
                calls.append((fold[0], type(self).__name__, tuple(getattr(x, "ids", ()))))
                return real(self, x)

            monkeypatch.setattr(cls, method, counted)


def test_a_fold_scores_its_validation_part_once_per_candidate(
    tmp_path, monkeypatch, one_torch_thread
):
    """After the epoch is chosen, each candidate scores a fold's validation and test parts
    once: tuning, selection, thresholds, post-processing, fusion and the gallery all reuse
    that result."""
    manifest = write_phantom_manifest(tmp_path / "data", n_normal=24, n_abnormal=12)
    candidates = {
        "cae": CAE,
        "intensity": {"model": {"name": "intensity", "spatial_dims": 2}},
        "cae+intensity": {"fusion": ["cae", "intensity"]},
    }
    spec = parse_spec(_spec(manifest, candidates, [{"min_max": {}}]), tmp_path)
    data = load_labelled(spec)
    ids = data.images.ids
    splits = protocol_splits(spec, data)
    calls: list[tuple[str, str, tuple[str, ...]]] = []
    _record_scoring(monkeypatch, _note_the_fold(monkeypatch), calls)
    results = compare(spec, tmp_path / "out", refit=False, progress=False)
    assert results["chosen"] is not None
    assert list((tmp_path / "out" / "figures" / "gallery").iterdir())
    assert [c for c in calls if c[0] == "after"] == []  # the gallery reused the first fold's
    counts = Counter((name, cases) for _, name, cases in calls)
    for split in splits:
        for part in (split.val, split.test):
            cases = tuple(ids[i] for i in part)
            assert counts[("CAE", cases)] == 1, split.name
            assert counts[("IntensityBaseline", cases)] == 1, split.name
        selection = {ids[i] for i in split.select}
        # in its fold, no other scoring (a half, a threshold's cases) sees a selection case
        scored = [name for f, name, cases in calls if f == split.name and selection & set(cases)]
        assert Counter(scored) == {"CAE": 1, "IntensityBaseline": 1}, split.name


def test_each_post_processing_choice_processes_a_case_once_per_candidate(
    tmp_path, monkeypatch, one_torch_thread
):
    """Tuning processes the tuning half under every choice; the chosen one's result is
    reused for the threshold and selection, not processed again."""
    manifest = write_phantom_manifest(tmp_path / "data", n_normal=24, n_abnormal=12)
    candidates = {
        "intensity": {"model": {"name": "intensity", "spatial_dims": 2}},
        "voxel": {"model": {"name": "intensity", "spatial_dims": 2, "per_voxel": True}},
        "fused": {"fusion": ["intensity", "voxel"]},
    }
    spec = parse_spec(_spec(manifest, candidates, [{"min_max": {}}], level="both"), tmp_path)
    fold = _note_the_fold(monkeypatch)
    apply = PostProcess.apply
    seen: Counter = Counter()

    def counted(self, result, images, groups=None):
        for i, image in enumerate(images):  # a case, under a choice, with one result
            result_key = _digest(result.maps[i]) + repr(float(result.scores[i]))
            seen[(fold[0], repr(self), _digest(image), result_key)] += 1
        return apply(self, result, images, groups)

    monkeypatch.setattr(PostProcess, "apply", counted)
    compare(spec, tmp_path / "out", refit=False, progress=False)
    assert len(seen) > 0 and max(seen.values()) == 1


def _digest(array) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.parametrize("placed", [False, True])
def test_augmentation_draws_the_same_arrays_without_monai_metadata(placed):
    """The training draws skip MONAI's metadata, and give exactly what they gave with it;
    a step that needs it (a random ``pad``, whose geometry MONAI returns) still has it."""
    steps = [
        {"rand_flip": {"axes": [0, 1], "prob": 0.5}},
        {"rand_affine": {"rotate_deg": 10.0, "translate": 0.05, "scale": 0.1, "prob": 0.9}},
        {"rand_intensity": {"prob": 0.9}},
    ]
    if placed:
        steps.insert(1, {"pad": {"shape": [20, 20], "position": "random"}})
    images = np.random.default_rng(0).random((12, 1, 16, 16)).astype(np.float32)
    transforms = build_transforms(steps)
    transforms.set_random_state(7)
    with_metadata = [
        np.asarray(transforms(MedicalImage(array=a, spacing=(1.0, 1.0))).array) for a in images
    ]
    augment = ArrayAugment(build_transforms(steps)).set_random_state(7)
    assert get_track_meta()
    drawn = [augment(a) for a in images]
    assert get_track_meta()  # the setting is MONAI's, for everyone else: restored
    assert any(not np.array_equal(d, a) for d, a in zip(drawn, images, strict=True))
    for ours, theirs in zip(drawn, with_metadata, strict=True):
        assert type(ours) is np.ndarray
        np.testing.assert_array_equal(ours, theirs)

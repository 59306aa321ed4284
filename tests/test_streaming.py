"""The streaming data layer: lazy cases from the cache, worker processes, shapes, ranks, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from worker_faults import die_on_three

from medanomaly import get_model
from medanomaly.cli import main
from medanomaly.data.loading import load_dataset
from medanomaly.data.phantoms import make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.data.streaming import StreamedSet
from medanomaly.data.workers import WorkerDied, map_in_workers
from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.scoring import RunningMoments
from medanomaly.training.engine import ShapeBatchSampler

ENGINE = {"epochs": 2, "batch_size": 4, "progress": False, "seed": 0, "val_min": 0}


def _write_volumes(folder: Path, shapes: list[tuple[int, ...]], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shape in enumerate(shapes):
        volume = make_phantoms(1, 0, shape, seed=seed + i).images[0, 0]
        paths.append(folder / f"v{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.eye(4)), paths[-1])
    return paths


def _write_slices(folder: Path, n: int, seed: int, n_abnormal: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(make_phantoms(n, n_abnormal, (32, 32), seed=seed).images):
        np.save(folder / f"c{i:02d}.npy", image[0])


def test_streamed_volumes_train_and_score_like_the_same_set_in_memory(tmp_path):
    _write_volumes(tmp_path / "train", [(16, 16, 16)] * 10)
    _write_volumes(tmp_path / "test", [(16, 16, 16)] * 5, seed=50)
    streamed, _ = load_dataset(tmp_path / "train", stream=True, num_workers=0)
    in_memory, _ = load_dataset(tmp_path / "train", num_workers=0)
    assert isinstance(streamed, StreamedSet) and isinstance(in_memory, ImageSet)
    model = {"spatial_dims": 3, "channels": [4, 8], "latent_channels": 2, "engine": ENGINE}
    from_stream = get_model("cae", **model).fit(streamed)
    from_memory = get_model("cae", **model).fit(in_memory)
    for key, value in from_memory.network_.state_dict().items():
        torch.testing.assert_close(from_stream.network_.state_dict()[key], value, rtol=0, atol=0)
    test_stream, _ = load_dataset(tmp_path / "test", stream=True)
    test_memory, _ = load_dataset(tmp_path / "test")
    streamed_result = from_stream.detect(test_stream)
    memory_result = from_memory.detect(test_memory)
    np.testing.assert_array_equal(streamed_result.scores, memory_result.scores)
    np.testing.assert_array_equal(streamed_result.maps, memory_result.maps)
    np.testing.assert_array_equal(from_stream.embed(test_stream), from_memory.embed(test_memory))
    assert from_stream.threshold_ == from_memory.threshold_
    np.testing.assert_array_equal(test_stream.to_image_set().images, test_memory.images)


@pytest.mark.parametrize(
    ("name", "params", "train_shapes", "test_shapes"),
    [
        (
            "resnet_ae",
            {"depth": 10, "channels": [4, 8, 8, 8], "latent_dim": 8, "patch_size": [16, 16, 16]},
            [(16, 16, 16), (24, 16, 32), (16, 16, 16), (32, 24, 16), (24, 16, 32)],
            [(16, 16, 16), (24, 16, 32), (20, 18, 40), (24, 16, 32)],
        ),
        (
            "dae",
            {"features": [8, 8, 8, 8, 8, 8], "norm_groups": 4},
            [(16, 16, 16), (32, 16, 16), (16, 16, 16)],
            [(16, 16, 16), (24, 16, 40), (16, 16, 16), (20, 18, 16)],
        ),
    ],
)
def test_mixed_shape_volumes_score_like_each_volume_alone(
    tmp_path, name, params, train_shapes, test_shapes
):
    _write_volumes(tmp_path / "train", train_shapes, seed=10)
    _write_volumes(tmp_path / "test", test_shapes, seed=20)
    train, _ = load_dataset(tmp_path / "train", stream=True)
    test, _ = load_dataset(tmp_path / "test", stream=True)
    assert len(set(train.shapes)) > 1 and len(set(test.shapes)) == 3
    # float32: in bf16 a volume's score moves with its batch (by 0.2 % for this DAE on an
    # AVX512-BF16 CPU), and this test is about batching by shape, to float32 rounding
    engine = {**ENGINE, "precision": "32-true"}
    detector = get_model(name, spatial_dims=3, engine=engine, **params).fit(train)
    scores = detector.score(test)  # batches of one shape, each volume at its own size
    alone = [detector.score(test.image(i)[None])[0] for i in range(len(test))]
    np.testing.assert_allclose(scores, alone, rtol=1e-6)
    maps = detector.anomaly_map(test)
    assert [m.shape for m in maps] == [s[1:] for s in test.shapes]


def test_training_on_mixed_shapes_refused_for_a_model_of_one_grid(tmp_path):
    _write_volumes(tmp_path / "train", [(16, 16, 16), (32, 16, 16)])
    train, _ = load_dataset(tmp_path / "train", stream=True)
    with pytest.raises(Exception, match="trains on one grid"):
        get_model("cae", spatial_dims=3, engine=ENGINE).fit(train)
    with pytest.raises(Exception, match="different shapes"):
        load_dataset(tmp_path / "train")  # in memory: one array needs one grid


def test_shape_batches_hold_one_shape_and_split_evenly_over_ranks():
    shapes = [(1, 8)] * 7 + [(1, 12)] * 5
    sampler = ShapeBatchSampler(shapes, batch_size=3, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len({shapes[i] for i in b}) == 1 for b in batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order every epoch, the same for a resumed run
    ranks = [list(ShapeBatchSampler(shapes, 3, True, 1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 5 batches: the odd one out waits an epoch
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_running_moments_equal_numpy_over_the_whole_stack():
    maps = np.random.default_rng(0).gamma(2.0, size=(23, 5, 6))
    moments = RunningMoments()
    for start in range(0, 23, 4):
        moments.add(maps[start : start + 4])
    np.testing.assert_allclose(moments.mean, maps.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.sd, maps.std(axis=0, ddof=1), rtol=1e-12)


def _read_counter(monkeypatch):
    import medanomaly.data.loading as datasets

    reads: list[str] = []
    original = datasets.read_image

    def counting(path, **kwargs):
        reads.append(Path(path).name)
        return original(path, **kwargs)

    monkeypatch.setattr(datasets, "read_image", counting)
    return reads


def test_truncated_cache_entries_are_rebuilt(tmp_path, monkeypatch, caplog):
    _write_slices(tmp_path / "data", 4, seed=3)
    cache = tmp_path / "cache"
    first, _ = load_dataset(tmp_path / "data", cache=cache, stream=True)
    images = sorted(cache.glob("*/*[0-9a-f].npy"))
    indexes = sorted(cache.glob("*/*.json"))
    sizes = {p: p.stat().st_size for p in images}
    images[0].write_bytes(images[0].read_bytes()[: sizes[images[0]] // 2])  # killed mid-copy
    indexes[1].write_text(indexes[1].read_text()[:40])  # index cut short
    reads = _read_counter(monkeypatch)
    again, _ = load_dataset(tmp_path / "data", cache=cache, stream=True)
    assert len(reads) == 2 and "unreadable" in caplog.text
    assert {p: p.stat().st_size for p in images} == sizes  # rebuilt, atomically
    np.testing.assert_array_equal(again.to_image_set().images, first.to_image_set().images)
    in_memory, _ = load_dataset(tmp_path / "data", cache=cache)
    assert len(reads) == 2  # every entry is whole again
    np.testing.assert_array_equal(in_memory.images, first.to_image_set().images)


def test_a_streamed_entry_cut_short_after_loading_is_named(tmp_path):
    _write_slices(tmp_path / "data", 2, seed=3)
    streamed, _ = load_dataset(tmp_path / "data", cache=tmp_path / "cache", stream=True)
    path = streamed.store.array_path(streamed.keys[1])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception, match=r"c01\.npy.*cannot be read"):
        streamed[1]


def test_worker_processes_skip_and_name_bad_cases_as_the_serial_path(tmp_path):
    _write_slices(tmp_path / "data", 6, seed=5)
    (tmp_path / "data" / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    serial, serial_report = load_dataset(tmp_path / "data", num_workers=0)
    parallel, parallel_report = load_dataset(tmp_path / "data", num_workers=2, stream=True)
    assert parallel_report.skipped == serial_report.skipped and len(serial_report.skipped) == 2
    assert parallel.ids == serial.ids
    np.testing.assert_array_equal(parallel.to_image_set().images, serial.images)
    with pytest.raises(Exception, match="broken.npy"):
        load_dataset(tmp_path / "data", num_workers=2, strict=True)


def test_a_dying_worker_does_not_hang_and_its_case_is_named():
    done = dict(map_in_workers(die_on_three, list(range(7)), workers=2))
    assert sorted(done) == list(range(7))
    assert isinstance(done[3], WorkerDied)
    assert {i: v for i, v in done.items() if i != 3} == {i: i * 10 for i in range(7) if i != 3}


def _env(root: Path) -> dict[str, str]:
    """One thread (same arithmetic in every process); temporary folders under ``root``."""
    (root / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(root / "tmp")}


def _cli(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "medanomaly.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(root))


@pytest.fixture(scope="module")
def cae_run(tmp_path_factory):
    """A small 2D cae run and a folder with a bad file."""
    root = tmp_path_factory.mktemp("run")
    _write_slices(root / "train", 16, seed=1)
    _write_slices(root / "test", 9, seed=2, n_abnormal=3)
    (root / "test" / "bad.npy").write_bytes(b"junk")
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16]},
        "engine": {**ENGINE, "accelerator": "cpu"},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(root / "c.yaml"), "--data", str(root / "train")]
    assert main([*args, "--out", str(root / "run")]) == 0
    return root


def test_two_process_score_writes_the_csv_of_one_process(cae_run):
    root = cae_run
    common = ["score", "--run", str(root / "run"), "--data", str(root / "test")]
    one = _cli(root, *common, "--out", str(root / "one.csv"), "--maps", str(root / "maps1"))
    two = _cli(
        root,
        *common,
        *("--out", str(root / "two.csv"), "--maps", str(root / "maps2")),
        *("--devices", "2", "--accelerator", "cpu"),
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert (root / "one.csv").read_bytes() == (root / "two.csv").read_bytes()
    assert len((root / "one.csv").read_text().splitlines()) == 1 + 12  # each case once
    assert two.stdout.count("scored 12 cases") == 1 and "bad.npy" in two.stderr
    assert sorted(p.name for p in (root / "maps1").iterdir()) == sorted(
        p.name for p in (root / "maps2").iterdir()
    )


def _write_labelled(folder: Path) -> Path:
    """Phantom slices with lesion masks and a manifest ``path,label,mask``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = make_phantoms(6, 3, (32, 32), seed=3)
    lines = ["path,label,mask"]
    for i, (image, label, mask) in enumerate(
        zip(data.images, data.labels, data.masks, strict=True)
    ):
        np.save(folder / f"c{i:02d}.npy", image[0])
        np.save(folder / f"c{i:02d}_mask.npy", mask.astype(np.uint8))
        lines.append(f"c{i:02d}.npy,{int(label)},c{i:02d}_mask.npy")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def test_two_process_evaluate_and_screen_write_the_tables_of_one_process(cae_run):
    root = cae_run
    manifest = _write_labelled(root / "labelled")
    two = ("--devices", "2", "--accelerator", "cpu")
    for name, data, table in (
        ("evaluate", manifest, "scores.csv"),
        ("screen", root / "test", "screen.csv"),
    ):
        common = [name, "--run", str(root / "run"), "--data", str(data)]
        one = [*common, "--out", str(root / f"{name}1"), "--maps", str(root / f"{name}m1")]
        assert main(one) == 0
        both = _cli(
            root, *common, "--out", str(root / f"{name}2"), "--maps", str(root / f"{name}m2"), *two
        )
        assert both.returncode == 0, both.stderr[-2000:]
        assert (root / f"{name}1" / table).read_text() == (root / f"{name}2" / table).read_text()
        assert sorted(p.name for p in (root / f"{name}m1").iterdir()) == sorted(
            p.name for p in (root / f"{name}m2").iterdir()
        )
    metrics = [json.loads((root / f"evaluate{i}" / "metrics.json").read_text()) for i in (1, 2)]
    assert metrics[0]["image"] == metrics[1]["image"]
    assert "pixel" in metrics[0] and metrics[0]["pixel"] == metrics[1]["pixel"]


def _history_rows(run: Path) -> int:
    try:
        return len((run / "history.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


def test_kill_9_during_streamed_training_then_resume_gives_the_same_weights(cae_run):
    root = cae_run
    config = yaml.safe_load((root / "c.yaml").read_text())
    # forced: each process's measured layout would be its own (resuming keeps the killed
    # run's, tests/test_engine.py), and layouts round differently from the uninterrupted run
    config["engine"].update(epochs=16, patience=None, memory_format="contiguous")
    (root / "long.yaml").write_text(yaml.safe_dump(config))
    fit = ["fit", "--config", str(root / "long.yaml"), "--data", str(root / "train")]
    assert _cli(root, *fit, "--out", str(root / "whole")).returncode == 0
    command = [sys.executable, "-m", "medanomaly.cli", *fit, "--out", str(root / "killed")]
    process = subprocess.Popen(
        command, env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while _history_rows(root / "killed") < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert 3 <= _history_rows(root / "killed") < 16
    resumed = _cli(root, *fit, "--out", str(root / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = BaseDetector.load(root / "whole").network_.state_dict()
    again = BaseDetector.load(root / "killed").network_.state_dict()
    for key, value in whole.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_ready_chunks_are_always_the_leading_chunks_of_the_whole_set():
    from medanomaly.data.sets import ready_chunks, shape_chunks

    rng = np.random.default_rng(0)
    for _ in range(50):
        shapes = [((1, 8, 8), (1, 4, 4), (1, 6, 6))[k] for k in rng.integers(0, 3, 12)]
        size = int(rng.integers(1, 5))
        whole = [list(c) for c in shape_chunks(shapes, size)]
        assert [list(c) for c in ready_chunks(shapes, size, complete=True)] == whole
        for known in range(len(shapes) + 1):
            ready = [list(c) for c in ready_chunks(shapes[:known], size, complete=False)]
            assert ready == whole[: len(ready)]  # what comes later never changes them
        full = sum(1 for s in shapes if s == shapes[0]) // size
        assert len(ready_chunks(shapes, size, complete=False)) == full


@pytest.mark.parametrize("workers", [0, 2])
def test_a_set_prepared_ahead_gives_the_chunks_arrays_and_report_of_the_loaded_set(
    tmp_path, workers
):
    from medanomaly.data.ahead import prepare_ahead
    from medanomaly.data.listing import list_cases

    shapes = [(12, 12, 12), (12, 12, 12), (10, 12, 12), (12, 12, 12), (12, 12, 12)]
    paths = _write_volumes(tmp_path / "cases", shapes)
    (tmp_path / "cases" / "v05.nii.gz").write_bytes(b"not a volume")
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = masks / "m03.nii.gz"  # one lesion mask, on the fourth case only
    nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), np.eye(4)), mask)
    manifest = tmp_path / "cases.csv"
    rows = [f"{p},,{mask if i == 3 else ''}" for i, p in enumerate(paths)]
    rows.insert(4, f"{tmp_path / 'cases' / 'v05.nii.gz'},,")
    manifest.write_text("path,label,mask\n" + "\n".join(rows) + "\n")
    options = {"transforms": [{"foreground_mask": {"threshold": 0.5}}], "num_workers": workers}
    listed = list_cases(manifest)
    whole, report = load_dataset(manifest, stream=True, **options)
    with prepare_ahead(listed, manifest, **options) as preparing:
        chunks = []
        for index in preparing.chunks(2):
            part = preparing.subset(index).to_image_set()
            chunks.append((list(index), part))
        finished, finished_report = preparing.finish()
    assert whole.has_masks and whole.has_foreground
    expected = whole.chunks(2)  # the first shape's 2 + 2, then the other shape's one
    assert [list(i) for i in expected] == [[0, 1], [3, 4], [2]]
    assert [index for index, _ in chunks] == [list(i) for i in expected]
    for (_, part), want in zip(chunks, expected, strict=True):
        same = whole.subset(want).to_image_set()
        assert part.ids == same.ids
        np.testing.assert_array_equal(part.images, same.images)
        np.testing.assert_array_equal(part.masks, same.masks)  # zeros where no case had one
        np.testing.assert_array_equal(part.foreground, same.foreground)
    assert finished.ids == whole.ids and finished.keys == whole.keys
    assert finished_report.skipped == report.skipped and len(report.skipped) == 1
    assert finished_report.kept == report.kept

"""Datasets: manifests, folder layouts, bad input (skipped and reported) and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import medanomaly.data.loading as datasets
from medanomaly.cli import main
from medanomaly.data import phantoms
from medanomaly.data.cache import CACHE_ENV, PreprocessCache, content_digest
from medanomaly.data.listing import read_manifest, scan_folder
from medanomaly.data.loading import load_dataset
from medanomaly.data.sets import ABNORMAL, NORMAL, UNKNOWN
from medanomaly.errors import ConfigError, ImageReadError
from medanomaly.transforms import build_transforms

RESIZE_8 = [{"resize": {"shape": [8, 8], "mode": "nearest"}}]

# --------------------------------------------------------------------------- synthetic files


def write_png(path: Path, value: int = 100, size: int = 16, square: bool = False) -> Path:
    """A gray PNG, flat ``value``; with ``square`` a bright 8x8 square at rows/cols 4..11."""
    pixels = np.full((size, size), value, np.uint8)
    if square:
        pixels[4:12, 4:12] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_dicom_slice(path: Path, z: float, series_uid: str = "1.2.3.1", value: int = 0) -> None:
    """One 8x8 axial CT slice at height ``z`` (1 mm pixels, HU = stored - 1024)."""
    pixels = np.full((8, 8), 1024 + value + int(z))
    phantoms.write_dicom_slice(path, pixels, (0.0, 0.0, z), series_uid=series_uid)


def write_series(folder: Path, zs: list[float], series_uid: str = "1.2.3.1") -> Path:
    """One slice file per height in ``zs``."""
    for i, z in enumerate(zs):
        write_dicom_slice(folder / f"{series_uid}_{i:02d}.dcm", z, series_uid)
    return folder


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(row) for row in rows) + "\n")
    return path


# --------------------------------------------------------------------------- manifests


def test_manifest_relative_paths_labels_groups_and_splits(tmp_path: Path) -> None:
    elsewhere = write_png(tmp_path / "elsewhere" / "c.png", 30)
    write_png(tmp_path / "study" / "img" / "a.png", 10)
    write_png(tmp_path / "study" / "img" / "b.png", 20)
    manifest = write_csv(
        tmp_path / "study" / "list.csv",
        [
            ["path", " label", "group", "split"],
            ["img/a.png", "normal", "p1", "train"],
            ["img/b.png", " hemorrhage", "p1", "test"],
            [str(elsewhere), "", "", ""],
        ],
    )
    cases = read_manifest(manifest, {"hemorrhage": 1})
    assert [c.path for c in cases] == [
        tmp_path / "study" / "img" / "a.png",
        tmp_path / "study" / "img" / "b.png",
        elsewhere,
    ]
    assert [c.label for c in cases] == [NORMAL, ABNORMAL, UNKNOWN]
    assert [c.group for c in cases] == ["p1", "p1", None]
    assert [c.split for c in cases] == ["train", "test", None]
    images, report = load_dataset(manifest, label_names={"hemorrhage": 1})
    assert not report
    assert images.images[:, 0, 0, 0].tolist() == [10.0, 20.0, 30.0]
    assert images.labels.tolist() == [NORMAL, ABNORMAL, UNKNOWN]
    assert images.groups.tolist() == ["p1", "p1", str(elsewhere)]  # no group: its own


def test_manifest_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad_label = write_csv(tmp_path / "a.csv", [["path", "label"], ["x.png", "maybe"]])
    with pytest.raises(ConfigError, match=r"a\.csv:2: unknown label 'maybe'"):
        read_manifest(bad_label)
    no_path = write_csv(tmp_path / "b.csv", [["file", "label"], ["x.png", "0"]])
    with pytest.raises(ConfigError, match="needs a 'path' column"):
        read_manifest(no_path)


def test_manifest_mask_moves_with_resize(tmp_path: Path) -> None:
    write_png(tmp_path / "img.png", 0, square=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    write_png(tmp_path / "plain.png", 0)
    manifest = write_csv(
        tmp_path / "m.csv",
        [["path", "label", "mask"], ["img.png", "1", "mask.png"], ["plain.png", "0", ""]],
    )
    images, _ = load_dataset(manifest, RESIZE_8)
    assert images.masks.shape == (2, 8, 8)
    assert images.masks[0].sum() == 16  # the 8x8 square became 4x4
    np.testing.assert_array_equal(images.masks[0], images.images[0, 0] > 100)
    assert not images.masks[1].any()  # a case without mask gets an empty one


def test_mask_of_other_shape_is_skipped_naming_the_mask(tmp_path: Path) -> None:
    write_png(tmp_path / "img.png")
    write_png(tmp_path / "ok.png")
    write_png(tmp_path / "small_mask.png", size=8)
    manifest = write_csv(
        tmp_path / "m.csv", [["path", "mask"], ["img.png", "small_mask.png"], ["ok.png", ""]]
    )
    images, report = load_dataset(manifest)
    assert len(images) == 1
    assert "small_mask.png" in report.lines()[0] and "differs from image shape" in report.lines()[0]


# --------------------------------------------------------------------------- folder layouts


def test_folder_layout_normal_abnormal_and_label_names(tmp_path: Path) -> None:
    write_png(tmp_path / "normal" / "n1.png")
    write_png(tmp_path / "normal" / "n2.png")
    write_png(tmp_path / "abnormal" / "a1.png")
    write_png(tmp_path / "bleed" / "b1.png")
    images, report = load_dataset(tmp_path)
    assert images.labels.tolist() == [ABNORMAL, NORMAL, NORMAL]
    assert [Path(i).name for i in images.ids] == ["a1.png", "n1.png", "n2.png"]
    assert report.skipped[0][0] == str(tmp_path / "bleed")
    assert "label_names" in report.skipped[0][1]  # says how to include it
    images, report = load_dataset(tmp_path, label_names={"bleed": 1})
    assert images.labels.tolist() == [ABNORMAL, ABNORMAL, NORMAL, NORMAL]
    assert not report


def test_unlabelled_folder_of_files_and_of_dicom_series(tmp_path: Path) -> None:
    write_png(tmp_path / "pngs" / "a.png")
    write_png(tmp_path / "pngs" / "b.png")
    images, _ = load_dataset(tmp_path / "pngs")
    assert images.labels.tolist() == [UNKNOWN, UNKNOWN]
    write_series(tmp_path / "series" / "s1", [0.0, 2.0, 4.0])
    write_series(tmp_path / "series" / "s2", [4.0, 0.0, 2.0], series_uid="1.2.3.2")
    images, report = load_dataset(tmp_path / "series")
    assert images.images.shape == (2, 1, 8, 8, 3)
    np.testing.assert_allclose(images.images[1, 0, 0, 0], [0.0, 2.0, 4.0])  # sorted, in HU
    assert not report


def test_empty_dataset_folder_is_an_error_even_without_strict(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="empty: no image files found"):
        load_dataset(tmp_path / "empty")
    write_csv(tmp_path / "only_text" / "notes.txt", [["hello"]])
    with pytest.raises(ImageReadError, match="found: notes.txt"):
        load_dataset(tmp_path / "only_text")


# --------------------------------------------------------------------------- bad input


def _corrupt_png(folder: Path) -> Path:
    path = folder / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not an image\n")
    return path


def _mixed_series(folder: Path) -> Path:
    write_series(folder / "mixed", [0.0, 2.0], series_uid="1.2.3.1")
    write_series(folder / "mixed", [0.0, 2.0], series_uid="1.2.3.2")
    return folder / "mixed"


def _nan_array(folder: Path) -> Path:
    array = np.ones((16, 16), np.float32)
    array[3, 3] = np.nan
    array[4, 4] = np.inf
    np.save(folder / "nan.npy", array)
    return folder / "nan.npy"


def _vector(folder: Path) -> Path:
    np.save(folder / "vector.npy", np.ones(16, np.float32))
    return folder / "vector.npy"


def _volume_in_2d_pipeline(folder: Path) -> Path:
    np.save(folder / "volume.npy", np.ones((16, 16, 16), np.float32))
    return folder / "volume.npy"


def _empty_series(folder: Path) -> Path:
    (folder / "empty_series").mkdir()
    return folder / "empty_series"


def _empty_file(folder: Path) -> Path:
    (folder / "zero.png").write_bytes(b"")
    return folder / "zero.png"


BAD_INPUTS = {
    "corrupt file": (_corrupt_png, "cannot decode picture"),
    "empty file": (_empty_file, "file is empty"),
    "non-image file": (_text_file, "not an image file"),
    "mixed series": (_mixed_series, "2 DICOM series found"),
    "nan and inf": (_nan_array, "1 NaN and 1 infinite"),
    "1d array": (_vector, "array has 1 dimensions"),
    "3d in a 2d pipeline": (_volume_in_2d_pipeline, "shape has 2 values but the image is 3D"),
    "empty folder": (_empty_series, "folder is empty"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_skipped_reported_and_raised_when_strict(tmp_path: Path, kind: str) -> None:
    make, problem = BAD_INPUTS[kind]
    write_png(tmp_path / "good.png")
    bad = make(tmp_path)
    images, report = load_dataset(tmp_path, RESIZE_8)
    assert [Path(i).name for i in images.ids] == ["good.png"]
    assert report.skipped == [(str(bad), report.skipped[0][1])]
    assert problem in report.skipped[0][1]
    assert report.lines() == [f"{bad}: {report.skipped[0][1]}"]
    assert report.lines()[0].count(str(bad)) == 1  # the file is named once
    with pytest.raises(ImageReadError) as info:
        load_dataset(tmp_path, RESIZE_8, strict=True)
    assert str(bad) in str(info.value) and problem in str(info.value)


def test_missing_slices_are_reported_not_fatal(tmp_path: Path) -> None:
    write_series(tmp_path / "gappy", [0.0, 2.0, 4.0, 8.0, 10.0])  # 6.0 is missing
    write_series(tmp_path / "whole", [0.0, 2.0, 4.0, 6.0, 8.0])
    for strict in (False, True):
        images, report = load_dataset(tmp_path, strict=strict)
        assert len(images) == 2 and not report
        (path, problem), *_ = report.warnings
        assert path == str(tmp_path / "gappy")
        assert "gap of 4.0 mm" in problem and "1 slice(s) missing" in problem
        assert all(p == str(tmp_path / "gappy") for p, _ in report.warnings)


def test_score_lists_skipped_cases_and_fails_only_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(6):
        write_png(tmp_path / "train" / f"{i}.png", 40 * i)
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [4, 8], "latent_channels": 2},
        "engine": {"epochs": 1, "batch_size": 4, "progress": False, "val_fraction": 0.34},
        "data": {"transforms": RESIZE_8},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    fit = f"fit --config {tmp_path / 'c.yaml'} --data {tmp_path / 'train'} --out {run}"
    assert main(fit.split()) == 0
    write_png(tmp_path / "score" / "good.png")
    bad = _text_file(tmp_path / "score")
    score = f"score --run {run} --data {tmp_path / 'score'} --out {tmp_path / 's.csv'}".split()
    capsys.readouterr()
    assert main(score) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable case(s)" in err
    assert f"{bad}: not an image file" in err
    assert (tmp_path / "s.skipped.txt").read_text().startswith(f"{bad}: ")
    before = (tmp_path / "s.csv").read_text()
    assert main([*score, "--strict"]) == 2  # stops before writing: the table stays as it was
    assert (tmp_path / "s.csv").read_text() == before


# --------------------------------------------------------------------------- cache


class ReadSpy:
    """Wraps ``read_image`` in ``medanomaly.data.loading``: counts calls, can be made to fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.fail = False
        self._read = datasets.read_image
        monkeypatch.setattr(datasets, "read_image", self)

    def __call__(self, path: Path, **kwargs: object):
        if self.fail:
            raise AssertionError(f"read_image called for {path} although it is cached")
        self.calls.append(Path(path).name)
        return self._read(path, **kwargs)


def test_second_load_reads_the_cache_not_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png(tmp_path / "data" / "a.png", 10, square=True)
    write_series(tmp_path / "data_3d" / "s", [0.0, 2.0, 4.0])
    spy = ReadSpy(monkeypatch)
    cache = tmp_path / "cache"
    first, _ = load_dataset(tmp_path / "data", RESIZE_8, cache=cache)
    first_3d, _ = load_dataset(tmp_path / "data_3d", cache=str(cache))
    assert spy.calls == ["a.png", "s"]
    assert len(list(cache.glob("*/*.json"))) == 2
    spy.fail = True
    second, _ = load_dataset(tmp_path / "data", RESIZE_8, cache=cache)
    second_3d, _ = load_dataset(tmp_path / "data_3d", cache=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first_3d.images, second_3d.images)
    assert second.ids == first.ids
    with pytest.raises(AssertionError, match="although it is cached"):
        load_dataset(tmp_path / "data", RESIZE_8, cache=False)  # off: reads the file again


def test_cache_off_reads_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(tmp_path / "a.png")
    spy = ReadSpy(monkeypatch)
    for option in (None, False):
        load_dataset(tmp_path, cache=option)
    assert spy.calls == ["a.png", "a.png"]


def test_cache_invalidated_by_content_and_by_transforms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = write_png(tmp_path / "pngs" / "a.png", 10)
    write_png(tmp_path / "pngs" / "b.png", 20)
    write_series(tmp_path / "volumes" / "s", [0.0, 2.0])
    cache = tmp_path / "cache"
    spy = ReadSpy(monkeypatch)

    def reads(folder: str, transforms: list | None = None) -> list[str]:
        spy.calls.clear()
        images, _ = load_dataset(tmp_path / folder, transforms, cache=cache)
        return sorted(spy.calls)

    assert reads("pngs") == ["a.png", "b.png"] and reads("volumes") == ["s"]
    assert reads("pngs") == [] and reads("volumes") == []
    write_png(image, 77)  # same name and size, new content
    assert reads("pngs") == ["a.png"]
    write_dicom_slice(tmp_path / "volumes" / "s" / "1.2.3.1_01.dcm", 2.0, value=5)  # one slice
    assert reads("volumes") == ["s"]
    resize = [{"resize": {"shape": [4, 4]}}]
    assert reads("pngs", resize) == ["a.png", "b.png"]
    assert reads("pngs", resize) == []
    assert reads("pngs", [{"resize": {"shape": [4, 4], "mode": "nearest"}}]) == ["a.png", "b.png"]
    images, _ = load_dataset(tmp_path / "pngs", cache=cache)
    assert images.images[:, 0, 0, 0].tolist() == [77.0, 20.0]


def test_cache_key_is_content_transforms_and_read_options(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png", 10)
    b = write_png(tmp_path / "copy_of_a.png", 10)
    store = PreprocessCache(tmp_path / "cache")
    none, resize = build_transforms([]), build_transforms([{"resize": {"shape": [4, 4]}}])
    assert content_digest(a) == content_digest(b)
    assert store.key(a, none) == store.key(b, none)  # renamed copy: same entry
    assert store.key(a, none) != store.key(a, resize)
    assert store.key(a, none) != store.key(a, none, {"channel": 0})
    assert store.key(a, none) != store.key(a, none, mask=b)
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        store.key(tmp_path / "missing.png", none)


def test_augmentation_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.arange(64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "ramp.npy", pixels)
    transforms = [{"clip": {"lower": 0.0}}, {"rand_flip": {"axes": [1], "prob": 1.0}}]
    cache = tmp_path / "cache"
    load_dataset(tmp_path / "data", transforms, augment=True, cache=cache)
    entry = json.loads(next(cache.glob("*/*.json")).read_text())
    assert [next(iter(t)) for t in entry["transforms"]] == ["clip"]
    ReadSpy(monkeypatch).fail = True
    images, _ = load_dataset(tmp_path / "data", transforms, augment=True, cache=cache)
    np.testing.assert_array_equal(images.images[0, 0], pixels)  # stored before the flip
    np.testing.assert_array_equal(images[0].numpy()[0], pixels[:, ::-1])  # flipped when drawn


def test_cached_masks_and_warnings_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png(tmp_path / "img.png", 0, square=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    np.save(tmp_path / "mask.npy", mask)
    write_series(tmp_path / "gappy", [0.0, 2.0, 6.0])
    manifest = write_csv(tmp_path / "m.csv", [["path", "mask"], ["img.png", "mask.npy"]])
    transforms = [{"foreground_mask": {"threshold": 100.0}}, *RESIZE_8]
    cache = tmp_path / "cache"
    first, _ = load_dataset(manifest, transforms, cache=cache)
    _, first_report = load_dataset(tmp_path / "gappy", cache=cache)
    ReadSpy(monkeypatch).fail = True
    second, _ = load_dataset(manifest, transforms, cache=cache)
    _, second_report = load_dataset(tmp_path / "gappy", cache=cache)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert second.masks[0].sum() == 16
    assert len(list(cache.glob("*/*.foreground.npy"))) == 1
    assert second_report.warnings == first_report.warnings != []


def test_unreadable_entry_is_recomputed_and_unwritable_cache_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_png(tmp_path / "data" / "a.png", 10)
    cache = tmp_path / "cache"
    load_dataset(tmp_path / "data", cache=cache)
    next(cache.glob("*/*[0-9a-f].npy")).write_bytes(b"truncated")
    images, _ = load_dataset(tmp_path / "data", cache=cache)
    assert images.images.max() == 10.0
    assert "unreadable" in caplog.text

    def refuse(*args: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(PreprocessCache, "_write_array", staticmethod(refuse))
    images, report = load_dataset(tmp_path / "data", cache=tmp_path / "other")
    assert len(images) == 1 and not report
    assert "cannot write the preprocessing cache" in caplog.text


def test_cache_true_uses_the_environment_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env_cache"))
    assert PreprocessCache.from_option(True).root == tmp_path / "env_cache"
    monkeypatch.delenv(CACHE_ENV)
    assert PreprocessCache.from_option(True).root == Path.home() / ".cache" / "medanomaly"
    assert PreprocessCache.from_option(None) is None and PreprocessCache.from_option(False) is None
    with pytest.raises(ValueError, match="cache must be"):
        PreprocessCache.from_option(3)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env_cache"))
    write_png(tmp_path / "data" / "a.png")
    data_block = yaml.safe_load("cache: true\ntransforms: [{resize: {shape: [8, 8]}}]")
    load_dataset(tmp_path / "data", **data_block)
    assert len(list((tmp_path / "env_cache").glob("*/*.json"))) == 1


def test_listing_reports_only_what_it_cannot_use(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    write_dicom_slice(tmp_path / "IM0001", 0.0)  # DICOM without suffix: an image
    _text_file(tmp_path)
    (tmp_path / ".DS_Store").write_text("hidden files are ignored")
    cases = scan_folder(tmp_path)
    assert [(c.path.name, c.problem is None) for c in cases] == [
        ("IM0001", True),
        ("a.png", True),
        ("notes.txt", False),
    ]


def test_foreground_mask_transform_reaches_the_image_set(tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(2):
        array = np.zeros((16, 16), np.float32)
        array[4:12, 4:12] = 100.0 + i
        np.save(folder / f"c{i}.npy", array)
    transforms = [{"foreground_mask": {"threshold": 50.0}}, {"resize": {"shape": [8, 8]}}]
    data, _ = load_dataset(folder, transforms=transforms)
    assert data.foreground is not None and data.foreground.shape == (2, 8, 8)
    assert data.foreground[:, 2:6, 2:6].all() and not data.foreground[:, 0, 0].any()
    assert data.subset([1]).foreground.shape == (1, 8, 8)

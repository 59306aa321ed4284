"""Data preparation of the 3D screening benchmark: planted outliers and the split manifest."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from conftest import load_benchmark

prepare_screen3d = load_benchmark("prepare_screen3d")


def _volume(path, seed, shape=(12, 14, 16)):
    """A blob brighter in the left half (so that a left-right flip shows), PSR-like affine."""
    rng = np.random.default_rng(seed)
    array = rng.random(shape).astype(np.float32) * 10
    array[: shape[0] // 2] += 50
    affine = np.array([[0, 0, -2.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "ixi_t1_3d" / "t1").mkdir(parents=True)
    for i in range(20):
        _volume(data / "ixi_t1_3d" / "t1" / f"IXI{i:03d}_T1.nii.gz", i)
    brats = data / "brats_3d" / "test" / "case1"
    brats.mkdir(parents=True)
    _volume(brats / "T1c_subtrMeanDivStd.nii.gz", 99)
    out = tmp_path_factory.mktemp("out")
    return data, out, prepare_screen3d.prepare(data, out)


def _rows(manifest):
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def test_manifest_splits_train_val_and_test_as_the_old_benchmark(prepared):
    _, out, manifest = prepared
    rows = _rows(manifest)
    count = {(s, lab): 0 for s in ("train", "val", "test") for lab in ("normal", "abnormal")}
    for row in rows:
        count[(row["split"], row["label"])] += 1
    # 12 IXI volumes are left after the 8 held out; the engine's seeded 0.2 validates
    assert count[("test", "normal")] == 8 and count[("test", "abnormal")] == 5 + 1
    assert count[("train", "normal")] == 10 and count[("val", "normal")] == 2
    assert count[("val", "abnormal")] == 2  # one planted outlier per validation normal
    test = [r for r in rows if r["split"] == "test"]
    assert all(r["path"].startswith(str(out / "screen")) for r in test)
    train = {r["group"] for r in rows if r["split"] == "train"}
    assert not train & {r["group"] for r in rows if r["split"] != "train"}


def _ras(image):
    to_ras, _ = prepare_screen3d._ras_transforms(image)
    return nib.orientations.apply_orientation(np.asarray(image.dataobj), to_ras)


def test_planted_outliers_alter_the_source_as_described(prepared):
    _, out, _ = prepared
    screen = out / "screen"
    planted, source = {}, {}
    for kind in prepare_screen3d.PLANTED_KINDS:
        path = next(p for p in screen.glob(f"{kind}_IXI*"))
        planted[kind] = nib.load(path)
        source[kind] = nib.load(screen / f"normal_{path.name[len(kind) + 1 :]}")
    for kind in ("metal", "missing", "noise", "flip"):
        np.testing.assert_array_equal(planted[kind].affine, source[kind].affine)
    assert _ras(planted["metal"]).max() > 3 * _ras(source["metal"]).max()
    missing = _ras(planted["missing"])
    assert np.all(missing[:, :, missing.shape[2] // 2] == 0)
    np.testing.assert_allclose(_ras(planted["flip"]), _ras(source["flip"])[::-1])
    header, original = planted["flip_header"], source["flip_header"]
    np.testing.assert_array_equal(np.asarray(header.dataobj), np.asarray(original.dataobj))
    np.testing.assert_allclose(_ras(header), _ras(original)[::-1])  # readers see it mirrored


def test_preparing_twice_gives_the_same_manifest(prepared):
    data, out, manifest = prepared
    before = manifest.read_text()
    assert prepare_screen3d.prepare(data, out).read_text() == before

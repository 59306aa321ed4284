"""Bad input never loses a batch: misfit cases are skipped and named once, the rest scored."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medanomaly.cli import main
from medanomaly.data.loading import InputSpec, check_fits
from medanomaly.data.phantoms import make_phantoms
from medanomaly.errors import InvalidImageError


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3D CAE run trained on 16³ phantom volumes stored as NIfTI."""
    root = tmp_path_factory.mktemp("run3d")
    for i, volume in enumerate(make_phantoms(10, 0, (16, 16, 16), seed=3).images):
        _nifti(root / "train" / f"n{i:02d}.nii.gz", volume[0])
    config = {
        "model": {"name": "cae", "spatial_dims": 3, "channels": [4, 8], "latent_channels": 4},
        "engine": {"epochs": 1, "batch_size": 4, "progress": False},
        "data": {"transforms": [{"resize": {"shape": [16, 16, 16]}}, {"min_max": {}}]},
    }
    (root / "cae3d.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(root / "cae3d.yaml"), "--data", str(root / "train")]
    assert main([*args, "--out", str(root / "run")]) == 0
    return root / "run"


def mixed_bad_folder(folder: Path) -> dict[str, str]:
    """Two good volumes and assorted bad files; returns bad file name -> expected reason."""
    good = make_phantoms(2, 0, (24, 24, 20), seed=4).images
    _nifti(folder / "good_a.nii.gz", good[0, 0])
    _nifti(folder / "good_b.nii.gz", good[1, 0])
    _nifti(folder / "four_d.nii.gz", np.ones((20, 20, 20, 3)))
    _nifti(folder / "flat.nii.gz", np.ones((40, 40)))
    _nifti(folder / "tiny.nii.gz", np.ones((1, 1, 1)))
    (folder / "x.nii.gz").write_bytes(b"")
    return {
        "four_d.nii.gz": "3 channels (stored as 20×20×20×3); the run's model takes 1",
        "flat.nii.gz": "a 2-D image (40×40) cannot go into a 3-D model",
        "tiny.nii.gz": "volume 1×1×1 is smaller than the minimum of 2 voxels per axis "
        "(data.min_size)",
        "x.nii.gz": "file is empty (0 bytes)",
    }


def test_score_skips_every_misfit_case_with_one_named_line_and_scores_the_rest(
    run_3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = mixed_bad_folder(tmp_path / "mixed")
    out = tmp_path / "s.csv"
    code = main(
        ["score", "--run", str(run_3d), "--data", str(tmp_path / "mixed"), "--out", str(out)]
    )
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(r["id"]).name for r in rows) == ["good_a.nii.gz", "good_b.nii.gz"]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, reason in expected.items():
        [line] = [line for line in err.splitlines() if f"/{name}:" in line]
        assert line.strip() == f"{tmp_path / 'mixed' / name}: {reason}"
        assert line.count(name) == 1  # the file is named once
    skipped = (tmp_path / "s.skipped.txt").read_text().splitlines()
    assert len(skipped) == len(expected)


def test_strict_score_stops_at_the_first_bad_case_before_writing(
    run_3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed_bad_folder(tmp_path / "mixed")
    args = ["score", "--run", str(run_3d), "--data", str(tmp_path / "mixed")]
    assert main([*args, "--out", str(tmp_path / "s.csv"), "--strict"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    ("read_shape", "file_shape", "spec", "problem"),
    [
        ([1, 16, 16], None, InputSpec(3, 1), "2-D image (16×16) cannot go into a 3-D model"),
        ([1, 8, 8, 8], None, InputSpec(2, 1), "3-D volume (8×8×8) cannot go into a 2-D model"),
        ([2, 8, 8], None, InputSpec(2, 1), "2 channels"),
        ([1, 8, 8, 8], None, InputSpec(3, 1), None),
        ([1, 8, 8, 1], None, InputSpec(2, 1), "3-D volume"),
    ],
)
def test_check_fits_names_the_misfit(read_shape, file_shape, spec, problem) -> None:
    facts = {"read_shape": read_shape, "file_shape": file_shape}
    if problem is None:
        check_fits("case.nii.gz", facts, spec, min_size=2)
        return
    with pytest.raises(InvalidImageError, match=re.escape(problem)) as info:
        check_fits("case.nii.gz", facts, spec, min_size=2)
    assert str(info.value).count("case.nii.gz") == 1


def test_fit_warns_when_the_threshold_rests_on_few_normals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from medanomaly import get_model

    train = make_phantoms(12, 0, (32, 32), seed=0)
    engine = {"epochs": 1, "batch_size": 8, "progress": False}
    with caplog.at_level(logging.WARNING, logger="medanomaly.detectors.base"):
        detector = get_model("cae", channels=[4, 8], engine=engine).fit(train)
    assert len(detector.val_scores_) == 1
    assert "rests on only 1 held-out normal image(s), fewer than 20" in caplog.text


def test_evaluate_and_screen_write_maps_in_the_source_geometry(
    run_3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_phantoms(2, 2, (24, 24, 20), seed=5)
    for i, (volume, label) in enumerate(zip(data.images, data.labels, strict=True)):
        _nifti(
            tmp_path / "labelled" / ("abnormal" if label else "normal") / f"c{i}.nii.gz", volume[0]
        )
    base = ["--run", str(run_3d), "--data", str(tmp_path / "labelled")]
    assert (
        main(["evaluate", *base, "--out", str(tmp_path / "eval"), "--maps", str(tmp_path / "em")])
        == 0
    )
    assert (
        main(["screen", *base, "--out", str(tmp_path / "scr"), "--maps", str(tmp_path / "sm")]) == 0
    )
    for folder in ("em", "sm"):
        written = sorted((tmp_path / folder).glob("*_map.nii.gz"))
        assert len(written) == 4
        assert all(nib.load(p).shape == (24, 24, 20) for p in written)
        np.testing.assert_allclose(nib.load(written[0]).affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = capsys.readouterr().out
    assert "AUROC" in out and "[95 % CI" in out.split("AUROC", 1)[1].split(",", 1)[0]


def test_dicom_output_needs_a_maps_folder(run_3d: Path, tmp_path: Path) -> None:
    args = [
        "score",
        "--run",
        str(run_3d),
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "s.csv"),
    ]
    assert main([*args, "--dicom"]) == 2


def test_input_spec_leaves_the_size_free_for_sliding_window_models() -> None:
    from medanomaly import get_model

    whole = get_model("resnet_ae", spatial_dims=3, depth=10)
    patches = get_model("resnet_ae", spatial_dims=3, depth=10, patch_size=[16, 16, 16])
    whole.input_shape_ = patches.input_shape_ = (1, 32, 32, 32)
    assert whole.input_spec() == InputSpec(3, 1, (1, 32, 32, 32))
    assert patches.input_spec() == InputSpec(3, 1, None)

"""The command line: fit -> score on a folder of PNGs, demo, models, help."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import yaml
from PIL import Image

from medanomaly.cli import _without_library_noise, main
from medanomaly.data.phantoms import make_phantoms
from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.thresholds import conformal_pvalues


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(folder / f"case_{i:03d}.png")


@pytest.fixture
def png_data(tmp_path):
    train = make_phantoms(16, 0, (32, 32), seed=1)
    test = make_phantoms(4, 4, (32, 32), seed=2)
    _write_pngs(tmp_path / "train", train.images)
    _write_pngs(tmp_path / "test" / "normal", test.normal.images)
    _write_pngs(tmp_path / "test" / "abnormal", test.abnormal.images)
    (tmp_path / "test" / "abnormal" / "broken.png").write_bytes(b"not a png at all")
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
        "engine": {"epochs": 2, "batch_size": 4, "progress": False},
        "data": {"transforms": [{"min_max": {}}, {"rand_flip": {"axes": [1], "seed": 0}}]},
    }
    (tmp_path / "cae.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "score", "demo", "models"):
        assert command in out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cae" in out and "vae" in out


def test_fit_then_score(png_data, capsys):
    run = png_data / "run"
    code = main(
        [
            "fit",
            "--config",
            str(png_data / "cae.yaml"),
            "--data",
            str(png_data / "train"),
            "--out",
            str(run),
            "--set",
            "engine.epochs=3",
        ]
    )
    assert code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["engine"]["epochs"] == 3 and saved["data"]["transforms"] and saved["version"]
    assert BaseDetector.load(run).run_config_["data"] == saved["data"]

    scores = png_data / "scores.csv"
    code = main(
        [
            "score",
            "--run",
            str(run),
            "--data",
            str(png_data / "test"),
            "--out",
            str(scores),
            "--maps",
            str(png_data / "maps"),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == 8
    assert {r["label"] for r in rows} == {"0", "1"}
    scores = np.array([float(r["score"]) for r in rows])
    assert np.isfinite(scores).all()
    expected = conformal_pvalues(BaseDetector.load(run).val_scores_, scores)
    np.testing.assert_allclose([float(r["p_value"]) for r in rows], expected, rtol=1e-5)
    maps = png_data / "maps"
    assert len(list(maps.glob("*.npy"))) == 8  # model grid
    assert len(list(maps.glob("*_overlay.png"))) == 8  # the image's own size
    assert len(list(maps.glob("*_map.tiff"))) == len(list(maps.glob("*_map.json"))) == 8
    assert len(list(maps.glob("*.png"))) == 16  # + input | reconstruction | map figures
    err = capsys.readouterr().err
    assert "broken.png" in err
    assert "broken.png" in (png_data / "scores.skipped.txt").read_text()

    strict = main(
        [
            "score",
            "--run",
            str(run),
            "--data",
            str(png_data / "test"),
            "--out",
            str(png_data / "strict.csv"),
            "--strict",
        ]
    )
    assert strict != 0


def test_resume_from_the_cli(png_data):
    run = png_data / "run"
    args = [
        "fit",
        "--config",
        str(png_data / "cae.yaml"),
        "--data",
        str(png_data / "train"),
        "--out",
        str(run),
    ]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 2


def test_config_errors_are_reported_not_raised(png_data, capsys):
    bad = png_data / "bad.yaml"
    bad.write_text("model: {name: caee}\n")
    code = main(
        [
            "fit",
            "--config",
            str(bad),
            "--data",
            str(png_data / "train"),
            "--out",
            str(png_data / "x"),
        ]
    )
    assert code == 2
    assert "Did you mean 'cae'" in capsys.readouterr().err


def test_demo_prints_an_auroc(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 0
    assert "AUROC" in capsys.readouterr().out
    assert (tmp_path / "scores.csv").exists()
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 6


def test_data_parallel_training_on_two_cpu_processes(tmp_path):
    """`--devices 2` runs two DDP processes (gloo on CPU) and one run directory results."""
    import subprocess
    import sys

    train = make_phantoms(16, 0, (32, 32), seed=1)
    (tmp_path / "train").mkdir()
    for i, image in enumerate(train.images):
        np.save(tmp_path / "train" / f"c{i:02d}.npy", image[0])
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16]},
        "engine": {"epochs": 2, "batch_size": 4, "progress": False, "accelerator": "cpu"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "medanomaly.cli",
        "fit",
        "--config",
        str(tmp_path / "c.yaml"),
        "--data",
        str(tmp_path / "train"),
        "--out",
        str(tmp_path / "run"),
        "--devices",
        "2",
        "-v",  # Lightning's note of its processes shows with --verbose only
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting with 2 processes" in done.stderr + done.stdout
    assert done.stdout.count("trained cae") == 1
    assert BaseDetector.load(tmp_path / "run").threshold_ > 0


def test_quiet_logs_drop_lightning_notes_but_keep_its_warnings():
    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    rank_zero = "lightning_fabric.utilities.rank_zero"
    assert not _without_library_noise(record(rank_zero, logging.INFO))
    assert _without_library_noise(record(rank_zero, logging.WARNING))
    assert _without_library_noise(record("medanomaly.jobs.fit", logging.INFO))
    assert not _without_library_noise(record("pydicom.pixels", logging.WARNING))

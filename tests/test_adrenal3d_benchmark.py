"""benchmarks/adrenal3d.py: the --quick path on a tiny synthetic AdrenalMNIST3D-like npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark  # noqa: I001


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("adrenal3d")


def _fake_npz(path: Path, side: int = 16) -> Path:
    """Binary blobs (0/255); abnormal ones are larger, like an enlarged gland."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"))
    arrays = {}
    for split, n in (("train", 24), ("val", 12), ("test", 18)):
        labels = (np.arange(n) % 3 == 0).astype(np.uint8)
        radius = np.where(labels == 1, 5.0, 3.0) + rng.uniform(-0.5, 0.5, n)
        centre = side / 2 + rng.uniform(-1, 1, (n, 3))
        dist = np.sqrt(((grid[None] - centre[:, :, None, None, None]) ** 2).sum(axis=1))
        arrays[f"{split}_images"] = ((dist <= radius[:, None, None, None]) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


def test_quick_run_writes_results(bench, tmp_path, capsys):
    data = _fake_npz(tmp_path / "fake.npz")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    argv = ["--out", str(out), "--data", str(data), "--quick", "--threads", "1"]
    try:
        models = ["volume", "vae", "cae", "cae_map", "dae32", "dae32_sum", "thickness"]
        assert bench.main([*argv, "--models", *models]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["rows"]) == set(models)
    assert [summary["rows"][m]["baseline"] for m in models] == [True] + [False] * 5 + [True]
    assert summary["rows"]["thickness"]["input"] == "distance"
    assert summary["rows"]["dae32"]["size"] == 32 and summary["rows"]["dae32_sum"]["size"] == 32
    speed = summary["speed"]
    assert speed["volumes"] == 16 and speed["volumes_per_s"] > 0 and speed["threads"] == 1
    assert speed["train_volumes_per_s"] > 0 and len(speed["pass_seconds"]) == 3
    row = summary["rows"]["cae"]
    for key in ("auroc", "auroc_ci", "sensitivity", "specificity", "accuracy", "f1", "threshold"):
        assert key in row
    assert row["epochs"] == 1 and row["epoch_kept"] == 1
    assert summary["rows"]["cae_map"]["from"] == "cae"
    assert summary["counts"] == {
        "train": 16, "val_normal": 6, "val_abnormal": 4, "test_normal": 10, "test_abnormal": 6
    }  # fmt: skip
    markdown = (out / "results.md").read_text()
    assert "Chung & Choi 2023" in markdown and "0.801" in markdown and "| cae_map |" in markdown
    assert "VAE-3D (`vae`) speed" in markdown and "*volume (no model)*" in markdown
    assert (out / "roc_test.png").exists()
    # a second run loads the saved model instead of retraining
    capsys.readouterr()
    try:
        assert bench.main([*argv, "--models", "cae"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "cae: loading" in capsys.readouterr().out


def test_missing_data_exits_with_message(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--data", str(tmp_path / "none.npz")]) == 1
    assert "not found" in capsys.readouterr().err

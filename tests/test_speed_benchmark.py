"""benchmarks/speed.py: a --quick run writes the float32 and auto rows and the machine's peak."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark  # noqa: I001


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("speed")


def test_quick_run_writes_both_precisions_and_the_peak(bench, tmp_path):
    threads = torch.get_num_threads()
    bench.main(["--quick", "--models", "cae", "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the run leaves the process's threads alone

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {
        "cae 32x32 32-true before",
        "cae 32x32 32-true",
        "cae 32x32 auto",
        "intensity 32x32 n/a",
    }
    before, fp32, auto = (rows[f"cae 32x32 {v}"] for v in ("32-true before", "32-true", "auto"))
    assert before["resolved_precision"] == fp32["resolved_precision"] == "32-true"
    assert before["memory_format"] == {"training": "contiguous", "scoring": "channels_last"}
    expected = "bf16-mixed" if results["machine"]["cpu_bf16"] else "32-true"
    assert auto["resolved_precision"] == expected
    assert fp32["training_speedup_fp32"] == 1.0 and auto["training_speedup"] > 0
    assert auto["training_speedup"] == pytest.approx(
        auto["training_images_per_second"] / before["training_images_per_second"]
    )
    for row in (before, fp32, auto):
        assert row["baseline"] is False
        assert row["training_images_per_second"] > 0 and row["scoring_images_per_second"] > 0
        assert row["training_gflop_per_image"] > 0 and row["peak_rss_mb"] > 100
    assert rows["intensity 32x32 n/a"]["baseline"] is True

    peak = results["peaks"]["gflops"]
    assert set(peak) == {"matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16"}
    assert all(value > 0 for value in peak.values())
    assert results["targets"] == []  # no dae or resnet_ae row

    table = (tmp_path / "table.md").read_text()
    assert "| cae | 32×32 | auto (" in table and "Peak (GFLOP/s): matmul fp32" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.md"]


def test_targets_compare_auto_with_float32(bench):
    def row(model, dims, precision, training, scoring):
        return {
            "model": model,
            "spatial_dims": dims,
            "shape": [64] * dims,
            "precision": precision,
            "training_speedup": training,
            "scoring_speedup": scoring,
        }

    rows = {
        "a": row("dae", 2, "32-true", 1.0, 1.0),
        "b": row("dae", 2, "auto", 1.8, 1.7),
        "c": row("resnet_ae", 3, "auto", 1.4, 2.0),
    }
    found = {(t["model"], t["phase"]): t["met"] for t in bench.targets(rows)}
    assert found == {
        ("dae", "training"): True,
        ("dae", "scoring"): False,
        ("resnet_ae", "training"): False,
    }


def test_the_profile_prints_the_operators_of_training_and_scoring(capsys):
    profile = load_benchmark("profile_speed")
    threads = torch.get_num_threads()
    argv = ["--model", "cae", "--size", "32", "--steps", "1", "--images", "4", "--rows", "3"]
    assert profile.main([*argv, "--variant", "32-true before", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "cae 32x32 32-true before: training, 1 steps of 30" in printed
    assert "cae 32x32 32-true before: scoring, 4 images" in printed
    assert printed.count("Self CPU time total") == 2 and "aten::" in printed

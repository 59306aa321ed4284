"""benchmarks/gpu_check.py: says so and exits 0 without a GPU; checks models on the CPU path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys) -> None:
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU found" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()


def test_the_checks_run_and_compare_scores(tmp_path) -> None:
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.main(["--allow-cpu", "--models", "intensity", "--no-timing",
                           "--out", str(tmp_path)]) == 0  # fmt: skip
    assert "speed" not in json.loads((tmp_path / "results.json").read_text()) or (
        json.loads((tmp_path / "results.json").read_text())["speed"] is None
    )  # intensity is not in the speed benchmark
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["rows"]["intensity"]
    assert row["baseline"] is True and row["passed"] and row["spearman"] > 0.99
    config = gpu_check.model_configs()["intensity"]
    assert row["shape"] == list(gpu_check.input_shape(config, 2))  # the config's own size
    assert results["matmul_peak_tflops"]["float32"] > 0


def test_input_shape_is_the_configs_last_fixed_size() -> None:
    gpu_check = load_benchmark("gpu_check")
    steps = [{"resize": {"shape": [96, 96]}}, {"pad": {"shape": [80, 80], "position": "random"}}]
    config = {"data": {"transforms": steps}}
    assert gpu_check.input_shape(config, 2) == (96, 96)
    assert gpu_check.input_shape({}, 3) == (64, 64, 64)


def test_the_speed_benchmark_runs_on_the_checked_device(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.main(["--allow-cpu", "--models", "cae", "--no-timing",
                           "--out", str(tmp_path)]) == 0  # fmt: skip
    speed = json.loads((tmp_path / "speed" / "results.json").read_text())
    variants = ("32-true before", "32-true", "auto")
    assert set(speed["rows"]) == {*(f"cae 32x32 {v}" for v in variants), "intensity 32x32 n/a"}
    assert speed["machine"]["device"] == "cpu"  # "cuda" where a GPU is lent
    auto = speed["rows"]["cae 32x32 auto"]
    assert set(auto["memory_format"]) == {"training", "scoring"}
    assert json.loads((tmp_path / "results.json").read_text())["speed"]["targets"] == []
    assert "| cae | 32×32 | auto" in (tmp_path / "speed" / "table.md").read_text()

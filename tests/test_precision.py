"""``engine.precision: auto``: bf16 where the hardware has it, float32 weights and scores."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from medanomaly import BaseDetector, get_model
from medanomaly.cli import main
from medanomaly.detectors.base import CONFIG_FILE, MODEL_FILE
from medanomaly.errors import ConfigError
from medanomaly.training import precision
from medanomaly.training.engine import EngineConfig, resolve_precision
from medanomaly.training.precision import (
    AutocastForward,
    choose_precision,
    cpuinfo_flags,
    float32_small_convolutions,
    kernel_spans_an_axis,
)

needs_bf16_cpu = pytest.mark.skipif(
    not precision.cpu_supports_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): auto trains in float32 here",
)
ENGINE = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch):
    """Force the CPU probe: ``bf16_cpu(False)`` plays a machine without bf16."""
    monkeypatch.setattr(precision, "_warned", set())

    def force(has_bf16: bool) -> None:
        monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: has_bf16)

    return force


@pytest.mark.parametrize(
    ("device", "has_bf16", "expected"),
    [
        ("cpu", True, "bf16-mixed"),
        ("cpu", False, "32-true"),
        ("cuda", True, "bf16-mixed"),
        ("cuda", False, "16-mixed"),
    ],
)
def test_auto_follows_the_hardware(monkeypatch, device, has_bf16, expected):
    monkeypatch.setattr(precision, "supports_bf16", lambda kind: kind == device and has_bf16)
    assert choose_precision("auto", device) == expected


def test_a_given_precision_overrides_auto(bf16_cpu):
    bf16_cpu(True)
    assert resolve_precision(EngineConfig(precision="32-true"), "cpu") == "32-true"
    assert resolve_precision(EngineConfig(precision=32), "cpu") == "32-true"  # YAML `32`
    bf16_cpu(False)
    assert resolve_precision(EngineConfig(precision="64-true"), "cpu") == "64-true"


def test_bf16_on_a_cpu_without_it_falls_back_with_one_warning(bf16_cpu, caplog):
    bf16_cpu(False)
    config = EngineConfig(precision="bf16-mixed")
    with caplog.at_level(logging.WARNING, logger="medanomaly.training.precision"):
        assert resolve_precision(config, "cpu") == "32-true"
        assert resolve_precision(config, "cpu") == "32-true"
    assert len(caplog.records) == 1
    assert "lacks (no AVX512-BF16 or AMX): using 32-true" in caplog.text
    with pytest.raises(ConfigError, match="set engine.precision to auto or 32-true"):
        resolve_precision(config, "cpu", strict=True)


def test_strict_fit_refuses_bf16_on_a_cpu_without_it(bf16_cpu, tmp_path, capsys):
    bf16_cpu(False)
    config = tmp_path / "cae.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"name": "cae"}, "engine": {"precision": "bf16-mixed"}})
    )
    args = ["fit", "--config", str(config), "--data", str(tmp_path / "none")]
    assert main([*args, "--out", str(tmp_path / "run"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'bf16-mixed' needs bf16 arithmetic, which this cpu lacks" in err


def test_an_unknown_precision_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'bf16-mixed'"):
        EngineConfig(precision="bf16-mixd")


def test_cpuinfo_flags_are_read(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nflags : fpu\n")
    assert {"avx512_bf16", "fpu"} <= cpuinfo_flags(cpuinfo)
    assert cpuinfo_flags(tmp_path / "missing") == set()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny2d):
    """A DAE fitted with ``precision: auto`` on this CPU, with the dtype of its conv outputs."""
    if not precision.cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX)")
    run = tmp_path_factory.mktemp("bf16") / "run"
    training_dtypes: set[torch.dtype] = set()

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d) and module.training and torch.is_grad_enabled():
            training_dtypes.add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        detector = get_model("dae", spatial_dims=2, engine=ENGINE).fit(tiny2d.normal, run_dir=run)
    finally:
        handle.remove()
    return run, detector, training_dtypes


def test_auto_trains_in_bf16_and_records_it(bf16_run):
    run, detector, training_dtypes = bf16_run
    config = yaml.safe_load((run / CONFIG_FILE).read_text())
    assert config["engine"]["precision"] == "auto"
    assert config["resolved"] == {
        "precision": "bf16-mixed",
        "memory_format": {"training": "contiguous", "scoring": "contiguous"},  # not timed in tests
        "epoch_monitor": "val_loss",
    }
    assert torch.bfloat16 in training_dtypes
    assert isinstance(detector.scoring_network(), AutocastForward)


def test_bf16_run_saves_float32_weights(bf16_run):
    run, _, _ = bf16_run
    with safe_open(str(run / MODEL_FILE), framework="pt") as saved:
        dtypes = {saved.get_tensor(key).dtype for key in saved.keys()}  # noqa: SIM118
    assert torch.float32 in dtypes
    assert not dtypes & {torch.bfloat16, torch.float16}


def test_bf16_run_scores_on_a_machine_without_bf16(bf16_run, bf16_cpu, tiny2d):
    run, detector, _ = bf16_run
    bf16_scores, bf16_maps = detector.score(tiny2d), detector.anomaly_map(tiny2d)
    bf16_cpu(False)
    loaded = BaseDetector.load(run)
    assert not isinstance(loaded.scoring_network(), AutocastForward)
    float32_scores, float32_maps = loaded.score(tiny2d), loaded.anomaly_map(tiny2d)
    assert bf16_scores.dtype == np.float64 and bf16_maps.dtype == np.float32
    assert not np.array_equal(bf16_scores, float32_scores)  # bf16 did run
    # bf16 keeps 8 bits of each layer's output. Measured on this AMD EPYC (AVX512-BF16)
    # for this 2-epoch DAE on tiny2d, seeds 0-4: largest relative score difference
    # 1.2-2.5 %, largest map difference 0.012-0.022 (maps reach 0.6); the tolerances
    # leave a margin of two.
    np.testing.assert_allclose(bf16_scores, float32_scores, rtol=5e-2)
    np.testing.assert_allclose(bf16_maps, float32_maps, atol=5e-2)


@needs_bf16_cpu
def test_weight_gradient_of_a_kernel_spanning_an_axis_is_right_in_bf16():
    """oneDNN's bf16 weight gradient of a 3x3x3 kernel over a depth of 2 is wrong on some CPUs."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, 3, padding=1, bias=False)
    x = torch.randn(4, 16, 2, 8, 8)
    (reference,) = torch.autograd.grad(conv(x).square().sum(), conv.weight)
    with float32_small_convolutions(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        (guarded,) = torch.autograd.grad(conv(x).float().square().sum(), conv.weight)
    np.testing.assert_allclose(guarded.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)
    assert not conv._forward_pre_hooks and not conv._forward_hooks  # hooks removed


def test_only_kernels_spanning_an_axis_are_guarded():
    conv = nn.Conv3d(1, 1, 3, padding=1)
    assert kernel_spans_an_axis(conv, torch.zeros(1, 1, 2, 8, 8))
    assert kernel_spans_an_axis(conv, torch.zeros(1, 1, 8, 8, 3))
    assert not kernel_spans_an_axis(conv, torch.zeros(1, 1, 4, 8, 8))
    dilated = nn.Conv2d(1, 1, 3, dilation=2)
    assert kernel_spans_an_axis(dilated, torch.zeros(1, 1, 5, 16))
    assert not kernel_spans_an_axis(dilated, torch.zeros(1, 1, 6, 16))

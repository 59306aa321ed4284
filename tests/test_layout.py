"""``engine.memory_format`` and ``engine.compile``: measured or forced layouts, compile fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from medanomaly import BaseDetector, get_model
from medanomaly.detectors.base import CONFIG_FILE, MODEL_FILE
from medanomaly.errors import ConfigError
from medanomaly.training import compiled, layout
from medanomaly.training.engine import EngineConfig
from medanomaly.training.layout import (
    choose_layout,
    faster_layout,
    layout_of,
    set_network_layout,
    to_layout,
)

FP32 = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0, "precision": "32-true"}


@pytest.fixture
def timed_layouts(monkeypatch: pytest.MonkeyPatch):
    """``auto`` measures, from an empty cache."""
    monkeypatch.setattr(layout, "CHOSEN", {})
    with layout.measuring(True):
        yield layout.CHOSEN


def conv_layouts_in_training() -> tuple[set[str], object]:
    """Layouts of the 2D convolutions run with gradients (a global hook).

    Weights contiguous in both layouts (one input channel, 1x1 kernels) are left out.
    """
    seen: set[str] = set()

    def record(module: nn.Module, args: tuple) -> None:
        trained = isinstance(module, nn.Conv2d) and module.training and torch.is_grad_enabled()
        if trained and not layout._is_degenerate(module.weight):
            seen.add(layout_of(module))

    return seen, nn.modules.module.register_module_forward_pre_hook(record)


def test_an_unknown_memory_format_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'channels_last'"):
        EngineConfig(memory_format="channel_last")
    with pytest.raises(ConfigError, match="compile must be true or false"):
        EngineConfig(compile="yes")


@pytest.mark.parametrize("forced", ["channels_last", "contiguous"])
def test_a_forced_layout_is_used_in_both_phases_and_recorded(forced, tiny2d, tmp_path):
    seen, handle = conv_layouts_in_training()
    try:
        detector = get_model("cae", engine={**FP32, "memory_format": forced})
        detector.fit(tiny2d.normal, run_dir=tmp_path)
    finally:
        handle.remove()
    assert seen == {forced}
    assert layout_of(detector.network_) == forced
    resolved = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())["resolved"]
    assert resolved["memory_format"] == {"training": forced, "scoring": forced}


def test_auto_measures_each_phase_once_and_records_the_choice(timed_layouts, tiny2d, tmp_path):
    detector = get_model("cae", engine=FP32).fit(tiny2d.normal, run_dir=tmp_path)
    chosen = {key.phase: value for key, value in timed_layouts.items()}
    assert set(chosen) == {"training", "scoring"}
    assert {key.input_shape for key in timed_layouts} == {(1, 32, 32)}
    assert {key.precision for key in timed_layouts} == {"32-true"}
    resolved = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())["resolved"]
    assert resolved["memory_format"] == chosen
    assert layout_of(detector.network_) == chosen["scoring"]
    detector.score(tiny2d)
    assert len(timed_layouts) == 2  # cached: scoring again measures nothing


def test_auto_keeps_the_faster_layout_and_caps_the_passes(timed_layouts, monkeypatch):
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    passes: list[str] = []

    def work(batch: torch.Tensor) -> None:
        passes.append(layout_of(network))
        network(batch).sum().backward()

    example = torch.rand(2, 1, 16, 16)
    monkeypatch.setattr(layout, "_timed", lambda call, device: (call(), 0.1 * len(passes))[1])
    choice = choose_layout("auto", network, example, "training", "32-true", work)
    # each call takes longer than the one before: the layout timed first in a round wins
    assert choice == layout.LAYOUTS[0]
    assert len(passes) <= 2 * (layout.MEASURE_ROUNDS + 1)
    assert choose_layout("auto", network, example, "training", "32-true", work) == choice
    assert len(passes) <= 2 * (layout.MEASURE_ROUNDS + 1)  # the second call was cached
    assert choose_layout("channels_last", network, example, "training", "32-true", work) == (
        "channels_last"
    )


def test_measuring_leaves_statistics_gradients_modes_and_random_state_alone(timed_layouts):
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    example = torch.rand(2, 1, 16, 16)
    state = torch.random.get_rng_state()

    def work(batch: torch.Tensor) -> None:
        network.train()
        network(batch).sum().backward()

    choose_layout("auto", network, example, "training", "32-true", work)
    assert len(timed_layouts) == 1
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(p.grad is None for p in network.parameters())
    assert not any(m.training for m in network.modules())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_without_convolutions_or_with_timing_off_auto_is_contiguous(monkeypatch):
    monkeypatch.setattr(layout, "CHOSEN", {})
    linear = nn.Linear(4, 2)
    with layout.measuring(True):
        assert choose_layout("auto", linear, torch.rand(2, 1, 4, 4), "scoring", "32", print) == (
            "contiguous"
        )
    conv = nn.Conv2d(1, 2, 3)
    assert choose_layout("auto", conv, torch.rand(2, 1, 8, 8), "scoring", "32", print) == (
        "contiguous"
    )
    assert layout.CHOSEN == {}


def test_layout_helpers_convert_images_only():
    network = set_network_layout(nn.Sequential(nn.Conv3d(2, 3, 3), nn.Conv2d(3, 3, 3)), "x")
    assert layout_of(network) == "contiguous"
    set_network_layout(network, "channels_last")
    assert network[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert network[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert layout_of(network) == "channels_last"
    images, labels = to_layout((torch.rand(2, 3, 4, 4), torch.tensor([0, 1])), "channels_last")
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dim() == 1


@pytest.fixture(scope="module")
def channels_last_run(tmp_path_factory, tiny2d):
    """A DAE fitted in float32 with both phases forced channels-last, saved."""
    run = tmp_path_factory.mktemp("layout") / "run"
    engine = {**FP32, "memory_format": "channels_last"}
    detector = get_model("dae", spatial_dims=2, engine=engine).fit(tiny2d.normal, run_dir=run)
    return run, detector


def test_scores_agree_between_layouts(channels_last_run, tiny2d):
    _, detector = channels_last_run
    channels_last = detector.score(tiny2d), detector.anomaly_map(tiny2d)
    detector.set_params(engine={**FP32, "memory_format": "contiguous"})
    try:
        contiguous = detector.score(tiny2d), detector.anomaly_map(tiny2d)
        assert layout_of(detector.network_) == "contiguous"
    finally:
        detector.set_params(engine={**FP32, "memory_format": "channels_last"})
    # float32 convolutions of the two layouts sum in different orders: on this AMD EPYC the
    # scores differed by < 1e-6 relative and the maps by < 1e-6; the tolerances leave room.
    np.testing.assert_allclose(contiguous[0], channels_last[0], rtol=1e-4)
    np.testing.assert_allclose(contiguous[1], channels_last[1], atol=1e-4)


def test_saved_weights_are_float32_and_load_in_any_layout(channels_last_run, tiny2d):
    run, detector = channels_last_run
    with safe_open(str(run / MODEL_FILE), framework="pt") as saved:
        dtypes = {saved.get_tensor(key).dtype for key in saved.keys()}  # noqa: SIM118
    assert dtypes == {torch.float32}
    loaded = BaseDetector.load(run)
    loaded.set_params(engine={**FP32, "memory_format": "contiguous"})
    np.testing.assert_allclose(loaded.score(tiny2d), detector.score(tiny2d), rtol=1e-4)
    assert layout_of(loaded.network_) == "contiguous"


def test_a_network_that_fails_to_compile_runs_uncompiled_with_one_warning(
    monkeypatch, tiny2d, caplog
):
    def failing(module: nn.Module, **kwargs) -> nn.Module:
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", failing)
    monkeypatch.setattr(compiled, "_warned", set())
    engine = {**FP32, "compile": True, "epochs": 1}
    with caplog.at_level(logging.WARNING, logger="medanomaly.training.compiled"):
        detector = get_model("cae", engine=engine).fit(tiny2d.normal)
        detector.score(tiny2d)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("compiled")]
    assert lines == [
        "engine.compile: torch.compile failed for ConvAutoencoder (RuntimeError: no compiler "
        "here): "
        "running it uncompiled"
    ]
    with compiled.strict_compiling(), pytest.raises(ConfigError, match="set engine.compile"):
        get_model("cae", engine=engine).fit(tiny2d.normal)


@pytest.mark.slow
def test_compiled_scoring_scores_as_eager(tiny2d, one_torch_thread):
    """A real ``torch.compile`` (inductor and a C compiler: tens of seconds on 2 cores).

    Scoring only: compiling the training step as well costs minutes on a 2-core machine.
    """
    detector = get_model("cae", engine={**FP32, "epochs": 1}).fit(tiny2d.normal)
    eager = detector.score(tiny2d)
    detector.set_params(engine={**FP32, "epochs": 1, "compile": True})
    compiled_scores = detector.score(tiny2d)
    assert type(detector.__dict__["_compiled_scoring"][2]).__name__ == "OptimizedModule"
    # inductor fuses and reorders float32 arithmetic: equal up to rounding
    np.testing.assert_allclose(compiled_scores, eager, rtol=1e-3)


def test_channels_last_needs_the_margin_to_replace_contiguous():
    assert faster_layout({"contiguous": 1.0, "channels_last": 0.95}) == "contiguous"
    assert faster_layout({"contiguous": 1.0, "channels_last": 0.85}) == "channels_last"
    assert faster_layout({"contiguous": 0.5, "channels_last": 1.0}) == "contiguous"


def test_a_resumed_run_keeps_the_layout_its_checkpoint_recorded(
    timed_layouts, tiny2d, tmp_path, monkeypatch, interrupt_training
):
    """The killed run measured channels-last; the resumed process would measure contiguous."""
    whole = get_model("cae", engine={**FP32, "epochs": 3, "memory_format": "channels_last"})
    whole.fit(tiny2d.normal, run_dir=tmp_path / "whole")

    monkeypatch.setattr(layout, "faster_layout", lambda seconds: "channels_last")
    restore = interrupt_training(3)
    with pytest.raises(KeyboardInterrupt):
        get_model("cae", engine={**FP32, "epochs": 3}).fit(tiny2d.normal, run_dir=tmp_path / "k")
    restore()
    monkeypatch.setattr(layout, "faster_layout", lambda seconds: "contiguous")
    timed_layouts.clear()
    resumed = get_model("cae", engine={**FP32, "epochs": 3})
    resumed.fit(tiny2d.normal, run_dir=tmp_path / "k", resume=True)
    resolved = yaml.safe_load((tmp_path / "k" / CONFIG_FILE).read_text())["resolved"]
    assert resolved["memory_format"]["training"] == "channels_last"
    for key, value in whole.network_.state_dict().items():
        torch.testing.assert_close(resumed.network_.state_dict()[key], value, rtol=0, atol=0)

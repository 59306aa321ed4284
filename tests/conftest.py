"""Shared fixtures: tiny synthetic phantoms, a fast engine and the real-data root."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medanomaly.data.cache import PreprocessCache, Preprocessed
from medanomaly.data.phantoms import make_phantoms
from medanomaly.data.sets import ImageSet
from medanomaly.data.streaming import StreamedSet
from medanomaly.training import layout
from medanomaly.training.engine import Engine
from medanomaly.transforms import FOREGROUND_KEY, LESION_KEY

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data(*parts: str) -> Path:
    """Path under ``../shared/data``; skips the test (naming the folder) when it is absent."""
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (needs ../shared/data beside the repo)")
    return path


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (``<name>_benchmark``)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def untimed_layouts():
    """``engine.memory_format: auto`` means contiguous in tests: no test's speed or rounding
    depends on what a timing on a busy machine chose (tests/test_layout.py times on purpose)."""
    with layout.measuring(False):
        yield


@pytest.fixture
def fast_engine() -> dict:
    """Two quick epochs, no progress bar."""
    return {"epochs": 2, "batch_size": 8, "progress": False, "seed": 0}


@pytest.fixture
def one_torch_thread():
    """Tiny networks train fastest on one thread, and do not stall on a busy 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny2d():
    """12 normal + 6 abnormal 1x32x32 phantoms."""
    return make_phantoms(12, 6, (32, 32), seed=0)


@pytest.fixture(scope="session")
def tiny2d_unseen():
    """Other phantoms like ``tiny2d`` (8 normal + 6 abnormal), for validating and scoring
    models fitted on ``tiny2d.normal`` without their training images."""
    return make_phantoms(8, 6, (32, 32), seed=1)


@pytest.fixture(scope="session")
def tiny2d_val20():
    """A validation set with 20 abnormal phantoms: enough for ``monitor: val_auroc``."""
    return make_phantoms(8, 20, (32, 32), seed=2)


@pytest.fixture(scope="session")
def tiny3d():
    """8 normal + 4 abnormal 1x16x16x16 phantoms."""
    return make_phantoms(8, 4, (16, 16, 16), seed=0)


def streamed_copy(images: ImageSet, folder: Path) -> StreamedSet:
    """The same cases as a :class:`StreamedSet`, stored in a cache under ``folder``."""
    store = PreprocessCache(folder)
    entries = []
    for i in range(len(images)):
        masks = {}
        if images.masks is not None:
            masks[LESION_KEY] = images.masks[i]
        if images.foreground is not None:
            masks[FOREGROUND_KEY] = images.foreground[i]
        entry = store.save(f"case{i:05d}", Preprocessed(images.images[i], masks))
        assert entry is not None
        entries.append(entry)
    return StreamedSet(store, entries, labels=images.labels, ids=images.ids, groups=images.groups)


@pytest.fixture
def to_streamed(tmp_path):
    """``to_streamed(images)``: the cases of an ``ImageSet`` as a streamed set."""
    return lambda images: streamed_copy(images, tmp_path / "streamed")


@pytest.fixture(autouse=True)
def _first_pass_never_switches_on_time(monkeypatch):
    """A first pass without ``num_workers`` stays in this process however long it takes.

    Its automatic switch to worker processes after a few seconds depends on the machine's
    load; no test result may.
    """
    monkeypatch.setattr("medanomaly.data.loading.AUTO_SERIAL_SECONDS", math.inf)


@pytest.fixture
def interrupt_training(monkeypatch: pytest.MonkeyPatch):
    """``interrupt_training(n)``: the n-th epoch any engine runs raises ``KeyboardInterrupt``.

    Returns a function that puts the engine back.
    """

    def interrupt_at(call: int):
        original = Engine._run_epoch
        calls = {"n": 0}

        def crash(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated interruption")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Engine, "_run_epoch", crash)
        return lambda: monkeypatch.setattr(Engine, "_run_epoch", original)

    return interrupt_at

"""The package layout: each layer imports only the layers below it, and nothing is circular."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import medanomaly

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = sorted(info.name for info in pkgutil.iter_modules(medanomaly.__path__) if info.ispkg)
TOP_LEVEL_MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(medanomaly.__path__)
    if not info.ispkg and info.name not in {"__main__"}
)


def test_import_linter_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_imports_alone(package):
    done = subprocess.run(
        [sys.executable, "-c", f"import medanomaly.{package}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_at_most_eight_modules_at_the_top_level():
    assert len(TOP_LEVEL_MODULES) <= 8, TOP_LEVEL_MODULES


def test_every_layer_says_what_it_owns_and_may_import():
    for package in SUBPACKAGES:
        module = __import__(f"medanomaly.{package}", fromlist=["_"])
        assert module.__doc__ and "May import" in module.__doc__, package


def test_public_imports_keep_working():
    from medanomaly import (  # noqa: F401
        AnomalyResult,
        BaseDetector,
        DeepDetector,
        EngineConfig,
        ImageSet,
        MedicalImage,
        get_model,
        list_models,
        load_model,
        read_image,
        register,
    )

    assert "cae" in list_models()


def test_names_of_the_old_evaluation_package_still_import():
    import medanomaly.detectors.thresholds as thresholds
    import medanomaly.metrics as metrics
    from medanomaly import evaluation

    for name in evaluation.__all__:
        home = metrics if hasattr(metrics, name) else thresholds
        assert getattr(evaluation, name) is getattr(home, name), name

"""Does the compare pipeline cost anything? ``compare`` over one candidate against ``cv``.

Both run the same config on the same phantoms (``--n-normal`` normal + ``--n-abnormal``
abnormal 32x32 phantoms, two per patient group) under the same folds (grouped, stratified
k-fold x repeats, validation share 0.2); ``compare`` without its final refit (``--no-refit``),
which ``cv`` does not do either. Prints both wall times and their ratio (target <= 1.1).

    .venv/bin/python benchmarks/compare_overhead.py [--epochs 5] [--folds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_evaluate_cli import write_phantom_manifest  # noqa: E402

from medanomaly.model_selection.compare import compare  # noqa: E402
from medanomaly.model_selection.cv import cross_validate  # noqa: E402
from medanomaly.model_selection.spec import parse_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-normal", type=int, default=60)
    parser.add_argument("--n-abnormal", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="compare_overhead_"))
    manifest = write_phantom_manifest(out / "data", args.n_normal, args.n_abnormal, per_group=2)
    config = {
        "model": {"name": "cae", "spatial_dims": 2, "channels": [8, 16], "latent_channels": 4},
        "engine": {"epochs": args.epochs, "batch_size": 8, "progress": False, "patience": 100},
        "data": {"transforms": [{"min_max": {}}]},
    }
    protocol = {"kind": "kfold", "folds": args.folds, "repeats": args.repeats, "val_fraction": 0.2}
    spec = {
        "data": {"path": str(manifest), **config["data"]},
        "protocol": protocol,
        "level": "image",
        "candidates": {"cae": {"model": config["model"], "engine": config["engine"]}},
    }
    start = time.perf_counter()
    cross_validate(config, manifest, out / "cv", folds=args.folds, repeats=args.repeats)
    cv_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compare(parse_spec(spec, out), out / "compare", refit=False, progress=False)
    compare_seconds = time.perf_counter() - start
    (out / "overhead.yaml").write_text(
        yaml.safe_dump({"cv_seconds": cv_seconds, "compare_seconds": compare_seconds})
    )
    print(
        f"cv {cv_seconds:.1f} s, compare {compare_seconds:.1f} s, "
        f"ratio {compare_seconds / cv_seconds:.2f} (target <= 1.1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

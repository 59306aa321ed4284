"""benchmarks/scale.py: the phantom, the targets and the report, on made-up measurements."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark  # noqa: I001


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("scale")


def _row(n: int, per_case: float, speedup: float, rss: float) -> dict:
    return {
        "n": n,
        "decode_seconds_1_worker": per_case * n,
        "decode_seconds_2_workers": per_case * n / speedup,
        "decode_speedup": speedup,
        "train_epoch_seconds": 0.5 * per_case * n,
        "screen_seconds": 3 * per_case * n + 10,
        "peak_rss_mb": rss,
        "peak_pss_mb": rss * 0.9,
        "cache_mb": 10.3 * n,
    }


def test_phantom_is_ct_like(bench):
    volume = bench.ct_volume(3)
    assert volume.dtype == np.int16 and volume.shape == bench.SHAPE
    assert volume.min() >= -1100 and volume.max() > 100  # air and contrast or bone
    assert (volume > -990).mean() > 0.2  # a body, not an empty field
    assert not np.array_equal(volume, bench.ct_volume(4))


def test_targets_read_linear_time_flat_memory_and_speedup(bench):
    rows = [_row(n, 0.2, 1.8, 2300 + n / 100) for n in (250, 500, 1000)]
    found = bench.targets(rows)
    assert found["linear_time"] and found["rss_within_3_gb"]
    assert found["decode_speedup_target_met"]
    assert all(0.85 <= b <= 1.15 for b in found["time_exponent"].values())
    quadratic = [dict(r, screen_seconds=r["n"] ** 2 / 1e3) for r in rows]
    assert not bench.targets(quadratic)["linear_time"]
    slow = [dict(r, decode_speedup=1.4) for r in rows]
    assert not bench.targets(slow)["decode_speedup_target_met"]


def test_report_states_targets_and_ceiling(bench):
    rows = [_row(n, 0.2, 1.5, 2500) for n in (250, 500)]
    extra = {
        "machine": {
            "cores": 2,
            "torch": "x",
            "torch_threads": 2,
            "load_average_at_start": [0, 0, 0],
        },
        "model": bench.MODEL,
        "flops": {"train_gflop_per_volume": 0.8, "score_gflop_per_volume": 3.6},
        "parallel_ceiling": {"decode_speedup": 1.55, "arithmetic_speedup": 1.98},
    }
    text = bench.markdown(rows, bench.targets(rows), extra)
    assert "| 500 | 100.0 s | 66.7 s | 1.50x |" in text
    assert "target 1.7x: missed" in text and "target <= 3072 MB: met" in text
    assert "decode in memory 1.55x, pure-Python arithmetic 1.98x" in text


def test_the_ceilings_decode_is_the_first_pass_without_its_cache(bench, tmp_path):
    """The ceiling's in-memory decode does the first pass's work: same read, same transforms."""
    from medanomaly.data.loading import load_dataset

    path = tmp_path / "volumes" / "ct.nii.gz"
    path.parent.mkdir()
    bench._write_volume((0, str(path)))
    first_pass, _ = load_dataset(path.parent, transforms=bench.TRANSFORMS, num_workers=0)
    expected = float(first_pass.images[0].astype(np.float64).mean())
    assert bench._decode_in_memory(str(path)) == pytest.approx(expected, rel=1e-5)

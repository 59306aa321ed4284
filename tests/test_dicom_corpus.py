"""`medanomaly inspect` over every file of pydicom's test files (benchmarks/dicom_corpus.py).

Counts are printed with ``pytest -s``; the script prints them on its own too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dicom_corpus.py"

# Files that hold pixel data and are still refused, and what must be named in the reason.
REFUSED_WITH_PIXELS = {
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000 Image Compression",  # corrupt J2K
    "MR_truncated.dcm": "less than expected",  # truncated pixel data
    "badVR.dcm": "NumberOfFrames (0028,0008)",  # the tag at fault
    "meta_missing_tsyntax.dcm": "no Rows/Columns",  # 2 bytes of pixel data, no image
    "nested_priv_SQ.dcm": "no Rows/Columns",
}


@pytest.fixture(scope="module")
def survey():
    spec = importlib.util.spec_from_file_location("dicom_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    outcomes, stderr = module.survey()
    summary = module.counts(outcomes, stderr)
    print(summary)
    return outcomes, stderr, summary


def test_inspect_prints_no_traceback_over_the_whole_corpus(survey) -> None:
    outcomes, stderr, summary = survey
    assert summary["files"] == len(outcomes) > 150
    assert summary["tracebacks"] == 0 and stderr == ""


def test_every_file_with_pixel_data_is_read_or_refused_for_a_named_reason(survey) -> None:
    outcomes, _, summary = survey
    refused = {o.name: o.reason for o in outcomes if o.has_pixels and not o.read}
    assert set(refused) == set(REFUSED_WITH_PIXELS)
    for name, needle in REFUSED_WITH_PIXELS.items():
        assert needle in refused[name] and "\n" not in refused[name]
    assert summary["dcm_read"] == 59  # 44 before issue 15


def test_every_refusal_is_one_line_that_does_not_repeat_the_path(survey) -> None:
    outcomes, _, _ = survey
    for outcome in outcomes:
        assert outcome.read or (outcome.reason and outcome.name not in outcome.reason)

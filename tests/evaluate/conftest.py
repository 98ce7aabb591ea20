"""Fixtures of the evaluation tests: those of tests/segment (tiny synthetic tissue, a segmenter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "segment_test_fixtures", Path(__file__).parents[1] / "segment" / "conftest.py")
_segment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_segment)

toy = _segment.toy
toy_dataset = _segment.toy_dataset
multiclass_folder = _segment.multiclass_folder

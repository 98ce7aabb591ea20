"""scripts/evaluate_default.py: the caption summary sets the generating caption's glomerular pixels beside the
empty caption's (what the model draws unasked)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from histosynth.captions import GENERATING_CAPTION
from histosynth.evaluate.caption_accuracy import judge, write_caption_accuracy_report
from histosynth.schema import RENAL

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GLOMERULI, TUBULI = RENAL.id_of("Glomeruli"), RENAL.id_of("Tubuli")


@pytest.fixture
def evaluate_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("evaluate_default")


def caption_report(out: Path, glomerular_rows: list[int], caption: str) -> Path:
    """A caption-accuracy report of 100x100 masks, each with its number of glomerular rows above 30 Tubuli rows."""
    masks = []
    for rows in glomerular_rows:
        mask = np.zeros((100, 100), dtype=np.uint8)
        mask[:rows] = GLOMERULI
        mask[rows:rows + 30] = TUBULI
        masks.append(mask)
    write_caption_accuracy_report(judge(masks, [caption] * len(masks), RENAL), out, coverage="full",
                                  caption_source="test", segmenter="exact")
    return out


def test_glomerular_pixels_are_the_mean_share_over_the_images(evaluate_default, tmp_path: Path):
    report = caption_report(tmp_path / "captions", [50, 30, 10, 0], GENERATING_CAPTION)
    assert evaluate_default.glomerular_pixels(report) == pytest.approx(22.5)


def test_the_caption_summary_sets_the_empty_caption_beside_the_generating_caption(evaluate_default, tmp_path: Path):
    captions = caption_report(tmp_path / "captions", [50, 50, 30, 0], GENERATING_CAPTION)
    empty = caption_report(tmp_path / "empty-caption", [0, 10, 0, 0, 0], "")
    lines = evaluate_default.caption_summary(captions, empty)
    assert "- images that mention glomeruli: **75.0 %** (thesis 91.3 %; target >= 95 %)" in lines
    assert "- 'Glomeruli high' found: **50.0 %** of images (thesis 0.5 %: 100x)" in lines
    assert "- Tubuli found at the requested 'medium': 100.0 % (target >= 50 %)" in lines
    assert ("- glomerular pixels: **32.5 %** of the generating caption's images against 2.0 % of 5 images of the "
            "empty caption (what the model draws unasked; there 20.0 % mention glomeruli, 0.0 % at "
            "'Glomeruli high')") in lines
    # without an empty-caption report (an evaluation made before it existed) the line is left out
    assert not any("empty caption" in line for line in evaluate_default.caption_summary(captions, tmp_path / "none"))

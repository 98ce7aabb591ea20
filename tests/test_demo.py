"""The demo runs end to end on small settings and resumes without redoing finished stages."""

from __future__ import annotations

from histosynth.captions import parse_caption
from histosynth.defaults import default_bundle_path, default_mask_bundle_path
from histosynth.demo import DemoSettings, run_demo
from histosynth.errors import ModelError


def ships(default_path) -> bool:
    try:
        default_path()
    except ModelError:
        return False
    return True


def test_demo_end_to_end_small(tmp_path):
    settings = DemoSettings(slides=2, slide_size=768, sheet_patches=4, generated_per_caption=1,
                            generated_from_masks=2, steps=2)
    result = run_demo(tmp_path / "demo", settings, progress=False)
    assert len(result.dataset) > 4
    assert set(result.dataset.manifest["slide"]) == {"phantom-0", "phantom-1"}
    for caption in result.dataset.manifest["caption"]:
        parse_caption(caption)  # every caption follows the rules
    assert result.sheet.stat().st_size > 10_000
    html = result.report.read_text()
    assert "contact_sheet.png" in html and f"{len(result.dataset)} patches" in html
    assert (result.generation.sheet is not None) == ships(default_bundle_path)
    if result.generation.sheet is not None:
        assert result.generation.sheet.stat().st_size > 10_000
        assert "caption accuracy (Table 5.1 form)" in html and "% mention glomeruli" in html
    assert (result.from_masks.sheet is not None) == ships(default_mask_bundle_path)
    if result.from_masks.sheet is not None:
        assert result.from_masks.sheet.stat().st_size > 10_000
        assert "label fidelity" in html and "mean Dice" in html
    else:
        assert "generation from masks skipped" in html

    slide_file = tmp_path / "demo" / "slides" / "phantom-0.tif"
    mtime = slide_file.stat().st_mtime_ns
    again = run_demo(tmp_path / "demo", settings, progress=False)
    assert slide_file.stat().st_mtime_ns == mtime  # finished stages are not redone
    assert len(again.dataset) == len(result.dataset)

"""Paired synthetic slides: `synth-slide --mask-slide` follows a label-mask slide and writes it beside the slide."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tiffslide

from histosynth.cli import main
from histosynth.data.pyramid import write_pyramid_tiff
from histosynth.errors import ConfigError, ModelError
from histosynth.models.bundle import load_bundle
from histosynth.sample.generate import SamplingOptions
from histosynth.sample.slides import synth_slide

_spec = importlib.util.spec_from_file_location("maskmodels", Path(__file__).with_name("maskmodels.py"))
maskmodels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maskmodels)

WIDTH, HEIGHT = 256, 192


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mask_bundle_path(tmp_path_factory):
    return maskmodels.make_mask_bundle(tmp_path_factory.mktemp("models") / "mask")


def slide_mask() -> np.ndarray:
    """Other tissue, a band of tubuli, a few glomeruli and a white corner."""
    mask = np.full((HEIGHT, WIDTH), 6, np.uint8)
    mask[:, 160:200] = 3
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for cy, cx in ((40, 50), (130, 90), (100, 230)):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 22**2] = 4
    mask[:24, :32] = 0
    return mask


@pytest.fixture(scope="module")
def mask_slide_path(tmp_path_factory):
    return write_pyramid_tiff(tmp_path_factory.mktemp("masks") / "layout.tif", slide_mask(), mpp=0.25, is_mask=True)


@pytest.fixture(scope="module")
def paired(mask_bundle_path, mask_slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    args = ["synth-slide", "--model", str(mask_bundle_path), "--mask-slide", str(mask_slide_path), "--steps", "2",
            "--seed", "3", "--mask-guidance", "2"]
    assert main([*args, "--out", str(out)]) == 0
    # the label map kept on disk beside the latent, read from the mask slide a band at a time: the same slide
    on_disk = out.with_name("on-disk.tif")
    assert main([*args, "--out", str(on_disk), "--latent-store", "disk"]) == 0
    assert on_disk.read_bytes() == out.read_bytes()
    return out


def test_the_paired_slide_and_its_mask_open_in_openslide(paired):
    with openslide.OpenSlide(paired) as slide:
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)  # the mask's
        image = np.asarray(slide.read_region((0, 0), 0, (WIDTH, HEIGHT)))[..., :3]
    assert image.std() > 5
    mask_path = paired.with_name("synthetic-mask.tif")
    with openslide.OpenSlide(mask_path) as slide:
        assert slide.dimensions == (WIDTH, HEIGHT)
    with tiffslide.TiffSlide(mask_path) as slide:
        stored = np.asarray(slide.read_region((0, 0), 0, (WIDTH, HEIGHT), as_array=True))
    np.testing.assert_array_equal(stored if stored.ndim == 2 else stored[..., 0], slide_mask())
    record = json.loads(paired.with_suffix(".json").read_text())
    assert (record["mask"], record["mask_guidance"], record["caption"], record["mode"]) == \
        ("synthetic-mask.tif", 2.0, "", "seamless")
    assert (record["width"], record["height"]) == (WIDTH, HEIGHT)


def test_the_slide_follows_its_mask_window_by_window(mask_bundle_path, mask_slide_path, paired, tmp_path):
    """A window of the slide is what its crop of the mask asks for: another mask slide, another slide there."""
    other = slide_mask()
    other[:96, :128] = 3  # the top-left quarter: tubuli instead of glomeruli and tissue
    other_path = write_pyramid_tiff(tmp_path / "other.tif", other, mpp=0.25, is_mask=True)
    out = tmp_path / "other-slide.tif"
    bundle = load_bundle(mask_bundle_path)
    synth_slide(bundle, "", None, out, mpp=None, seed=3, options=SamplingOptions(steps=2, mask_guidance=2.0),
                mask_slide=other_path)
    with tiffslide.TiffSlide(paired) as a, tiffslide.TiffSlide(out) as b:
        first = np.asarray(a.read_region((0, 0), 0, (WIDTH, HEIGHT), as_array=True))[..., :3].astype(int)
        second = np.asarray(b.read_region((0, 0), 0, (WIDTH, HEIGHT), as_array=True))[..., :3].astype(int)
    changed = np.abs(first - second).mean(axis=2)
    # far from the edit (beyond the windows that overlap it) the slides differ only through the
    # decoder's attention, which sees the whole 256 px tile
    assert changed[:80, :110].mean() > 3 * changed[:, 216:].mean()


def test_paired_slides_refuse_what_they_cannot_make(mask_bundle_path, tiny_bundle, mask_slide_path, tmp_path):
    bundle = load_bundle(mask_bundle_path)
    options = SamplingOptions(steps=1)
    with pytest.raises(ConfigError, match="generated seamless; use the seamless mode"):
        synth_slide(bundle, "", None, tmp_path / "a.tif", "stitched", options=options, mask_slide=mask_slide_path)
    with pytest.raises(ConfigError, match=r"takes the size of its mask slide \(256x192 px\); leave out the size"):
        synth_slide(bundle, "", 256, tmp_path / "a.tif", options=options, mask_slide=mask_slide_path)
    with pytest.raises(ModelError, match="is not mask-conditioned"):
        synth_slide(tiny_bundle, "", None, tmp_path / "a.tif", options=options, mask_slide=mask_slide_path)
    assert not list(tmp_path.glob("a*"))

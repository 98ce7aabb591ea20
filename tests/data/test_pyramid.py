"""Pyramidal TIFF writing: both readers see the same exact-halving pyramid, mpp and pixels."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from histosynth.data import pyramid
from histosynth.data.pyramid import TileSource, padded_size, pyramid_halvings, write_pyramid_tiff
from histosynth.errors import DataError

READERS = [openslide.OpenSlide, tiffslide.TiffSlide]


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """Gradients JPEG keeps well, so read-back pixels can be held to a tight tolerance."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height) + 64],
                    axis=-1).astype(np.uint8)


def random_labels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8, (height, width), dtype=np.uint8)


def region(slide, level: int, width: int, height: int) -> np.ndarray:
    pixels = np.asarray(slide.read_region((0, 0), level, (width, height)))
    return pixels[..., :3] if pixels.ndim == 3 else pixels


def test_halvings_and_padding_follow_the_tile_size():
    assert pyramid_halvings(256, 256) == 0
    assert pyramid_halvings(257, 100) == 1
    assert pyramid_halvings(1001, 1500) == 3
    assert padded_size(1001, 1500) == (1008, 1504)
    assert padded_size(200, 300) == (200, 300)
    assert padded_size(301, 20) == (302, 20)


@pytest.mark.parametrize("reader", READERS, ids=["openslide", "tiffslide"])
def test_rgb_pyramid_opens_with_exact_halves_and_mpp(tmp_path, reader):
    image = smooth_rgb(1001, 1500)
    path = write_pyramid_tiff(tmp_path / "slide.tif", image, mpp=0.25)
    with reader(str(path)) as slide:
        assert slide.level_dimensions == ((1504, 1008), (752, 504), (376, 252), (188, 126))
        assert tuple(slide.level_downsamples) == (1.0, 2.0, 4.0, 8.0)
        prefix = "openslide" if reader is openslide.OpenSlide else "tiffslide"
        assert float(slide.properties[f"{prefix}.mpp-x"]) == pytest.approx(0.25)
        assert float(slide.properties[f"{prefix}.mpp-y"]) == pytest.approx(0.25)
        level0 = region(slide, 0, 1504, 1008).astype(int)
        assert np.abs(level0[:1001, :1500] - image).mean() < 1.5
        assert level0[1001:].mean() > 245 and level0[:, 1500:].mean() > 245  # white padding
        level1 = region(slide, 1, 752, 504).astype(int)
        halved = image[:1000].reshape(500, 2, 750, 2, 3).mean(axis=(1, 3))
        assert np.abs(level1[:500, :750] - halved).mean() < 1.5


def test_both_readers_return_identical_pixels(tmp_path):
    path = write_pyramid_tiff(tmp_path / "slide.tif", smooth_rgb(700, 900), mpp=0.5)
    with openslide.OpenSlide(str(path)) as a, tiffslide.TiffSlide(str(path)) as b:
        for level in range(a.level_count):
            width, height = a.level_dimensions[level]
            np.testing.assert_array_equal(region(a, level, width, height), region(b, level, width, height))


@pytest.mark.parametrize("reader", READERS, ids=["openslide", "tiffslide"])
def test_mask_levels_are_lossless_nearest_neighbour(tmp_path, reader):
    labels = random_labels(1001, 1500)
    path = write_pyramid_tiff(tmp_path / "mask.tif", labels, mpp=0.25, is_mask=True)
    padded = np.zeros((1008, 1504), dtype=np.uint8)
    padded[:1001, :1500] = labels
    with reader(str(path)) as slide:
        assert len(slide.level_dimensions) == 4
        for level, (width, height) in enumerate(slide.level_dimensions):
            read = region(slide, level, width, height)
            ids = read[..., 0] if read.ndim == 3 else read
            step = 2**level
            np.testing.assert_array_equal(ids, padded[::step, ::step])


def test_streamed_sources_write_the_same_pixels_as_an_array(tmp_path):
    image = smooth_rgb(1001, 1500)
    from_array = write_pyramid_tiff(tmp_path / "array.tif", image, mpp=0.5)
    bands = (image[top:top + 77] for top in range(0, 1001, 77))
    from_bands = write_pyramid_tiff(tmp_path / "bands.tif", TileSource.from_bands(1001, 1500, bands), mpp=0.5)
    reads = []
    from_reader = write_pyramid_tiff(
        tmp_path / "reader.tif",
        TileSource(1001, 1500, lambda x, y, w, h: reads.append((x, y, w, h)) or image[y:y + h, x:x + w]),
        mpp=0.5,
    )
    assert reads == [(0, top, 1500, min(256, 1001 - top)) for top in range(0, 1001, 256)]
    with tifffile.TiffFile(from_array) as a, tifffile.TiffFile(from_bands) as b, tifffile.TiffFile(from_reader) as c:
        assert len(a.pages) == len(b.pages) == len(c.pages) == 4
        for pa, pb, pc in zip(a.pages, b.pages, c.pages, strict=True):
            np.testing.assert_array_equal(pa.asarray(), pb.asarray())
            np.testing.assert_array_equal(pa.asarray(), pc.asarray())


def test_large_levels_go_through_scratch_files_and_bigtiff(tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid, "_IN_MEMORY_BYTES", 1000)
    monkeypatch.setattr(pyramid, "_BIGTIFF_BYTES", 1000)
    labels = random_labels(600, 520, seed=1)
    path = write_pyramid_tiff(tmp_path / "mask.tif", labels, mpp=1.0, is_mask=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    for reader in READERS:
        with reader(str(path)) as slide:
            width, height = slide.level_dimensions[1]
            read = region(slide, 1, width, height)
            np.testing.assert_array_equal(read[..., 0] if read.ndim == 3 else read, labels[::2, ::2])


def test_failed_write_leaves_nothing_behind(tmp_path):
    image = smooth_rgb(1000, 600)

    def failing(x, y, w, h):
        if y >= 512:
            raise RuntimeError("renderer crashed")
        return image[y:y + h, x:x + w]

    with pytest.raises(RuntimeError):
        write_pyramid_tiff(tmp_path / "slide.tif", TileSource(1000, 600, failing), mpp=0.5)
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"expected a uint8 \(H, W, 3\) RGB image, got float64"):
        write_pyramid_tiff(tmp_path / "a.tif", np.zeros((10, 10, 3)), mpp=0.5)
    with pytest.raises(DataError, match=r"expected a uint8 \(H, W\) label ids image"):
        write_pyramid_tiff(tmp_path / "b.tif", np.zeros((10, 10, 3), np.uint8), mpp=0.5, is_mask=True)
    with pytest.raises(DataError, match="microns per pixel must be above 0, got 0"):
        write_pyramid_tiff(tmp_path / "c.tif", np.zeros((10, 10, 3), np.uint8), mpp=0)
    wrong = TileSource(300, 300, lambda x, y, w, h: np.zeros((h, w), np.uint8))
    with pytest.raises(DataError, match=r"returned uint8 \(256, 300\) for rows 0-256; expected uint8 \(256, 300, 3\)"):
        write_pyramid_tiff(tmp_path / "d.tif", wrong, mpp=0.5)
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    leftovers = [tmp_path / ".slide.tif.abcdefgh.part.tif", tmp_path / ".slide.tif.pyramid-k3j9x_2a"]
    leftovers[0].write_bytes(b"II*\x00half")
    leftovers[1].mkdir()
    (leftovers[1] / "level1.npy").write_bytes(b"half")
    kept = [tmp_path / ".other.tif.abcdefgh.part.tif", tmp_path / ".other.tif.pyramid-abcdefgh",
            tmp_path / ".pyramid-notes", tmp_path / "slide.tif.bak"]
    for path in kept:
        path.write_bytes(b"mine")
    write_pyramid_tiff(tmp_path / "slide.tif", smooth_rgb(300, 200), mpp=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["slide.tif", *[p.name for p in kept]])
    assert all(path.read_bytes() == b"mine" for path in kept)


@pytest.mark.parametrize("mpp, message", [(float("nan"), "must be a finite number, got nan"),
                                          (float("inf"), "must be a finite number, got inf"),
                                          (-1.0, "must be above 0, got -1.0")])
def test_non_finite_resolutions_are_refused_before_writing(tmp_path, mpp, message):
    with pytest.raises(DataError, match=f"a.tif: microns per pixel {message}"):
        write_pyramid_tiff(tmp_path / "a.tif", np.zeros((10, 10, 3), np.uint8), mpp=mpp)
    assert list(tmp_path.iterdir()) == []

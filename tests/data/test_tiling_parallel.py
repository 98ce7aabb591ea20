"""Tiling several slides at once (--workers) and across machines (--shard): the same dataset as one process."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from histosynth.cli import main
from histosynth.data.dataset import PatchDatasetWriter, open_dataset
from histosynth.data.pyramid import write_pyramid_tiff
from histosynth.data.slides import open_mask_slide, open_slide
from histosynth.data.tiling import SlideInput, TilingOptions, TilingStopped, slides_of_shard, tile_slide, tile_slides
from histosynth.errors import ConfigError
from histosynth.parallel import Shard
from histosynth.schema import RENAL

OPTIONS = TilingOptions(mpp=0.5, size=64)
NAMES = ("s1", "s2", "s3")
GLASS = (236, 236, 236)
STAIN = {3: (190, 90, 170), 4: (140, 50, 150), 6: (230, 150, 190), 7: (240, 190, 225)}


def slide_pixels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 512 x 448 px slide at 0.25 µm/px: tissue rectangles of four classes on glass, and its mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((448, 512), dtype=np.uint8)
    mask[40:420, 30 + 10 * seed:480] = 6
    for class_id in (3, 4, 7, 3):
        x, y = rng.integers(30, 330, 2)
        mask[y:y + rng.integers(40, 120), x:x + rng.integers(40, 160)] = class_id
    palette = np.array([STAIN.get(i, GLASS) for i in range(8)], dtype=np.int16)
    image = (palette[mask] + rng.integers(-8, 9, mask.shape + (3,))).clip(0, 255).astype(np.uint8)
    return image, mask


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[SlideInput]:
    folder = tmp_path_factory.mktemp("slides")
    inputs = []
    for seed, name in enumerate(NAMES):
        image, mask = slide_pixels(seed)
        write_pyramid_tiff(folder / f"{name}.tif", image, mpp=0.25)
        write_pyramid_tiff(folder / f"{name}_mask.tif", mask, mpp=0.25, is_mask=True)
        inputs.append(SlideInput(folder / f"{name}.tif", mask=folder / f"{name}_mask.tif"))
    return inputs


@pytest.fixture(scope="module")
def one_process(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "ds"
    tile_slides(slides, out, options=OPTIONS, progress=False, workers=1)
    return out


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_workers_write_the_dataset_of_one_process(slides, one_process, tmp_path):
    result = tile_slides(slides, tmp_path / "ds", options=OPTIONS, progress=False, workers=2)
    assert list(result.tiled) == list(NAMES) and all(count > 5 for count in result.tiled.values())
    assert files(tmp_path / "ds") == files(one_process)  # every PNG, manifest, summary and dataset.json
    assert result.dataset.manifest.equals(open_dataset(one_process).manifest)


def test_two_shards_write_the_dataset_of_one_process(slides, one_process, tmp_path):
    out = tmp_path / "ds"
    first = tile_slides(slides, out, options=OPTIONS, progress=False, shard=Shard(0, 2))
    # Shard 0 of 2 takes the first and third slide in name order; the second is shard 1's.
    assert list(first.tiled) == ["s1", "s3"] and first.waiting == ["s2"] and first.dataset is None
    assert not (out / "manifest.csv").exists()
    second = tile_slides(slides[::-1], out, options=OPTIONS, progress=False, workers=2, shard=Shard(1, 2))
    assert list(second.tiled) == ["s2"] and second.waiting == [] and second.skipped == []
    assert files(out) == files(one_process)
    assert second.dataset.manifest.equals(open_dataset(one_process).manifest)


def test_a_killed_shard_redoes_its_slide_and_leaves_the_other_shards_alone(slides, one_process, tmp_path):
    out = tmp_path / "ds"
    tile_slides(slides, out, options=OPTIONS, progress=False, shard=Shard(0, 2))
    tile_slides(slides, out, options=OPTIONS, progress=False, shard=Shard(1, 2))
    (out / "slides" / "s2.json").unlink()  # shard 1 killed before s2 was finished
    (out / "images" / "s2" / "s2_000999.png").write_bytes(b"half")
    others = {path: data for path, data in files(out).items() if "s2" not in path and path != "manifest.csv"}
    again = tile_slides(slides, out, options=OPTIONS, progress=False, shard=Shard(1, 2))
    assert list(again.tiled) == ["s2"]
    assert {path: data for path, data in files(out).items() if path in others} == others
    assert files(out) == files(one_process)


def test_a_stopped_slide_is_left_unfinished_and_redone_by_the_next_run(slides, one_process, tmp_path):
    out = tmp_path / "ds"
    writer = PatchDatasetWriter(out, RENAL, OPTIONS.size, extra_info={"tiling": OPTIONS.as_info()})
    stop = threading.Event()
    stop.set()  # as an interrupt does while slides are tiled
    with pytest.raises(TilingStopped, match="stopped before the slide was finished"):
        tile_slide(writer, slides[0], RENAL, OPTIONS, "train", stop=stop)
    assert not (out / "slides" / "s1.json").exists()
    assert list(tile_slides(slides, out, options=OPTIONS, progress=False).tiled) == list(NAMES)
    assert files(out) == files(one_process)


def test_patches_are_the_slide_regions_pixel_for_pixel(slides, one_process):
    dataset = open_dataset(one_process)
    assert set(dataset.manifest["level"]) == {1}  # 0.5 µm/px is level 1 of these 0.25 µm/px slides
    for item in slides:
        rows = dataset.manifest[dataset.manifest["slide"] == item.name]
        with open_slide(item.slide) as slide, open_mask_slide(item.mask) as mask:
            for _, row in rows.iterrows():
                x, y = int(row["x"]), int(row["y"])
                np.testing.assert_array_equal(dataset.image(row), slide.read_region(x, y, 1, 64, 64))
                np.testing.assert_array_equal(dataset.mask(row), mask.read_region(x, y, 1, 64, 64))


@pytest.mark.parametrize("value", ["2/2", "3/2", "x", "1/0", "2", "-1/2"])
def test_bad_shards_are_refused_in_one_line(slides, tmp_path, refused, value):
    error = refused(["tile", str(slides[0].slide), "--out", str(tmp_path / "ds"), "--shard", value])
    assert error.startswith(("error: shard ", "error: --shard expects i/n such as 0/4, got "))
    assert error.endswith(("does not exist; use i/n with 0 <= i < n", "'"))
    assert not (tmp_path / "ds").exists()


def test_zero_workers_are_refused_in_one_line(slides, tmp_path, refused):
    error = refused(["tile", str(slides[0].slide), "--out", str(tmp_path / "ds"), "--workers", "0"])
    assert error == "error: --workers must be at least 1, got 0"
    assert not (tmp_path / "ds").exists()


def test_shards_split_any_slide_list_in_name_order():
    inputs = [SlideInput(f"/data/{name}.svs") for name in ("e", "a", "d", "b", "c")]
    picked = [[item.name for item in slides_of_shard(Shard(i, 2), inputs)] for i in (0, 1)]
    assert picked == [["e", "a", "c"], ["d", "b"]]  # a, c, e and b, d, in the order given
    assert Shard.parse(" 2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    with pytest.raises(ConfigError, match="shard 1/1 does not exist"):
        Shard(1, 1)


def test_the_cli_says_which_shard_writes_the_manifest(slides, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["tile", *[str(item.slide) for item in slides], *[a for item in slides for a in ("--masks", str(item.mask))],
            "--mpp", "0.5", "--size", "64", "--out", str(out), "--no-progress"]
    assert main([*args, "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("s2: ") and lines[1].startswith("shard 1/2 done; other shards have 2 of 3 slides")
    assert main([*args, "--shard", "0/2", "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"{len(open_dataset(out))} patches in {out}"

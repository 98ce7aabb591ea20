"""The renal phantom: determinism, exact masks, class-mix control, stain realism, slides and CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage
from skimage.morphology import disk

from histosynth.captions import caption_for_mask, prevalence_levels, prevalences
from histosynth.cli import main
from histosynth.data.dataset import open_dataset
from histosynth.data.masks import read_mask
from histosynth.data.phantom import (
    MIXES,
    PhantomMix,
    PhantomSlide,
    Stain,
    phantom_patch,
    phantom_patch_mask,
    phantom_slide,
    resolve_mix,
    with_shares,
)
from histosynth.data.phantom.export import phantom_seed, slide_splits
from histosynth.data.phantom.render import render_window
from histosynth.errors import ConfigError, DataError
from histosynth.schema import RENAL, RENAL_PIXEL_SHARES

GLOMERULI, SCLEROTIC, ARTERIES, DILATED, TUBULI = 4, 5, 1, 7, 3


# --- determinism and masks ------------------------------------------------------------------------

def test_same_seed_gives_identical_arrays_and_other_seeds_differ():
    image, mask = phantom_patch(11, 128)
    again_image, again_mask = phantom_patch(11, 128)
    other_image, _ = phantom_patch(12, 128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == np.uint8
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(mask, again_mask)
    assert np.abs(image.astype(int) - other_image.astype(int)).mean() > 10


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_masks_hold_only_schema_ids_and_match_the_image_call(mix):
    mask = phantom_patch_mask(3, 96, mix)
    assert set(np.unique(mask)) <= set(RENAL.ids)
    RENAL.check_mask(mask)
    if mix in ("default", "glomeruli-rich"):
        _, rendered_mask = phantom_patch(3, 96, mix)
        np.testing.assert_array_equal(mask, rendered_mask)


def test_a_default_patch_is_tissue_made_of_tubuli_and_interstitium():
    mask = phantom_patch_mask(0)
    shares = prevalences(mask)
    assert shares[TUBULI] > 0.2 and shares[6] > 0.1
    assert shares[0] == 0.0


# --- class mix ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_glomeruli_rich_patches_have_a_lot_of_glomeruli(seed):
    mask = phantom_patch_mask(seed, 256, "glomeruli-rich")
    assert prevalences(mask)[GLOMERULI] >= 0.4
    assert "There is a lot of Glomeruli visible in the image." in caption_for_mask(mask).splitlines()


@pytest.mark.parametrize("mix, class_id", [("sclerotic-rich", SCLEROTIC), ("arteries-rich", ARTERIES),
                                           ("dilated-rich", DILATED)])
def test_focus_mixes_centre_their_class(mix, class_id):
    for seed in range(2):
        assert prevalences(phantom_patch_mask(seed, 256, mix))[class_id] >= 0.4


def test_glomeruli_rich_holds_for_large_patches_and_coarse_resolution():
    assert prevalences(phantom_patch_mask(5, 512, "glomeruli-rich"))[GLOMERULI] >= 0.4
    assert prevalences(phantom_patch_mask(5, 256, "glomeruli-rich", mpp=1.0))[GLOMERULI] >= 0.4


def test_generating_mix_mostly_states_the_generating_caption_levels():
    levels = [prevalence_levels(phantom_patch_mask(seed, 256, "generating")) for seed in range(20)]
    assert all(level["Glomeruli"].value == "high" for level in levels)
    assert sum(level["Tubuli"].value == "medium" for level in levels) >= 12


def test_default_mix_follows_the_thesis_shares_over_many_patches():
    shares = np.mean([list(prevalences(phantom_patch_mask(seed, 256)).values()) for seed in range(240)], axis=0)
    for class_id, target in RENAL_PIXEL_SHARES.items():
        tolerance = 0.03 if target > 0.1 else 0.01
        assert abs(shares[class_id] - target) <= tolerance, (class_id, shares[class_id], target)
    # "a lot of Glomeruli" is rare, as in the thesis data
    high = sum(prevalences(phantom_patch_mask(seed, 256))[GLOMERULI] >= 0.4 for seed in range(60))
    assert high <= 3


def test_shares_can_be_changed():
    more_tubuli = with_shares(resolve_mix(None), tubuli=0.62, dilated=0.02)
    dense = np.mean([prevalences(phantom_patch_mask(s, 256, more_tubuli))[TUBULI] for s in range(12)])
    sparse = np.mean([prevalences(phantom_patch_mask(s, 256, with_shares(more_tubuli, tubuli=0.2)))[TUBULI]
                      for s in range(12)])
    assert dense > 0.5 > 0.3 > sparse


def test_bad_mixes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown phantom mix 'glomerulus'.*glomeruli-rich"):
        resolve_mix("glomerulus")
    with pytest.raises(ConfigError, match="shares can be set for classes"):
        PhantomMix(name="x", shares={6: 0.5})
    with pytest.raises(ConfigError, match="leave room for interstitium"):
        PhantomMix(name="x", shares={3: 0.9, 7: 0.1})
    with pytest.raises(ConfigError, match="focus must be one of"):
        PhantomMix(name="x", shares={}, focus=3)
    with pytest.raises(ConfigError, match="unknown share 'glomerulus'"):
        with_shares(resolve_mix(None), glomerulus=0.3)


# --- the look: stains, nuclei, variation ----------------------------------------------------------

def test_no_class_is_a_flat_colour():
    image, mask = phantom_patch(4, 256, "glomeruli-rich")
    for class_id in np.unique(mask):
        pixels = image[mask == class_id].astype(float)
        if len(pixels) > 500:
            assert pixels.std(axis=0).max() > 8, class_id


def test_glomeruli_carry_more_hematoxylin_than_tubule_lumina_and_glass():
    stain = Stain.reference()
    glomerular, dilated = [], []
    for seed in range(2):
        image, mask = phantom_patch(seed, 256, "glomeruli-rich")
        h, _ = stain.separate(image)
        glomerular.append(h[mask == GLOMERULI].mean())
        image, mask = phantom_patch(seed, 256, "dilated-rich")
        h, _ = stain.separate(image)
        dilated.append(h[mask == DILATED].mean())   # mostly lumen
    assert min(glomerular) > 2.5 * max(dilated)
    image, mask = phantom_slide(1, 256, 256, mpp=2.0)
    h, e = stain.separate(image)
    assert abs(h[mask == 0].mean()) < 0.05 and abs(e[mask == 0].mean()) < 0.05


def test_separate_inverts_the_stain_model():
    stain = Stain.random(np.random.default_rng(3))
    h = np.array([[0.0, 0.4, 1.0]], dtype=np.float32)
    e = np.array([[0.0, 0.6, 0.2]], dtype=np.float32)
    got_h, got_e = stain.separate(stain.to_rgb(h, e))
    np.testing.assert_allclose(got_h, h, atol=0.02)
    np.testing.assert_allclose(got_e, e, atol=0.02)


def test_stain_varies_from_slide_to_slide():
    stains = [PhantomSlide.create(seed, 256, 256).stain for seed in range(4)]
    strengths = {(round(s.hematoxylin_strength, 3), round(s.eosin_strength, 3)) for s in stains}
    assert len(strengths) == 4
    # the same tissue under two slides' stains: same mask, visibly different colour
    slide = PhantomSlide.create(0, 256, 256, mpp=1.0)
    colours = []
    for stain in stains:
        image, mask = render_window(slide.layout, stain, 0, 0, 256, 256)
        colours.append(image[mask > 0].reshape(-1, 3).mean(axis=0))
    spread = np.ptp(colours, axis=0)
    assert spread.max() > 8, spread


# --- slides ---------------------------------------------------------------------------------------

def test_slide_regions_agree_wherever_they_overlap():
    slide = PhantomSlide.create(5, 700, 600)
    whole_image, whole_mask = slide.read_region(0, 0, 700, 600)
    part_image, part_mask = slide.read_region(257, 131, 300, 250)
    np.testing.assert_array_equal(part_mask, whole_mask[131:381, 257:557])
    np.testing.assert_array_equal(part_image, whole_image[131:381, 257:557])
    image, mask = slide.render()
    np.testing.assert_array_equal(mask, whole_mask)
    np.testing.assert_array_equal(image, whole_image)


def test_slide_is_tissue_with_an_irregular_border_on_glass():
    image, mask = phantom_slide(2, 640, 512, mpp=2.0)
    tissue = mask > 0
    assert 0.3 < tissue.mean() < 0.8
    assert not tissue[0, 0] and not tissue[-1, -1] and tissue[256, 320]
    assert image[~tissue].mean() > 225
    # an irregular border: smoothing the outline (closing and opening with a 24 µm disk) changes
    # it many times more than it changes a plain ellipse of the same size
    def roughness(region: np.ndarray) -> float:
        smooth = ndimage.binary_opening(ndimage.binary_closing(region, disk(12)), disk(12))
        return (smooth ^ region).sum() / region.sum()

    rows, cols = np.mgrid[0:512, 0:640]
    ellipse = ((cols - 320) / 250) ** 2 + ((rows - 256) / 190) ** 2 < 1
    assert roughness(tissue) > 10 * roughness(ellipse)


def test_bad_sizes_are_data_errors():
    with pytest.raises(DataError, match="size must be a whole number of pixels >= 16"):
        phantom_patch(0, 8)
    with pytest.raises(DataError, match="microns per pixel"):
        phantom_patch(0, 64, mpp=0.0)


def test_slide_splits_keep_every_split_for_small_runs():
    assert slide_splits(5) == ["train", "train", "train", "val", "test"]
    assert slide_splits(10, 0.2, 0.1) == ["train"] * 7 + ["val"] * 2 + ["test"]
    assert slide_splits(2) == ["train", "train"]
    with pytest.raises(DataError):
        slide_splits(3, 0.5, 0.5)


# --- command line ---------------------------------------------------------------------------------

def test_cli_patches_writes_a_dataset_split_by_slide(tmp_path):
    out = tmp_path / "ds"
    assert main(["phantom", "patches", "--out", str(out), "--n", "6", "--size", "64", "--seed", "4",
                 "--no-progress"]) == 0
    dataset = open_dataset(out)
    manifest = dataset.manifest
    assert len(manifest) == 6 and manifest["slide"].nunique() == 5
    assert manifest.groupby("slide")["split"].nunique().max() == 1
    assert sorted(manifest.drop_duplicates("slide")["split"]) == ["test", "train", "train", "train", "val"]
    first = manifest.iloc[0]
    image, mask = phantom_patch(phantom_seed(4, 0), 64)
    np.testing.assert_array_equal(dataset.image(first), image)
    np.testing.assert_array_equal(dataset.mask(first), mask)
    assert first["caption"] == caption_for_mask(mask)
    assert dataset.info["mix"] == "default" and dataset.info["seed"] == 4
    # a re-run resumes; another seed into the same folder is refused
    assert main(["phantom", "patches", "--out", str(out), "--n", "6", "--size", "64", "--seed", "4",
                 "--no-progress"]) == 0
    assert main(["phantom", "patches", "--out", str(out), "--n", "6", "--size", "64", "--seed", "5",
                 "--no-progress"]) == 2


def test_cli_masks_writes_masks_with_captions(tmp_path):
    assert main(["phantom", "masks", "--out", str(tmp_path), "--n", "3", "--size", "64",
                 "--mix", "glomeruli-rich", "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "masks.csv", keep_default_na=False)
    assert list(table["mask"]) == ["mask_000000.png", "mask_000001.png", "mask_000002.png"]
    mask = read_mask(tmp_path / "mask_000001.png")
    np.testing.assert_array_equal(mask, phantom_patch_mask(phantom_seed(0, 1), 64, "glomeruli-rich"))
    assert table["caption"][1] == caption_for_mask(mask)
    assert (table["frac_4"] >= 0.4).all()


def test_cli_slide_writes_pyramids_of_the_image_and_its_mask(tmp_path):
    assert main(["phantom", "slide", "--out", str(tmp_path), "--size", "600", "--height", "520",
                 "--seed", "9", "--mpp", "2.0", "--no-progress"]) == 0
    image, mask = PhantomSlide.create(9, 600, 520, mpp=2.0).render()
    with tifffile.TiffFile(tmp_path / "phantom-9-mask.tif") as tif:
        stored_mask = tif.pages[0].asarray()
        assert len(tif.pages) >= 2
    np.testing.assert_array_equal(stored_mask[:520, :600], mask)
    with tifffile.TiffFile(tmp_path / "phantom-9.tif") as tif:
        stored = tif.pages[0].asarray()[:520, :600]
    assert np.abs(stored.astype(int) - image.astype(int)).mean() < 4   # JPEG
    info = json.loads((tmp_path / "phantom-9.json").read_text())
    assert info["seed"] == 9 and info["mpp"] == 2.0
    assert info["pixel_shares"]["Tubuli"] == pytest.approx(np.mean(mask == TUBULI), abs=1e-5)


def test_cli_help_names_every_mix():
    from histosynth.cli.phantom import MixOption

    assert all(name in MixOption.help for name in MIXES)


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["phantom", "patches", "--out", str(tmp_path), "--n", "2", "--mix", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown phantom mix 'nope'") and err.count("\n") == 1
    assert main(["phantom", "masks", "--out", str(tmp_path), "--n", "0", "--no-progress"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_a_rerun_of_a_killed_phantom_slide_removes_its_leftovers_and_nothing_else(tmp_path):
    leftovers = [tmp_path / ".phantom-9.tif.phantom-k3j9x_2a", tmp_path / ".phantom-9.tif.pyramid-abcdefgh",
                 tmp_path / ".phantom-9.tif.abcdefgh.part.tif", tmp_path / ".phantom-9.json.abcdefgh.part.json"]
    for path in leftovers[:2]:
        path.mkdir()
        (path / "mask.npy").write_bytes(b"half")
    for path in leftovers[2:]:
        path.write_bytes(b"half")
    kept = [tmp_path / ".phantom-8.tif.phantom-k3j9x_2a", tmp_path / ".phantom-abcdefgh", tmp_path / "notes.txt"]
    for path in kept:
        path.write_bytes(b"mine")
    assert main(["phantom", "slide", "--out", str(tmp_path), "--size", "256", "--seed", "9", "--mpp", "2.0",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["phantom-9.tif", "phantom-9-mask.tif", "phantom-9.json", *[p.name for p in kept]])


def test_a_phantom_dataset_that_finished_no_slide_binds_no_recipe(tmp_path):
    from histosynth.data.dataset import PatchDatasetWriter

    PatchDatasetWriter(tmp_path / "ds", RENAL, patch_size=64, extra_info={"seed": 4, "mix": "default"})  # killed
    assert main(["phantom", "patches", "--out", str(tmp_path / "ds"), "--n", "2", "--size", "64", "--seed", "5",
                 "--no-progress"]) == 0
    assert open_dataset(tmp_path / "ds").info["seed"] == 5


@pytest.mark.parametrize("command, extra, message", [
    ("patches", ["--seed", "-1"], "--seed must be at least 0, got -1"),
    ("masks", ["--seed", "-1"], "--seed must be at least 0, got -1"),
    ("masks", ["--seed", str(2**32)], "--seed must be at most 4294967295, got 4294967296"),
    ("patches", ["--slides", "0"], "--slides must lie between 1 and the number of patches (2), got 0"),
    ("patches", ["--size", "0"], "size must be a whole number of pixels >= 16, got 0"),
    ("masks", ["--mpp", "nan"], "microns per pixel must lie between 0.05 and 4, got nan"),
])
def test_cli_refuses_impossible_numbers_before_writing(tmp_path, capsys, command, extra, message):
    out = tmp_path / "out"
    assert main(["phantom", command, "--out", str(out), "--n", "2", "--size", "32", "--no-progress", *extra]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--mpp", "nan"], "--mpp must be a finite number, got nan"),
    (["--mpp", "inf"], "--mpp must be a finite number, got inf"),
    (["--mpp", "0"], "--mpp must be above 0, got 0.0"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
])
def test_stamp_refuses_impossible_numbers(tmp_path, capsys, extra, message):
    mask = tmp_path / "m.png"
    from histosynth.io import write_png_atomic

    write_png_atomic(mask, np.full((32, 32), 6, np.uint8))
    assert main(["phantom", "stamp", str(mask), "--add", "Glomeruli=1", "--out", str(tmp_path / "out"), *extra]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()

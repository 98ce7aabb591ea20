"""Edited masks: phantom structures stamped onto the tissue of existing label masks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import distance_transform_edt, label

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.data.phantom.layout import GAP_UM, LARGE_STRUCTURES
from histosynth.data.phantom.stamp import Addition, parse_additions, stamp_structures, write_stamped_masks
from histosynth.errors import ConfigError, DataError
from histosynth.io import write_png_atomic
from histosynth.schema import RENAL

GLOMERULI, SCLEROTIC, OTHER = 4, 5, 6
MPP = 2.0  # glomeruli of 25-42.5 px radius: several fit in 256 px


def test_a_stamped_glomerulus_has_the_phantoms_size_and_leaves_the_rest_alone():
    mask = np.full((256, 256), OTHER, np.uint8)
    mask[:, :40] = 3  # tubuli at the left may be covered
    result = stamp_structures(mask, [Addition(GLOMERULI, 1)], RENAL, MPP, seed=1)
    assert (result.asked, result.placed) == (1, 1)
    components, count = label(result.mask == GLOMERULI)
    assert count == 1
    low, high = (r / MPP for r in LARGE_STRUCTURES[GLOMERULI].radius_um)
    area = (result.mask == GLOMERULI).sum()
    assert math.pi * low ** 2 * 0.9 <= area <= math.pi * high ** 2 * 1.05  # (a part may lie outside the mask)
    untouched = result.mask != GLOMERULI
    np.testing.assert_array_equal(result.mask[untouched], mask[untouched])
    again = stamp_structures(mask, [Addition(GLOMERULI, 1)], RENAL, MPP, seed=1).mask
    np.testing.assert_array_equal(again, result.mask)  # the seed decides


def test_structures_keep_clear_of_large_structures_and_background():
    mask = np.full((256, 256), OTHER, np.uint8)
    yy, xx = np.mgrid[:256, :256]
    mask[(yy - 128) ** 2 + (xx - 128) ** 2 < 40 ** 2] = SCLEROTIC
    mask[:, 200:] = 0  # white background
    result = stamp_structures(mask, [Addition(GLOMERULI, 16)], RENAL, MPP, seed=0)
    assert 1 <= result.placed < 16  # not all fit
    np.testing.assert_array_equal(result.mask == SCLEROTIC, mask == SCLEROTIC)
    added = result.mask == GLOMERULI
    assert label(added)[1] == result.placed  # apart from each other
    assert distance_transform_edt(mask != SCLEROTIC)[added].min() >= GAP_UM / MPP
    assert (result.mask[:, 200:] == GLOMERULI).mean() <= 0.1  # at most a 10 % rim on background
    nothing = stamp_structures(np.zeros((64, 64), np.uint8), [Addition(GLOMERULI, 1)], RENAL, MPP, seed=0)
    assert nothing.placed == 0 and not nothing.mask.any()


def test_additions_are_read_by_class_name_and_only_for_large_structures():
    assert parse_additions("Glomeruli=2, arteries=1", RENAL) == [Addition(4, 2), Addition(1, 1)]
    for text, message in [("Tubuli=1", "Tubuli cannot be stamped; stampable classes: Glomeruli, Sclerotic"),
                          ("Glomeruli", "write CLASS=COUNT with a count of at least 1"),
                          ("Glomeruli=0", "write CLASS=COUNT"), ("Podocytes=1", "unknown class name 'Podocytes'"),
                          (" , ", "--add names no structures")]:
        with pytest.raises(ConfigError, match=message):
            parse_additions(text, RENAL)


def test_the_stamp_command_edits_a_folder_of_masks(tmp_path, capsys):
    source = tmp_path / "masks"
    for i in range(3):
        write_png_atomic(source / f"m{i}.png", np.full((128, 128), OTHER, np.uint8))
    out = tmp_path / "edited"
    args = ["phantom", "stamp", str(source), "--add", "Glomeruli=1", "--out", str(out), "--mpp", "4", "--seed", "2"]
    assert main(args) == 0
    assert "edited 3 masks: 3 of 3 structures placed (0 found no free tissue)" in capsys.readouterr().out
    table = pd.read_csv(out / "masks.csv")
    assert table["mask"].tolist() == ["m0.png", "m1.png", "m2.png"] and table["added"].tolist() == [1, 1, 1]
    for _, row in table.iterrows():
        edited = np.asarray(Image.open(out / row["mask"]))
        assert row["frac_4"] == pytest.approx((edited == GLOMERULI).mean(), abs=1e-6)
        assert "Glomeruli" in row["caption"] and row["source"] == str(source / row["mask"])
    # a dataset's masks are named by patch id
    writer = PatchDatasetWriter(tmp_path / "ds", RENAL, 128)
    writer.write_slide("s", [Patch(np.zeros((128, 128, 3), np.uint8), np.full((128, 128), OTHER, np.uint8), 0, 0)]
                       * 2, "train")
    writer.finalize()
    assert main(["phantom", "stamp", "--masks-from", str(tmp_path / "ds"), "--add", "Arteries=1", "--out",
                 str(tmp_path / "from-ds"), "--mpp", "4"]) == 0
    table = pd.read_csv(tmp_path / "from-ds" / "masks.csv")
    assert table["mask"].tolist() == ["s_000000.png", "s_000001.png"]
    assert table["source"].tolist() == [f"{tmp_path / 'ds'}:s_00000{i}" for i in range(2)]
    with pytest.raises(DataError, match="several masks are named m0; edit them in separate runs"):
        write_stamped_masks([("m0", "a", np.zeros((8, 8), np.uint8))] * 2, [Addition(GLOMERULI, 1)], tmp_path / "x")
    assert main(["phantom", "stamp", "--add", "Glomeruli=1", "--out", str(out)]) == 2
    assert "give the masks to edit: a file or folder (MASKS), or --masks-from DATASET" in capsys.readouterr().err

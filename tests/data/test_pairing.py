"""`histosynth dataset pair`: images and same-stem masks become a patch dataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histosynth.captions import caption_for_mask
from histosynth.cli import main
from histosynth.data.dataset import open_dataset
from histosynth.data.pairing import pair_dataset
from histosynth.errors import DataError
from histosynth.schema import RENAL


def _write_pairs(root, count=3, size=32, mask_suffix=".png"):
    rng = np.random.default_rng(0)
    images, masks = root / "job" / "images", root / "job" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    written = []
    for index in range(count):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2] = 3  # top half Tubuli
        mask[size // 2:, : size // 4 * (index + 1)] = 4  # more Glomeruli in each image
        Image.fromarray(image).save(images / f"img_{index:02d}.png")
        Image.fromarray(mask).save(masks / f"img_{index:02d}{mask_suffix}")
        written.append((image, mask))
    return images, masks, written


def test_pairs_become_one_pseudo_slide_with_captions_from_the_masks(tmp_path):
    images, masks, written = _write_pairs(tmp_path)
    dataset = pair_dataset(images, masks, tmp_path / "ds")
    rows = dataset.rows("train")
    assert len(dataset) == 3 and dataset.patch_size == 32
    assert set(rows["slide"]) == {"job"}  # a job's images/ folder is named after the job
    for (_, row), (image, mask) in zip(rows.iterrows(), written, strict=True):
        np.testing.assert_array_equal(dataset.image(row), image)
        np.testing.assert_array_equal(dataset.mask(row), mask)
        assert row["caption"] == caption_for_mask(mask, RENAL)
        assert row["frac_4"] == pytest.approx(np.mean(mask == 4))
    assert dataset.info["paired_from"] == {"images": str(images), "masks": str(masks)}


def test_pair_command_writes_a_chosen_split(tmp_path, capsys):
    images, masks, _ = _write_pairs(tmp_path, mask_suffix=".tif")
    assert main(["dataset", "pair", str(images), str(masks), "--out", str(tmp_path / "ds"), "--split", "val",
                 "--slide", "synthetic", "--no-progress"]) == 0
    assert "wrote 3 image/mask pairs of 32 px" in capsys.readouterr().out
    rows = open_dataset(tmp_path / "ds").rows()
    assert set(rows["split"]) == {"val"} and set(rows["slide"]) == {"synthetic"}


def test_pairing_refuses_what_cannot_be_a_patch_dataset(tmp_path, capsys):
    images, masks, _ = _write_pairs(tmp_path)
    (masks / "img_01.png").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images have no mask of the same name .*: img_01.png"):
        pair_dataset(images, masks, tmp_path / "a")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "img_01.png")
    with pytest.raises(DataError, match=r"img_01.png is 16x16 px but its image .* is 32x32 px"):
        pair_dataset(images, masks, tmp_path / "b")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(masks / "img_01.png")
    assert main(["dataset", "pair", str(images), str(masks), "--out", str(tmp_path / "c"), "--no-progress"]) != 0
    assert "9" in capsys.readouterr().err  # the unknown class id is named
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "img_01.png")
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(images / "img_03.png")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(masks / "img_03.png")
    with pytest.raises(DataError, match=r"differ in size \(32x32 px: img_00.png, img_01.png, img_02.png; "
                                        r"48x32 px: img_03.png\)"):
        pair_dataset(images, masks, tmp_path / "d")
    (images / "img_03.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "img_00.tif")
    with pytest.raises(DataError, match="several masks for img_00"):
        pair_dataset(images, masks, tmp_path / "e")
    assert main(["dataset", "pair", str(images), str(masks), "--out", str(tmp_path / "f"), "--split", "holdout"]) != 0
    assert "--split must be one of train, val, test, not 'holdout'" in capsys.readouterr().err

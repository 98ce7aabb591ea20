"""The patch-dataset format (writer, resume, finalize, errors) and its torch view (range, paired flips)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from histosynth.captions import caption_for_mask
from histosynth.data.dataset import MANIFEST_COLUMNS, Patch, PatchDatasetWriter, open_dataset, recaption_dataset
from histosynth.data.torchdata import PatchTorchDataset, to_model_range, to_uint8
from histosynth.errors import DataError
from histosynth.schema import RENAL

SIZE = 16


def patch(seed: int, x: int = 0, y: int = 0) -> Patch:
    """A patch whose red channel encodes its mask, so pairing survives any flip: red = 30 * id."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 8, (SIZE, SIZE), dtype=np.uint8)
    image = np.stack([mask * 30, rng.integers(0, 256, (SIZE, SIZE)), np.full((SIZE, SIZE), seed)], axis=-1)
    return Patch(image=image.astype(np.uint8), mask=mask, x=x, y=y, level=1, mpp=0.5, tissue_fraction=0.75)


def write_two_slides(root) -> PatchDatasetWriter:
    writer = PatchDatasetWriter(root, RENAL, patch_size=SIZE)
    writer.write_slide("a", [patch(1), patch(2, x=16)], split="train")
    writer.write_slide("b", [patch(3, y=32)], split="val", summary={"source": "b.svs"})
    return writer


def test_writer_writes_pngs_manifest_and_summaries(tmp_path):
    dataset = write_two_slides(tmp_path).finalize()
    manifest = dataset.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS + [f"frac_{i}" for i in range(8)]
    assert list(manifest["patch_id"]) == ["a_000000", "a_000001", "b_000000"]
    assert list(manifest["split"]) == ["train", "train", "val"]
    assert list(zip(manifest["x"], manifest["y"], strict=True)) == [(0, 0), (16, 0), (0, 32)]
    row = manifest.iloc[1]
    expected = patch(2, x=16)
    np.testing.assert_array_equal(dataset.image(row), expected.image)
    np.testing.assert_array_equal(dataset.mask(row), expected.mask)
    assert row["caption"] == caption_for_mask(expected.mask, RENAL)
    assert row["frac_3"] == pytest.approx((expected.mask == 3).mean(), abs=1e-6)
    assert (row["level"], row["mpp"], row["size"], row["tissue_fraction"]) == (1, 0.5, SIZE, 0.75)
    summary = (tmp_path / "slides" / "b.json").read_text()
    assert '"patches": 1' in summary and '"source": "b.svs"' in summary
    assert len(dataset.rows("val")) == 1 and dataset.rows("val")["slide"].tolist() == ["b"]


def test_resume_skips_finished_slides_and_finalize_ignores_unfinished(tmp_path):
    write_two_slides(tmp_path)
    writer = PatchDatasetWriter(tmp_path, RENAL, patch_size=SIZE)
    assert writer.slide_done("a") and writer.slide_done("b") and not writer.slide_done("c")
    # A slide whose run was killed has patches and maybe its CSV part, but no JSON summary.
    (tmp_path / "slides" / "c.csv").write_text(pd.DataFrame(columns=MANIFEST_COLUMNS).to_csv(index=False))
    assert sorted(writer.finalize().manifest["slide"].unique()) == ["a", "b"]


def test_reopening_with_other_settings_is_refused(tmp_path):
    write_two_slides(tmp_path)
    with pytest.raises(DataError, match=r"holds a dataset of 16 px patches; choose another --out for 32 px"):
        PatchDatasetWriter(tmp_path, RENAL, patch_size=32)
    other = RENAL.model_copy(update={"name": "other"})
    with pytest.raises(DataError, match="holds a dataset with another class schema"):
        PatchDatasetWriter(tmp_path, other, patch_size=SIZE)


def test_bad_patches_and_names_are_refused(tmp_path):
    writer = PatchDatasetWriter(tmp_path, RENAL, patch_size=SIZE)
    wrong = Patch(image=np.zeros((8, 8, 3), np.uint8), mask=np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError,
                       match=r"slide s: patch 0 has image \(8, 8, 3\) and mask \(8, 8\); expected \(16, 16, 3\)"):
        writer.write_slide("s", [wrong])
    assert not writer.slide_done("s")
    with pytest.raises(DataError, match="cannot be used as a folder name"):
        writer.write_slide("a/b", [])


def test_corrupt_and_missing_pngs_are_errors_that_say_what_to_do(tmp_path):
    dataset = write_two_slides(tmp_path).finalize()
    row = dataset.manifest.iloc[0]
    (tmp_path / row["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(DataError, match=r"a_000000\.png is corrupt .*delete its slide's JSON under slides/ and re-run"):
        dataset.image(row)
    (tmp_path / row["mask"]).unlink()
    with pytest.raises(DataError, match=r"a_000000\.png is missing from the dataset"):
        dataset.mask(row)
    with pytest.raises(DataError, match=r"mask ids \[9\] are not in schema 'renal'"):
        bad = patch(5)
        bad.mask[0, 0] = 9
        writer = PatchDatasetWriter(tmp_path / "x", RENAL, patch_size=SIZE)
        writer.write_slide("s", [bad])


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "none")
    with pytest.raises(DataError, match=r"is not a patch dataset \(no dataset.json\)"):
        open_dataset(tmp_path)
    PatchDatasetWriter(tmp_path / "d", RENAL, patch_size=SIZE)
    with pytest.raises(DataError, match="has no manifest.csv; the run that wrote it did not finish"):
        open_dataset(tmp_path / "d")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text('{"format": ')
    with pytest.raises(DataError, match=r"dataset.json is corrupt \(Expecting value"):
        open_dataset(tmp_path / "bad")
    (tmp_path / "bad" / "dataset.json").write_text('{"format": "other/2"}')
    with pytest.raises(DataError, match=r"unknown dataset format 'other/2' \(expected histosynth"):
        open_dataset(tmp_path / "bad")


def test_recaption_restores_captions_from_masks(tmp_path):
    dataset = write_two_slides(tmp_path).finalize()
    original = list(dataset.manifest["caption"])
    dataset.manifest.loc[1, "caption"] = "stale"
    dataset.manifest.to_csv(tmp_path / "manifest.csv", index=False)
    assert recaption_dataset(tmp_path) == (1, 3)
    assert list(open_dataset(tmp_path).manifest["caption"]) == original


# --- torch view ---------------------------------------------------------------------------

def test_model_range_maps_0_and_255_to_minus_one_and_one():
    image = np.array([[[0, 127, 255]]], dtype=np.uint8)
    tensor = to_model_range(image)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    round_trip = to_uint8(torch.stack([to_model_range(p) for p in pixels]))
    np.testing.assert_array_equal(round_trip, pixels)


def test_items_are_in_range_and_flips_move_image_and_mask_together(tmp_path):
    write_two_slides(tmp_path).finalize()
    plain = PatchTorchDataset(tmp_path, split=None, flips=False)
    flipped = PatchTorchDataset(tmp_path, split=None, flips=True, seed=3)
    seen = set()
    for epoch in range(8):
        flipped.set_epoch(epoch)
        for index in range(len(flipped)):
            item, base = flipped[index], plain[index]
            assert item["image"].shape == (3, SIZE, SIZE) and item["mask"].dtype == torch.int64
            assert item["image"].min() >= -1 and item["image"].max() <= 1
            red = torch.round((item["image"][0] + 1) * 127.5)
            torch.testing.assert_close(red, item["mask"].float() * 30)  # still paired
            mask = base["mask"]
            variants = {"none": mask, "h": mask.flip(1), "v": mask.flip(0), "hv": mask.flip(0).flip(1)}
            kind = next(k for k, v in variants.items() if torch.equal(item["mask"], v))
            seen.add(kind)
            assert item["caption"] == base["caption"]
    assert seen == {"none", "h", "v", "hv"}


def test_flips_are_reproducible_and_splits_filter_slides(tmp_path):
    write_two_slides(tmp_path).finalize()
    first = PatchTorchDataset(tmp_path, split=None, seed=7)
    second = PatchTorchDataset(tmp_path, split=None, seed=7)
    for index in range(len(first)):
        assert torch.equal(first[index]["image"], second[index]["image"])
    assert len(PatchTorchDataset(tmp_path, split="train")) == 2
    assert len(PatchTorchDataset(tmp_path, split="val")) == 1
    assert len(PatchTorchDataset(tmp_path, split="test")) == 0


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from histosynth.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind


def test_removing_an_unfinished_slide_never_follows_links_or_touches_finished_slides(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "s_000000.png").write_bytes(b"mine")
    root = tmp_path / "ds"
    writer = write_two_slides(root)
    (root / "images" / "s").symlink_to(outside, target_is_directory=True)
    assert writer.remove_unfinished("s") == []
    assert (outside / "s_000000.png").read_bytes() == b"mine"
    with pytest.raises(DataError, match="slide a in .* is finished; its patches are not removed"):
        writer.remove_unfinished("a")
    for name in ["", ".", "..", "a/..", "../a"]:
        with pytest.raises(DataError, match="cannot be used as a folder name"):
            writer.remove_unfinished(name)
    assert sorted(p.name for p in (root / "images" / "a").iterdir()) == ["a_000000.png", "a_000001.png"]


def test_dataset_settings_bind_only_once_a_slide_is_finished(tmp_path):
    PatchDatasetWriter(tmp_path, RENAL, patch_size=32, extra_info={"tiling": {"mpp": 360}})  # a run that failed
    writer = PatchDatasetWriter(tmp_path, RENAL, patch_size=SIZE, extra_info={"tiling": {"mpp": 0.5}})
    writer.write_slide("a", [patch(1)])
    dataset = writer.finalize()
    assert dataset.patch_size == SIZE and dataset.info["tiling"] == {"mpp": 0.5}
    with pytest.raises(DataError, match="holds a dataset of 16 px patches"):
        PatchDatasetWriter(tmp_path, RENAL, patch_size=32)


def test_temporaries_of_finished_slides_are_not_taken_for_slides(tmp_path):
    writer = write_two_slides(tmp_path)
    (tmp_path / "slides" / ".c.json.k3j9x_2a.part.json").write_text("{}")
    assert writer.finished_slides() == ["a", "b"]
    assert sorted(writer.finalize().manifest["slide"].unique()) == ["a", "b"]

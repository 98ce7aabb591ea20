"""Label fidelity: Dice per class of segmented generated images against the masks that made them."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import DataError
from histosynth.evaluate.label_fidelity import evaluate_label_fidelity, pair_by_name, read_mask_job
from histosynth.io import write_png_atomic
from histosynth.schema import RENAL
from histosynth.segment.predict import predict_images
from histosynth.segment.segmenter import Segmenter

_spec = importlib.util.spec_from_file_location(
    "maskmodels", Path(__file__).parents[1] / "sample" / "maskmodels.py")
maskmodels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maskmodels)


def random_pairs(seed: int, n: int = 4, size: int = 32):
    """Masks with large blocks of a few classes, and noisy 'predictions' of them."""
    rng = np.random.default_rng(seed)
    masks, predictions = [], []
    for _ in range(n):
        blocks = rng.choice([3, 4, 6], size=(4, 4))
        mask = np.kron(blocks, np.ones((size // 4, size // 4), dtype=np.int64)).astype(np.uint8)
        mask[0, 0] = 1  # a rare class: one pixel per image
        wrong = rng.random(mask.shape) < 0.2
        prediction = np.where(wrong, rng.choice([3, 4, 5, 6], size=mask.shape), mask).astype(np.uint8)
        masks.append(mask)
        predictions.append(prediction)
    return masks, predictions


def test_dice_per_class_equals_sklearns_f1_on_the_pooled_pixels():
    masks, predictions = random_pairs(0)
    result, returned = evaluate_label_fidelity([np.zeros((32, 32, 3), np.uint8)] * 4, masks, lambda _: predictions,
                                               RENAL, names=list("abcd"))
    assert returned is predictions
    table = result.per_class().set_index("class")
    truth, guess = np.concatenate([m.ravel() for m in masks]), np.concatenate([p.ravel() for p in predictions])
    present = [1, 3, 4, 5, 6]
    expected = f1_score(truth, guess, labels=present, average=None)
    np.testing.assert_allclose(table.loc[[RENAL.name_of(i) for i in present], "Dice"], expected, rtol=1e-12)
    assert table.loc["white background", "images with the class"] == 0
    assert np.isnan(table.loc["white background", "Dice"])
    # per image: sklearn's F1 of each image where the class occurs, averaged
    per_image = [f1_score(m.ravel(), p.ravel(), labels=[4], average=None)[0]
                 for m, p in zip(masks, predictions, strict=True)]
    assert table.loc["Glomeruli", "mean image Dice"] == pytest.approx(np.mean(per_image))
    shares = np.bincount(truth, minlength=8) / truth.size
    np.testing.assert_allclose(table["mask pixel share"], shares)


def test_the_mean_counts_only_classes_with_enough_pixels():
    masks, predictions = random_pairs(1)
    result, _ = evaluate_label_fidelity([None] * 4, masks, lambda _: predictions, RENAL, list("abcd"), min_share=0.01)
    table = result.per_class().set_index("class")
    counted = table[table["counted"]]
    assert list(counted.index) == ["Tubuli", "Glomeruli", "other kidney tissue"]  # not the one-pixel Arteries
    assert result.mean_dice() == pytest.approx(counted["Dice"].mean())
    assert result.per_image()["image"].tolist() == list("abcd")


def test_a_centre_only_segmentation_is_compared_with_the_centre_of_the_mask():
    masks, _ = random_pairs(2, n=2, size=40)
    centres = [m[6:34, 6:34] for m in masks]  # what a segmenter with the thesis' coverage returns
    result, _ = evaluate_label_fidelity([None, None], masks, lambda _: centres, RENAL, ["a", "b"])
    dice = result.per_class().set_index("class")["Dice"]
    assert dice[["Tubuli", "Glomeruli", "other kidney tissue"]].tolist() == [1.0, 1.0, 1.0]
    assert result.counts[:, :, 1].sum() == 2 * 28 * 28


# --- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mask_model(tmp_path_factory):
    return maskmodels.make_mask_bundle(tmp_path_factory.mktemp("models") / "mask")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    for i in range(3):
        mask = np.full((64, 64), 6, np.uint8)
        mask[8 * i:8 * i + 24, 10:40] = 4
        mask[40:, :] = 0
        write_png_atomic(folder / f"m{i}.png", mask)
    return folder


def test_evaluate_masks_generates_segments_and_reports(mask_model, layouts, multiclass_folder, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["evaluate", "masks", "--model", str(mask_model), "--mask", str(layouts), "--n", "2", "--steps", "1",
            "--segmenter", str(multiclass_folder), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["examples.png", "job", "per_class.csv", "per_image.csv",
                                                     "report.md"]
    pairs, _ = read_mask_job(out / "job")
    assert [p.name for p in pairs] == ["00000", "00001"] and all(p.mask.is_file() for p in pairs)
    # the report's numbers are those of the segmenter on the job's images against the job's masks
    segmenter = Segmenter.load(multiclass_folder)
    images = [np.asarray(Image.open(p.image).convert("RGB")) for p in pairs]
    predictions = predict_images(segmenter, images, coverage="full", device="cpu")
    masks = [np.asarray(Image.open(p.mask)) for p in pairs]
    truth = np.concatenate([m.ravel() for m in masks])
    guess = np.concatenate([p.ravel() for p in predictions])
    table = pd.read_csv(out / "per_class.csv").set_index("id")
    expected = f1_score(truth, guess, labels=[0, 4, 6], average=None, zero_division=0.0)
    np.testing.assert_allclose(table.loc[[0, 4, 6], "Dice"], expected, rtol=1e-9)
    mean = table.loc[table["counted"], "Dice"].mean()
    assert f"2 images: mean Dice {mean:.3f} over classes with >= 1.0% of the mask pixels (target 0.8)" in printed
    report = (out / "report.md").read_text()
    assert "# Label fidelity" in report and f"**mean Dice {mean:.3f}**" in report
    assert "(white background, Glomeruli, other kidney tissue)" in report

    # an existing job is evaluated as it is
    again = tmp_path / "again"
    assert main(["evaluate", "masks", "--images", str(out / "job"), "--segmenter", str(multiclass_folder),
                 "--out", str(again), "--device", "cpu", "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again / "per_class.csv"), pd.read_csv(out / "per_class.csv"))

    # any folder of images, against the masks of the same name: a mask folder, or a patch dataset's patches
    assert main(["evaluate", "masks", "--images", str(out / "job" / "images"), "--mask", str(out / "job" / "masks"),
                 "--segmenter", str(multiclass_folder), "--out", str(tmp_path / "by-stem"), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "by-stem" / "per_class.csv"),
                                  pd.read_csv(out / "per_class.csv"))
    writer = PatchDatasetWriter(tmp_path / "ds", RENAL, 64)
    writer.write_slide("s", [Patch(np.asarray(Image.open(p.image).convert("RGB")), np.asarray(Image.open(p.mask)), 0, 0)
                             for p in pairs], "test")
    writer.finalize()
    named = tmp_path / "named"
    named.mkdir()
    for index, pair in enumerate(pairs):
        shutil.copy(pair.image, named / f"s_{index:06d}.png")
    assert main(["evaluate", "masks", "--images", str(named), "--masks-from", str(tmp_path / "ds"),
                 "--segmenter", str(multiclass_folder), "--out", str(tmp_path / "by-id"), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "by-id" / "per_class.csv"), pd.read_csv(out / "per_class.csv"))


def test_evaluate_masks_refuses_caption_jobs_and_missing_masks(tiny_bundle_path, mask_model, multiclass_folder,
                                                               tmp_path, capsys):
    job = tmp_path / "captions-job"
    assert main(["generate", "--model", str(tiny_bundle_path), "--caption", "", "--n", "1", "--steps", "1",
                 "--out", str(job)]) == 0
    with pytest.raises(DataError, match="is a job generated from captions, not from masks"):
        read_mask_job(job)
    capsys.readouterr()
    assert main(["evaluate", "masks", "--model", str(mask_model), "--segmenter", str(multiclass_folder),
                 "--out", str(tmp_path / "r")]) == 2
    assert ("with --model give the masks to generate from: --masks-from DATASET or --mask PATH"
            in capsys.readouterr().err)
    assert main(["evaluate", "masks", "--images", str(tmp_path), "--segmenter", str(multiclass_folder),
                 "--out", str(tmp_path / "r")]) == 2
    assert (f"{tmp_path} is not a generation job: give the masks of its images with --mask DIR"
            in capsys.readouterr().err)
    assert main(["evaluate", "masks", "--images", str(job), "--mask", str(tmp_path), "--segmenter",
                 str(multiclass_folder), "--out", str(tmp_path / "r")]) == 2
    assert "--images is a finished job with its own masks; leave out --mask / --masks-from" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"1 of 1 images in .* are not named after a patch of"):
        pair_by_name(job, _one_patch_dataset(tmp_path / "ds"))


def _one_patch_dataset(root: Path) -> Path:
    writer = PatchDatasetWriter(root, RENAL, 32)
    writer.write_slide("s", [Patch(np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 6, np.uint8), 0, 0)], "test")
    writer.finalize()
    return root

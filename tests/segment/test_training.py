"""Training: the loss, Dice, the training pairs' geometry, seeding, and Dice reached on toy tissue."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import ConfigError, DataError
from histosynth.schema import RENAL
from histosynth.segment.data import PatchRows, SegmentationPairs, default_input_size
from histosynth.segment.segmenter import Segmenter
from histosynth.segment.training import (
    SegmentTrainConfig,
    balanced_class_weights,
    best_epoch,
    dice_by_class,
    label_pixel_counts,
    learning_rate_factor,
    mean_dice,
    segmentation_loss,
    stat_scores,
    train_segmenter,
    weights_fingerprint,
)

LUT = np.zeros((256, 3), dtype=np.uint8)
LUT[:8] = [(i * 30, 255 - i * 30, (i * 70) % 256) for i in range(8)]


def test_dice_per_class_equals_sklearn_f1():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 3, 4, 6], size=(2, 20, 20))
    predicted = np.where(rng.random(labels.shape) < 0.7, labels, rng.choice([0, 3, 4, 5], size=labels.shape))
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    metric = stat_scores(segmenter)
    metric.update(torch.from_numpy(predicted), torch.from_numpy(labels))
    dice = dice_by_class(segmenter, metric.compute())
    reference = f1_score(labels.ravel(), predicted.ravel(), labels=[0, 3, 4, 5], average=None)
    np.testing.assert_allclose([dice[i] for i in (0, 3, 4, 5)], reference)
    assert math.isnan(dice[1])  # absent from labels and predictions
    # the mean counts the classes present in the labels only (0, 3, 4, 6), not 5
    np.testing.assert_allclose(mean_dice(segmenter, metric.compute()),
                               np.mean([dice[0], dice[3], dice[4], dice[6]]))


def test_binary_loss_is_bce_plus_soft_dice():
    segmenter = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2] = 1  # 8 of 16 pixels
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    soft_dice = (2 * 0.5 * 8 + 1) / (0.5 * 16 + 8 + 1)
    expected = math.log(2) + (1 - soft_dice)
    assert segmentation_loss(segmenter, logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert segmentation_loss(segmenter, logits, labels, dice_weight=0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_multiclass_loss_vanishes_for_a_confident_right_answer():
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    labels = torch.tensor([[[4, 6], [6, 0]]])
    logits = torch.nn.functional.one_hot(labels, 8).permute(0, 3, 1, 2).float() * 30
    assert segmentation_loss(segmenter, logits, labels).item() < 1e-3
    wrong = torch.nn.functional.one_hot(torch.full_like(labels, 3), 8).permute(0, 3, 1, 2).float() * 30
    assert segmentation_loss(segmenter, wrong, labels).item() > 10


def test_balanced_weights_follow_the_square_root_of_median_over_share():
    # shares 400/525, 100/525, 25/525 (median 100/525); label 2 never occurs
    weights = balanced_class_weights(np.array([400, 100, 0, 25]))
    np.testing.assert_allclose(weights.numpy(), [0.5, 1.0, 1.0, 2.0], rtol=1e-6)
    # a class of a few pixels is capped rather than allowed to swamp the loss
    assert balanced_class_weights(np.array([10**6, 10**6, 1])).tolist() == [1.0, 1.0, 10.0]
    with pytest.raises(DataError, match="no labelled pixels"):
        balanced_class_weights(np.zeros(4))


def test_weighted_loss_charges_a_miss_of_the_rare_class_more():
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    labels = torch.tensor([[[5, 6], [6, 6]]])  # one rare pixel, predicted as 6 like the rest
    logits = torch.nn.functional.one_hot(torch.full_like(labels, 6), 8).permute(0, 3, 1, 2).float() * 5
    weights = torch.ones(8)
    weights[5] = 3.0
    plain = segmentation_loss(segmenter, logits, labels, dice_weight=0)
    weighted = segmentation_loss(segmenter, logits, labels, dice_weight=0, class_weights=weights)
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    assert weighted.item() == pytest.approx(expected.item()) and weighted.item() > plain.item()
    binary = Segmenter.for_class(RENAL, "Sclerotic Glomeruli", base_channels=2)
    zero = torch.zeros(1, 1, 2, 2)
    # BCE with p = 0.5: one positive of four pixels, weighted 3x -> (3 + 3) / 4 * log 2
    assert segmentation_loss(binary, zero, (labels == 5).long(), dice_weight=0,
                             class_weights=torch.tensor([1.0, 3.0])).item() == pytest.approx(1.5 * math.log(2))


def test_label_pixel_counts_add_up_the_masks(tmp_path):
    dataset = _coloured_dataset(tmp_path)
    rows = dataset.rows()
    expected = sum(np.bincount(dataset.mask(row).ravel(), minlength=8) for _, row in rows.iterrows())
    multi = Segmenter.for_class(RENAL, None, base_channels=2)
    np.testing.assert_array_equal(label_pixel_counts(multi, [PatchRows(dataset, rows)]), expected)
    binary = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)
    np.testing.assert_array_equal(label_pixel_counts(binary, [PatchRows(dataset, rows)]),
                                  [expected.sum() - expected[4], expected[4]])


def _coloured_dataset(root, size=64, count=4):
    """Patches whose RGB is a fixed colour per class id, so pixels tell their label."""
    writer = PatchDatasetWriter(root, schema=RENAL, patch_size=size)
    rng = np.random.default_rng(0)
    patches = []
    for _ in range(count):
        mask = rng.choice([0, 3, 4, 5, 6], size=(size // 8, size // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        patches.append(Patch(LUT[mask], mask))
    writer.write_slide("s", patches, split="train")
    return writer.finalize()


def test_training_pairs_line_up_with_their_labels(tmp_path):
    dataset = _coloured_dataset(tmp_path)
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    pairs = SegmentationPairs(PatchRows(dataset, dataset.rows()), segmenter, input_size=220, seed=3)
    for epoch in range(3):
        pairs.set_epoch(epoch)
        for index in range(len(pairs)):
            item = pairs[index]
            assert item["image"].shape == (3, 220, 220) and item["labels"].shape == (36, 36)
            centre = ((item["image"][:, 92:128, 92:128] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(centre, LUT[item["labels"].numpy()])


def test_foreground_crops_put_the_rare_class_in_the_window(tmp_path):
    writer = PatchDatasetWriter(tmp_path / "ds", schema=RENAL, patch_size=96)
    mask = np.full((96, 96), 6, np.uint8)
    mask[88:92, 4:8] = 4  # 16 pixels of Glomeruli near a corner
    writer.write_slide("s", [Patch(LUT[mask], mask)] * 4, split="train")
    dataset = writer.finalize()
    rows = PatchRows(dataset, dataset.rows())
    binary = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)

    def windows_with_glomeruli(foreground: float, segmenter: Segmenter, label: int) -> int:
        pairs = SegmentationPairs(rows, segmenter, input_size=204, seed=1, foreground=foreground)
        hits = 0
        for epoch in range(10):
            pairs.set_epoch(epoch)
            hits += sum(int((pairs[i]["labels"] == label).any()) for i in range(len(pairs)))
        return hits

    assert windows_with_glomeruli(1.0, binary, 1) == 40  # every one of 10 epochs x 4 windows of 20 px
    assert windows_with_glomeruli(0.0, binary, 1) <= 4  # a uniform window holds it 1 time in 100
    multiclass = Segmenter.for_class(RENAL, None, base_channels=2)
    assert windows_with_glomeruli(1.0, multiclass, 4) == 40  # the patch's one rare label


def test_evaluation_pairs_cover_the_whole_patch(tmp_path):
    dataset = _coloured_dataset(tmp_path)
    segmenter = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)
    pairs = SegmentationPairs(PatchRows(dataset, dataset.rows()), segmenter, augment=False)
    item = pairs[1]
    assert item["image"].shape == (3, 252, 252) and item["labels"].shape == (64, 64)
    mask = dataset.mask(dataset.rows().iloc[1])
    np.testing.assert_array_equal(item["labels"].numpy(), (mask == 4).astype(int))
    centre = ((item["image"][:, 92:156, 92:156] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(centre, LUT[mask])


def test_training_window_must_fit_the_patches(tmp_path):
    dataset = _coloured_dataset(tmp_path)
    assert default_input_size(64, 4) == 236 and default_input_size(256, 4) == 428
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    with pytest.raises(ConfigError, match="input size 268 px predicts 84 px.*at most 236 px"):
        SegmentationPairs(PatchRows(dataset, dataset.rows()), segmenter, input_size=268)


def test_same_seed_same_run(toy_dataset, tmp_path):
    config = SegmentTrainConfig(base_channels=2, input_size=204, batch_size=4, max_epochs=1, device="cpu", seed=7)
    train = [PatchRows(toy_dataset, toy_dataset.rows("train").head(4))]
    val = PatchRows(toy_dataset, toy_dataset.rows("val").head(2))
    runs = [train_segmenter(train, val, config, RENAL, keep_best=False) for _ in range(2)]
    pd.testing.assert_frame_equal(pd.DataFrame(runs[0].history), pd.DataFrame(runs[1].history))
    for key, value in runs[0].segmenter.net.state_dict().items():
        torch.testing.assert_close(runs[1].segmenter.net.state_dict()[key], value, rtol=0, atol=0)


def test_learning_rate_warms_up_then_follows_its_schedule():
    cosine = learning_rate_factor(4, 12, "cosine")
    np.testing.assert_allclose([cosine(s) for s in (0, 1, 3, 4, 6, 8, 12, 20)],
                               [0.25, 0.5, 1.0, 1.0, 0.853553, 0.5, 0.0, 0.0], atol=1e-6)
    constant = learning_rate_factor(2, 12, "constant")
    assert [constant(s) for s in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]
    assert learning_rate_factor(0, 10, "cosine")(0) == 1.0  # no warm-up


def test_best_epoch_follows_the_monitored_score():
    history = [{"epoch": 1, "val_loss": 0.9, "val_dice": math.nan}, {"epoch": 2, "val_loss": 0.5, "val_dice": 0.4},
               {"epoch": 3, "val_loss": 0.4, "val_dice": 0.7}, {"epoch": 4, "val_loss": 0.3, "val_dice": 0.7}]
    assert best_epoch(history, "val_loss")["epoch"] == 4
    assert best_epoch(history, "val_dice")["epoch"] == 3  # the first of ties, NaN never


def test_dice_monitored_training_keeps_the_best_dice_epoch(toy_dataset, tmp_path):
    config = SegmentTrainConfig(base_channels=2, input_size=204, batch_size=4, max_epochs=3, device="cpu", seed=7,
                                monitor="val_dice", warmup_epochs=1, schedule="cosine", class_name="Glomeruli")
    train = [PatchRows(toy_dataset, toy_dataset.rows("train").head(4))]
    val = PatchRows(toy_dataset, toy_dataset.rows("val").head(2))
    run = train_segmenter(train, val, config, RENAL, log_dir=tmp_path, keep_best=True)
    assert run.kept == "highest validation Dice" and run.present == [1] and len(run.history) == 3
    assert run.kept_epoch == best_epoch(run.history, "val_dice")
    initial = {}
    for seed in (7, 8):  # the weights a run starts from are those its seed draws
        torch.manual_seed(seed)
        initial[seed] = weights_fingerprint(Segmenter.for_class(RENAL, "Glomeruli", base_channels=2))
    assert run.initial_weights == initial[7] != initial[8]
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # the kept weights were loaded, then removed


def test_training_can_start_from_a_trained_segmenter(multiclass_folder, toy_dataset, tmp_path):
    start = Segmenter.load(multiclass_folder)
    width = start.architecture.base_channels
    train = [PatchRows(toy_dataset, toy_dataset.rows("train").head(2))]
    val = PatchRows(toy_dataset, toy_dataset.rows("val").head(1))
    config = SegmentTrainConfig(base_channels=width, input_size=204, batch_size=2, max_epochs=1, device="cpu",
                                init=str(multiclass_folder), class_weights="balanced", learning_rate=1e-9)
    run = train_segmenter(train, val, config, RENAL, keep_best=False)
    # a learning rate of 1e-9 leaves the weights where they started (batch-norm statistics aside)
    for key, value in start.net.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(run.segmenter.net.state_dict()[key], value, rtol=0, atol=1e-6)
    wider = SegmentTrainConfig(base_channels=width + 1, input_size=204, max_epochs=1, device="cpu",
                               init=str(multiclass_folder))
    with pytest.raises(ConfigError, match="pass the --class and --base-channels"):
        train_segmenter(train, val, wider, RENAL, keep_best=False)


# --- the command, and the Dice it reaches ----------------------------------------------------------
def test_segment_train_writes_a_folder_with_its_record(multiclass_folder, toy):
    config = json.loads((multiclass_folder / "segmenter.json").read_text())
    assert config["mode"] == "multiclass" and config["target_class"] is None
    training = config["training"]
    assert training["patches"] == {"train": 24, "val": 8, "test": 8}
    assert training["config"]["input_size"] == toy.QUICK_OPTIONS["input_size"]
    metrics = pd.read_csv(multiclass_folder / "logs" / "metrics.csv")
    assert training["epochs"] == len(metrics.dropna(subset=["val_loss"]))
    assert training["weights"] == "lowest validation loss"
    assert set(training["evaluation"]) == {"val", "test"}
    test = training["evaluation"]["test"]
    assert test["patches"] == 8
    shares = {int(k): c["pixel_share"] for k, c in test["classes"].items()}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert {k for k, v in shares.items() if v > 0} == {0, 4, 5, 6}


@pytest.mark.slow
@pytest.mark.parametrize("class_name, classes", [("Glomeruli", {1}), (None, {0, 4, 5, 6})])
def test_segment_train_reaches_dice_0_9(toy, toy_dataset, tmp_path, class_name, classes):
    out = tmp_path / "seg"
    assert main(toy.train_command(toy_dataset.root, out, toy.QUALITY_OPTIONS, class_name)) == 0
    evaluation = json.loads((out / "segmenter.json").read_text())["training"]["evaluation"]["test"]
    present = {int(k): c["dice"] for k, c in evaluation["classes"].items() if c["pixel_share"] >= 0.02}
    assert set(present) == classes
    assert min(present.values()) >= 0.9, present


def test_segment_predict_writes_labels_of_each_image(multiclass_folder, toy_dataset, tmp_path, capsys):
    rows = toy_dataset.rows("test").head(2)
    images = [toy_dataset.root / p for p in rows["image"]]
    assert main(["segment", "predict", *map(str, images), "--segmenter", str(multiclass_folder),
                 "--out", str(tmp_path / "multi"), "--device", "cpu", "--no-progress"]) == 0
    assert main(["segment", "predict", *map(str, images), "--segmenter", str(multiclass_folder),
                 "--out", str(tmp_path / "glom"), "--class", "Glomeruli", "--preview", "--no-progress"]) == 0
    assert "segmented 2 images with the multi-class segmenter" in capsys.readouterr().out
    for path in images:
        labels = np.array(Image.open(tmp_path / "multi" / path.name))
        assert labels.shape == (96, 96) and set(np.unique(labels)) <= set(range(8))
        glomeruli = np.array(Image.open(tmp_path / "glom" / path.name))
        np.testing.assert_array_equal(glomeruli, (labels == 4).astype(np.uint8))
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "glom" / "preview" / path.name)), glomeruli * 255)


def test_segment_commands_refuse_bad_input(toy, toy_dataset, multiclass_folder, tmp_path, capsys):
    no_val = toy.write_toy_dataset(tmp_path / "noval", {"a": "train"}, per_slide=2, size=64)
    assert main(["segment", "train", str(no_val.root), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "has no 'val' rows" in capsys.readouterr().err
    assert main(["segment", "train", str(toy_dataset.root), "--out", str(multiclass_folder)]) == 2
    assert "already holds a segmenter" in capsys.readouterr().err
    assert main(["segment", "train", str(toy_dataset.root), "--out", str(tmp_path / "s"), "--class", "Podocytes"]) == 2
    assert "unknown class name 'Podocytes'" in capsys.readouterr().err
    assert main(["segment", "train", str(toy_dataset.root), "--out", str(tmp_path / "s"), "--batch-size", "0"]) == 2
    assert "bad training option (field 'batch_size'" in capsys.readouterr().err
    image = toy_dataset.root / toy_dataset.rows("test")["image"][0]
    assert main(["segment", "predict", str(image), "--segmenter", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "not a segmenter folder" in capsys.readouterr().err
    assert main(["segment", "predict", str(image), "--segmenter", str(multiclass_folder), "--out",
                 str(tmp_path / "p"), "--coverage", "most", "--no-progress"]) == 2
    assert "unknown coverage 'most'" in capsys.readouterr().err


def test_segment_predict_takes_a_dataset_or_its_images_folder_with_slide_sub_folders(multiclass_folder, toy_dataset,
                                                                                      tmp_path, capsys):
    import shutil

    rows = toy_dataset.manifest.groupby("slide").head(1).head(2)
    copy = tmp_path / "DS"
    for relative in rows["image"]:
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_dataset.root / relative, copy / relative)
    shutil.copy(toy_dataset.root / "dataset.json", copy / "dataset.json")
    assert main(["segment", "predict", *[str(toy_dataset.root / p) for p in rows["image"]], "--segmenter",
                 str(multiclass_folder), "--out", str(tmp_path / "files"), "--no-progress"]) == 0
    for given in (copy, copy / "images"):
        out = tmp_path / f"from-{given.name}"
        assert main(["segment", "predict", str(given), "--segmenter", str(multiclass_folder), "--out", str(out),
                     "--no-progress"]) == 0
        assert "segmented 2 images" in capsys.readouterr().out
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
        assert written == sorted(str(Path(p).relative_to("images")) for p in rows["image"])
        for relative in written:
            np.testing.assert_array_equal(np.array(Image.open(out / relative)),
                                          np.array(Image.open(tmp_path / "files" / Path(relative).name)))


def test_segment_predict_checks_its_options_before_loading_the_segmenter(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert main(["segment", "predict", str(image), "--segmenter", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "p"), "--tile", "0"]) == 2
    assert capsys.readouterr().err == "error: --tile must be at least 1, got 0\n"


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "field 'learning_rate': Input should be a finite number"),
    ("--dice-weight", "inf", "field 'dice_weight': Input should be a finite number"),
    ("--seed", "-1", "field 'seed': Input should be greater than or equal to 0"),
    ("--input-size", "-4", "field 'input_size': Input should be greater than or equal to 1"),
])
def test_segment_train_refuses_non_finite_and_negative_options(toy_dataset, tmp_path, capsys, option, value, message):
    assert main(["segment", "train", str(toy_dataset.root), "--out", str(tmp_path / "s"), option, value,
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: bad training option ({message})\n"
    assert not (tmp_path / "s").exists()

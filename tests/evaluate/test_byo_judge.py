"""Your own judge: masks predicted by any model, or an exported network with its JSON, give the reports of a
histosynth segmenter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.evaluate.caption_accuracy import judge
from histosynth.io import write_png_atomic
from histosynth.schema import RENAL
from histosynth.segment.external import TorchSegmenter
from histosynth.segment.predict import predict_images, thesis_centre
from histosynth.segment.segmenter import Segmenter

#: The tiny segmenter's windows for 96 px images: 92 px of context before, padded on to 284 px (100 px out).
INPUT_SIZE = 284
UNET_JSON = {"class_ids": RENAL.ids, "normalisation": "[-1,1]", "padding": {"mode": "reflect", "px": 92},
             "input_size": INPUT_SIZE}
RUN = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def job_folder(toy, tmp_path_factory):
    """Generated images as generation jobs lay them out (00000/00000.png), with their requested captions."""
    return toy.write_generated_folder(tmp_path_factory.mktemp("job"), nested=True)


@pytest.fixture(scope="module")
def predicted(job_folder, multiclass_folder, tmp_path_factory):
    """The built-in segmenter's own predictions, written as any other model's would be."""
    out = tmp_path_factory.mktemp("predicted") / "masks"
    assert main(["segment", "predict", str(job_folder), "--segmenter", str(multiclass_folder), "--out", str(out),
                 *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def folder_report(job_folder, multiclass_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "folder"
    assert main(["evaluate", "captions", "--images", str(job_folder), "--segmenter", str(multiclass_folder),
                 "--coverage", "full", "--out", str(out), *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def scripted(multiclass_folder, tmp_path_factory):
    """The built-in segmenter's network traced with TorchScript, with its JSON beside it."""
    net = Segmenter.load(multiclass_folder).net.eval()
    path = tmp_path_factory.mktemp("scripted") / "unet.pt"
    with pytest.warns(torch.jit.TracerWarning):  # the valid sizes are fixed at INPUT_SIZE, as its JSON says
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), check_trace=False), path)
    path.with_name("unet.pt.json").write_text(json.dumps(UNET_JSON))
    return path


def assert_same_tables(ours, theirs, names=("table_5_1", "per_image", "agreement", "confusion_glomeruli")):
    for name in names:
        pd.testing.assert_frame_equal(pd.read_csv(ours / f"{name}.csv", keep_default_na=False),
                                      pd.read_csv(theirs / f"{name}.csv", keep_default_na=False))


def test_predicted_masks_give_the_segmenters_own_caption_report(job_folder, predicted, folder_report, tmp_path):
    assert sorted(p.relative_to(predicted).as_posix() for p in predicted.rglob("*.png"))[:2] == [
        "00000/00000.png", "00001/00001.png"]
    out = tmp_path / "byo"
    assert main(["evaluate", "captions", "--images", str(job_folder), "--predicted-masks", str(predicted),
                 "--coverage", "full", "--out", str(out), "--no-progress"]) == 0
    assert_same_tables(out, folder_report)
    assert f"segmenter: masks predicted by another model, read from {predicted} (schema 'renal')" in (
        out / "report.md").read_text()

    # with the thesis' coverage only the centre the thesis segmented counts (84 px of 96), and a flat folder
    # of masks named by the images' stems serves as well
    flat = tmp_path / "flat"
    flat.mkdir()
    for mask in predicted.rglob("*.png"):
        shutil.copy(mask, flat / mask.name)
    centre = tmp_path / "centre"
    assert main(["evaluate", "captions", "--images", str(job_folder), "--predicted-masks", str(flat),
                 "--out", str(centre), "--no-progress"]) == 0
    masks = [thesis_centre(np.asarray(Image.open(p))) for p in sorted(flat.glob("*.png"))]
    assert masks[0].shape == (84, 84)
    expected = judge(masks, [GENERATING_CAPTION] * 6, RENAL).level_shares()
    pd.testing.assert_frame_equal(pd.read_csv(centre / "table_5_1.csv", keep_default_na=False), expected,
                                  check_dtype=False)


def test_a_torchscript_export_gives_the_folder_segmenters_report(job_folder, multiclass_folder, scripted,
                                                                 folder_report, predicted, tmp_path):
    out = tmp_path / "scripted"
    assert main(["evaluate", "captions", "--images", str(job_folder), "--segmenter", str(scripted),
                 "--coverage", "full", "--out", str(out), *RUN]) == 0
    assert_same_tables(out, folder_report)
    assert f"segmenter: TorchScript segmenter unet.pt on schema 'renal' ({scripted})" in (out / "report.md").read_text()
    # `segment predict` takes it too, and writes the folder segmenter's labels
    labels = tmp_path / "labels"
    assert main(["segment", "predict", str(job_folder), "--segmenter", str(scripted), "--out", str(labels), *RUN]) == 0
    for mask in predicted.rglob("*.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(labels / mask.relative_to(predicted))),
                                      np.asarray(Image.open(mask)))


def test_a_same_size_network_is_fed_as_its_json_says(tmp_path):
    """A padded network: [0, 1] input, reflect padding cut off again, channels mapped to the JSON's ids."""

    class Thresholds(torch.nn.Module):  # channel 0: dark, channel 1: bright (red channel), same-size output
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            red = x[:, :1]
            return torch.cat([0.5 - red, red - 0.5], dim=1)

    path = tmp_path / "thresholds.pt"
    torch.jit.save(torch.jit.script(Thresholds()), path)
    config = tmp_path / "own.json"
    config.write_text(json.dumps({"class_ids": [6, 4], "normalisation": "[0,1]", "padding": {"px": 5}}))
    image = np.zeros((20, 30, 3), np.uint8)
    image[5:9, 10:25, 0] = 255
    model = TorchSegmenter.load(path, config)
    expected = np.where(image[:, :, 0] > 127, 4, 6)
    np.testing.assert_array_equal(model.predict([image, image])[1], expected)


def test_refusals(job_folder, predicted, scripted, multiclass_folder, tmp_path, refused):
    def captions(*judge_args: str) -> str:
        return refused(["evaluate", "captions", "--images", str(job_folder), "--out", str(tmp_path / "r"),
                        "--coverage", "full", *RUN, *judge_args])

    partial = tmp_path / "partial"
    shutil.copytree(predicted, partial)
    (partial / "00003" / "00003.png").unlink()
    assert captions("--predicted-masks", str(partial)) == (
        f"error: no predicted mask for {job_folder / '00003' / '00003.png'} in {partial} (looked for "
        "00003/00003.png, 00003.png); predict one per image, named like it")
    write_png_atomic(partial / "00003" / "00003.png", np.zeros((90, 96), np.uint8))
    assert captions("--predicted-masks", str(partial)) == (
        f"error: {partial / '00003' / '00003.png'} is 90x96 px but its image {job_folder / '00003' / '00003.png'} "
        "is 96x96 px; predict masks at the images' size")
    unknown = np.zeros((96, 96), np.uint8)
    unknown[0, :2] = (9, 12)
    write_png_atomic(partial / "00003" / "00003.png", unknown)
    assert captions("--predicted-masks", str(partial)).startswith(
        f"error: {partial / '00003' / '00003.png'}: mask ids [9, 12] are not in schema 'renal'")
    assert "--predicted-masks DIR (your model's label PNGs), one of them" in captions(
        "--predicted-masks", str(partial), "--segmenter", str(multiclass_folder))

    bare = tmp_path / "bare.pt"
    shutil.copy(scripted, bare)
    assert captions("--segmenter", str(bare)).startswith(f"error: {tmp_path / 'bare.pt.json'} is missing: an exported "
                                                         "segmenter needs a JSON beside it (or --segmenter-config)")
    bad = tmp_path / "bad.json"
    bad.write_text("{class_ids: [0, 1]")
    assert captions("--segmenter", str(bare), "--segmenter-config", str(bad)).startswith(
        f"error: {bad} is not valid JSON")
    for wrong, says in ((dict(UNET_JSON, class_ids=[0, 1, 2, 3, 4, 5, 6, 9]), "'class_ids' [9] are not in schema"),
                        (dict(UNET_JSON, class_ids=[0]), "'class_ids' must list the class id"),
                        (dict(UNET_JSON, normalisation="imagenet"), "'normalisation' must be"),
                        (dict(UNET_JSON, padding={"mode": "wrap", "px": 92}), "'padding' must be"),
                        (dict(UNET_JSON, class_ids=[0, 1, 2]), "returned (6, 8, 100, 100), not (batch, 3, height"),
                        (dict(UNET_JSON, padding=80), "does not cover the 96 px image with 80 px padding"),
                        (dict(UNET_JSON, input_size=200), "does not fit the network's input size of 200 px")):
        bad.write_text(json.dumps(wrong))
        assert says in captions("--segmenter", str(bare), "--segmenter-config", str(bad))
    assert "neither a segmenter folder nor an exported network" in captions("--segmenter", str(bad))
    weights = tmp_path / "weights.pt"
    torch.save(Segmenter.load(multiclass_folder).net.state_dict(), weights)
    assert captions("--segmenter", str(weights), "--segmenter-config", str(scripted) + ".json").endswith(
        "; save the network itself (not its weights) with torch.jit.save or torch.export.save")


@pytest.mark.slow
def test_a_torch_export_program_gives_the_folder_segmenters_report(job_folder, multiclass_folder, folder_report,
                                                                   tmp_path):
    net = Segmenter.load(multiclass_folder).net.eval()
    path = tmp_path / "unet.pt2"
    batch = torch.export.Dim("batch", max=64)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE),),
                                          dynamic_shapes=({0: batch},)), path)
    path.with_name("unet.pt2.json").write_text(json.dumps(UNET_JSON))
    out = tmp_path / "exported"
    assert main(["evaluate", "captions", "--images", str(job_folder), "--segmenter", str(path),
                 "--coverage", "full", "--out", str(out), *RUN]) == 0
    assert_same_tables(out, folder_report)
    images = [np.asarray(Image.open(p)) for p in sorted(job_folder.rglob("*.png"))]
    np.testing.assert_array_equal(TorchSegmenter.load(path).predict(images)[0],
                                  predict_images(Segmenter.load(multiclass_folder), images, device="cpu")[0])


def test_a_patch_dataset_is_judged_by_predicted_masks_as_by_the_segmenter(toy, multiclass_folder, tmp_path):
    dataset = toy.write_toy_dataset(tmp_path / "ds", {"a": "train", "b": "test"}, per_slide=2, size=96)
    predicted = tmp_path / "predicted"
    assert main(["segment", "predict", str(dataset.root), "--segmenter", str(multiclass_folder),
                 "--out", str(predicted), *RUN]) == 0
    assert sorted(p.relative_to(predicted).as_posix() for p in predicted.rglob("*.png")) == [
        "a/a_000000.png", "a/a_000001.png", "b/b_000000.png", "b/b_000001.png"]  # its per-slide folders
    common = ["evaluate", "captions", "--images", str(dataset.root), "--coverage", "full", "--no-progress"]
    assert main([*common, "--segmenter", str(multiclass_folder), "--device", "cpu", "--out", str(tmp_path / "f")]) == 0
    assert main([*common, "--predicted-masks", str(predicted), "--out", str(tmp_path / "byo")]) == 0
    assert_same_tables(tmp_path / "byo", tmp_path / "f")
    assert len(pd.read_csv(tmp_path / "byo" / "per_image.csv")) == 4

    # label fidelity of the dataset's patches against their own masks
    common = ["evaluate", "masks", "--images", str(dataset.root), "--masks-from", str(dataset.root), "--no-progress"]
    assert main([*common, "--segmenter", str(multiclass_folder), "--device", "cpu", "--out", str(tmp_path / "mf")]) == 0
    assert main([*common, "--predicted-masks", str(predicted), "--out", str(tmp_path / "mbyo")]) == 0
    for name in ("per_class", "per_image"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "mbyo" / f"{name}.csv"),
                                      pd.read_csv(tmp_path / "mf" / f"{name}.csv"))
    assert pd.read_csv(tmp_path / "mf" / "per_image.csv")["image"].tolist() == [
        "a_000000", "a_000001", "b_000000", "b_000001"]

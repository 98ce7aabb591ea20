"""Caption accuracy: levels found against levels requested, Table 5.1 beside the thesis, the command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.captions import GENERATING_CAPTION, Level
from histosynth.cli import main
from histosynth.errors import CaptionError, DataError, ModelError
from histosynth.evaluate.caption_accuracy import (
    THESIS_TABLE_5_1,
    judge,
    segmenter_function,
    write_caption_accuracy_report,
)
from histosynth.evaluate.images import read_generated
from histosynth.io import write_png_atomic
from histosynth.models.bundle import load_bundle
from histosynth.sample.jobs import Job, item_seed
from histosynth.schema import RENAL
from histosynth.segment.predict import predict_images
from histosynth.segment.segmenter import Segmenter

#: A colour per class id; images drawn in these colours are segmented exactly by `colour_segment`.
PALETTE = np.array([(255, 255, 255), (200, 0, 0), (255, 160, 0), (0, 120, 255), (0, 200, 0),
                    (140, 0, 210), (240, 200, 210), (0, 210, 210)], dtype=np.uint8)


def band_mask(shares: dict[int, float], size: int = 100, rest: int = 6) -> np.ndarray:
    """A mask of horizontal bands with exactly the given shares of rows; `rest` fills the remainder."""
    mask = np.full((size, size), rest, dtype=np.uint8)
    row = 0
    for class_id, share in shares.items():
        rows = round(share * size)
        mask[row:row + rows] = class_id
        row += rows
    return mask


def colour_segment(images):
    """The exact segmentation of images drawn in PALETTE colours."""
    return [np.argmin(((img[:, :, None, :].astype(int) - PALETTE[None, None]) ** 2).sum(-1), axis=-1).astype(np.uint8)
            for img in images]


#: 4 match the generating caption exactly, 3 show a little of both glomeruli, 2 medium sclerotic, 1 none.
MASKS = ([band_mask({4: 0.5, 3: 0.3}, rest=0)] * 4 + [band_mask({4: 0.1, 5: 0.05})] * 3
         + [band_mask({5: 0.3})] * 2 + [band_mask({})])


def test_table_5_1_counts_levels_found():
    result = judge(MASKS, [GENERATING_CAPTION] * len(MASKS), RENAL)
    table = result.level_shares().set_index("level")
    assert table["Glomeruli %"].tolist() == [30.0, 30.0, 0.0, 40.0]
    assert table["Sclerotic Glomeruli %"].tolist() == [50.0, 30.0, 20.0, 0.0]
    assert table["combined %"].tolist() == [10.0, 30.0, 20.0, 40.0]
    assert table.loc["None", "Glomeruli % (thesis)"] == 12.34
    assert table.loc["High", "combined % (thesis)"] == 4.88
    assert (table["Sclerotic Glomeruli % (thesis)"].tolist()
            == [THESIS_TABLE_5_1["Sclerotic Glomeruli"][lvl] for lvl in Level])
    assert result.mention_share() == 90.0
    assert result.exact_match_share() == 40.0


def test_confusion_of_requested_and_found_levels():
    result = judge(MASKS, [GENERATING_CAPTION] * len(MASKS), RENAL)
    glomeruli = result.confusion("Glomeruli").set_index("requested")
    assert glomeruli.loc["high"].tolist() == [3, 3, 0, 4]
    assert glomeruli.drop(index="high").to_numpy().sum() == 0
    tubuli = result.confusion("Tubuli").set_index("requested")
    assert tubuli.loc["medium"].tolist() == [6, 0, 4, 0]
    agreement = result.agreement().set_index("class")
    assert agreement.loc["Glomeruli", "found = requested %"] == 40.0
    assert agreement.loc["Glomeruli", "requested"] == "high (10)"
    assert agreement.loc["Arteries", "found = requested %"] == 100.0


def test_report_places_the_thesis_beside_ours(tmp_path):
    result = judge(MASKS, [GENERATING_CAPTION] * len(MASKS), RENAL)
    path = write_caption_accuracy_report(result, tmp_path, coverage="thesis", caption_source="test", segmenter="exact")
    text = path.read_text()
    assert "| None | 30.00 | 12.34 | 50.00 | 12.60 | 10.00 | 8.74 |" in text
    assert "**90.0 %** (thesis: 91.3 %)" in text
    assert "244 px out" in text and "12 px border" in text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "table_5_1.csv", keep_default_na=False), result.level_shares(),
                                  check_dtype=False)
    assert len(pd.read_csv(tmp_path / "per_image.csv")) == 10
    assert (tmp_path / "confusion_glomeruli.csv").is_file() and (tmp_path / "table_5_1.png").is_file()


def test_unparseable_requested_caption_names_the_image():
    with pytest.raises(CaptionError, match="requested caption of image_00000.*Podocytes"):
        judge([MASKS[0]], ["There is a lot of Podocytes visible in the image."], RENAL)


def test_binary_segmenter_cannot_recaption():
    with pytest.raises(ModelError, match="needs a multi-class segmenter"):
        segmenter_function(Segmenter.for_class(RENAL, "Glomeruli", base_channels=2))


# --- the command -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated_folder(toy, tmp_path_factory):
    return toy.write_generated_folder(tmp_path_factory.mktemp("generated"))


@pytest.mark.parametrize("coverage, side", [("thesis", 84), ("full", 96)])
def test_evaluate_captions_command(generated_folder, multiclass_folder, tmp_path, coverage, side, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "captions", "--images", str(generated_folder), "--segmenter", str(multiclass_folder),
                 "--out", str(out), "--coverage", coverage, "--device", "cpu", "--no-progress"]) == 0
    assert "6 images:" in capsys.readouterr().out
    per_image = pd.read_csv(out / "per_image.csv")
    assert per_image["height"].tolist() == [side] * 6 and per_image["width"].tolist() == [side] * 6
    # the verdicts are those of the segmenter's own masks at this coverage
    images = [np.asarray(Image.open(p)) for p in sorted(generated_folder.glob("*.png"))]
    masks = predict_images(Segmenter.load(multiclass_folder), images, coverage=coverage, device="cpu")
    expected = judge(masks, [GENERATING_CAPTION] * 6, RENAL).level_shares()
    pd.testing.assert_frame_equal(pd.read_csv(out / "table_5_1.csv", keep_default_na=False), expected,
                                  check_dtype=False)
    assert (out / "report.md").read_text().count("(thesis: 91.3 %)") == 1


def test_evaluate_captions_refuses_bad_input(generated_folder, multiclass_folder, tmp_path, capsys):
    common = ["--segmenter", str(multiclass_folder), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(["evaluate", "captions", "--images", str(generated_folder), "--n", "10", *common]) == 2
    assert "holds 6 images but 10 were asked for" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    write_png_atomic(bare / "x.png", np.zeros((96, 96, 3), dtype=np.uint8))
    assert main(["evaluate", "captions", "--images", str(bare), *common]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["evaluate", "captions", "--model", str(tmp_path), *common]) == 2
    assert "is not a histosynth model folder" in capsys.readouterr().err
    assert main(["evaluate", "captions", *common]) == 2
    assert "give either --images DIR" in capsys.readouterr().err
    binary = tmp_path / "binary"
    Segmenter.for_class(RENAL, "Glomeruli", base_channels=2).save(binary)
    assert main(["evaluate", "captions", "--images", str(generated_folder), "--segmenter", str(binary),
                 "--out", str(tmp_path / "r")]) == 2
    assert "needs a multi-class segmenter" in capsys.readouterr().err
    schema = tmp_path / "schema.yaml"
    schema.write_text("name: two\nclasses:\n  - {id: 0, name: background, color: [0, 0, 0]}\n"
                      "  - {id: 1, name: Glomeruli, color: [0, 255, 0]}\n")
    assert main(["evaluate", "captions", "--images", str(generated_folder), "--schema", str(schema), *common]) == 2
    assert "segmenter's classes" in capsys.readouterr().err


def test_generation_job_manifest_is_read_and_missing_images_reported(tmp_path):
    write_png_atomic(tmp_path / "00000.png", PALETTE[MASKS[0]])
    write_png_atomic(tmp_path / "00001.png", PALETTE[MASKS[4]])
    items = [{"index": i, "file": f"{i:05d}.png", "caption": GENERATING_CAPTION, "seed": 17 + i} for i in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "histosynth.generation-job", "items": items}))
    found, source = read_generated(tmp_path)
    assert [i.path.name for i in found] == ["00000.png", "00001.png"]
    assert source == "manifest.json; 1 listed images are missing (an unfinished job?) and left out"


def test_manifest_must_list_images_and_captions(tmp_path):
    manifest = pd.DataFrame([{"file": "missing.png", "caption": GENERATING_CAPTION}])
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError, match="none of the 1 images listed"):
        read_generated(tmp_path)
    pd.DataFrame([{"name": "a.png"}]).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError, match="needs a 'caption' column"):
        read_generated(tmp_path)


def test_evaluate_captions_generates_from_a_model_folder(tiny_bundle_path, multiclass_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "captions", "--model", str(tiny_bundle_path), "--segmenter", str(multiclass_folder),
                 "--n", "2", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    generated = sorted((out / "images").rglob("*.png"))
    assert len(generated) == 2
    # the images are a generation job's, as `histosynth generate` makes them (same seeds, same manifest)
    job = Job.read(out / "images")
    assert [item["caption"] for item in job.items] == [GENERATING_CAPTION] * 2
    assert [item["seed"] for item in job.items] == [item_seed(0, 0), item_seed(0, 1)]
    assert job.spec.options == load_bundle(tiny_bundle_path).sampling.on_device("cpu")  # its precision settled
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 2
    # the verdicts are those of the segmenter on the images that were generated and written
    images = [np.asarray(Image.open(p)) for p in generated]
    masks = predict_images(Segmenter.load(multiclass_folder), images, coverage="thesis", device="cpu")
    expected = judge(masks, [GENERATING_CAPTION] * 2, RENAL).level_shares()
    pd.testing.assert_frame_equal(pd.read_csv(out / "table_5_1.csv", keep_default_na=False), expected,
                                  check_dtype=False)

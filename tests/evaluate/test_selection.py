"""Choosing, per mask, the generated image a segmenter reads closest to its mask."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.cli import main
from histosynth.errors import ConfigError, DataError
from histosynth.evaluate.label_fidelity import pixel_counts
from histosynth.evaluate.selection import Candidates, agreement, read_candidates, select_best
from histosynth.io import write_png_atomic
from histosynth.sample.jobs import Job
from histosynth.schema import RENAL
from histosynth.segment.predict import predict_images
from histosynth.segment.segmenter import Segmenter

_spec = importlib.util.spec_from_file_location(
    "maskmodels", Path(__file__).parents[1] / "sample" / "maskmodels.py")
maskmodels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maskmodels)


def test_agreement_is_the_share_of_pixels_read_as_their_mask_class():
    mask = np.array([[3, 3, 6, 6]] * 4, np.uint8)           # 8 px Tubuli, 8 px interstitium
    prediction = mask.copy()
    prediction[:2, 2:] = 4                                    # half the interstitium read as Glomeruli
    assert agreement(pixel_counts(mask, prediction, RENAL.ids)) == 12 / 16
    assert agreement(pixel_counts(mask, mask, RENAL.ids)) == 1.0


def test_the_candidate_read_closest_to_its_mask_is_kept_the_first_of_equals(tmp_path):
    # images whose red channel is the class id, read by a segmenter that returns the red channel
    def read_red(images):
        return [image[..., 0].copy() for image in images]

    mask = np.array([[3, 3, 6, 6]] * 4, np.uint8)
    write_png_atomic(tmp_path / "mask.png", mask)
    readings = {"half": np.where(np.arange(4) < 2, mask, 3).astype(np.uint8), "exact": mask,
                "exact-again": mask, "three-quarters": mask.copy()}
    readings["three-quarters"][0, 2:] = 3
    paths = []
    for name, reading in readings.items():
        paths.append(tmp_path / f"{name}.png")
        write_png_atomic(paths[-1], np.stack([reading] * 3, axis=-1))
    group = Candidates("00000.png", tmp_path / "mask.png", "test", tuple(paths), (1, 2, 3, 4))
    selection = select_best([group], read_red, RENAL)
    # half: all read as Tubuli, so the 8 interstitium pixels are wrong; three-quarters: 2 of them
    expected = [8 / 16, 1.0, 1.0, 14 / 16]
    np.testing.assert_allclose(selection.scores[0], expected)
    assert selection.chosen.tolist() == [1]
    assert selection.table().loc[0, "kept_seed"] == 2


@pytest.fixture(scope="module")
def candidate_jobs(tmp_path_factory):
    """Three jobs of one micro mask model from the same three masks, seeds 0, 1 and 2."""
    root = tmp_path_factory.mktemp("candidates")
    model = maskmodels.make_mask_bundle(root / "model")
    masks = root / "masks"
    masks.mkdir()
    for i in range(3):
        mask = np.full((64, 64), 6, np.uint8)
        mask[8 * i:8 * i + 24, 10:40] = 3
        write_png_atomic(masks / f"m{i}.png", mask)
    jobs = []
    for seed in range(3):
        jobs.append(root / f"job{seed}")
        assert main(["generate", "--model", str(model), "--mask", str(masks), "--steps", "1", "--seed", str(seed),
                     "--out", str(jobs[-1]), "--device", "cpu"]) == 0
    return model, masks, jobs


def _share_read_right(mask: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.mean(mask == prediction))


def test_select_pairs_keeps_each_masks_best_read_candidate(candidate_jobs, multiclass_folder, tmp_path, capsys):
    _, _, jobs = candidate_jobs
    out = tmp_path / "kept"
    assert main(["select-pairs", *map(str, jobs), "--segmenter", str(multiclass_folder), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "selection.csv")
    assert table["name"].tolist() == ["00000.png", "00001.png", "00002.png"]

    segmenter = Segmenter.load(multiclass_folder)
    for row in table.itertuples():
        mask = np.asarray(Image.open(jobs[0] / "masks" / "00000" / row.name))
        candidates = [np.asarray(Image.open(job / "images" / "00000" / row.name).convert("RGB")) for job in jobs]
        predictions = predict_images(segmenter, candidates, coverage="full", device="cpu")
        expected = [_share_read_right(mask, p) for p in predictions]
        np.testing.assert_allclose([row.agreement_0, row.agreement_1, row.agreement_2], expected, rtol=1e-9)
        best = int(np.argmax(expected))  # the first of equals
        assert row.kept_agreement == pytest.approx(max(expected))
        assert row.kept_image == str(jobs[best] / "images" / "00000" / row.name)
        kept = np.asarray(Image.open(out / "images" / row.name).convert("RGB"))
        np.testing.assert_array_equal(kept, candidates[best])
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / row.name)), mask)
        assert row.kept_seed == Job.read(jobs[best]).items[int(row.name[:5])]["seed"]

    record = json.loads((out / "selection.json").read_text())
    assert record["jobs"] == [str(job) for job in jobs]
    assert sum(record["kept_per_job"]) == 3
    first, kept = table["agreement_0"].mean(), table["kept_agreement"].mean()
    assert f"3 masks, 3 candidates each: mean agreement {first:.3f} (first job) -> {kept:.3f} (kept)" in printed
    # a job is never overwritten with the kept images
    assert main(["select-pairs", *map(str, jobs), "--segmenter", str(multiclass_folder), "--out", str(jobs[1]),
                 "--no-progress"]) == 2
    assert f"{jobs[1]} holds a generation job, whose images the kept ones would replace" in capsys.readouterr().err
    # the kept pairs are a folder of images with the masks of the same name, as evaluate masks reads them
    assert main(["evaluate", "masks", "--images", str(out / "images"), "--mask", str(out / "masks"),
                 "--segmenter", str(multiclass_folder), "--out", str(tmp_path / "judged"), "--no-progress"]) == 0


def test_candidates_must_be_finished_jobs_of_the_same_masks_with_their_own_seeds(candidate_jobs, tiny_bundle_path,
                                                                                 tmp_path):
    model, masks, jobs = candidate_jobs
    with pytest.raises(ConfigError, match="at least two generation jobs"):
        read_candidates(jobs[:1])
    captions = tmp_path / "captions"
    assert main(["generate", "--model", str(tiny_bundle_path), "--caption", "", "--n", "1", "--steps", "1",
                 "--out", str(captions)]) == 0
    with pytest.raises(DataError, match="is a job generated from captions"):
        read_candidates([jobs[0], captions])
    other = tmp_path / "other-masks"
    assert main(["generate", "--model", str(model), "--mask", str(masks / "m0.png"), "--steps", "1", "--seed", "5",
                 "--out", str(other), "--device", "cpu"]) == 0
    with pytest.raises(DataError, match="was made from other masks than"):
        read_candidates([jobs[0], other])
    same_seed = tmp_path / "same-seed"
    assert main(["generate", "--model", str(model), "--mask", str(masks), "--steps", "1", "--seed", "0",
                 "--out", str(same_seed), "--device", "cpu"]) == 0
    with pytest.raises(ConfigError, match=r"the jobs share a seed \(\[0, 0\]\)"):
        read_candidates([jobs[0], same_seed])
    (same_seed / "images" / "00000" / "00001.png").unlink()
    with pytest.raises(DataError, match="lacks 1 of its 3 images; run its generate command again"):
        read_candidates([jobs[1], same_seed])

"""scripts/compare_samplers.py: the same items made by each sampler, measured with the evaluations' own functions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histosynth.errors import ConfigError
from histosynth.evaluate.caption_accuracy import evaluate_caption_accuracy, segmenter_function
from histosynth.evaluate.label_fidelity import LabelFidelity, evaluate_mask_job, read_mask_job
from histosynth.parallel import Shard
from histosynth.sample.jobs import Job
from histosynth.schema import RENAL
from histosynth.segment.predict import read_rgb
from histosynth.segment.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


script = _load("compare_samplers", ROOT / "scripts" / "compare_samplers.py")
maskmodels = _load("maskmodels", ROOT / "tests" / "sample" / "maskmodels.py")


def test_samplers_are_parsed_with_their_steps_and_job_seed():
    assert script.parse_samplers("ddim50, dpm20,ddim50@1") == [
        script.Sampler("ddim", 50), script.Sampler("dpm++", 20), script.Sampler("ddim", 50, 1)]
    assert [s.name for s in script.parse_samplers("ddim50,dpm20,ddim50@1")] == ["ddim50", "dpm20", "ddim50@1"]
    for bad, said in (("ddim50,euler20", "unknown sampler 'euler20'"), ("ddim50,dpm0", "unknown sampler 'dpm0'"),
                      ("ddim50", "two or more different samplers"), ("dpm20,dpm20", "two or more different")):
        with pytest.raises(ConfigError, match=said):
            script.parse_samplers(bad)


def fidelity(counts: list) -> LabelFidelity:
    """A label fidelity of images whose (both, mask, prediction) pixel counts are given per image and class."""
    array = np.zeros((len(counts), len(RENAL.ids), 3), np.int64)
    for i, per_class in enumerate(counts):
        for class_id, triple in per_class.items():
            array[i, RENAL.ids.index(class_id)] = triple
    return LabelFidelity(RENAL, [f"i{i}" for i in range(len(counts))], array)


def test_the_difference_is_judged_against_the_spread_of_the_reference():
    # two images, one class: the reference reads each perfectly or half; the other sampler the same, swapped
    reference = fidelity([{4: (10, 10, 10)}, {4: (5, 10, 10)}])
    swapped = fidelity([{4: (5, 10, 10)}, {4: (10, 10, 10)}])
    worse = fidelity([{4: (0, 10, 10)}, {4: (0, 10, 10)}])
    draws = script.resampled_items(2, resamples=100)
    table = script.compare({"ref": reference, "swapped": swapped, "worse": worse},
                           script.FIDELITY_METRICS, script.fidelity_subset, draws).set_index("sampler")
    assert table.loc["ref", "value"] == pytest.approx(0.75) and np.isnan(table.loc["ref", "difference"])
    # the resampled Dice of the reference: 1.0, 0.75 or 0.5 (a quarter, a half, a quarter of the draws)
    assert table.loc["ref", "seed spread"] == pytest.approx(1.96 * np.sqrt(2) * np.sqrt(1 / 32), rel=0.2)
    assert (table.loc["ref", "low"], table.loc["ref", "high"]) == (0.5, 1.0)
    assert table.loc["swapped", "difference"] == 0 and table.loc["swapped", "within spread"]
    assert table.loc["worse", "difference"] == pytest.approx(-0.75) and not table.loc["worse", "within spread"]
    assert script.outside_spread(table.reset_index().assign(model="text+mask")) == {
        "swapped": [], "worse": ["text+mask mean Dice"]}


def test_processes_sharing_the_batches_keep_their_own_timings_and_are_summed(tmp_path):
    first, second = script.Timings(tmp_path, Shard(0, 2)), script.Timings(tmp_path, Shard(1, 2))
    first.add("text-ddim50", 10.0, 8.0, 8)
    second.add("text-ddim50", 30.0, 12.0, 2)
    second.add("text-ddim50", 5.0, 5.0, 0)  # nothing made: nothing noted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timings-0-of-2.json", "timings-1-of-2.json"]
    assert json.loads((tmp_path / "timings-1-of-2.json").read_text()) == {
        "text-ddim50": {"seconds": 30.0, "cpu_seconds": 12.0, "items": 2}}
    whole = script.Timings(tmp_path)
    assert whole.path.name == "timings.json"
    assert whole.per_item("text-ddim50") == pytest.approx(20.0 / 10)
    assert whole.per_item("text-ddim50", "seconds") == pytest.approx(40.0 / 10)
    assert np.isnan(whole.per_item("mask-ddim50"))
    assert script.Timings(tmp_path, Shard(1, 2)).data == second.data  # a resumed process adds to its own file


def test_every_sampler_makes_the_same_items_and_is_measured_as_the_evaluations_do(
        tiny_bundle_path, multiclass_folder, tmp_path):
    models = script.Models(tiny_bundle_path, maskmodels.make_mask_bundle(tmp_path / "mask"), multiclass_folder)
    samplers = script.parse_samplers("ddim2,dpm2,ddim2@1")
    out = tmp_path / "compare"
    table, per_class, levels, timings = script.run_comparison(models, samplers, 2, out, "cpu", resamples=20)

    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "layouts", "mask-ddim2", "mask-ddim2@1", "mask-dpm2", "text-ddim2", "text-ddim2@1", "text-dpm2"]
    jobs = {p.name: Job.read(p).finished() for p in out.iterdir() if p.is_dir() and p.name != "layouts"}
    seeds = {name: [item["seed"] for item in items] for name, items in jobs.items()}
    assert seeds["text-ddim2"] == seeds["text-dpm2"] == seeds["mask-ddim2"] == seeds["mask-dpm2"]
    assert seeds["text-ddim2@1"] != seeds["text-ddim2"]
    assert [i["scheduler"] for i in jobs["mask-dpm2"]] == ["dpm++"] * 2
    assert [i["mask"] for i in jobs["mask-dpm2"]] == [i["mask"] for i in jobs["mask-ddim2"]]

    # the numbers are those of the evaluations run on each job
    segmenter = Segmenter.load(multiclass_folder)
    for sampler in ("ddim2", "dpm2", "ddim2@1"):
        rows = table[table["sampler"] == sampler].set_index("metric")
        result = evaluate_mask_job(read_mask_job(out / f"mask-{sampler}")[0],
                                   segmenter_function(segmenter, "full", "cpu"), RENAL)[0]
        assert rows.loc["mean Dice", "value"] == pytest.approx(result.mean_dice())
        files = sorted(Job.read(out / f"text-{sampler}").folder.rglob("*.png"))
        captions = evaluate_caption_accuracy([read_rgb(f) for f in files], [jobs[f"text-{sampler}"][0]["caption"]] * 2,
                                             segmenter_function(segmenter, "thesis", "cpu"), RENAL)
        assert rows.loc["mention glomeruli %", "value"] == pytest.approx(captions.mention_share())
        assert rows.loc["exact caption %", "value"] == pytest.approx(captions.exact_match_share())
        assert json.loads((out / "timings.json").read_text())[f"text-{sampler}"]["items"] == 2
    assert len(table) == 3 * (len(script.CAPTION_METRICS) + len(script.FIDELITY_METRICS))
    assert set(per_class["sampler"]) == set(levels["sampler"]) == {"ddim2", "dpm2", "ddim2@1"}
    assert timings.per_item("mask-dpm2") > 0
    # items are counted per shard of batches (one batch of 8 here: shard 0 of 2 holds it, shard 1 nothing)
    assert [script.finished_in_shard(out / "text-dpm2", s) for s in (Shard(), Shard(0, 2), Shard(1, 2))] == [2, 2, 0]
    assert script.finished_in_shard(out / "no-job", Shard()) == 0

    text = script.write_outputs(out, "python scripts/compare_samplers.py --n 2", table, per_class, levels)
    assert (out / "comparison.md").read_text() == text
    assert "(2 for the text model, 2 for the text+mask model;" in text and "| text+mask | mean Dice | dpm2 |" in text
    assert pd.read_csv(out / "comparison.csv").shape[0] == len(table)

    # measuring alone reads the same items back; with no jobs there is nothing to measure
    again = script.run_comparison(models, samplers, 2, out, "cpu", resamples=20, generate=False)[0]
    np.testing.assert_array_equal(again["value"], table["value"])
    with pytest.raises(ConfigError, match="0 text and 0 mask items in common"):
        script.run_comparison(models, samplers, 2, tmp_path / "empty", "cpu", generate=False)

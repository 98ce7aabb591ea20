"""The six-split real/synthetic experiment: patch counts, subsets, runs, resume, report, command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import ConfigError, DataError, JobError
from histosynth.evaluate.mix import (
    SPLITS,
    MixConfig,
    MixSources,
    mix_config,
    run_mix_experiment,
    split_rows,
    write_mix_report,
)
from histosynth.schema import ClassInfo, ClassSchema
from histosynth.segment.training import SegmentTrainConfig

TINY = dict(base_channels=2, input_size=204, batch_size=4, max_epochs=1, patience=1, device="cpu")


def test_patch_counts_follow_the_thesis():
    assert [s.name for s in SPLITS] == ["100_0", "75_25", "50_50", "25_75", "0_100", "100_100"]
    assert [s.counts(198) for s in SPLITS] == [(198, 0), (148, 50), (99, 99), (50, 148), (0, 198), (198, 198)]
    assert [sum(s.counts(10)) for s in SPLITS] == [10, 10, 10, 10, 10, 20]


def test_smaller_shares_are_subsets_of_larger_ones():
    real = pd.DataFrame({"patch_id": [f"r{i}" for i in range(20)]})
    synthetic = pd.DataFrame({"patch_id": [f"s{i}" for i in range(20)]})
    by_name = {s.name: split_rows(s, real, synthetic, 8, seed=3) for s in SPLITS}
    assert set(by_name["75_25"][0]["patch_id"]) < set(by_name["100_0"][0]["patch_id"])
    assert set(by_name["25_75"][0]["patch_id"]) < set(by_name["50_50"][0]["patch_id"])
    assert set(by_name["0_100"][1]["patch_id"]) == set(by_name["100_100"][1]["patch_id"])
    again = split_rows(SPLITS[2], real, synthetic, 8, seed=3)
    assert again[0].equals(by_name["50_50"][0])
    other_seed = split_rows(SPLITS[2], real, synthetic, 8, seed=4)
    assert not other_seed[0].equals(by_name["50_50"][0])
    with pytest.raises(DataError, match="needs 30 real and 0 synthetic patches; there are 20 and 20"):
        split_rows(SPLITS[0], real, synthetic, 30, seed=0)


def test_config_from_command_line_text():
    train = SegmentTrainConfig(**TINY)
    assert mix_config(None, "3", None, train).seeds == (0, 1, 2)
    assert mix_config("100_0,0_100", "0,5", 4, train).splits == ("100_0", "0_100")
    with pytest.raises(ConfigError, match="--seeds takes a count"):
        mix_config(None, "three", None, train)
    with pytest.raises(ConfigError, match=r"unknown splits \['60_40'\]"):
        mix_config("100_0,60_40", "1", None, train)


@pytest.fixture(scope="module")
def synthetic_dataset(toy, tmp_path_factory):
    return toy.write_toy_dataset(tmp_path_factory.mktemp("synthetic") / "ds", {"g1": "train", "g2": "train"},
                                 per_slide=4, size=96, seed=11, healthy=4)


@pytest.fixture(scope="module")
def val_dataset(toy, tmp_path_factory):
    return toy.write_toy_dataset(tmp_path_factory.mktemp("val") / "ds", {"v": "val"}, per_slide=2, size=96, seed=12)


def test_binary_experiment_runs_all_six_splits_and_resumes(toy_dataset, synthetic_dataset, val_dataset, tmp_path):
    sources = MixSources.from_datasets(toy_dataset, synthetic_dataset, val_dataset)
    assert (len(sources.real), len(sources.synthetic), len(sources.val)) == (24, 8, 2)
    config = MixConfig(seeds=(0,), n=4, train=SegmentTrainConfig(class_name="Glomeruli", **TINY))
    result = run_mix_experiment(sources, config, tmp_path)
    counts = {r["split"]: (r["real"], r["synthetic"]) for r in result.runs}
    assert counts == {"100_0": (4, 0), "75_25": (3, 1), "50_50": (2, 2), "25_75": (1, 3), "0_100": (0, 4),
                      "100_100": (4, 4)}
    assert all(r["history"][-1] == r["final"] and r["epochs"] == 1 for r in result.runs)
    report = write_mix_report(result, tmp_path).read_text()
    table = pd.read_csv(tmp_path / "table_5_2.csv")
    assert table["experiment"].tolist() == [s.name for s in SPLITS]
    assert table["patches"].tolist() == [4, 4, 4, 4, 4, 8]
    assert "| 100_0 | 1.000 | 0.000 | 4 | 1.0 |" in report and "| 0.094 | 0.956 |" in report  # thesis beside ours
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "final.png").is_file()
    assert len(pd.read_csv(tmp_path / "history.csv")) == 6
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    assert len(stamps) == 6
    resumed = run_mix_experiment(sources, config, tmp_path)  # everything on disk: nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == stamps
    assert [r["final"] for r in resumed.runs] == json.loads(json.dumps([r["final"] for r in result.runs]))
    with pytest.raises(JobError, match="holds another experiment"):
        run_mix_experiment(sources, config.model_copy(update={"seeds": (1,)}), tmp_path)


def test_mix_command_multiclass_with_seeds(toy_dataset, synthetic_dataset, val_dataset, tmp_path, capsys):
    out = tmp_path / "mix"
    args = ["experiment", "mix", "--real", str(toy_dataset.root), "--synthetic", str(synthetic_dataset.root),
            "--val", str(val_dataset.root), "--out", str(out), "--splits", "0_100", "--seeds", "0,3", "--n", "4",
            "--base-channels", "2",
            "--input-size", "204", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "0_100: final val loss" in capsys.readouterr().out
    table = pd.read_csv(out / "table_5_2.csv")
    assert table["seeds"].tolist() == [2]
    runs = pd.read_csv(out / "runs.csv")
    assert runs["seed"].tolist() == [0, 3]
    expected_sd = runs["val_dice"].std(ddof=1)
    assert table.loc[0, "Dice sd"] == pytest.approx(expected_sd)
    report = (out / "report.md").read_text()
    assert " ± " in report and "thesis" not in report.split("## Final")[1].split("\n\n")[1]
    assert "## Dice per class" in report and (out / "dice_per_class.csv").is_file()


def test_datasets_of_different_schemas_are_refused(toy_dataset, tmp_path):
    schema = ClassSchema(name="two", classes=(ClassInfo(id=0, name="background", color=(0, 0, 0)),
                                              ClassInfo(id=1, name="Glomeruli", color=(0, 255, 0))))
    writer = PatchDatasetWriter(tmp_path / "other", schema=schema, patch_size=96)
    writer.write_slide("x", [Patch(np.zeros((96, 96, 3), np.uint8), np.zeros((96, 96), np.uint8))])
    with pytest.raises(DataError, match="different class schemas"):
        MixSources.from_datasets(toy_dataset, writer.finalize())

"""The six-split real/synthetic experiment: patch counts, subsets, runs, resume, report, command."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import ConfigError, DataError, JobError
from histosynth.evaluate.mix import (
    SPLIT_NAMES,
    SPLITS,
    TRAINING_DEFAULTS,
    Arm,
    MixConfig,
    MixResult,
    MixSources,
    arm_training,
    is_collapsed,
    mix_config,
    paired_difference,
    patches_holding,
    run_mix_experiment,
    scarce_class_warning,
    scarcity_arms,
    six_split_arms,
    split_rows,
    write_mix_report,
)
from histosynth.schema import ClassInfo, ClassSchema
from histosynth.segment.data import PatchRows
from histosynth.segment.training import SegmentTrainConfig, best_epoch

TINY = dict(base_channels=2, input_size=204, batch_size=4, max_epochs=1, patience=1, device="cpu")
#: The experiment's own training set-up (warm-up, cosine, balanced weights, best validation Dice), made tiny.
TINY_MIX = TRAINING_DEFAULTS | TINY


def test_patch_counts_follow_the_thesis():
    assert [s.name for s in SPLITS] == ["100_0", "75_25", "50_50", "25_75", "0_100", "100_100"]
    assert [s.counts(198) for s in SPLITS] == [(198, 0), (148, 50), (99, 99), (50, 148), (0, 198), (198, 198)]
    assert [sum(s.counts(10)) for s in SPLITS] == [10, 10, 10, 10, 10, 20]


def test_smaller_shares_are_subsets_of_larger_ones():
    real = pd.DataFrame({"patch_id": [f"r{i}" for i in range(20)]})
    synthetic = pd.DataFrame({"patch_id": [f"s{i}" for i in range(20)]})
    arms = six_split_arms(SPLIT_NAMES, 8)
    assert {a.name: a.baseline for a in arms} == {"100_0": None, **{s: "100_0" for s in SPLIT_NAMES[1:]}}
    by_name = {a.name: split_rows(a, real, synthetic, seed=3) for a in arms}
    assert set(by_name["75_25"][0]["patch_id"]) < set(by_name["100_0"][0]["patch_id"])
    assert set(by_name["25_75"][0]["patch_id"]) < set(by_name["50_50"][0]["patch_id"])
    assert set(by_name["0_100"][1]["patch_id"]) == set(by_name["100_100"][1]["patch_id"])
    assert by_name["100_100"][0].equals(by_name["100_0"][0])  # paired: the same real patches
    again = split_rows(arms[2], real, synthetic, seed=3)
    assert again[0].equals(by_name["50_50"][0])
    other_seed = split_rows(arms[2], real, synthetic, seed=4)
    assert not other_seed[0].equals(by_name["50_50"][0])
    with pytest.raises(DataError, match="100_0 needs 30 real and 0 synthetic patches; there are 20 and 20"):
        split_rows(six_split_arms(SPLIT_NAMES, 30)[0], real, synthetic, seed=0)


def test_scarcity_curve_arms_and_their_baselines():
    arms = scarcity_arms((48, 12), (0, 1, 4), synthetic_only=True)
    assert [(a.name, a.real, a.synthetic, a.baseline) for a in arms] == [
        ("r12_s0", 12, 0, None), ("r12_s12", 12, 12, "r12_s0"), ("r12_s48", 12, 48, "r12_s0"),
        ("r0_s12", 0, 12, "r12_s0"),
        ("r48_s0", 48, 0, None), ("r48_s48", 48, 48, "r48_s0"), ("r48_s192", 48, 192, "r48_s0"),
        ("r0_s48", 0, 48, "r48_s0")]
    assert [a.name for a in scarcity_arms((24,), (4,), synthetic_only=False)] == ["r24_s0", "r24_s96"]
    assert six_split_arms(("50_50", "100_100"), 8) == [Arm("50_50", 4, 4), Arm("100_100", 8, 8)]  # no 100_0


def test_config_from_command_line_text():
    train = SegmentTrainConfig(**TINY)
    assert mix_config(None, "3", None, train).seeds == (0, 1, 2)
    assert MixConfig().seeds == (0, 1, 2, 3, 4) and MixConfig().train.monitor == "val_dice"
    assert mix_config("100_0,0_100", "0,5", 4, train).splits == ("100_0", "0_100")
    curve = mix_config(None, "2", None, train, design="curve", real_counts="12,24", synthetic_multiples="0,4")
    assert [a.name for a in curve.arms(99)] == ["r12_s0", "r12_s48", "r0_s12", "r24_s0", "r24_s96", "r0_s24"]
    with pytest.raises(ConfigError, match="--seeds takes a count"):
        mix_config(None, "three", None, train)
    with pytest.raises(ConfigError, match=r"unknown splits \['60_40'\]"):
        mix_config("100_0,60_40", "1", None, train)
    with pytest.raises(ConfigError, match="--real-counts takes whole numbers separated by commas"):
        mix_config(None, "1", None, train, design="curve", real_counts="12;24")
    with pytest.raises(ConfigError, match=r"real counts must be at least 1, got \[0, 12\]"):
        mix_config(None, "1", None, train, design="curve", real_counts="0,12")


def test_paired_difference_of_known_pairs():
    # resampling [0, 0, 0, 0, 1]: the mean is Binomial(5, 0.2) / 5, whose 2.5 % and 97.5 % points are 0 and 0.6
    skewed = paired_difference([0, 0, 0, 0, 1])
    assert (skewed.pairs, skewed.mean, skewed.ci_low, skewed.ci_high) == (5, pytest.approx(0.2), 0.0, 0.6)
    assert skewed.verdict() == "not shown (interval contains 0)"
    rising = paired_difference([0.1, 0.2, 0.3, 0.4, 0.5])
    assert rising.mean == pytest.approx(0.3)
    assert rising.t_p == pytest.approx(0.0132356, rel=1e-4)  # t = 4.243 on 4 degrees of freedom
    assert rising.wilcoxon_p == pytest.approx(2 / 32)  # exact: all five signs positive, two-sided
    assert 0.1 <= rising.ci_low < 0.3 < rising.ci_high <= 0.5 and rising.verdict() == "higher (interval above 0)"
    falling = paired_difference([-0.2, -0.2, -0.2])
    assert (falling.ci_low, falling.ci_high) == pytest.approx((-0.2, -0.2))
    assert falling.verdict() == "lower (interval below 0)"
    assert np.isnan(falling.t_p)  # no spread: the t statistic is undefined
    assert paired_difference([0.3]).pairs == 1 and np.isnan(paired_difference([0.3]).t_p)


def _run(split: str, seed: int, dice: float, present: list[int]) -> dict:
    epoch = {"epoch": 1, "val_loss": 1 - dice, "val_dice": dice, "val_dice_1": dice}
    return {"split": split, "seed": seed, "epochs": 1, "present": present, "kept": epoch, "final": epoch,
            "history": [epoch]}


def test_collapse_count_and_differences_of_a_constructed_result():
    config = MixConfig(splits=("100_0", "100_100"), seeds=(0, 1, 2))
    dice = {"100_0": [0.05, 0.6, 0.7], "100_100": [0.5, 0.08, 0.9]}
    runs = [_run(split, seed, d, [1]) for split, values in dice.items() for seed, d in enumerate(values)]
    runs.append(_run("100_0", 3, 0.0, []))  # the class absent from validation: not a collapse
    runs.append(_run("100_100", 3, 0.0, []))
    result = MixResult(runs=runs, n=4, config=config)
    assert [is_collapsed(r) for r in runs] == [True, False, False, False, True, False, False, False]
    assert result.final_table()["collapsed"].tolist() == [1, 1]
    collapse = result.collapse()
    assert (collapse["collapsed"], collapse["runs"], collapse["share"]) == (2, 8, 0.25)
    assert collapse["collapsed_runs"] == ["100_0 seed 0", "100_100 seed 1"]
    differences = result.differences(Arm("100_100", 4, 4, "100_0"))
    np.testing.assert_allclose(differences.to_numpy(), [0.45, -0.52, 0.2, 0.0])
    paired = result.paired_table()
    assert paired["experiment"].tolist() == ["100_100"] and paired["pairs"].tolist() == [4]
    assert paired.loc[0, "mean"] == pytest.approx(0.0325)
    assert paired.loc[0, "collapsed_pairs"] == 2  # seed 0 (100_0) and seed 1 (100_100)

    # where the class fills half the validation pixels, marking every pixel scores 2/3: no better is a collapse
    constant = MixResult(runs=runs, n=4, config=config, everywhere={1: 2 / 3})
    assert [constant.collapsed(r) for r in runs] == [True, True, False, True, True, False, False, False]
    assert is_collapsed(_run("100_0", 0, 2 / 3 + 0.009, [1]), {1: 2 / 3})
    assert not is_collapsed(_run("100_0", 0, 2 / 3 + 0.011, [1]), {1: 2 / 3})
    assert constant.collapse()["everywhere_dice"] == {"1": 2 / 3} and constant.collapse()["collapsed"] == 4


@pytest.fixture(scope="module")
def synthetic_dataset(toy, tmp_path_factory):
    return toy.write_toy_dataset(tmp_path_factory.mktemp("synthetic") / "ds", {"g1": "train", "g2": "train"},
                                 per_slide=4, size=96, seed=11, healthy=4)


@pytest.fixture(scope="module")
def val_dataset(toy, tmp_path_factory):
    return toy.write_toy_dataset(tmp_path_factory.mktemp("val") / "ds", {"v": "val"}, per_slide=2, size=96, seed=12)


def test_binary_experiment_runs_splits_paired_by_seed_and_resumes(toy_dataset, synthetic_dataset, val_dataset,
                                                                  tmp_path):
    sources = MixSources.from_datasets(toy_dataset, synthetic_dataset, val_dataset)
    assert (len(sources.real), len(sources.synthetic), len(sources.val)) == (24, 8, 2)
    config = MixConfig(splits=("100_0", "75_25", "0_100", "100_100"), seeds=(0, 1), n=4,
                       train=SegmentTrainConfig(class_name="Glomeruli", **TINY_MIX))
    result = run_mix_experiment(sources, config, tmp_path)
    counts = {r["split"]: (r["real"], r["synthetic"]) for r in result.runs}
    assert counts == {"100_0": (4, 0), "75_25": (3, 1), "0_100": (0, 4), "100_100": (4, 4)}
    for seed in (0, 1):  # paired: one initialisation per seed, and 100_100 has 100_0's real patches
        runs = {r["split"]: r for r in result.runs if r["seed"] == seed}
        assert len({r["initial_weights"] for r in runs.values()}) == 1
        assert runs["100_100"]["real_patches"] == runs["100_0"]["real_patches"] != runs["75_25"]["real_patches"]
    assert result.runs_of("100_0")[0]["initial_weights"] != result.runs_of("100_0")[1]["initial_weights"]
    for r in result.runs:  # judged by the epoch of the best validation Dice; the final one is kept too
        assert r["epochs"] == 1 and r["history"][-1] == r["final"] and r["present"] == [1]
        assert r["kept"] == best_epoch(r["history"], "val_dice") and r["weights"] == "highest validation Dice"
    report = write_mix_report(result, tmp_path).read_text()
    table = pd.read_csv(tmp_path / "table_5_2.csv")
    assert table["experiment"].tolist() == ["100_0", "75_25", "0_100", "100_100"]
    assert table["patches"].tolist() == [4, 4, 4, 8]
    assert "| 100_0 | 4 | 0 | 1.0 ± 0.0 |" in report and "| 0.094 | 0.956 |" in report  # thesis beside ours
    summary = json.loads((tmp_path / "mix.json").read_text())
    dice = {(r["split"], r["seed"]): r["kept"]["val_dice"] for r in result.runs}
    assert [p["experiment"] for p in summary["paired"]] == ["75_25", "0_100", "100_100"]
    for paired in summary["paired"]:
        differences = [dice[paired["experiment"], s] - dice["100_0", s] for s in (0, 1)]
        assert paired["differences"] == pytest.approx({"0": differences[0], "1": differences[1]})
        assert paired["mean"] == pytest.approx(np.mean(differences))
        assert min(differences) - 1e-12 <= paired["ci_low"] <= paired["ci_high"] <= max(differences) + 1e-12
    everywhere = sources.everywhere_dice("Glomeruli")[1]
    collapsed = sum(is_collapsed(r, {1: everywhere}) for r in result.runs)
    assert summary["collapse"]["runs"] == 8 and summary["collapse"]["collapsed"] == collapsed
    assert ("collapsed runs (judged Dice < 0.1 on a class present in the validation labels, or at most 0.01 above "
            f"the Dice of predicting it on every pixel: {everywhere:.3f}): **{collapsed} of 8**") in report
    assert "## Paired differences of Dice against 100_0" in report and (tmp_path / "differences.png").is_file()
    shares = sources.presence("Glomeruli")
    assert summary["patches_holding"] == shares
    assert "patches whose mask holds Glomeruli: " + ", ".join(
        f"{source} {100 * shares[source]['Glomeruli']:.0f} %" for source in ("real", "synthetic", "val")) in report
    assert pd.read_csv(tmp_path / "paired.csv")["pairs"].tolist() == [2] * 3
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "final.png").is_file()
    assert len(pd.read_csv(tmp_path / "history.csv")) == 8
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    assert len(stamps) == 8
    resumed = run_mix_experiment(sources, config, tmp_path)  # everything on disk: nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == stamps
    assert [r["final"] for r in resumed.runs] == json.loads(json.dumps([r["final"] for r in result.runs]))
    with pytest.raises(JobError, match="holds another experiment"):
        run_mix_experiment(sources, config.model_copy(update={"seeds": (1,)}), tmp_path)


def test_mix_command_multiclass_with_seeds(toy_dataset, synthetic_dataset, val_dataset, tmp_path, capsys):
    out = tmp_path / "mix"
    args = ["experiment", "mix", "--real", str(toy_dataset.root), "--synthetic", str(synthetic_dataset.root),
            "--val", str(val_dataset.root), "--out", str(out), "--splits", "0_100", "--seeds", "0,3", "--n", "4",
            "--base-channels", "2", "--weights", "final",
            "--input-size", "204", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "0_100: Dice" in printed and "collapsed runs:" in printed
    table = pd.read_csv(out / "table_5_2.csv")
    assert table["seeds"].tolist() == [2]
    runs = pd.read_csv(out / "runs.csv")
    assert runs["seed"].tolist() == [0, 3] and runs["weights"].tolist() == ["final", "final"]
    expected_sd = runs["val_dice"].std(ddof=1)
    assert table.loc[0, "Dice sd"] == pytest.approx(expected_sd)
    report = (out / "report.md").read_text()
    assert " ± " in report and "thesis" not in report.split("## Dice of")[1].split("\n\n")[1]
    assert "## Dice per class" in report
    per_class = pd.read_csv(out / "dice_per_class.csv")  # named by the schema, in its order
    assert list(per_class.columns) == ["experiment", *(c.name for c in toy_dataset.schema.classes)]
    assert json.loads((out / "mix.json").read_text())["paired"] == []  # no 100_0 to compare with
    assert "## Paired differences" not in report and not (out / "differences.png").exists()
    recorded = json.loads((out / "experiment.json").read_text())["config"]["train"]
    assert {k: recorded[k] for k in TRAINING_DEFAULTS} == TRAINING_DEFAULTS  # not those of segment train
    again = tmp_path / "again"  # the same runs in another folder: copied, not trained
    assert main([*args[:args.index("--out") + 1], str(again), *args[args.index("--out") + 2:],
                 "--reuse-runs-from", str(out)]) == 0
    copied = pd.read_csv(again / "runs.csv")
    assert copied["copied_from"].tolist() == [str(out / "runs" / f"0_100_seed{s}.json") for s in (0, 3)]
    assert copied["val_dice"].tolist() == runs["val_dice"].tolist() and "key" not in copied.columns


def test_mix_command_scarcity_curve(toy_dataset, synthetic_dataset, val_dataset, tmp_path, capsys):
    out = tmp_path / "curve"
    args = ["experiment", "mix", "--real", str(toy_dataset.root), "--synthetic", str(synthetic_dataset.root),
            "--val", str(val_dataset.root), "--out", str(out), "--design", "curve", "--real-counts", "2,4",
            "--synthetic-multiples", "0,1", "--seeds", "1", "--class", "Glomeruli", "--base-channels", "2",
            "--input-size", "204", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main([*args, "--shard", "0/2"]) == 0  # two processes share the folder: the first trains 3 of 6 runs
    assert "3 runs on disk, 3 left to other shards" in capsys.readouterr().out
    assert len(list((out / "runs").glob("*.json"))) == 3 and not (out / "report.md").exists()
    assert main([*args, "--shard", "1/2"]) == 0  # the last one to finish writes the report
    assert "r0_s4 - r4_s0:" in capsys.readouterr().out
    arms = pd.read_csv(out / "arms.csv")
    assert arms["experiment"].tolist() == ["r2_s0", "r2_s2", "r0_s2", "r4_s0", "r4_s4", "r0_s4"]
    assert arms["patches"].tolist() == [2, 4, 2, 4, 8, 4]
    paired = pd.read_csv(out / "paired.csv")
    assert paired["baseline"].tolist() == ["r2_s0", "r2_s0", "r4_s0", "r4_s0"]
    assert (out / "scarcity.png").is_file() and not (out / "table_5_2.csv").exists()


def test_patches_holding_the_class_are_counted_and_a_scarce_class_is_named(toy_dataset, synthetic_dataset,
                                                                          val_dataset):
    sources = MixSources.from_datasets(toy_dataset, synthetic_dataset, val_dataset)
    glomeruli = toy_dataset.schema.id_of("Glomeruli")
    presence = sources.presence("Glomeruli")
    for name, part in sources.parts():  # the manifest's shares agree with the masks themselves
        held = [bool((part.dataset.mask(row) == glomeruli).any()) for _, row in part.rows.iterrows()]
        assert presence[name] == {"Glomeruli": pytest.approx(np.mean(held))}
    rows = pd.DataFrame({f"frac_{glomeruli}": [0.0, 0.2, 0.0, 0.5, 0.0]})
    assert patches_holding(PatchRows(toy_dataset, rows), glomeruli) == pytest.approx(0.4)
    assert math.isnan(patches_holding(PatchRows(toy_dataset, rows), glomeruli + 1))  # no such column: unknown
    assert list(sources.presence(None)["val"]) == [toy_dataset.schema.name_of(i)
                                                   for i in toy_dataset.schema.captioned_ids]
    # marking every validation pixel Glomeruli: the pooled Dice from the masks themselves
    masks = np.stack([val_dataset.mask(row) == glomeruli for _, row in val_dataset.rows().iterrows()])
    expected = 2 * masks.sum() / (masks.sum() + masks.size)
    assert sources.everywhere_dice("Glomeruli") == {1: pytest.approx(expected, rel=1e-4)}
    assert sources.everywhere_dice(None) == {}
    warning = scarce_class_warning({"real": {"Glomeruli": 0.05}}, "Glomeruli")
    assert warning.startswith("only 5 % of the real training patches hold Glomeruli")
    assert "--mix generating" in warning
    for share, class_name in ((0.25, "Glomeruli"), (math.nan, "Glomeruli"), (0.05, None)):
        assert scarce_class_warning({"real": {"Glomeruli": share}}, class_name) is None


def test_equal_steps_give_smaller_arms_more_epochs_on_the_same_schedule():
    train = SegmentTrainConfig(batch_size=4, max_epochs=6, warmup_epochs=2.0, val_every=3, patience=5)
    config = MixConfig(train=train, equal_steps=True)
    assert arm_training(config, Arm("r96_s0", 96, 0), 96) == train  # the largest arm keeps its epochs
    small = arm_training(config, Arm("r12_s0", 12, 0), 96)  # 3 batches an epoch against 24: 8x the epochs
    assert (small.max_epochs, small.warmup_epochs, small.val_every, small.patience) == (48, 16.0, 24, 5)
    odd = arm_training(config, Arm("r10_s0", 10, 0), 48)  # 3 batches (the last of 2) against 12
    assert (odd.max_epochs, odd.warmup_epochs, odd.val_every) == (24, 8.0, 12)
    assert arm_training(MixConfig(train=train), Arm("r12_s0", 12, 0), 96) == train  # equal epochs: unchanged


def test_mix_command_with_equal_steps(toy_dataset, synthetic_dataset, val_dataset, tmp_path, capsys):
    out = tmp_path / "curve"
    assert main(["experiment", "mix", "--real", str(toy_dataset.root), "--synthetic", str(synthetic_dataset.root),
                 "--val", str(val_dataset.root), "--out", str(out), "--design", "curve", "--real-counts", "2,4",
                 "--synthetic-multiples", "0,1", "--no-synthetic-only", "--seeds", "1", "--class", "Glomeruli",
                 "--base-channels", "2", "--input-size", "204", "--batch-size", "4", "--epochs", "1",
                 "--equal-steps", "--device", "cpu", "--no-progress"]) == 0
    runs = {r["split"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))}
    # 2, 4 and 4 patches are one batch of 4, the 8 patches of r4_s4 two: the smaller arms train 2 epochs
    assert {name: (r["patches"], r["max_epochs"], r["planned_steps"]) for name, r in runs.items()} == {
        "r2_s0": (2, 2, 2), "r2_s2": (4, 2, 2), "r4_s0": (4, 2, 2), "r4_s4": (8, 1, 2)}
    assert all(len(r["history"]) == 1 for r in runs.values())  # validated once, after the last step
    assert "every arm trains as many optimiser steps, about 2: 2 patches 2 epochs" in (out / "report.md").read_text()


def test_an_experiment_started_before_a_config_field_existed_resumes(tmp_path):
    from histosynth.evaluate.mix import _claim_folder

    description = {"config": MixConfig(train=SegmentTrainConfig(**TINY_MIX)).model_dump(mode="json"), "n": 4}
    older = json.loads(json.dumps(description))
    del older["config"]["equal_steps"]  # written before --equal-steps existed
    (tmp_path / "experiment.json").write_text(json.dumps(older))
    _claim_folder(tmp_path, description)  # the same experiment: resumed
    changed = {**description, "config": MixConfig(train=SegmentTrainConfig(**TINY_MIX), equal_steps=True)
               .model_dump(mode="json")}
    with pytest.raises(JobError, match="holds another experiment"):
        _claim_folder(tmp_path, changed)


def test_datasets_of_different_schemas_are_refused(toy_dataset, tmp_path):
    schema = ClassSchema(name="two", classes=(ClassInfo(id=0, name="background", color=(0, 0, 0)),
                                              ClassInfo(id=1, name="Glomeruli", color=(0, 255, 0))))
    writer = PatchDatasetWriter(tmp_path / "other", schema=schema, patch_size=96)
    writer.write_slide("x", [Patch(np.zeros((96, 96, 3), np.uint8), np.zeros((96, 96), np.uint8))])
    with pytest.raises(DataError, match="different class schemas"):
        MixSources.from_datasets(toy_dataset, writer.finalize())


def test_a_run_another_experiment_trained_alike_is_copied_not_retrained(toy_dataset, synthetic_dataset, val_dataset,
                                                                         tmp_path, capsys):
    """The real-only arm of two experiments on the same real data, validation set, loop and seeds is one run."""
    sources = MixSources.from_datasets(toy_dataset, synthetic_dataset, val_dataset)
    config = MixConfig(splits=("100_0", "75_25"), seeds=(0,), n=4,
                       train=SegmentTrainConfig(class_name="Glomeruli", **TINY_MIX))
    first = run_mix_experiment(sources, config, tmp_path / "first")
    trained = {r["split"]: r for r in first.runs}
    assert len({r["key"] for r in first.runs}) == 2

    second = run_mix_experiment(sources, config.model_copy(update={"splits": ("100_0", "0_100")}),
                                tmp_path / "second", reuse=[tmp_path / "first"])
    runs = {r["split"]: r for r in second.runs}
    assert runs["100_0"]["copied_from"] == str(tmp_path / "first" / "runs" / "100_0_seed0.json")
    assert runs["100_0"]["final"] == trained["100_0"]["final"] and runs["100_0"]["key"] == trained["100_0"]["key"]
    assert "copied_from" not in runs["0_100"] and runs["0_100"]["synthetic"] == 4
    assert not (tmp_path / "second" / "logs" / "100_0_seed0").exists()  # nothing trained for it

    slower = config.train.model_copy(update={"learning_rate": config.train.learning_rate / 2})
    other_loop = config.model_copy(update={"train": slower})
    other_n = config.model_copy(update={"n": 3})
    for name, changed in (("other-loop", other_loop), ("other-n", other_n)):
        result = run_mix_experiment(sources, changed, tmp_path / name, reuse=[tmp_path / "first"])
        assert not any("copied_from" in r for r in result.runs), name
    with pytest.raises(DataError, match="is not an experiment folder"):
        run_mix_experiment(sources, config, tmp_path / "third", reuse=[tmp_path / "missing"])

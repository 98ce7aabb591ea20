"""scripts/compare_recipes.py: a longer step budget continues the recipe's longest shorter run that fits."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def compare_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module("compare_recipes")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def a_run(root: Path, name: str, batch_size: int = 8, warmup_steps: int = 25, checkpoint: bool = True) -> Path:
    run = root / "models" / f"{name}.run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"batch_size": batch_size, "warmup_steps": warmup_steps}))
    if checkpoint:
        (run / "checkpoints" / "last.ckpt").write_text(name)
    return run


def test_the_longest_fitting_shorter_run_of_the_recipe_and_seed_is_continued(compare_recipes, tmp_path: Path):
    a_run(tmp_path, "flow-300")
    a_run(tmp_path, "flow-600")
    a_run(tmp_path, "flow-1200", checkpoint=False)  # nothing to continue from
    a_run(tmp_path, "flow-900", batch_size=16)  # another batch
    a_run(tmp_path, "flow-1000", warmup_steps=0)  # another warm-up
    a_run(tmp_path, "flow-3000")  # longer
    a_run(tmp_path, "flow-800-seed1")  # another seed
    a_run(tmp_path, "v-pred+min-snr-700")  # another recipe
    compare_recipes.continue_shorter_run("flow", compare_recipes.Sizes(steps=1500), seed=0)
    run = tmp_path / "models" / "flow-1500.run"
    assert (run / "checkpoints" / "last.ckpt").read_text() == "flow-600"
    assert not run.with_name("flow-1500.run.partial").exists()


def test_a_run_folder_that_exists_is_left_alone_and_no_fitting_run_copies_nothing(compare_recipes, tmp_path: Path):
    a_run(tmp_path, "v-pred-600")
    existing = a_run(tmp_path, "v-pred-1500", checkpoint=False)
    compare_recipes.continue_shorter_run("v-pred", compare_recipes.Sizes(steps=1500), seed=0)
    assert not (existing / "checkpoints" / "last.ckpt").exists()
    compare_recipes.continue_shorter_run("v-pred", compare_recipes.Sizes(steps=1500), seed=1)
    compare_recipes.continue_shorter_run("v-pred+min-snr", compare_recipes.Sizes(steps=1500), seed=0)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v-pred-1500.run", "v-pred-600.run"]


def test_text_only_runs_continue_only_text_only_runs(compare_recipes, tmp_path: Path):
    a_run(tmp_path, "flow-600")
    a_run(tmp_path, "flow-text-300")
    text = compare_recipes.Sizes(steps=1500, condition="text")
    assert compare_recipes.run_name("flow", text, seed=1) == "flow-text-1500-seed1"
    compare_recipes.continue_shorter_run("flow", text, seed=0)
    assert (tmp_path / "models" / "flow-text-1500.run" / "checkpoints" / "last.ckpt").read_text() == "flow-text-300"
    compare_recipes.continue_shorter_run("flow", compare_recipes.Sizes(steps=1500), seed=0)
    assert (tmp_path / "models" / "flow-1500.run" / "checkpoints" / "last.ckpt").read_text() == "flow-600"


def test_a_run_with_a_damaged_run_json_is_not_continued(compare_recipes, tmp_path: Path, capsys):
    a_run(tmp_path, "dit-300")
    damaged = a_run(tmp_path, "dit-600")
    (damaged / "run.json").write_text('{"batch_size": 8, "warm')
    (a_run(tmp_path, "dit-900") / "run.json").write_text("[8, 25]")  # JSON, but no settings
    compare_recipes.continue_shorter_run("dit", compare_recipes.Sizes(steps=1500), seed=0)
    assert (tmp_path / "models" / "dit-1500.run" / "checkpoints" / "last.ckpt").read_text() == "dit-300"
    said = capsys.readouterr().out
    assert "dit-600.run: its run.json cannot be read" in said and "dit-900.run: its run.json holds no settings" in said


def test_another_caption_image_count_has_its_own_report(compare_recipes, tmp_path: Path):
    """A job folder holds one count of images: 48 images of the caption are not the 12 of the default's folder."""
    default, more = compare_recipes.Sizes(steps=600), compare_recipes.Sizes(steps=600, caption_images=48)
    assert compare_recipes.captions_report("flow", default, seed=0) == tmp_path / "reports" / "flow-600" / "captions"
    reports = tmp_path / "reports"
    assert compare_recipes.captions_report("flow", more, seed=1) == reports / "flow-600-seed1" / "captions-48"


def test_several_seeds_make_one_row_of_means_and_sds(compare_recipes):
    seed0 = {"recipe": "flow", "options": "--prediction-type flow_prediction", "Tubuli medium %": 41.7,
             "label fidelity (mean Dice)": 0.800, "two-sample AUC": 1.0, "AUC 95% CI": "1.000 – 1.000",
             "training s": 7031.0}
    seed1 = seed0 | {"Tubuli medium %": 25.0, "label fidelity (mean Dice)": 0.879, "training s": 5000.0}
    assert compare_recipes.seeds_row([seed0, seed1]) == {
        "recipe": "flow", "options": "--prediction-type flow_prediction", "Tubuli medium %": "33.4 ± 11.8",
        "label fidelity (mean Dice)": "0.840 ± 0.056", "two-sample AUC": "1.000 ± 0.000",
        "training s": "6016 ± 1436"}


@pytest.mark.parametrize("seeds", ["x", "0,-1", ",", "1,1"])
def test_seeds_that_are_not_whole_numbers_from_0_are_refused(compare_recipes, seeds: str, capsys):
    with pytest.raises(SystemExit) as refused:
        compare_recipes.main(["--seed", seeds])
    assert refused.value.code == 2 and "--seed takes whole numbers" in capsys.readouterr().err

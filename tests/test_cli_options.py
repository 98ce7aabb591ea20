"""The command line's shared options: each defined once, the same wherever it appears; impossible numbers refused in
one exact line before any work."""

from __future__ import annotations

import inspect

import pytest
import typer
from typer.main import get_command

from histosynth.cli import app, main
from histosynth.cli.common import DeviceOption, OptionBlock, expand_blocks


def _commands(group, path=()):
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))
    if not hasattr(group, "commands"):
        yield " ".join(path), group


def test_every_device_option_says_the_one_device_vocabulary():
    helps = {name: param.help for name, command in _commands(get_command(app))
             for param in command.params if param.name == "device"}
    assert len(helps) >= 10
    assert set(helps.values()) == {DeviceOption.help}
    assert all(word in DeviceOption.help for word in ("auto", "cpu", "cuda", "cuda:N", "mps"))


def test_every_option_name_means_one_option_per_command():
    for name, command in _commands(get_command(app)):
        names = [opt for param in command.params for opt in param.opts]
        assert len(names) == len(set(names)), name


def _block(first: int = typer.Option(1, "--first"), second: str = typer.Option("b", "--second")) -> tuple:
    return first, second


Block = OptionBlock(_block)


def test_a_block_of_options_joins_the_signature_and_the_command_gets_its_result():
    seen = []

    @expand_blocks
    def command(out: str = typer.Option("o", "--out"), both: tuple = Block, last: bool = typer.Option(False, "--last")):
        seen.append((out, both, last))

    assert list(inspect.signature(command).parameters) == ["out", "first", "second", "last"]
    runner = typer.Typer()
    runner.command()(command)
    runner(["--first", "3", "--last"], standalone_mode=False)
    assert seen == [("o", (3, "b"), True)]


def test_a_block_may_not_repeat_a_parameter_of_its_command():
    def command(first: int = typer.Option(0, "--other"), both: tuple = Block):
        pass

    with pytest.raises(TypeError, match="repeats"):
        expand_blocks(command)


def test_block_options_are_parsed_and_checked_as_before(tmp_path, capsys):
    assert main(["segment", "train", str(tmp_path), "--out", str(tmp_path / "s"), "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_epochs" in err and err.count("\n") == 1


# Command lines as typed, split at spaces: the tiny model folder as {model}, every other path in a folder {tmp} that
# holds nothing and must stay empty.
LEVELS = "Glomeruli=high,Tubuli=medium"
GENERATE = f"generate --model {{model}} --levels {LEVELS} --steps 1 --out {{tmp}}/out"
SYNTH_SLIDE = f"synth-slide --model {{model}} --levels {LEVELS} --size 128 --steps 1 --out {{tmp}}/slide.tif"
REALISM = "evaluate realism --real {tmp}/real --synthetic {tmp}/synthetic --out {tmp}/report"
MASKS = "evaluate masks --segmenter {tmp}/seg --out {tmp}/report --model {tmp}/model --masks-from {tmp}/dataset"
CAPTIONS = "evaluate captions --segmenter {tmp}/seg --out {tmp}/report --images {tmp}/images"
SELECT = "select-pairs {tmp}/job --segmenter {tmp}/seg --out {tmp}/out"


# The whole error after "error: "; one ending in "..." is its beginning (the rest depends on the machine).
@pytest.mark.parametrize("command, extra, message", [
    (GENERATE, "--guidance nan", "guidance must be a finite number, got nan"),
    (GENERATE, "--mask-guidance inf", "mask guidance must be a finite number, got inf"),
    (GENERATE, "--seed -1", "--seed must be at least 0, got -1"),
    (GENERATE, "--seed 4294967296", "--seed must be at most 4294967295, got 4294967296"),
    (GENERATE, "--size 0",
     "image size 0 px must be a multiple of 8 when smaller than the model's 64 px patches; use 8"),
    (GENERATE, "--size 1048576", "an image of 1048576x1048576 px needs about..."),
    (GENERATE, "--eta 2", "eta must be between 0 (deterministic DDIM) and 1, got 2.0"),
    (SYNTH_SLIDE, "--mpp nan", "--mpp must be a finite number, got nan"),
    (SYNTH_SLIDE, "--mpp inf", "--mpp must be a finite number, got inf"),
    (SYNTH_SLIDE, "--seed -1", "--seed must be at least 0, got -1"),
    (SYNTH_SLIDE, "--guidance nan", "guidance must be a finite number, got nan"),
    (SYNTH_SLIDE, "--overlap 99", "the window overlap must be 0 to 15 latent pixels, got 99"),
    (SYNTH_SLIDE, "--window-batch 0", "the window batch must be at least 1, got 0"),
    (REALISM, "--n -1", "--n must be at least 1, got -1"),
    (REALISM, "--n 0", "--n must be at least 1, got 0"),
    (REALISM, "--folds 0", "--folds must be at least 2, got 0"),
    (REALISM, "--bootstrap -1", "--bootstrap must be at least 1, got -1"),
    (REALISM, "--seed -1", "--seed must be at least 0, got -1"),
    (REALISM, "--seed 4294967296", "--seed must be at most 4294967295, got 4294967296"),
    (MASKS, "--guidance nan", "--guidance must be a finite number, got nan"),
    (MASKS, "--mask-guidance inf", "--mask-guidance must be a finite number, got inf"),
    (MASKS, "--guidance -1", "--guidance must be at least 0, got -1.0"),
    (MASKS, "--min-share nan", "--min-share must be a finite number, got nan"),
    (MASKS, "--min-share 2", "--min-share must be at most 1, got 2.0"),
    (MASKS, "--steps 0", "--steps must be at least 1, got 0"),
    (MASKS, "--n -3", "--n must be at least 1, got -3"),
    (MASKS, "--seed -1", "--seed must be at least 0, got -1"),
    (MASKS, "--batch-size 0", "--batch-size must be at least 1, got 0"),
    (CAPTIONS, "--n 0", "--n must be at least 1, got 0"),
    (CAPTIONS, "--seed -5", "--seed must be at least 0, got -5"),
    (CAPTIONS, "--batch-size -1", "--batch-size must be at least 1, got -1"),
    (SELECT, "--batch-size 0", "--batch-size must be at least 1, got 0"),
])
def test_impossible_numbers_are_refused_before_any_work(tiny_bundle_path, tmp_path, refused, command, extra, message):
    error = refused([word.format(model=tiny_bundle_path, tmp=tmp_path) for word in f"{command} {extra}".split()])
    if message.endswith("..."):
        assert error.startswith(f"error: {message[:-3]}")
    else:
        assert error == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_block_may_hold_a_block():
    def _outer(last: bool = typer.Option(False, "--last"), both: tuple = Block) -> tuple:
        return both, last

    seen = []

    @expand_blocks
    def command(outer: tuple = OptionBlock(_outer)):
        seen.append(outer)

    assert list(inspect.signature(command).parameters) == ["last", "first", "second"]
    runner = typer.Typer()
    runner.command()(command)
    runner(["--second", "x", "--last"], standalone_mode=False)
    assert seen == [((1, "x"), True)]


def test_every_coverage_option_says_the_same():
    helps = {param.help for _, command in _commands(get_command(app)) for param in command.params
             if param.name == "coverage"}
    assert len(helps) == 1


def test_quiet_before_any_command_draws_no_progress_bar(tmp_path, capsys):
    from histosynth.cli import main

    printed = {}
    for name, quiet in (("bars", []), ("quiet", ["--quiet"])):
        assert main([*quiet, "phantom", "patches", "--out", str(tmp_path / name), "--n", "3", "--size", "64"]) == 0
        printed[name] = capsys.readouterr()
    assert "phantom patches" in printed["bars"].out and "3/3" in printed["bars"].out
    result = f"3 patches in {tmp_path / 'quiet'} (train 1, val 1, test 1)\n"
    assert (printed["quiet"].out, printed["quiet"].err) == (result, "")
    assert main(["phantom", "patches", "--out", str(tmp_path / "again"), "--n", "3", "--size", "64"]) == 0
    assert "3/3" in capsys.readouterr().out  # --quiet holds for its own command only


@pytest.mark.parametrize("environment, shown", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"RANK": "1"}, False), ({"LOCAL_RANK": "2"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
])
def test_only_the_first_process_of_a_job_shows_warnings(monkeypatch, environment, shown):
    import warnings

    from histosynth.cli import RANK_VARIABLES, warnings_of_the_first_process

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with warnings_of_the_first_process():
            warnings.warn("no --autoencoder given", UserWarning, stacklevel=1)
        warnings.warn("after the command", UserWarning, stacklevel=1)  # the filter does not outlive the command
    assert [str(w.message) for w in seen] == (["no --autoencoder given"] if shown else []) + ["after the command"]

"""The command line's shared options: each defined once, the same wherever it appears."""

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

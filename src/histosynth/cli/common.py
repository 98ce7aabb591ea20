"""Options and helpers shared by several command groups, each defined once.

An option that more than one command group takes is a ``typer.Option`` (or a small factory of one) here. A block
of options that several commands share is an :class:`OptionBlock`: one function whose parameters are the options
and which turns them into what the library takes. A command names the block as the default of one parameter and
is wrapped by :func:`expand_blocks`, so ``--help`` lists the block's options in place and the command receives
what the block's function returned; a block's own parameters may name blocks in turn. Blocks and options shared
only by the commands of one module are defined at the top of that module (phantom's ``--seed/--mix/--mpp`` and
phantom sets, evaluate's segmenting options, generate's sampling options, train's run options).
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from ..schema import ClassSchema, load_schema

SchemaOption = typer.Option(
    None, "--schema", help="class schema: 'renal' (default) or a YAML file", show_default=False
)
#: What :func:`histosynth.devices.pick_device` accepts, for every command that takes --device.
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="show progress bars")
WorkersOption = typer.Option(0, "--workers", help="data-loading worker processes")


def dataset_argument(help: str = "patch dataset folder") -> Any:
    """DATASET, the patch dataset a command reads (``help``: what it needs of it, where more than a dataset)."""
    return typer.Argument(..., help=help)


def init_option(help: str) -> Any:
    """--init: the folder a training command starts from (fine-tuning); ``help`` says which folders fit."""
    return typer.Option(None, "--init", help=help)


def coverage_option(default: str) -> Any:
    """--coverage of every command that segments images (the commands differ in the default only)."""
    return typer.Option(default, "--coverage", help="full: every pixel; thesis: as the thesis, 86 px padding of "
                                                    "256 px images, a 12 px border lost")


def seed_option(help: str, default: Optional[int] = 0) -> Any:
    """--seed with what it seeds in this command (the commands differ only in that; ``None``: random)."""
    return typer.Option(default, "--seed", help=help, show_default=default is not None)


def schema_from_option(value: Optional[Path | str]) -> ClassSchema:
    return load_schema(value)


# --- blocks of options --------------------------------------------------------------------------------
class OptionBlock:
    """Options several commands share: a function whose parameters are Typer options (their defaults) and
    which returns what the commands pass on to the library, built from them."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self.build = build = expand_blocks(build)  # a block may hold blocks of its own
        hints = typing.get_type_hints(build)
        self.parameters = [p.replace(annotation=hints.get(p.name, p.annotation))
                           for p in inspect.signature(build).parameters.values()]


Command = TypeVar("Command", bound=Callable[..., Any])


def expand_blocks(command: Command) -> Command:
    """The command with each parameter whose default is an :class:`OptionBlock` replaced, in the signature
    that Typer reads, by the block's options; the command receives the block's result there."""
    hints = typing.get_type_hints(command)
    blocks: dict[str, OptionBlock] = {}
    parameters: list[inspect.Parameter] = []
    for parameter in inspect.signature(command).parameters.values():
        if isinstance(parameter.default, OptionBlock):
            blocks[parameter.name] = parameter.default
            parameters += parameter.default.parameters
        else:
            parameters.append(parameter.replace(annotation=hints.get(parameter.name, parameter.annotation)))
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: an option block repeats one of the command's parameter names")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, block in blocks.items():
            values[name] = block.build(**{p.name: values.pop(p.name) for p in block.parameters})
        return command(**values)

    run.__signature__ = inspect.Signature(parameters, return_annotation=hints.get("return", None))  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return typing.cast(Command, run)


# --- what a training command reads and writes: `train`, `train-autoencoder` and `segment train` ---------------
def training_folders(out_help: str, init_help: str, dataset_help: str = "patch dataset folder") -> OptionBlock:
    """DATASET, --out and --init of a training command: the patch dataset it learns from, the folder it writes and
    the folder it fine-tunes (``None``: it starts afresh), as a dict of ``dataset``, ``out`` and ``init``; the
    helps say what each must hold."""

    def folders(
        dataset: Path = typer.Argument(..., help=dataset_help),
        out: Path = typer.Option(..., "--out", help=out_help),
        init: Optional[Path] = typer.Option(None, "--init", help=init_help),
    ) -> dict[str, Any]:
        return dict(dataset=dataset, out=out, init=init)

    return OptionBlock(folders)


# --- the segmenter-training block of `segment train` and `experiment mix` (one loop, one set of knobs) ---------
def _per_command(flag: str, help: str, segment_train: Any, experiment_mix: Any) -> Any:
    """An option whose default depends on the command: None here, filled in by :func:`segment_train_config`."""
    return typer.Option(None, flag, help=f"{help} (segment train: {segment_train}, experiment mix: {experiment_mix})")


def segmenter_training(
    class_name: Optional[str] = typer.Option(
        None, "--class", help="binary segmentation of this class (e.g. Glomeruli); default: multi-class"),
    base_channels: int = typer.Option(64, "--base-channels", help="U-Net width (64 = classic; 4-16 for CPUs)"),
    input_size: Optional[int] = typer.Option(
        None, "--input-size", help="training window in px (a valid size); default: largest that fits a patch"),
    batch_size: int = typer.Option(8, "--batch-size"),
    epochs: int = typer.Option(100, "--epochs", help="at most this many epochs (EarlyStopping usually stops sooner)"),
    patience: Optional[int] = _per_command("--patience", "EarlyStopping: validations without a better score", 10, 15),
    monitor: Optional[str] = _per_command(
        "--monitor", "what EarlyStopping and the kept weights follow: val_loss or val_dice", "val_loss", "val_dice"),
    val_every: int = typer.Option(1, "--val-every", help="validate every this many epochs (patience counts "
                                                         "validations)"),
    lr: float = typer.Option(1e-3, "--lr"),
    warmup_epochs: Optional[float] = _per_command("--warmup-epochs", "linear learning-rate warm-up", 0, 2),
    schedule: Optional[str] = _per_command(
        "--schedule", "learning rate after the warm-up: constant or cosine (decays to 0 at --epochs)", "constant",
        "cosine"),
    foreground_crops: Optional[float] = _per_command(
        "--foreground-crops", "share of training windows placed on a pixel of a rare class (binary: the class)",
        0, 0.33),
    dice_weight: float = typer.Option(1.0, "--dice-weight", help="weight of the soft-Dice term beside CE/BCE"),
    class_weights: Optional[str] = _per_command(
        "--class-weights", "balanced: weigh CE/BCE up for rare classes (sqrt of median/share); none", "none",
        "balanced"),
    device: str = DeviceOption,
    workers: int = WorkersOption,
) -> dict[str, Any]:
    """Keyword arguments of ``SegmentTrainConfig.from_options`` (see :func:`segment_train_config`); the options
    left at None take the command's own default."""
    return dict(class_name=class_name, base_channels=base_channels, input_size=input_size, batch_size=batch_size,
                max_epochs=epochs, patience=patience, monitor=monitor, val_every=val_every, learning_rate=lr,
                warmup_epochs=warmup_epochs, schedule=schedule, foreground_crops=foreground_crops,
                dice_weight=dice_weight, class_weights=class_weights, device=device, num_workers=workers)


SegmenterTraining = OptionBlock(segmenter_training)

#: The options of :data:`SegmenterTraining` whose default depends on the command.
COMMAND_DEFAULTED = ("patience", "monitor", "warmup_epochs", "schedule", "foreground_crops", "class_weights")


def segment_train_config(training: dict[str, Any], defaults: Optional[dict[str, Any]] = None, **more: Any):
    """The :data:`SegmenterTraining` options (and ``more`` fields) as one checked training config; the
    command-defaulted options not given take `defaults`, else the config's own defaults."""
    from ..segment.training import SegmentTrainConfig

    options = dict(training)
    for key in COMMAND_DEFAULTED:
        if options.get(key) is None:
            options.pop(key, None)
            if defaults and key in defaults:
                options[key] = defaults[key]
    return SegmentTrainConfig.from_options(**options, **more)

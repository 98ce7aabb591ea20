"""What long-running work shows in the user's terminal: one progress bar, one line per warning, and
Lightning and diffusers without their chatter."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress

#: Lightning's loggers of start-up banners (accelerator found, seed set, CUDA_VISIBLE_DEVICES, tips).
LIGHTNING_CHATTER = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")
#: diffusers' logger that advises installing accelerate whenever a model is loaded or built without it
MODEL_LOADING_CHATTER = "diffusers.models.modeling_utils"

_progress_bars = {"shown": True}


def show_progress_bars(shown: bool) -> None:
    """Whether this process draws progress bars at all (``histosynth --quiet`` turns them off: results,
    warnings and errors are still printed)."""
    _progress_bars["shown"] = bool(shown)


def progress_bars_shown() -> bool:
    return _progress_bars["shown"]


def progress_bar(enabled: bool = True, *, transient: bool = False, elapsed: bool = False, rate: bool = False,
                 stderr: bool = False) -> "Progress":
    """A rich progress bar: each task's description, the bar, done/total and the time left.

    ``transient`` bars disappear when they finish (steps inside a larger command); ``elapsed`` shows
    the time taken instead of the time left; ``rate`` (long jobs) shows the units per second of a task
    whose ``unit`` field names them (``1.42 images/s``), the time taken and the time left ("ETA").
    ``stderr`` draws on standard error, leaving standard output to a command's results. A disabled bar
    (or any bar after ``show_progress_bars(False)``) prints nothing, so callers need no branch.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Units per second of a task whose ``unit`` field names them, e.g. ``1.42 images/s``."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "")
            return Text("" if speed is None else f"{speed:.2f} {unit}/s", style="progress.data.speed")

    class ShownFromFirstTask(Progress):
        """Draws nothing until its first task: a command refused before any work prints its one line only."""

        def __enter__(self) -> "ShownFromFirstTask":
            return self

        def add_task(self, *args, **kwargs):
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kwargs)

        def __exit__(self, *exc_info) -> None:
            if self.live.is_started:
                self.stop()

    if rate:
        clocks = [RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    else:
        clocks = [TimeElapsedColumn() if elapsed else TimeRemainingColumn()]
    return ShownFromFirstTask(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *clocks,
                              disable=not (enabled and progress_bars_shown()), transient=transient,
                              console=Console(stderr=True) if stderr else None)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's progress bar and real warnings, without its start-up banners and the warnings that small
    datasets and short runs always raise; the loggers' levels and the warning filters are restored after."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextmanager
def plain_output() -> Iterator[None]:
    """Warnings as one line each, diffusers' model loading without its advice to install accelerate, and
    Lightning's progress bar and warnings without its tips and chatter (see :func:`quiet_lightning`)."""
    loading = logging.getLogger(MODEL_LOADING_CHATTER)
    level, format_warning = loading.level, warnings.formatwarning
    loading.setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        with quiet_lightning():
            yield
    finally:
        loading.setLevel(level)
        warnings.formatwarning = format_warning

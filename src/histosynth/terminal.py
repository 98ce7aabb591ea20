"""What long-running work shows in the user's terminal: one progress bar, and Lightning without its chatter."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress

#: Lightning's loggers of start-up banners (accelerator found, seed set, CUDA_VISIBLE_DEVICES, tips).
LIGHTNING_CHATTER = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


def progress_bar(enabled: bool = True, *, transient: bool = False, elapsed: bool = False) -> "Progress":
    """A rich progress bar: each task's description, the bar, done/total and the time left.

    ``transient`` bars disappear when they finish (steps inside a larger command); ``elapsed`` shows
    the time taken instead of the time left. A disabled bar prints nothing, so callers need no branch.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    clock = TimeElapsedColumn() if elapsed else TimeRemainingColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), clock,
                    disable=not enabled, transient=transient)


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

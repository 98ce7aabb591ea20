"""The `histosynth` command line: one Typer app, one module per command group.

Each subcommand parses its options and calls one library function. A user mistake
(:class:`~histosynth.errors.HistosynthError`) is printed as one line without a traceback and
exits non-zero.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import typer

from ..errors import HistosynthError
from ..terminal import show_progress_bars
from . import caption, dataset, demo, evaluate, generate, jobs, model, phantom, segment, survey, tile, train

app = typer.Typer(
    name="histosynth",
    help="Synthetic renal histology on command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars in any command (results, "
                                     "warnings and errors are still printed); give it before the command")) -> None:
    """Synthetic renal histology on command: captions, phantom data, tiling, models, evaluation."""
    show_progress_bars(not quiet)


caption.register(app)
demo.register(app)
survey.register(app)
model.register(app)
tile.register(app)
generate.register(app)
jobs.register(app)
phantom.register(app)
train.register(app)
segment.register(app)
evaluate.register(app)
dataset.register(app)


def _usage_error_class() -> type[Exception]:
    """Click's ``ClickException`` (a usage error such as an unknown option or a missing one).

    Older Typer re-exports click's exceptions, newer Typer vendors its own copy of click; either way
    ``typer.BadParameter`` derives from the ``ClickException`` that the parser raises.
    """
    return next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


USAGE_ERROR = _usage_error_class()


#: the environment variables by which torchrun (RANK, LOCAL_RANK) and Lightning's launcher (LOCAL_RANK, NODE_RANK)
#: tell a process its place in a job
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK")


def is_other_process() -> bool:
    """Whether this process is one of a multi-process job's other processes (not its first)."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in RANK_VARIABLES)


@contextmanager
def warnings_of_the_first_process() -> Iterator[None]:
    """Python warnings are shown by a job's first process only: the others would repeat them once each."""
    with warnings.catch_warnings():
        if is_other_process():
            warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests).

    A leading ``--`` is dropped: ``torchrun ... -m histosynth -- generate --n 4`` keeps torchrun from
    reading ``--n`` as an abbreviation of its own options, and some Pythons' argparse passes the ``--`` on.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        with warnings_of_the_first_process():
            result = app(args=argv, standalone_mode=False, prog_name="histosynth")
    except HistosynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except USAGE_ERROR as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())

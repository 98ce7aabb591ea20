"""The `histosynth` command line: one Typer app, one module per command group.

Each subcommand parses its options and calls one library function. A user mistake
(:class:`~histosynth.errors.HistosynthError`) is printed as one line without a traceback and
exits non-zero.
"""

from __future__ import annotations

import sys

import click
import typer

from ..errors import HistosynthError
from . import caption
from . import demo
from . import survey
from . import model
from . import tile
from . import generate
from . import phantom
from . import train
from . import segment
from . import evaluate
from . import dataset

app = typer.Typer(
    name="histosynth",
    help="Synthetic renal histology on command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Synthetic renal histology on command: captions, phantom data, tiling, models, evaluation."""


caption.register(app)
demo.register(app)
survey.register(app)
model.register(app)
tile.register(app)
generate.register(app)
phantom.register(app)
train.register(app)
segment.register(app)
evaluate.register(app)
dataset.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests)."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="histosynth")
    except HistosynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())

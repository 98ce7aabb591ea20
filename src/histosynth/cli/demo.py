"""`histosynth demo`: the toolkit end to end on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ProgressOption, seed_option


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="folder for the demo's outputs and report.html"),
    seed: int = seed_option("random seed of the phantom slides"),
    progress: bool = ProgressOption,
) -> None:
    """Phantom slides -> captioned patch dataset -> contact sheet -> report.html."""
    from ..demo import DemoSettings, run_demo

    result = run_demo(out, DemoSettings(seed=seed), progress=progress)
    total = sum(result.timings.values())
    typer.echo(f"{len(result.dataset)} patches in {result.dataset.root}; contact sheet {result.sheet}")
    typer.echo(f"report: {result.report}  ({total:.0f} s)")

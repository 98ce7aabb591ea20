"""`histosynth generate` (patches on command) and `histosynth synth-slide` (whole synthetic slides)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
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

from ..errors import ConfigError

def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("synth-slide")(synth_slide_command)


ModelOption = typer.Option(None, "--model", help="model folder (default: the toolkit's embedded model)",
                           show_default=False)
CaptionOption = typer.Option(None, "--caption", help="caption in the schema's templates ('\\n' between sentences)")
LevelsOption = typer.Option(None, "--levels", help="class levels, e.g. 'Glomeruli=high,Tubuli=medium'")
SeedOption = typer.Option(0, "--seed", help="job seed; each image's seed is derived from it and its index")
StepsOption = typer.Option(50, "--steps", help="denoising steps")
GuidanceOption = typer.Option(1.5, "--guidance", help="classifier-free guidance scale (1 = none, 0 = unconditional)")
SchedulerOption = typer.Option("ddim", "--scheduler", help="ddim (CompVis DDIM, eta 0) or dpm++ (DPM-Solver++)")
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")


def generate_command(
    model: Optional[Path] = ModelOption,
    caption: Optional[str] = CaptionOption,
    levels: Optional[str] = LevelsOption,
    captions_file: Optional[Path] = typer.Option(None, "--captions-file", help="text file, one caption per line"),
    n: Optional[int] = typer.Option(None, "--n", help="number of images (default: one per caption); captions cycle"),
    out: Path = typer.Option(..., "--out", help="output folder: PNGs and manifest.json"),
    seed: int = SeedOption,
    steps: int = StepsOption,
    guidance: float = GuidanceOption,
    scheduler: str = SchedulerOption,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", show_default=False,
                                             help="images per UNet call, part of the job (default: 8, or the "
                                             "job's when resuming)"),
    size: Optional[int] = typer.Option(None, "--size", help="image side in px (default: the model's patch size)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: make the batches with index = i mod n "
                                        "(default: torchrun's RANK/WORLD_SIZE, else all)"),
    device: str = DeviceOption,
) -> None:
    """Generate images from a caption, class levels or a captions file; re-running resumes the job."""
    from ..devices import pick_device
    from ..sample.generate import SamplingOptions
    from ..sample.jobs import Shard, new_job, run_job

    folder = _model_folder(model)
    schema = _model_schema(folder)
    captions = _captions(schema, caption, levels, captions_file)
    options = SamplingOptions(steps, guidance, scheduler)
    chosen = Shard.parse(shard) if shard else Shard.from_environment()
    bundle = _load(folder, pick_device(device))
    job = new_job(out, bundle, captions, len(captions) if n is None else n, seed, options, size, batch_size)
    todo = len(job.missing(chosen))
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(f"shard {chosen}" if chosen.count > 1 else "generating", total=todo, unit="images")
        run = run_job(bundle, job, chosen, lambda k: progress.advance(task, k))
    seconds = time.perf_counter() - started
    rate = f", {run.written / seconds:.2f} images/s" if run.written else ""
    typer.echo(f"shard {chosen}: wrote {run.written} images in {seconds:.1f} s{rate} "
               f"({run.existing} of {run.items} were already there) to {out}")


def synth_slide_command(
    model: Optional[Path] = ModelOption,
    caption: Optional[str] = CaptionOption,
    levels: Optional[str] = LevelsOption,
    size: str = typer.Option(..., "--size", help="slide size in px: one side (square) or WIDTHxHEIGHT"),
    out: Path = typer.Option(..., "--out", help="pyramidal TIFF to write (its record goes beside it as .json)"),
    mode: str = typer.Option("seamless", "--mode", help="seamless (blended windows) or stitched (thesis grid)"),
    mpp: float = typer.Option(0.5, "--mpp", help="microns per pixel written in the TIFF"),
    seed: int = SeedOption,
    steps: int = StepsOption,
    guidance: float = GuidanceOption,
    scheduler: str = SchedulerOption,
    batch_size: int = typer.Option(8, "--batch-size", help="patches per UNet call (stitched mode)"),
    window_batch: int = typer.Option(8, "--window-batch", help="latent windows per UNet call (seamless mode)"),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="latent px shared by windows (default: a quarter window)"),
    device: str = DeviceOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
) -> None:
    """Generate a synthetic slide of one caption, streamed to a pyramidal TIFF."""
    from ..devices import pick_device
    from ..sample.generate import SamplingOptions
    from ..sample.slides import check_slide_mode, synth_slide

    folder = _model_folder(model)
    schema = _model_schema(folder)
    if (caption is None) == (levels is None):
        raise ConfigError("give exactly one of --caption or --levels")
    (text,) = _captions(schema, caption, levels, None)
    check_slide_mode(mode)
    options = SamplingOptions(steps, guidance, scheduler)
    slide_size = parse_slide_size(size)
    bundle = _load(folder, pick_device(device))
    tasks: dict[str, int] = {}
    with _progress() as progress:
        def advance(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total, unit=phase.split()[-1])
            progress.update(tasks[phase], completed=done)

        report = synth_slide(bundle, text, slide_size, out, mode, mpp, seed, options, batch_size=batch_size,
                             window_batch=window_batch, overlap=overlap, overwrite=overwrite, progress=advance)
    typer.echo(report.summary())


def parse_slide_size(text: str) -> tuple[int, int]:
    """(height, width) from ``"20480"`` or ``"WIDTHxHEIGHT"``."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise ConfigError(f"--size expects a side in px (20480) or WIDTHxHEIGHT (4096x2048), got {text!r}")
    width, height = sides if len(sides) == 2 else sides * 2
    return height, width


# --- shared steps -------------------------------------------------------------------------------------
def _model_folder(model: Optional[Path]) -> Path:
    from ..defaults import default_bundle_path

    return model if model is not None else default_bundle_path()


def _model_schema(folder: Path):
    """The class schema of a model folder, read (and its format version checked) before any weights load."""
    from ..models.bundle import CONFIG_FILE, read_bundle_config
    from ..schema import ClassSchema

    return ClassSchema.from_dict(read_bundle_config(folder)["schema"], source=f"{folder / CONFIG_FILE}: schema")


def _captions(schema, caption: Optional[str], levels: Optional[str], captions_file: Optional[Path]) -> list[str]:
    from ..sample.generate import canonical_caption, caption_for_levels, read_captions_file

    given = [x is not None for x in (caption, levels, captions_file)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --caption, --levels or --captions-file")
    if caption is not None:
        return [canonical_caption(caption, schema)]
    if levels is not None:
        return [caption_for_levels(levels, schema)]
    return read_captions_file(captions_file, schema)


def _load(folder: Path, device):
    from ..models.bundle import load_bundle

    with Console(stderr=True).status(f"loading {folder} on {device}"):
        return load_bundle(folder, device)


class _RateColumn(ProgressColumn):
    """Units per second of a task whose ``unit`` field names them, e.g. ``1.42 images/s``."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text("" if speed is None else f"{speed:.2f} {unit}/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))

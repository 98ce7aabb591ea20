"""`histosynth jobs status` (where a generation job stands, shard by shard, and what to run next) and
`histosynth jobs merge` (its single manifest, manifest.jsonl)."""

from __future__ import annotations

from pathlib import Path

import typer

jobs_app = typer.Typer(help="Generation jobs (histosynth generate --out FOLDER): where they stand, their manifest.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


JobArgument = typer.Argument(..., help="the job's folder (generate's --out)", show_default=False)


@jobs_app.command("status")
def status_command(
    job_folder: Path = JobArgument,
    check_files: bool = typer.Option(False, "--check-files", help="also look for every finished image on disk "
                                     "(lists every image folder: slow for millions of images)"),
) -> None:
    """Count each shard's finished and missing images and say what to run next."""
    from ..sample.jobs import Job

    job = Job.read(job_folder)
    for line in status_lines(job, check_files):
        typer.echo(line)


def status_lines(job, check_files: bool = False) -> list[str]:
    """The report of `jobs status`: the whole job, each shard of the shard counts its runs used, what next."""
    import numpy as np

    from ..sample.jobs import Shard

    spec = job.spec
    recorded = job.finished_mask()
    finished = job.finished_mask(check_files=True) if check_files else recorded
    done = int(finished.sum())
    lines = [f"{job.folder}: {spec.n} images of model {spec.model_id} ({spec.batch_size} per batch): "
             f"{done} finished, {spec.n - done} missing"]
    gone = np.flatnonzero(recorded & ~finished)
    if len(gone):
        lines.append(f"{len(gone)} finished images are gone from disk (e.g. {job.item(int(gone[0]))['file']}); "
                     "the job's generate command with --check-files makes them again")
    counts = job.record_shard_counts() or [1]
    waiting = []
    for count in counts:
        for index in range(count):
            state = job.state(Shard(index, count), finished=finished)
            if count > 1:
                lines.append(f"  shard {index}/{count}: {state.existing} of {state.items} finished, "
                             f"{state.missing} missing")
            if state.missing and count == counts[-1]:
                waiting.append(state.shard)
    if not waiting:
        lines.append(f"complete: `histosynth jobs merge {job.folder}` writes its manifest (manifest.jsonl)")
    elif counts[-1] == 1:
        lines.append("next: run the job's generate command again; it makes only what is missing")
    else:
        shards = ", ".join(f"--shard {shard}" for shard in waiting)
        lines.append(f"next: run the job's generate command again with {shards} (or all {counts[-1]} under "
                     "torchrun); each makes only what is missing")
    return lines


@jobs_app.command("merge")
def merge_command(job_folder: Path = JobArgument) -> None:
    """Write the job's single manifest, manifest.jsonl: every finished image's file, caption, seed and options."""
    from ..sample.jobs import Job

    job = Job.read(job_folder)
    path, count = job.merge()
    missing = job.spec.n - count
    more = f"; {missing} images are still missing (see `histosynth jobs status {job.folder}`)" if missing else ""
    typer.echo(f"wrote {path}: {count} of {job.spec.n} images{more}")

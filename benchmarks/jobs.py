"""Generation jobs: starting and resuming a job of a million images, and writing images off the critical path.

Prints ``name value unit`` lines:

* ``job_start_1M_s``: creating a job of 1,000,000 images in an empty folder and working out what its
  shard has to make - what ``histosynth generate`` does between loading the model and sampling the
  first batch (:func:`new_job`, :meth:`Job.state`), one shard of one (the whole job: the most work);
* ``job_resume_1M_s``: the same command on the same folder once all 1,000,000 images are recorded as
  finished (the records one line per batch of 8, as the writers leave them; the images themselves
  are not written: a resume never looks at them), up to :func:`run_job` returning with nothing to
  do; ``job_resume_1M_b1_s``: the same with batches of 1 (a million record lines); target < 2 s each;
* ``job_without_writing_s`` / ``job_with_writing_s``: a job of 64 images of the ``tiny`` preset
  (random weights, 256 px, 2 DDIM steps, batches of 8) sampled by the job loop with the images
  thrown away, and the same job made by :func:`run_job`, PNGs written by its writer threads; side by
  side in one process, alternating, best of two each, with ``job_writing_ratio`` (target <= 1.05)
  and ``png_encode_ms_per_image``, what writing an image takes on one thread (it used to be paid
  inside the loop).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jobs.py [--threads 1] [--no-writing]

Measured on the 2-core CPU machine (torch 2.13 CPU), ``--threads 1``, shared with other
test runs (load average 3-4 during the run; an earlier run at load 6-12 gave 0.24 s and
1.8 s for the resumes and a writing ratio of 0.79, the load changing between the two jobs by more
than writing costs)::

    job_start_1M_s 0.01944 s
    job_resume_1M_s 0.07126 s
    job_resume_1M_b1_s 0.4972 s
    job_without_writing_s 149.7 s
    job_with_writing_s 145.3 s
    job_writing_ratio 0.9709 x
    png_encode_ms_per_image 34.43 ms

The 64 images took over 2 s each to sample and decode on the CPU against 35 ms to write (a synced
PNG write, on one thread): writing is under 2 % of this job even when paid in the loop, so on this
machine the ratio mostly measures the load. On a GPU, where a 256 px image samples in tens of
milliseconds, the threads are what keeps writing out of the loop.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sampling import CAPTION, make_bundle  # noqa: E402

MILLION = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-writing", action="store_true", help="only the start and resume of a million")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from histosynth.models.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(make_bundle(Path(tmp) / "tiny", "tiny"), "cpu")
        for name, seconds in start_and_resume(bundle, Path(tmp)).items():
            report(name, seconds, "s")
        if not args.no_writing:
            timings = writing_overlap(bundle, Path(tmp))
            report("job_without_writing_s", timings["without"], "s")
            report("job_with_writing_s", timings["with"], "s")
            report("job_writing_ratio", timings["with"] / timings["without"], "x")
            report("png_encode_ms_per_image", timings["encode"] * 1000, "ms")


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def start_and_resume(bundle, root: Path) -> dict[str, float]:
    """Seconds to start a job of a million images, and to resume it when everything is recorded."""
    from histosynth.sample.jobs import Shard

    timings = {}
    folder = root / "million"
    timings["job_start_1M_s"] = _start(bundle, folder, 8, run=False)
    record_everything(folder)
    timings["job_resume_1M_s"] = _start(bundle, folder, 8, run=True)
    folder_b1 = root / "million-b1"
    _start(bundle, folder_b1, 1, run=False)
    record_everything(folder_b1)
    timings["job_resume_1M_b1_s"] = _start(bundle, folder_b1, 1, run=True)
    assert _job(bundle, folder, 8).state(Shard()).missing == 0
    shutil.rmtree(folder)
    shutil.rmtree(folder_b1)
    return timings


def _job(bundle, folder: Path, batch_size: int):
    from histosynth.sample.generate import SamplingOptions
    from histosynth.sample.jobs import new_job

    return new_job(folder, bundle, [CAPTION, ""], MILLION, 7, SamplingOptions(steps=2), batch_size=batch_size)


def _start(bundle, folder: Path, batch_size: int, run: bool) -> float:
    """What the generate command does after loading the model; with ``run``, up to run_job's return."""
    from histosynth.sample.jobs import Shard, run_job

    started = time.perf_counter()
    job = _job(bundle, folder, batch_size)
    state = job.state(Shard())
    if run:
        result = run_job(bundle, job, Shard(), state=state)
        assert result.written == 0 and result.existing == MILLION
    return time.perf_counter() - started


def record_everything(folder: Path) -> None:
    """Record every batch of the job in ``folder`` as finished, as its writers would have."""
    from histosynth.sample.jobs import Job, Shard
    from histosynth.sample.writing import RecordFile

    job = Job.read(folder)
    with RecordFile(job.record_path(Shard())) as record:
        for batch in range(job.batch_count):
            record.append(batch)


def writing_overlap(bundle, root: Path, images: int = 64, rounds: int = 2) -> dict[str, float]:
    """Best-of-``rounds`` seconds for a job of ``images`` with its images thrown away, and with them written by
    run_job (the two alternate, so that a change in the machine's load hits both)."""
    from histosynth.io import write_png_atomic
    from histosynth.sample.generate import SamplingOptions
    from histosynth.sample.jobs import Shard, _sampled_batches, new_job, run_job

    options = SamplingOptions(steps=2)
    run_job(bundle, new_job(root / "warm", bundle, [CAPTION], 8, 1, options, batch_size=8))  # first calls allocate
    timings: dict[str, list[float]] = {"without": [], "with": []}
    for attempt in range(rounds):
        job = new_job(root / f"thrown-away-{attempt}", bundle, [CAPTION, ""], images, 7, options, batch_size=8)
        started = time.perf_counter()
        made = [image for _, files in _sampled_batches(bundle, job, job.state(Shard())) for _, _, image in files]
        timings["without"].append(time.perf_counter() - started)
        job = new_job(root / f"written-{attempt}", bundle, [CAPTION, ""], images, 7, options, batch_size=8)
        started = time.perf_counter()
        assert run_job(bundle, job).written == images
        timings["with"].append(time.perf_counter() - started)
    started = time.perf_counter()
    for index, image in enumerate(made):
        write_png_atomic(root / "encoded" / f"{index}.png", image, durable=True)
    encode = (time.perf_counter() - started) / len(made)
    return {"without": min(timings["without"]), "with": min(timings["with"]), "encode": encode}


if __name__ == "__main__":
    main()

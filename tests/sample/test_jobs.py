"""Generation jobs: descriptions, records, item seeds, shards, resuming, writing, torchrun and the commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import histosynth
from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.devices import process_gpu
from histosynth.errors import ConfigError, JobError
from histosynth.evaluate.images import read_generated
from histosynth.sample.generate import SamplingOptions
from histosynth.sample.jobs import JOB_FILE, Job, JobSpec, Layout, Shard, item_seed, new_job, run_job
from histosynth.sample.writing import ImageWriter, RecordFile, read_records

OPTIONS = SamplingOptions(steps=2)
LEVELS = "Glomeruli=high,Tubuli=medium"


def _cli_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--levels", LEVELS, "--n", "5", "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--seed", "7", *extra]


def _subprocess(args: list[str], **env: str) -> subprocess.Popen:
    code = "import sys; from histosynth.cli import main; sys.exit(main(sys.argv[1:]))"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def _one_thread():
    """Match the subprocesses: CPU kernels round differently with another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _png_chunk_types(data: bytes) -> list[str]:
    types, offset = [], 8
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        assert zlib.crc32(data[offset + 4:offset + 8 + length]) == int.from_bytes(
            data[offset + 8 + length:offset + 12 + length], "big")
        types.append(kind.decode())
        offset += 12 + length
    return types


# --- seeds and shards ---------------------------------------------------------------------------------
def test_item_seeds_depend_on_job_seed_and_index_only():
    seeds = [item_seed(7, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert item_seed(7, 3) == seeds[3]
    assert not set(seeds) & {item_seed(8, i) for i in range(1000)}


def test_shards():
    assert Shard.parse("1/4") == Shard(1, 4)
    assert [b for b in range(10) if Shard(1, 4).takes(b)] == [1, 5, 9]
    assert Shard.from_environment({"RANK": "3", "WORLD_SIZE": "8"}) == Shard(3, 8)
    assert Shard.from_environment({}) == Shard(0, 1)
    with pytest.raises(ConfigError, match=r"^shard 4/4 does not exist; use i/n with 0 <= i < n$"):
        Shard.parse("4/4")
    with pytest.raises(ConfigError, match=r"^--shard expects i/n such as 0/4, got 'half'$"):
        Shard.parse("half")


# --- a job on disk ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_job(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    job = new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS, batch_size=2)
    run = run_job(tiny_bundle, job)
    assert (run.items, run.existing, run.written) == (3, 0, 3)
    return job


def _job_dict(model_id: str) -> dict:
    """The job as today's histosynth and the first job format both describe it."""
    return {"model_id": model_id, "n": 3, "seed": 7, "steps": 2, "guidance": 1.5, "scheduler": "ddim",
            "height": 64, "width": 64, "batch_size": 2, "captions": [GENERATING_CAPTION, ""]}


def test_a_job_is_described_once_and_its_items_derived(finished_job, tiny_bundle):
    folder = finished_job.folder
    assert json.loads((folder / JOB_FILE).read_text()) == {
        "format": "histosynth.generation-job", "format_version": 2,
        "job": {**_job_dict(tiny_bundle.id), "precision": "fp32"},
        "layout": {"images_per_folder": 1000}}
    assert Job.read(folder).items[2] == {
        "index": 2, "file": "00000/00002.png", "caption": GENERATING_CAPTION, "seed": item_seed(7, 2), "steps": 2,
        "guidance": 1.5, "scheduler": "ddim", "model_id": tiny_bundle.id, "height": 64, "width": 64,
    }
    # one line per batch, appended once its images were on disk
    assert (folder / "records" / "shard-0-of-1.jsonl").read_text() == '{"batch":0}\n{"batch":1}\n'
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "00000/00000.png", "00000/00001.png", "00000/00002.png"]
    assert [r["file"] for r in Job.read(folder).finished()] == ["00000/00000.png", "00000/00001.png", "00000/00002.png"]
    # evaluation reads the job as it is, without a merged manifest
    found, source = read_generated(folder)
    assert [(g.path, g.caption) for g in found] == [(folder / "00000" / f"0000{i}.png", [GENERATING_CAPTION, ""][i % 2])
                                                    for i in range(3)]
    assert source == f"generation job {folder} (3 of 3 images finished)"
    assert main(["jobs", "merge", str(folder)]) == 0
    merged = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert merged == [Job.read(folder).items[i] for i in range(3)] and merged[1]["file"] == "00000/00001.png"


def test_a_job_of_a_million_images_is_small_and_shards_by_arithmetic(tmp_path):
    spec = JobSpec("model", (GENERATING_CAPTION, ""), 1_000_000, 7, OPTIONS, (64, 64), 8)
    job = Job.create_or_resume(tmp_path, spec)
    assert (tmp_path / JOB_FILE).stat().st_size < 1000 and sorted(os.listdir(tmp_path)) == [JOB_FILE]
    assert job.items[123_456]["file"] == "00123/123456.png" and len(job.items) == 1_000_000
    layout = Layout(1_000_000)
    assert layout.index_of("00123/123456.png") == 123_456 and layout.index_of("00124/123456.png") is None
    state = job.state(Shard(1, 3))  # batches 1, 4, ... of 125000: 41667 batches, the last (124999) is shard 1's
    assert (state.items, state.existing, len(state.todo), state.todo[:2].tolist()) == (333_336, 0, 41_667, [1, 4])
    with RecordFile(job.record_path(Shard(1, 3))) as record:
        record.append(1)
        record.append(4, [33, 35])
    state = job.state(Shard(1, 3))
    assert (state.existing, state.todo[:2].tolist()) == (10, [4, 7])


def test_a_killed_job_resumes_with_only_what_is_missing(finished_job, tiny_bundle):
    folder, images = finished_job.folder, finished_job.folder / "00000"
    before = _pngs(images)
    record = folder / "records" / "shard-0-of-1.jsonl"
    # killed while writing batch 0: item 0 on disk and recorded, item 1 half-written, the next line cut short
    record.write_text('{"batch":0,"items":[0]}\n{"batch":1}\n{"batch":0,"it')
    (images / "00001.png").unlink()
    partial = images / ".00001.png.k3j9x_2a.part.png"
    partial.write_bytes(before["00001.png"][:100])
    untouched = {name: (images / name).stat().st_mtime_ns for name in ("00000.png", "00002.png")}
    job = new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS)  # batch size from the job
    assert [item["file"] for item in job.missing()] == ["00000/00001.png"]
    assert job.state().todo.tolist() == [0]
    run = run_job(tiny_bundle, job)
    assert (run.existing, run.written) == (2, 1)
    assert _pngs(images) == before  # the same bytes as the uninterrupted run
    assert not partial.exists()
    assert {name: (images / name).stat().st_mtime_ns for name in untouched} == untouched
    assert record.read_text() == '{"batch":0,"items":[0]}\n{"batch":1}\n{"batch":0,"items":[1]}\n'
    # an image deleted after it was recorded: only a run that checks the files sees it
    (images / "00002.png").unlink()
    assert job.state().missing == 0 and job.state(check_files=True).todo.tolist() == [1]
    assert run_job(tiny_bundle, job, check_files=True).written == 1 and _pngs(images) == before


def test_a_job_of_the_first_format_resumes_in_its_flat_layout(finished_job, tiny_bundle, tmp_path):
    """A folder as histosynth wrote jobs before job.json: manifest.json with every item, images side by side."""
    items = [{"index": i, "file": f"0000{i}.png", "caption": [GENERATING_CAPTION, ""][i % 2], "seed": item_seed(7, i),
              "steps": 2, "guidance": 1.5, "scheduler": "ddim", "model_id": tiny_bundle.id, "height": 64, "width": 64}
             for i in range(3)]
    manifest = json.dumps({"format": "histosynth.generation-job", "format_version": 1,
                           "job": _job_dict(tiny_bundle.id), "items": items}, indent=2)
    (tmp_path / "manifest.json").write_text(manifest)
    made = _pngs(finished_job.folder / "00000")
    for name in ("00000.png", "00001.png"):  # killed before the last batch
        (tmp_path / name).write_bytes(made[name])
    job = new_job(tmp_path, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS)
    assert job.spec.batch_size == 2 and list(job.items) == items
    assert [item["file"] for item in job.missing()] == ["00002.png"]
    assert run_job(tiny_bundle, job).written == 1
    assert _pngs(tmp_path) == made and (tmp_path / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "00002.png", "manifest.json",
                                                          "records"]
    assert main(["jobs", "merge", str(tmp_path)]) == 0
    assert [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == items


def test_another_jobs_folder_is_refused_untouched(finished_job, tiny_bundle, tmp_path):
    folder = finished_job.folder
    description = (folder / JOB_FILE).read_bytes()
    images = _pngs(folder / "00000")
    with pytest.raises(JobError, match=rf"^{folder} holds another job \(its job.json differs in seed: 7 there, "
                                       rf"8 here \(--seed 7 continues it\)\); choose another output folder, or "):
        new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 8, OPTIONS)
    with pytest.raises(JobError, match=r"differs in batch_size: 2 there, 3 here \(--batch-size 2 continues it\)"):
        new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS, batch_size=3)
    assert (folder / JOB_FILE).read_bytes() == description and _pngs(folder / "00000") == images
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "00000.png").write_bytes(b"someone's image")
    with pytest.raises(JobError, match=r"holds image files but no job.json \(e.g. 00000.png\)"):
        new_job(stray, tiny_bundle, [GENERATING_CAPTION], 3, 7, OPTIONS)
    assert (stray / "00000.png").read_bytes() == b"someone's image" and not (stray / JOB_FILE).exists()


# --- writing and records ----------------------------------------------------------------------------------
def test_a_writer_error_surfaces_in_the_caller_and_its_batch_is_not_recorded(tmp_path):
    image = np.full((8, 8, 3), 200, np.uint8)
    (tmp_path / "b1" / "3.png").mkdir(parents=True)  # a folder where the image should go: the rename fails
    batches = [[(i, tmp_path / f"b{i // 2}" / f"{i}.png", image) for i in (2 * b, 2 * b + 1)] for b in range(3)]
    with RecordFile(tmp_path / "record.jsonl") as record:
        with pytest.raises(JobError, match=rf"^could not write {tmp_path}/b1/3.png \(Is a directory\); free the "):
            with ImageWriter(record, threads=2, pending=1) as writer:
                for number, files in enumerate(batches):
                    writer.submit(number, files)
    assert (tmp_path / "record.jsonl").read_text().splitlines()[0] == '{"batch":0}'
    assert '{"batch":1}' not in (tmp_path / "record.jsonl").read_text()
    assert not list(tmp_path.rglob(".*.part.png"))  # nothing half-written is left behind either


def test_a_batch_is_recorded_as_soon_as_its_images_are_on_disk(tmp_path):
    """Not when the next batch is handed over: a process killed while it samples that one loses nothing written."""
    image = np.full((8, 8, 3), 90, np.uint8)
    path = tmp_path / "record.jsonl"
    done = []
    with RecordFile(path) as record, ImageWriter(record, threads=2, pending=2, done=done.append) as writer:
        writer.submit(0, [(0, tmp_path / "0.png", image), (1, tmp_path / "1.png", image)])
        deadline = time.monotonic() + 60
        while not path.read_text() and time.monotonic() < deadline:  # the caller goes on sampling
            time.sleep(0.01)
        assert path.read_text() == '{"batch":0}\n' and done == [2] and writer.written == 2
        assert (tmp_path / "0.png").is_file() and (tmp_path / "1.png").is_file()
        writer.submit(1, [(3, tmp_path / "3.png", image)], whole=False)
    assert path.read_text() == '{"batch":0}\n{"batch":1,"items":[3]}\n' and done == [2, 1]


def test_a_record_drops_a_cut_line_and_refuses_a_corrupt_one(tmp_path):
    path = tmp_path / "shard-0-of-1.jsonl"
    path.write_text('{"batch":0}\n{"batch":2,"items":[17]}\n{"batch":1,"ite')
    assert [a.tolist() for a in read_records(tmp_path)] == [[0], [17]]
    with RecordFile(path) as record:
        record.append(3)
    assert path.read_text() == '{"batch":0}\n{"batch":2,"items":[17]}\n{"batch":3}\n'
    path.write_text('{"batch":0}\nnot json\n')
    with pytest.raises(JobError, match=r"shard-0-of-1.jsonl line 2 is not a record of finished images \('not json'\)"):
        read_records(tmp_path)


def test_each_process_takes_its_own_gpu():
    assert process_gpu(4, None, {"LOCAL_RANK": "3"}) == 3  # torchrun
    assert process_gpu(4, 1, {"LOCAL_RANK": "2"}) == 2     # torchrun's local rank beats the shard's index
    assert process_gpu(2, 5, {}) == 1                      # --shard 5/8 on two GPUs
    assert process_gpu(2, None, {}) == 0


# --- the command ----------------------------------------------------------------------------------------
def test_torchrun_makes_the_same_images_as_one_process(tiny_bundle_path, tmp_path, capsys):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    # as people type it; the -- keeps torchrun from reading --n as an abbreviation of its own --nnodes
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "histosynth", "--", *_cli_args(tiny_bundle_path, sharded), "--device", "cpu"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(histosynth.__file__).parents[1])}
    worker = subprocess.Popen(torchrun, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with _one_thread():  # --count: --n by another name, which torchrun leaves alone
        args = [a if a != "--n" else "--count" for a in _cli_args(tiny_bundle_path, single)]
        assert main(args) == 0
    output = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, output
    # batches of 2: rank 0 makes batches 0 and 2 (items 0, 1, 4), rank 1 batch 1 (items 2, 3)
    assert "shard 0/2: wrote 3 images" in output and "shard 1/2: wrote 2 images" in output
    assert sorted(_pngs(sharded / "00000")) == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png"]
    assert _pngs(sharded / "00000") == _pngs(single / "00000")
    assert (sharded / JOB_FILE).read_bytes() == (single / JOB_FILE).read_bytes()
    capsys.readouterr()
    assert main(["--", "jobs", "status", str(sharded)]) == 0  # as torchrun passes it on with some Pythons
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  shard 0/2: 3 of 3 finished, 0 missing", "  shard 1/2: 2 of 2 finished, 0 missing",
        f"complete: `histosynth jobs merge {sharded}` writes its manifest (manifest.jsonl)"]
    (sharded / "records" / "shard-1-of-2.jsonl").write_text("")  # as if rank 1 had not run
    assert main(["jobs", "status", str(sharded)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "next: run the job's generate command again with --shard 1/2 (or all 2 under torchrun); each makes only "
        "what is missing")


def test_captions_file_cycles_over_images(tiny_bundle_path, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("The image shows a low amount of Glomeruli.\nThere is a lot of Tubuli visible in the image.\n")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_bundle_path), "--captions-file", str(captions), "--n", "3",
                 "--out", str(out), "--steps", "1", "--guidance", "1"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    items = Job.read(out).items
    assert [item["caption"].splitlines()[1] for item in items] == [
        "The image shows a low amount of Glomeruli.", "There is a lot of Tubuli visible in the image.",
        "The image shows a low amount of Glomeruli."]


@pytest.mark.parametrize("change, message", [
    (["--guidance", "-1"], "error: guidance must be 0 or more (1 = no guidance), got -1.0"),
    (["--steps", "0"], "error: steps must be a whole number of at least 1, got 0"),
    (["--size", "130"], "error: image size 130 px must be a multiple of 4 (the autoencoder's downsampling "
                        "factor); use 128 or 132"),
    (["--levels", "Glomerulus=high"], "error: unknown class name 'Glomerulus'; schema 'renal' has "),
    (["--caption", "Lots of glomeruli."], "error: give exactly one of --caption, --levels or --captions-file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_bundle_path, tmp_path, refused, change, message):
    out = tmp_path / "out"
    assert refused(_cli_args(tiny_bundle_path, out) + change).startswith(message)
    assert not out.exists()


def test_model_folder_of_another_version_is_refused(tiny_bundle_path, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_bundle_path, model)
    config = json.loads((model / "histosynth.json").read_text())
    config["format_version"] = 99
    (model / "histosynth.json").write_text(json.dumps(config))
    assert main(_cli_args(model, tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {model} has model-folder format version 99; this histosynth reads versions 1, 2: "
        "upgrade histosynth to load it")
    assert not (tmp_path / "out").exists()


def test_without_a_model_the_embedded_default_is_used(tmp_path):
    from histosynth.defaults import default_bundle_path
    from histosynth.errors import ModelError
    from histosynth.models.bundle import read_bundle_config

    try:
        shipped = default_bundle_path()
    except ModelError:
        pytest.skip("this installation ships no default model")
    out = tmp_path / "out"
    assert main(["generate", "--levels", LEVELS, "--n", "1", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.rglob("*.png"))) == 1
    assert read_bundle_config(shipped).id in (out / "job.json").read_text()


@pytest.mark.slow
def test_a_job_killed_mid_way_resumes(tiny_bundle_path, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    worker = _subprocess(_cli_args(tiny_bundle_path, killed, "--batch-size", "1"))
    deadline = time.monotonic() + 300
    while len(list(killed.glob("00000/0*.png"))) < 2 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert 2 <= len(list(killed.glob("00000/0*.png"))) < 5
    with _one_thread():
        assert main(_cli_args(tiny_bundle_path, killed, "--batch-size", "1")) == 0
        assert main(_cli_args(tiny_bundle_path, reference, "--batch-size", "1")) == 0
    assert _pngs(killed / "00000") == _pngs(reference / "00000") and len(_pngs(killed / "00000")) == 5
    assert not list(killed.rglob(".*.part.png"))

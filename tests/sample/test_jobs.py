"""Generation jobs: manifests, item seeds, shards, resuming, and the `generate` command."""

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

import pytest
import torch
from PIL import Image

from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.errors import ConfigError, JobError
from histosynth.sample.generate import SamplingOptions
from histosynth.sample.jobs import MANIFEST_FILE, Job, Shard, item_seed, new_job, run_job

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


def test_manifest_holds_one_record_per_image(finished_job, tiny_bundle):
    manifest = json.loads((finished_job.folder / MANIFEST_FILE).read_text())
    assert manifest["job"] == {
        "model_id": tiny_bundle.id, "n": 3, "seed": 7, "steps": 2, "guidance": 1.5, "scheduler": "ddim",
        "precision": "fp32", "height": 64, "width": 64, "batch_size": 2, "captions": [GENERATING_CAPTION, ""],
    }
    assert manifest["items"][2] == {
        "index": 2, "file": "00002.png", "caption": GENERATING_CAPTION, "seed": item_seed(7, 2), "steps": 2,
        "guidance": 1.5, "scheduler": "ddim", "model_id": tiny_bundle.id, "height": 64, "width": 64,
    }
    assert [r["file"] for r in Job.read(finished_job.folder).finished()] == ["00000.png", "00001.png", "00002.png"]


def test_images_are_plain_pngs_without_metadata(finished_job):
    data = (finished_job.folder / "00000.png").read_bytes()
    assert _png_chunk_types(data) == ["IHDR", "IDAT", "IEND"]
    image = Image.open(finished_job.folder / "00000.png")
    assert (image.mode, image.size, image.info) == ("RGB", (64, 64), {})


def test_a_killed_job_resumes_with_only_what_is_missing(finished_job, tiny_bundle):
    folder = finished_job.folder
    before = _pngs(folder)
    (folder / "00001.png").unlink()
    (folder / ".00001.png.k3j9x.part.png").write_bytes(before["00001.png"][:100])  # a write cut short
    untouched = {name: (folder / name).stat().st_mtime_ns for name in ("00000.png", "00002.png")}
    job = new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS)  # batch size from the manifest
    assert [item["file"] for item in job.missing()] == ["00001.png"]
    assert [[item["index"] for item in batch] for batch in job.batches_to_run(Shard())] == [[0, 1]]
    run = run_job(tiny_bundle, job)
    assert (run.existing, run.written) == (2, 1)
    assert _pngs(folder) == before  # the same bytes as the uninterrupted run
    assert not list(folder.glob(".*.part.png"))
    assert {name: (folder / name).stat().st_mtime_ns for name in untouched} == untouched


def test_another_jobs_folder_is_refused_untouched(finished_job, tiny_bundle, tmp_path):
    folder = finished_job.folder
    manifest = (folder / MANIFEST_FILE).read_bytes()
    images = _pngs(folder)
    with pytest.raises(JobError, match=rf"^{folder} holds another job's manifest \(it differs in seed: 7 there, "
                                       rf"8 here\); choose another output folder, or delete "):
        new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 8, OPTIONS)
    with pytest.raises(JobError, match=r"differs in batch_size: 2 there, 3 here"):
        new_job(folder, tiny_bundle, [GENERATING_CAPTION, ""], 3, 7, OPTIONS, batch_size=3)
    assert (folder / MANIFEST_FILE).read_bytes() == manifest and _pngs(folder) == images
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "00000.png").write_bytes(b"someone's image")
    with pytest.raises(JobError, match=r"holds image files but no manifest.json \(e.g. 00000.png\)"):
        new_job(stray, tiny_bundle, [GENERATING_CAPTION], 3, 7, OPTIONS)
    assert (stray / "00000.png").read_bytes() == b"someone's image" and not (stray / MANIFEST_FILE).exists()


# --- the command ----------------------------------------------------------------------------------------
def test_two_processes_make_the_same_images_as_one(tiny_bundle_path, tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    workers = [
        _subprocess(_cli_args(tiny_bundle_path, sharded, "--shard", "0/2")),
        _subprocess(_cli_args(tiny_bundle_path, sharded), RANK="1", WORLD_SIZE="2"),  # as under torchrun
    ]
    with _one_thread():
        assert main(_cli_args(tiny_bundle_path, single)) == 0
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    # batches of 2: shard 0 makes batches 0 and 2 (items 0, 1, 4), shard 1 batch 1 (items 2, 3)
    assert "shard 0/2: wrote 3 images" in outputs[0][0] and "shard 1/2: wrote 2 images" in outputs[1][0]
    assert sorted(_pngs(sharded)) == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png"]
    assert _pngs(sharded) == _pngs(single)
    assert (sharded / MANIFEST_FILE).read_bytes() == (single / MANIFEST_FILE).read_bytes()


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
    assert len(list(out.glob("*.png"))) == 1
    assert read_bundle_config(shipped).id in (out / "manifest.json").read_text()


@pytest.mark.slow
def test_a_job_killed_mid_way_resumes(tiny_bundle_path, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    worker = _subprocess(_cli_args(tiny_bundle_path, killed, "--batch-size", "1"))
    deadline = time.monotonic() + 300
    while len(list(killed.glob("0*.png"))) < 2 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert 2 <= len(list(killed.glob("0*.png"))) < 5
    with _one_thread():
        assert main(_cli_args(tiny_bundle_path, killed, "--batch-size", "1")) == 0
        assert main(_cli_args(tiny_bundle_path, reference, "--batch-size", "1")) == 0
    assert _pngs(killed) == _pngs(reference) and len(_pngs(killed)) == 5
    assert not list(killed.glob(".*.part.png"))

"""`histosynth cache` shared by several processes (as torchrun starts them, on the CPU with gloo), a
stopped run continued, and the encoding options."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

import histosynth.train.cache as cache_module
from histosynth.cli import main

PART = 4  # patches per part in these tests: the 16 blob patches make 4 parts, 2 for each of 2 processes


@pytest.fixture()
def small_parts(monkeypatch):
    monkeypatch.setattr(cache_module, "PART_SIZE", PART)


@pytest.fixture(scope="module")
def reference(blob_dataset, tmp_path_factory):
    """The cache one process writes (its PNGs read by a data-loader worker)."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "PART_SIZE", PART)
        assert main(cache_args(blob_dataset.root, folder, "--workers", "1")) == 0
    return folder


def cache_args(dataset: Path, folder: Path, *extra: str) -> list[str]:
    return ["cache", str(dataset), "--cache-dir", str(folder), "--label-maps", "--batch-size", "3", *extra]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_as_torchrun(args: list[str], logs: Path, world_size: int = 2) -> list[int]:
    """`histosynth ARGS` in ``world_size`` forked processes with the environment torchrun gives them;
    their exit codes (each one's stdout and stderr in ``logs``/rank-R.out and .err)."""
    port = free_port()

    def rank_main(rank: int) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(logs / f"rank-{rank}.out", "w") as out, open(logs / f"rank-{rank}.err", "w") as err:
            sys.stdout, sys.stderr = out, err
            try:
                code = main(args)
            except BaseException as exc:  # noqa: B036 (a test's child process: report anything, then exit)
                print(f"{type(exc).__name__}: {exc}", file=err)
                code = 1
            out.flush()
            err.flush()
        os._exit(code)

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


def cache_files(folder: Path) -> dict[str, bytes]:
    """The files of a cache's latents and label maps (parts and indexes), by path, with their bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parent.parent.name in ("latents", "labels")}


def caption_store(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """The caption store's header (without its random creation id) and the bytes of its data files."""
    (store,) = [p for p in (folder / "text").iterdir() if p.is_dir()]
    header = json.loads((store / "store.json").read_text())
    del header["created"]
    return header, {p.name: p.read_bytes() for p in sorted(store.glob("*.bin"))}


def test_two_processes_write_the_cache_of_one_byte_for_byte(blob_dataset, reference, small_parts, tmp_path):

    assert run_as_torchrun(cache_args(blob_dataset.root, tmp_path / "two"), tmp_path) == [0, 0]
    one, two = cache_files(reference), cache_files(tmp_path / "two")
    assert sum(name.endswith(".npy") for name in one) == 2 * 16 // PART  # latents and label maps, 4 parts each
    assert two.keys() == one.keys()
    assert [name for name in one if two[name] != one[name]] == []
    assert caption_store(tmp_path / "two") == caption_store(reference)
    report = (tmp_path / "rank-0.out").read_text().strip()
    assert report.startswith("cached 16 patches x 4 flips") and "by 2 processes" in report
    assert (tmp_path / "rank-1.out").read_text() == "" and (tmp_path / "rank-1.err").read_text() == ""


def test_a_process_that_fails_stops_the_others_and_the_next_run_encodes_what_is_missing(
        reference, dataset_copy, small_parts, tmp_path):
    # a PNG of part 1 (rank 1's share) is gone: rank 1 stops there, rank 0 must not wait for it forever
    patch = cache_module.open_dataset(dataset_copy).manifest.iloc[PART + 1]
    image = Path(dataset_copy) / patch["image"]
    shutil.move(image, tmp_path / "image.png")
    folder = tmp_path / "cache"
    assert run_as_torchrun(cache_args(dataset_copy, folder), tmp_path) == [2, 2]
    assert "is missing from the dataset" in (tmp_path / "rank-1.err").read_text()
    assert "process 0 of 2 stopped waiting for the latents parts of the other processes: another process of the " \
           "job stopped" in (tmp_path / "rank-0.err").read_text()
    latents = next((folder / "latents").iterdir())
    assert sorted(p.name for p in latents.glob("part-*")) == ["part-00000.npy", "part-00002.npy"]  # rank 0's
    written = {p.name: p.stat().st_mtime_ns for p in latents.glob("part-*")}
    (latents / ".part-00001.npy.k3j9x_2a.part.npy").write_bytes(b"half a part")  # what a kill leaves

    shutil.move(tmp_path / "image.png", image)
    assert main(cache_args(dataset_copy, folder)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in latents.glob("part-0000[02].npy")} == written  # not encoded again
    assert not list(latents.glob(".part-*"))
    assert cache_files(folder) == cache_files(reference)


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--workers", "-1", "--workers must be at least 0, got -1"),
    ("--devices", "0", "--devices must be at least 1, got 0"),
])
def test_encoding_options_out_of_range_are_refused(blob_dataset, refused, tmp_path, option, value, message):
    assert refused(["cache", str(blob_dataset.root), "--cache-dir", str(tmp_path / "c"), option, value]) == \
        f"error: {message}"
    assert not (tmp_path / "c").exists()


def test_a_ddp_run_on_an_incomplete_cache_is_refused_with_the_command_that_completes_it(blob_dataset, minilm, refused,
                                                                                         tmp_path):
    import shlex

    from histosynth.train.cache import missing_from_cache

    from .conftest import seeded_autoencoder

    cache = tmp_path / "cache"
    error = refused(["train", str(blob_dataset.root), "--out", str(tmp_path / "model"), "--preset", "tiny",
                     "--condition", "text+mask", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                     "--cache-dir", str(cache), "--steps", "1"])
    command = (f"histosynth cache {blob_dataset.root} --preset tiny --seed 0 --text-encoder minilm "
               f"--cache-dir {cache} --label-maps")
    assert error == ("error: the training cache lacks its latents, label maps and caption embeddings, which each "
                     f"of the 2 processes of this run would encode in full; encode them once first with '{command}' "
                     "(prefix 'torchrun --nproc-per-node N -m' for N GPUs), then start the run again")
    assert not (cache / "latents").exists() and not (tmp_path / "model.run").exists()  # nothing written
    assert main(shlex.split(command)[1:]) == 0
    assert missing_from_cache(blob_dataset, seeded_autoencoder(), minilm, cache,
                              label_classes=blob_dataset.schema.ids) == []


def test_each_process_takes_every_nth_part_and_checks_torchrun_s_environment(blob_dataset, refused, monkeypatch,
                                                                               tmp_path):
    from histosynth.errors import ConfigError
    from histosynth.train.ranks import Ranks, ranks_from_environment

    assert [Ranks(rank, 3).share(list(range(8))) for rank in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert ranks_from_environment() == Ranks(0, 1, 0)  # no torchrun: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK 2 is not one of the WORLD_SIZE 2 processes; start them with torchrun"):
        ranks_from_environment()
    monkeypatch.setenv("RANK", "1")
    assert ranks_from_environment() == Ranks(1, 2, 1)
    assert refused(["cache", str(blob_dataset.root), "--cache-dir", str(tmp_path), "--devices", "2"]) == (
        "error: --devices 2 starts processes of its own; under torchrun leave it out (torchrun's --nproc-per-node "
        "says how many)")

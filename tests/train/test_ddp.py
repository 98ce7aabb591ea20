"""Training on several processes: the world size and the learning rate a run records, and (slow) real
2-process DDP runs on CPU (gloo), started by Lightning and by torchrun, that must train on disjoint
halves of each global batch, keep their processes' weights equal and resume bit-exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import histosynth
from histosynth.cli import main
from histosynth.models.bundle import load_bundle
from histosynth.train.data import global_batch_items
from histosynth.train.runtime import fingerprint

#: these runs use the preset's untrained autoencoder on purpose (speed); its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")

#: 4 patches per process; the tiny preset's batch is 8
RUN = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1",
       "--checkpoint-every", "2", "--accelerator", "cpu"]
TWO_PROCESSES = ["--devices", "2", "--strategy", "ddp"]


def train_args(dataset, out, cache, steps: int, *extra: str) -> list[str]:
    return ["train", str(dataset), "--out", str(out), "--cache-dir", str(cache), "--steps", str(steps), *RUN, *extra]


def load_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


# --- one process: what a run records ---------------------------------------------------------------
def test_scale_lr_trains_with_the_rate_of_the_global_batch_and_a_run_records_its_world(blob_dataset, tmp_path, capsys,
                                                                                       refused):
    out, cache = tmp_path / "model", tmp_path / "cache"
    assert main(train_args(blob_dataset.root, out, cache, 1, "--scale-lr")) == 0
    # 1e-3 is the rate of the preset's batch (8); one process of 4 patches trains with half of it
    assert "learning rate 0.0005 (--scale-lr: 0.001 x global batch 4 / 8)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "model.run" / "run.json").read_text())
    assert {k: recorded[k] for k in ("lr", "scale_lr", "effective_lr", "world_size", "devices_per_node",
                                     "num_nodes", "global_batch_size")} == {
        "lr": 1e-3, "scale_lr": True, "effective_lr": 5e-4, "world_size": 1, "devices_per_node": 1, "num_nodes": 1,
        "global_batch_size": 4}
    provenance = load_bundle(out).config.provenance
    assert (provenance["lr"], provenance["base_lr"], provenance["scale_lr"]) == (5e-4, 1e-3, True)
    assert (provenance["world_size"], provenance["global_batch_size"]) == (1, 4)
    checkpoint = load_checkpoint(tmp_path / "model.run")
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 5e-4
    check_replicas(checkpoint, processes=1)

    resumed = train_args(blob_dataset.root, out, cache, 2, "--resume")
    assert refused(resumed) == (  # --scale-lr left out: the run recorded it
        f"error: --resume with other settings than the run in {tmp_path / 'model.run'}: scale_lr differ; "
        "resume with the same options or start a new run")
    # a run.json as a 2-process run leaves it (the slow tests below refuse a real one)
    recorded = json.loads((tmp_path / "model.run" / "run.json").read_text())
    recorded.update(world_size=2, devices_per_node=2, global_batch_size=8)
    (tmp_path / "model.run" / "run.json").write_text(json.dumps(recorded))
    assert refused([*resumed, "--scale-lr"]) == (
        f"error: --resume with 1 process(es), but the run in {tmp_path / 'model.run'} trained with 2 (2 device(s) x "
        "1 node(s), global batch 8); resume with --devices 2 --num-nodes 1 (or torchrun with 2 processes in all), "
        "or start a new run")


def check_replicas(checkpoint: dict, processes: int) -> None:
    """Every process held the weights and EMA that the checkpoint saved."""
    replicas = checkpoint["replicas"]
    unet = [v for k, v in checkpoint["state_dict"].items() if k.startswith("unet.")]
    assert replicas["unet"] == [fingerprint(unet).tolist()] * processes
    assert replicas["ema"] == [fingerprint(checkpoint["ema"]["shadow_params"]).tolist()] * processes


# --- two processes (gloo on CPU) --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args: list[str], launcher: str) -> subprocess.CompletedProcess:
    """Run ``histosynth ARGS`` as a 2-process DDP run: started by Lightning (which re-runs the command once
    more) or by torchrun. Each run gets a free port, so parallel test runs do not meet."""
    port = str(free_port())
    source = str(Path(histosynth.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "histosynth", *args, *TWO_PROCESSES]
    if launcher == "torchrun":
        command[1:2] = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                        "--master-port", port, "-m"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def succeeded(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 or pytest.fail(result.stderr[-3000:])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, blob_dataset):
    """Four steps started by Lightning; two steps started by torchrun, then resumed to four by torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    dataset, cache = blob_dataset.root, root / "cache"
    assert main(["cache", str(dataset), "--preset", "tiny", "--cache-dir", str(cache), "--dtype", "float32"]) == 0
    assert succeeded(two_processes(train_args(dataset, root / "four", cache, 4), "lightning"))
    assert succeeded(two_processes(train_args(dataset, root / "two", cache, 2), "torchrun"))
    shutil.copytree(root / "two.run", root / "two-only.run")
    assert succeeded(two_processes(train_args(dataset, root / "two", cache, 4, "--resume"), "torchrun"))
    return dataset, cache, root


@pytest.mark.slow
def test_two_processes_keep_equal_weights_and_record_their_world(ddp_runs):
    _, _, root = ddp_runs
    recorded = json.loads((root / "four.run" / "run.json").read_text())
    assert {k: recorded[k] for k in ("world_size", "devices_per_node", "num_nodes", "global_batch_size",
                                     "effective_lr")} == {
        "world_size": 2, "devices_per_node": 2, "num_nodes": 1, "global_batch_size": 8, "effective_lr": 1e-3}
    checkpoint = load_checkpoint(root / "four.run")
    assert checkpoint["global_step"] == 4
    check_replicas(checkpoint, processes=2)
    bundle = load_bundle(root / "four")
    assert (bundle.config.provenance["world_size"], bundle.config.provenance["global_batch_size"]) == (2, 8)
    for saved, ema in zip(bundle.unet.parameters(), checkpoint["ema"]["shadow_params"], strict=True):
        assert torch.equal(saved, ema)


@pytest.mark.slow
def test_four_steps_equal_two_steps_resumed_to_four(ddp_runs):
    _, _, root = ddp_runs
    straight, resumed = load_checkpoint(root / "four.run"), load_checkpoint(root / "two.run")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for a, b in zip(resumed["ema"]["shadow_params"], straight["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert resumed["ema"]["optimization_step"] == 4
    for index, state in straight["optimizer_states"][0]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optimizer_states"][0]["state"][index][key], state[key]), (index, key)
    assert resumed["replicas"] == straight["replicas"]


@pytest.mark.slow
def test_a_resume_with_another_number_of_processes_is_refused(ddp_runs, tmp_path, refused):
    dataset, cache, root = ddp_runs
    run = shutil.copytree(root / "two-only.run", tmp_path / "model.run")
    args = train_args(dataset, tmp_path / "model", cache, 4, "--resume", "--devices", "1")
    assert refused(args) == (
        f"error: --resume with 1 process(es), but the run in {run} trained with 2 (2 device(s) x 1 node(s), global "
        "batch 8); resume with --devices 2 --num-nodes 1 (or torchrun with 2 processes in all), or start a new run")
    assert load_checkpoint(run)["global_step"] == 2


@pytest.mark.slow
def test_the_processes_train_on_the_two_halves_of_a_batch_and_stop_together(ddp_runs, tmp_path):
    """A patch made NaN stops both processes at the step that first draws it: the one that holds it names
    its batch, the other names its own, and the two are the two halves of that step's global batch."""
    dataset, cache, _ = ddp_runs
    poisoned_cache = shutil.copytree(cache, tmp_path / "cache")
    step_items = global_batch_items(16, 8, seed=0, step=1)  # step 0 draws the other 8 patches
    poisoned = int(step_items[5])  # the second process's half: items 4-7
    part = next((poisoned_cache / "latents").glob("*/part-00000.npy"))
    latents = np.load(part)
    latents[poisoned] = float("nan")
    np.save(part, latents)

    args = train_args(dataset, tmp_path / "model", poisoned_cache, 4, "--checkpoint-every", "1")
    result = two_processes(args, "torchrun")
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, result.stderr[-3000:]
    pattern = r"error: (another process's loss became non-finite|the loss became nan) at step 1 \((this process's )?" \
              r"batch: (?P<batch>[^;]*); found by the check of step 1\); training stopped and the last good " \
              r"checkpoint is .*last.ckpt"
    matches = [re.match(pattern, line) for line in errors]
    assert all(matches), errors
    other, mine = (m.group("batch").split(", ") for m in matches)
    assert errors[1].startswith("error: the loss became nan") and f"s0_{poisoned:06d}" in mine
    assert mine == [f"s0_{i:06d}" for i in step_items[4:]] and other == [f"s0_{i:06d}" for i in step_items[:4]]
    kept = load_checkpoint(tmp_path / "model.run")
    assert kept["global_step"] == 1 and not (tmp_path / "model").exists()
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


@pytest.mark.slow
def test_an_autoencoder_trained_on_two_processes_reports_all_its_held_out_patches(blob_dataset, tmp_path):
    """Each process checks the held-out patches; the report averages the processes' results (rather than
    giving the first process's alone). The discriminator, on from step 1, stays equal in both processes."""
    from histosynth.data.dataset import open_dataset
    from histosynth.models.autoencoder import decode_latents, encode_latents, psnr
    from histosynth.models.bundle import load_autoencoder_folder
    from histosynth.train.autoencoder import split_for_autoencoder

    out = tmp_path / "ae"
    args = ["train-autoencoder", str(blob_dataset.root), "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--checkpoint-every", "2", "--accelerator", "cpu", "--disc-start", "1"]
    assert succeeded(two_processes(args, "torchrun"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["held_out_patches"]) == (2, 4, 2)
    _, held_out = split_for_autoencoder(open_dataset(blob_dataset.root))
    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    autoencoder = load_autoencoder_folder(out).eval()
    with torch.no_grad():
        reconstruction = decode_latents(autoencoder, encode_latents(autoencoder, images))
    assert abs(float(psnr(images, reconstruction)) - metrics["psnr_db"]) < 1e-2
    replicas = load_checkpoint(tmp_path / "ae.run")["replicas"]
    for network in ("autoencoder", "discriminator"):
        first, second = replicas[network]
        assert first == second, network


@pytest.mark.slow
def test_a_dit_flow_model_trains_on_two_processes_with_equal_weights(blob_dataset, tmp_path):
    from histosynth.models.denoiser import DiTDenoiser

    cache = tmp_path / "cache"
    assert main(["cache", str(blob_dataset.root), "--preset", "tiny", "--cache-dir", str(cache)]) == 0
    dit = ["--denoiser", "dit", "--prediction-type", "flow_prediction"]
    assert succeeded(two_processes(train_args(blob_dataset.root, tmp_path / "dit", cache, 2, *dit), "torchrun"))
    checkpoint = load_checkpoint(tmp_path / "dit.run")
    assert checkpoint["global_step"] == 2
    check_replicas(checkpoint, processes=2)
    assert isinstance(load_bundle(tmp_path / "dit").unet, DiTDenoiser)

"""`histosynth train`: the loss falls, a kill -9 resumes exactly, NaN and full disks stop cleanly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.models.bundle import load_bundle
from histosynth.models.latent_range import DEFAULT_QUANTILE
from histosynth.train.data import global_batch_items
from histosynth.train.runtime import AtomicCheckpointIO, TrainingStopped

#: these runs use the preset's untrained autoencoder on purpose (speed); its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")

STEPS = 10
#: fast-learning settings for a 10-step run (the preset defaults warm up over 100 steps)
FAST = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1"]


def train_args(dataset, out, *extra: str) -> list[str]:
    return ["train", str(dataset), "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", "2", *FAST, *extra]


def load_checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def logged_losses(run_dir, version: int = 0) -> pd.DataFrame:
    log = pd.read_csv(run_dir / "logs" / f"version_{version}" / "metrics.csv")
    return log.dropna(subset=["loss"]).set_index("step")["loss"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, blob_dataset):
    """One uninterrupted 10-step run; the reference for the resume test."""
    root = tmp_path_factory.mktemp("straight")
    dataset = blob_dataset.root
    assert main(train_args(dataset, root / "model", "--cache-dir", str(root / "cache"), "--sample-every", "5")) == 0
    return dataset, root


def test_training_lowers_the_loss_and_writes_a_bundle(straight_run):
    _, root = straight_run
    losses = logged_losses(root / "model.run")
    assert list(losses.index) == list(range(STEPS))
    first, last = losses.iloc[:3].mean(), losses.iloc[-3:].mean()
    assert first > 0.9 and last < 0.7 * first, losses.round(3).tolist()
    bundle = load_bundle(root / "model")
    provenance = bundle.config.provenance
    assert (provenance["steps"], provenance["batch_size"], provenance["lr"]) == (STEPS, 4, 1e-3)
    assert provenance["command"].startswith("histosynth ") and bundle.config.unet_weights == "ema"
    assert bundle.image_size == 32 and bundle.config.conditioning.text_dropout == 0.1
    checkpoint = load_checkpoint(root / "model.run")
    assert checkpoint["global_step"] == STEPS and checkpoint["ema"]["optimization_step"] == STEPS
    names = [n for n, _ in bundle.unet.named_parameters()]
    ema_weights = dict(zip(names, checkpoint["ema"]["shadow_params"], strict=True))
    for name, value in bundle.unet.named_parameters():
        assert torch.equal(value, ema_weights[name].cpu())


def test_sample_grids_show_the_most_frequent_captions(straight_run, blob_dataset):
    _, root = straight_run
    samples = root / "model.run" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step-0000005.png", "step-0000010.png"]
    captions = (samples / "captions.txt").read_text().strip().split("\n\n")
    all_captions = blob_dataset.manifest["caption"].tolist()
    ranked = sorted(set(all_captions), key=lambda c: (-all_captions.count(c), all_captions.index(c)))
    assert captions == ranked[:4]  # most frequent first, ties in dataset order
    assert np.asarray(Image.open(samples / "step-0000010.png")).shape == (32, 4 * 32, 3)


def test_a_run_killed_with_sigkill_resumes_exactly(straight_run, tmp_path, capsys):
    dataset, root = straight_run
    out = tmp_path / "model"
    args = train_args(dataset, out, "--cache-dir", str(root / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", "from histosynth.cli import run; run()", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "model.run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    killed_at = load_checkpoint(tmp_path / "model.run")["global_step"]
    assert 2 <= killed_at < STEPS and not out.exists()

    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert logged_losses(tmp_path / "model.run", version=1).index[0] == killed_at  # continued at that step
    bar = capsys.readouterr().out.split("\r")  # the bar knows the resumed run's total and where it resumed
    assert any(f"| {killed_at}/{STEPS} [" in line for line in bar) and f"| {STEPS}/{STEPS} [" in bar[-1]
    resumed, straight = load_checkpoint(tmp_path / "model.run"), load_checkpoint(root / "model.run")
    assert resumed["global_step"] == straight["global_step"] == STEPS
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for a, b in zip(resumed["ema"]["shadow_params"], straight["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    straight_adam, resumed_adam = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for index, state in straight_adam.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed_adam[index][key], state[key]), (index, key)
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]


@pytest.mark.parametrize("checkpoint_every, log_every, checked, kept_step", [
    ("1", "1", "step 3", 3),  # checked every step
    ("2", "10", "steps 2-3", 2),  # checked before the checkpoint of step 4, which is not written
])
def test_a_nan_loss_stops_at_its_step_and_names_the_batch(dataset_copy, tmp_path, capsys, checkpoint_every,
                                                          log_every, checked, kept_step):
    cache = tmp_path / "cache"
    assert main(["cache", str(dataset_copy), "--preset", "tiny", "--cache-dir", str(cache), "--dtype", "float32"]) == 0
    poisoned = global_batch_items(16, 4, seed=0, step=3)[1]  # a patch first drawn at step 3
    part = next((cache / "latents").glob("*/part-00000.npy"))
    latents = np.load(part)
    latents[poisoned] = float("nan")
    np.save(part, latents)
    capsys.readouterr()

    code = main(train_args(dataset_copy, tmp_path / "model", "--cache-dir", str(cache), "--checkpoint-every",
                           checkpoint_every, "--log-every", log_every))
    error = capsys.readouterr().err
    assert code == 2
    assert "the loss became nan at step 3 (batch: " in error and f"s0_{poisoned:06d}" in error
    assert f"; found by the check of {checked}); training stopped and the last good checkpoint is" in error
    assert not (tmp_path / "model").exists()
    kept = load_checkpoint(tmp_path / "model.run")
    assert kept["global_step"] == kept_step
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path):
    """A write that fails part-way (here: the file-size limit, as a full disk would) changes nothing."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.arange(10.0)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(TrainingStopped, match="could not write checkpoint .*last.ckpt .*the previous checkpoint "
                                                  "there is kept"):
            io.save_checkpoint({"global_step": 6, "w": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 4 and torch.equal(kept["w"], torch.arange(10.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_bundle_keeps_the_range_of_its_training_latents(straight_run, dataset_copy, tmp_path, capsys):
    import shutil

    from histosynth.train.cache import latent_range, prepare_training_data

    dataset, root = straight_run
    trained = load_bundle(root / "model")
    cached = prepare_training_data(dataset, trained.autoencoder, trained.text_encoder, root / "cache",
                                   show_progress=False)
    expected = latent_range(cached.latents)
    assert trained.latent_range == expected and expected.quantile == DEFAULT_QUANTILE
    # `histosynth latent-range` measures a model the same way (here on a copy of the data, encoded anew)
    model = shutil.copytree(root / "model", tmp_path / "model")
    assert main(["latent-range", str(model), "--remove"]) == 0
    unranged = load_bundle(model)
    assert unranged.latent_range is None and unranged.id != trained.id
    assert main(["latent-range", str(model), "--dataset", str(dataset_copy), "--quantile", "0.01"]) == 0
    measured = load_bundle(model).latent_range
    assert measured.low == pytest.approx(expected.low, abs=1e-5)
    assert measured.high == pytest.approx(expected.high, abs=1e-5)
    assert "latent range per channel" in capsys.readouterr().out
    assert main(["latent-range", str(model)]) == 2
    assert "give either --dataset (measure and store the range) or --remove" in capsys.readouterr().err


# --- bad input: one-line errors, nothing overwritten -------------------------------------------------
def test_an_existing_run_needs_resume_and_the_same_settings(straight_run, capsys):
    dataset, root = straight_run
    assert main(train_args(dataset, root / "model", "--cache-dir", str(root / "cache"))) == 2
    assert "holds a training run; pass --resume to continue it" in capsys.readouterr().err
    changed = train_args(dataset, root / "model", "--cache-dir", str(root / "cache"), "--resume")
    changed[changed.index("--lr") + 1] = "5e-4"
    assert main(changed) == 2
    assert "--resume with other settings than the run in" in capsys.readouterr().err


def test_resume_without_a_run_is_refused(blob_dataset, tmp_path, capsys):
    assert main(train_args(blob_dataset.root, tmp_path / "model", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_fp16_is_refused_with_the_reason(blob_dataset, tmp_path, capsys):
    assert main(train_args(blob_dataset.root, tmp_path / "model", "--precision", "16-mixed")) == 2
    reason = "fp16 is refused: fp16 autocast silently froze weights whose gradients underflowed"
    assert reason in capsys.readouterr().err


def test_init_from_a_bundle_of_another_shape_is_refused(straight_run, tmp_path, capsys):
    dataset, root = straight_run
    wider = tmp_path / "wider.yaml"
    from histosynth.presets import load_preset

    data = load_preset("tiny").to_dict()
    data["unet"]["block_out_channels"] = [32, 64, 96, 128]
    import yaml

    wider.write_text(yaml.safe_dump(data))
    args = train_args(dataset, tmp_path / "model", "--cache-dir", str(root / "cache"), "--init", str(root / "model"))
    args[args.index("--preset") + 1] = str(wider)
    assert main(args) == 2
    assert "its denoiser does not fit the preset (" in capsys.readouterr().err


def test_training_errors_are_histosynth_errors():
    assert issubclass(TrainingStopped, HistosynthError)


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--lr", "0", "--lr must be above 0, got 0.0"),
    ("--mask-dropout", "nan", "--mask-dropout must be a finite number, got nan"),
    ("--mask-dropout", "1.5", "--mask-dropout must be at most 1, got 1.5"),
    ("--seed", "-1", "--seed must be at least 0, got -1"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0, got -1"),
    ("--workers", "-1", "--workers must be at least 0, got -1"),
    ("--sample-every", "-5", "--sample-every must be at least 0, got -5"),
    ("--num-nodes", "0", "--num-nodes must be at least 1, got 0"),
])
def test_impossible_numbers_are_refused_before_anything_is_written(blob_dataset, tmp_path, capsys, option, value,
                                                                   message):
    args = train_args(blob_dataset.root, tmp_path / "model", "--cache-dir", str(tmp_path / "cache"))
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_out_folder_that_is_not_a_model_is_refused_before_training(dataset_copy, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    started = time.perf_counter()
    assert main(train_args(dataset_copy, out)) == 2
    assert capsys.readouterr().err == (f"error: --out {out} exists and is not a model folder (no histosynth.json); "
                                       "choose a new or empty folder, or an older model folder to replace\n")
    assert time.perf_counter() - started < 5
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "results.run").exists() and not (dataset_copy / "cache").exists()
    (tmp_path / "file").write_text("x")
    assert main(train_args(dataset_copy, tmp_path / "file")) == 2
    assert "--out " + str(tmp_path / "file") + " is a file, not a model folder" in capsys.readouterr().err


def test_an_empty_out_folder_receives_the_model(blob_dataset, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    args = train_args(blob_dataset.root, out, "--cache-dir", str(tmp_path / "cache"))
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    assert load_bundle(out).image_size == 32


def test_cache_refuses_a_negative_seed_before_encoding(blob_dataset, tmp_path, capsys):
    assert main(["cache", str(blob_dataset.root), "--cache-dir", str(tmp_path / "cache"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "error: --seed must be at least 0, got -1\n"
    assert not (tmp_path / "cache").exists()


def test_a_resume_on_a_cache_of_another_dtype_is_refused(straight_run, tmp_path, capsys):
    dataset, root = straight_run
    run = tmp_path / "model.run"
    shutil.copytree(root / "model.run", run)
    assert json.loads((run / "run.json").read_text())["latent_dtype"] == "bfloat16"  # the default cache
    assert main(["cache", str(dataset), "--preset", "tiny", "--cache-dir", str(tmp_path / "cache"),
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    args = train_args(dataset, tmp_path / "model", "--cache-dir", str(tmp_path / "cache"), "--resume")
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --resume with latent_dtype float32, but the run in {run} trained with bfloat16; rebuild the "
        f"cache with 'histosynth cache {dataset} --dtype bfloat16', or start a new run\n")

"""What a killed training run leaves (checkpoint temporaries, half-saved model folders) goes at the next run."""

from __future__ import annotations

import pytest

from histosynth.errors import JobError
from histosynth.models.autoencoder import build_autoencoder, write_autoencoder_folder
from histosynth.models.bundle import load_autoencoder_folder
from histosynth.presets import Preset, load_preset
from histosynth.train.runtime import CHECKPOINT_DIR, AtomicCheckpointIO, RunFolder


def test_a_resumed_run_removes_the_temporaries_of_a_killed_checkpoint_write(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.start({"steps": 10}, resume=False)
    AtomicCheckpointIO().save_checkpoint({"step": 5}, run.last_checkpoint)
    checkpoints = tmp_path / "run" / CHECKPOINT_DIR
    leftovers = [checkpoints / ".last.ckpt.abcdefgh.part.ckpt", checkpoints / ".epoch=0.ckpt.k3j9x_2a.part.ckpt"]
    kept = [checkpoints / "mine.ckpt", checkpoints / ".notes.abcdefgh.part", tmp_path / "run" / "notes.txt"]
    for path in [*leftovers, *kept]:
        path.write_bytes(b"half")
    before = run.last_checkpoint.read_bytes()
    with pytest.raises(JobError, match="pass --resume"):
        run.start({"steps": 10}, resume=False)  # refused: nothing is touched
    assert all(path.exists() for path in leftovers)
    RunFolder(tmp_path / "run").start({"steps": 20}, resume=True)
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_bytes() == b"half" for path in kept) and run.last_checkpoint.read_bytes() == before


def test_saving_a_model_folder_removes_the_staging_folder_of_a_killed_save(tmp_path):
    data = load_preset("tiny").to_dict()
    data["autoencoder"].update(block_out_channels=[16, 16, 16], norm_num_groups=8)
    autoencoder = build_autoencoder(Preset.from_dict(data))
    leftover = tmp_path / ".ae.k3j9x_2a.part"
    (leftover / "autoencoder").mkdir(parents=True)
    (leftover / "autoencoder" / "weights.safetensors").write_bytes(b"half")
    kept = [tmp_path / ".ae2.k3j9x_2a.part", tmp_path / "ae.part", tmp_path / ".ae.notes"]
    for path in kept:
        path.write_bytes(b"mine")
    write_autoencoder_folder(tmp_path / "ae", autoencoder, {"metrics.json": {"psnr_db": 0.0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ae", *[p.name for p in kept]])
    load_autoencoder_folder(tmp_path / "ae")

"""`histosynth train-autoencoder`: held-out PSNR / SSIM that match the saved weights, latent scale."""

from __future__ import annotations

import json

import pytest
import torch

from histosynth.cli import main
from histosynth.data.dataset import open_dataset
from histosynth.data.torchdata import to_model_range
from histosynth.models.autoencoder import decode_latents, encode_latents, estimate_latent_scale, psnr, ssim
from histosynth.models.bundle import load_autoencoder_folder
from histosynth.train.autoencoder import split_for_autoencoder


def test_a_trained_autoencoder_reports_what_its_weights_reconstruct(blob_dataset, tmp_path, capsys):
    out = tmp_path / "ae"
    args = ["train-autoencoder", str(blob_dataset.root), "--preset", "tiny", "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["held_out_patches"] == 2  # a seeded tenth of 16 patches
    assert f"PSNR {metrics['psnr_db']:.2f} dB, SSIM {metrics['ssim']:.4f}" in printed

    autoencoder = load_autoencoder_folder(out).eval()
    train_items, held_out = split_for_autoencoder(open_dataset(blob_dataset.root))
    assert len(train_items) == 14 and set(held_out.indices).isdisjoint(train_items.indices)
    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    with torch.no_grad():
        reconstruction = decode_latents(autoencoder, encode_latents(autoencoder, images))
        assert abs(float(psnr(images, reconstruction)) - metrics["psnr_db"]) < 1e-2
        assert abs(float(ssim(images, reconstruction)) - metrics["ssim"]) < 1e-3
        # a KL autoencoder's latent scale makes its training latents unit-variance
        rows = blob_dataset.manifest.iterrows()
        train_images = torch.stack([to_model_range(blob_dataset.image(row)) for _, row in rows])
        scale = metrics["latent_scale"]
        assert abs(estimate_latent_scale(autoencoder, train_images) - scale) < 1e-3 * scale


def test_an_existing_output_is_never_overwritten(blob_dataset, tmp_path, capsys):
    out = tmp_path / "ae"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train-autoencoder", str(blob_dataset.root), "--out", str(out), "--steps", "1"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--lr", "-1", "--lr must be above 0, got -1.0"),
    ("--seed", "-1", "--seed must be at least 0, got -1"),
    ("--workers", "-2", "--workers must be at least 0, got -2"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
])
def test_impossible_numbers_are_refused_before_anything_is_written(blob_dataset, tmp_path, capsys, option, value,
                                                                   message):
    args = ["train-autoencoder", str(blob_dataset.root), "--out", str(tmp_path / "ae"), "--steps", "1", option, value]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_an_out_path_that_is_a_file_is_refused(blob_dataset, tmp_path, capsys):
    out = tmp_path / "ae"
    out.write_text("mine")
    assert main(["train-autoencoder", str(blob_dataset.root), "--out", str(out), "--steps", "1"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err and out.read_text() == "mine"


def test_a_decoder_fine_tune_keeps_the_latents_and_their_scale(blob_dataset, tmp_path):
    from histosynth.models.autoencoder import write_autoencoder_folder

    from .conftest import seeded_autoencoder

    start = seeded_autoencoder(3)
    start.register_to_config(scaling_factor=0.37)
    write_autoencoder_folder(tmp_path / "start", start, {})
    out = tmp_path / "tuned"
    args = ["train-autoencoder", str(blob_dataset.root), "--init", str(tmp_path / "start"), "--decoder-only",
            "--out", str(out), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "3"]
    assert main(args) == 0
    tuned = load_autoencoder_folder(out).eval()
    assert tuned.config.scaling_factor == 0.37
    assert json.loads((out / "metrics.json").read_text())["trained"] == "decoder"
    before, after = start.state_dict(), tuned.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    assert any(name.startswith("post_quant_conv.") for name in changed)
    images = torch.stack([to_model_range(blob_dataset.image(row)) for _, row in blob_dataset.manifest.iterrows()])
    with torch.no_grad():
        assert torch.equal(encode_latents(start, images), encode_latents(tuned, images))


def test_a_decoder_fine_tune_needs_an_autoencoder_to_start_from(blob_dataset, tmp_path, capsys):
    out = tmp_path / "ae"
    assert main(["train-autoencoder", str(blob_dataset.root), "--decoder-only", "--out", str(out), "--steps", "1"]) == 2
    message = "--decoder-only fine-tunes the decoder of an existing autoencoder; give it with --init"
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_fine_tune_is_not_resumed_as_a_whole_autoencoder_run(blob_dataset, tmp_path, capsys):
    from histosynth.models.autoencoder import write_autoencoder_folder

    from .conftest import seeded_autoencoder

    write_autoencoder_folder(tmp_path / "start", seeded_autoencoder(3), {})

    def train(out: str, *extra: str) -> int:
        return main(["train-autoencoder", str(blob_dataset.root), "--init", str(tmp_path / "start"), "--out",
                     str(tmp_path / out), "--run-dir", str(tmp_path / "run"), "--batch-size", "2",
                     "--checkpoint-every", "1", *extra])

    assert train("tuned", "--steps", "2", "--decoder-only") == 0
    capsys.readouterr()
    assert train("whole", "--steps", "3", "--resume") == 2  # the option left out: refused
    assert "--resume with other settings than the run in" in capsys.readouterr().err
    assert not (tmp_path / "whole").exists()
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["training_seconds"]
    assert first > 0
    assert train("tuned-more", "--steps", "3", "--resume", "--decoder-only") == 0  # with it: resumed
    metrics = json.loads((tmp_path / "tuned-more" / "metrics.json").read_text())
    # the time of both commands (the first's as its checkpoint kept it), not of the last one alone
    assert metrics["training_time_s"] > round(first, 1) and metrics["steps"] == 3

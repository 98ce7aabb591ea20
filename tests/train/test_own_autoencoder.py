"""Bringing one's own autoencoder: a CompVis first stage imported with `histosynth import-compvis`, or a plain
diffusers `save_pretrained` folder, used as it is by `cache --autoencoder` and `train-autoencoder --init`."""

from __future__ import annotations

import importlib.util
import json
import logging
import logging.handlers

import pytest
import torch
from diffusers import AutoencoderKL

from histosynth.cli import main
from histosynth.models.autoencoder import encode_latents, latent_scale, load_checked_autoencoder
from histosynth.presets import load_preset
from histosynth.terminal import MODEL_LOADING_CHATTER, plain_output
from histosynth.train.cache import autoencoder_id
from histosynth.train.ldm import resolve_autoencoder


@pytest.fixture(scope="module")
def diffusers_kl(tmp_path_factory):
    """An AutoencoderKL saved by diffusers alone: config.json and weights, no histosynth notes."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                                sample_size=32, scaling_factor=0.5).eval()
    folder = tmp_path_factory.mktemp("diffusers") / "kl-f2"
    autoencoder.save_pretrained(folder)
    return folder, autoencoder


def cache_line(dataset, autoencoder, cache_dir, capsys) -> str:
    args = ["cache", str(dataset), "--autoencoder", str(autoencoder), "--cache-dir", str(cache_dir),
            "--dtype", "float32"]
    assert main(args) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_an_imported_first_stage_caches_a_dataset(compvis_vq_first_stage, blob_dataset, tmp_path, capsys):
    ckpt, config = compvis_vq_first_stage
    folder = tmp_path / "vq-f4"
    assert main(["import-compvis", str(ckpt), "--config", str(config), "--out", str(folder)]) == 0
    capsys.readouterr()
    line = cache_line(blob_dataset.root, folder, tmp_path / "cache", capsys)
    assert line.startswith(f"cached 16 patches x 4 flips ((3, 8, 8) float32 latents, "
                           f"{autoencoder_id(load_checked_autoencoder(folder))})"), line


def test_a_plain_diffusers_folder_is_used_as_it_is(diffusers_kl, blob_dataset, tmp_path, capsys):
    folder, original = diffusers_kl
    loaded = resolve_autoencoder(load_preset("tiny"), folder)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = original.encode(image).latent_dist.mean * 0.5
        assert latent_scale(loaded) == 0.5 and torch.equal(encode_latents(loaded, image), expected)
    line = cache_line(blob_dataset.root, folder, tmp_path / "cache", capsys)
    assert line.startswith(f"cached 16 patches x 4 flips ((4, 16, 16) float32 latents, {autoencoder_id(loaded)})")

    out = tmp_path / "tuned"
    assert main(["train-autoencoder", str(blob_dataset.root), "--init", str(folder), "--out", str(out),
                 "--steps", "1", "--batch-size", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["init"] == str(folder)
    assert load_checked_autoencoder(out).config.block_out_channels == [32, 32]


def test_folders_that_cannot_serve_are_refused_in_one_line(diffusers_kl, blob_dataset, tmp_path, refused):
    folder, original = diffusers_kl
    shifted = tmp_path / "shifted"
    AutoencoderKL.from_config(original.config, shift_factor=0.1).save_pretrained(shifted)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    command = ["cache", str(blob_dataset.root), "--cache-dir", str(tmp_path / "cache"), "--autoencoder"]
    assert refused([*command, str(shifted)]) == (
        f"error: {shifted}: the autoencoder's config sets shift_factor 0.1; histosynth scales latents by "
        "scaling_factor alone, so it would make other latents than the ones its owners used")
    assert refused([*command, str(no_weights)]).startswith(
        f"error: {no_weights}: the autoencoder cannot be loaded: ")
    assert not (tmp_path / "cache").exists()


def test_model_loading_under_plain_output_gives_no_advice_to_install_accelerate(diffusers_kl):
    """`cache`, `train`, `train-autoencoder` and `import-compvis` run under plain_output."""
    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("diffusers gives the advice only where accelerate is missing")
    folder, _ = diffusers_kl
    logger = logging.getLogger(MODEL_LOADING_CHATTER)
    records = logging.handlers.BufferingHandler(capacity=100)
    logger.addHandler(records)
    try:
        AutoencoderKL.from_pretrained(folder)
        assert any("pip install accelerate" in r.getMessage() for r in records.buffer)
        records.flush()
        with plain_output():
            AutoencoderKL.from_pretrained(folder)
        assert records.buffer == []
    finally:
        logger.removeHandler(records)

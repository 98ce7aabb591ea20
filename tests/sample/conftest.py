"""A tiny text-conditioned model folder with random weights, shared by the generation tests.

The tiny preset cut down to 64 px patches (16 x 16 latents): a two-level UNet and a three-level
KL-f4 autoencoder with middle attention, 16-32 channels in groups of 8, with the default MiniLM
text encoder.
Real diffusers / transformers models, small enough that a few denoising steps take a fraction of a
second on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histosynth.models.autoencoder import build_autoencoder
from histosynth.models.bundle import load_bundle, save_bundle
from histosynth.models.denoiser import build_denoiser
from histosynth.models.diffusion import noise_scheduler
from histosynth.models.text import load_text_encoder
from histosynth.presets import Preset, load_preset
from histosynth.schema import RENAL

PATCH = 64


def micro_preset() -> Preset:
    data = load_preset("tiny").to_dict()
    data["image_size"] = PATCH
    data["unet"].update(block_out_channels=[16, 32], cross_attention=[False, True], norm_num_groups=8)
    data["autoencoder"].update(block_out_channels=[16, 16, 16], mid_block_attention=True, norm_num_groups=8)
    return Preset.from_dict(data)


def make_tiny_bundle(path: Path, seed: int = 0) -> Path:
    preset = micro_preset()
    text = load_text_encoder("minilm")
    torch.manual_seed(seed)
    unet = build_denoiser(preset, context_dim=text.hidden_size)
    autoencoder = build_autoencoder(preset)
    return save_bundle(path, unet, autoencoder, dict(noise_scheduler(preset).config), text, RENAL,
                       {"image_size": PATCH, "preset": preset.to_dict()})


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_path):
    return load_bundle(tiny_bundle_path, "cpu")

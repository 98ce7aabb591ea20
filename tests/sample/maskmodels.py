"""Tiny mask-conditioned model folders for the tests (random weights, the 64 px micro preset of tests/conftest).

Loaded by path where needed (tests/evaluate), like tests/segment/toydata.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from histosynth.models.autoencoder import build_autoencoder
from histosynth.models.bundle import save_bundle
from histosynth.models.conditioning import Conditioning
from histosynth.models.denoiser import build_denoiser
from histosynth.models.diffusion import noise_scheduler
from histosynth.models.text import load_text_encoder
from histosynth.schema import RENAL


def _root_conftest():
    spec = importlib.util.spec_from_file_location("histosynth_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _root_conftest()
#: the 64 px micro preset of the text model folder ``tiny_bundle`` (tests/conftest.py)
micro_preset = _conftest.micro_preset


def make_mask_bundle(path: Path, condition: str = "text+mask", seed: int = 0, mask_dropout: float = 0.2) -> Path:
    """A micro-preset model folder reading label maps of the RENAL classes (and text, unless 'mask')."""
    preset = micro_preset()
    text = load_text_encoder("minilm")
    conditioning = Conditioning.parse(condition, 0.1, mask_dropout)
    torch.manual_seed(seed)
    unet = build_denoiser(preset, context_dim=text.hidden_size, extra_in_channels=len(RENAL.ids))
    autoencoder = build_autoencoder(preset)
    meta = {"image_size": _conftest.PATCH, "preset": preset.to_dict(),
            "conditioning": conditioning.to_config(RENAL.ids)}
    return save_bundle(path, unet, autoencoder, dict(noise_scheduler(preset).config), text, RENAL, meta)

"""The denoiser built from a preset computes what the CompVis UNet computes."""

from __future__ import annotations

import json

import pytest
import torch

from histosynth.models.denoiser import build_denoiser, count_parameters, denoiser_config
from histosynth.presets import Preset, load_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fixture_shaped_preset() -> Preset:
    """A preset with the sizes of the CompVis fixture's UNet (channel_mult [1, 2, 1], attention at ds 4)."""
    return Preset.from_dict({
        "image_size": 64,
        "autoencoder": {"kind": "vq", "block_out_channels": [32, 32, 32], "layers_per_block": 1,
                        "num_vq_embeddings": 64},
        "unet": {"block_out_channels": [32, 64, 32], "layers_per_block": 1, "cross_attention": [False, False, True]},
    })


@pytest.mark.parametrize("name, millions", [("tiny", 4.4), ("small", 23.6)])
def test_cpu_presets_have_the_measured_sizes(name, millions):
    unet = build_denoiser(load_preset(name), context_dim=384)
    assert round(count_parameters(unet) / 1e6, 1) == millions
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (3, 3, 64)


def test_built_denoiser_matches_the_verified_compvis_settings_and_outputs(compvis_dir, compvis_expected):
    verified = json.loads((compvis_dir / "fixture.json").read_text())["diffusers_verification"]["unet_config"]
    ours = denoiser_config(fixture_shaped_preset(), context_dim=64)
    assert {k: ours[k] for k in ours if k in verified} == {k: verified[k] for k in ours if k in verified}
    assert {k for k in verified if k not in ours} <= {
        "center_input_sample", "only_cross_attention", "downsample_padding", "mid_block_scale_factor",
        "time_embedding_type", "class_embed_type", "addition_embed_type",
    }  # left at diffusers' defaults, which are the verified values
    from histosynth.models.compvis import import_compvis

    imported, _, _ = import_compvis(compvis_dir / "tiny_ldm.safetensors", compvis_dir / "tiny_ldm.yaml")
    unet = build_denoiser(fixture_shaped_preset(), context_dim=64)
    unet.load_state_dict(imported.state_dict(), strict=True)
    ref = compvis_expected
    with torch.no_grad():
        eps = unet(ref["unet_x"], ref["unet_t"], encoder_hidden_states=ref["unet_ctx"]).sample
    assert (eps - ref["unet_eps"]).abs().max().item() < 1e-4


def test_extra_input_channels_widen_only_the_input():
    unet = build_denoiser(fixture_shaped_preset(), context_dim=16, extra_in_channels=2)
    assert (unet.config.in_channels, unet.config.out_channels) == (5, 3)
    with torch.no_grad():
        out = unet(torch.randn(1, 5, 16, 16), 10, encoder_hidden_states=torch.randn(1, 4, 16)).sample
    assert out.shape == (1, 3, 16, 16)


@torch.no_grad()
def test_tiny_denoiser_depends_on_time_and_context():
    torch.manual_seed(0)
    unet = build_denoiser(load_preset("tiny"), context_dim=8)
    for p in unet.parameters():  # zero-initialised output layers would hide both dependencies
        p.add_(0.02 * torch.randn_like(p))
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 8)
    base = unet(x, 500, encoder_hidden_states=ctx).sample
    assert (unet(x, 100, encoder_hidden_states=ctx).sample - base).abs().max() > 1e-3
    assert (unet(x, 500, encoder_hidden_states=-ctx).sample - base).abs().max() > 1e-3

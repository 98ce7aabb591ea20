"""The diffusion objective: CompVis schedule, samplers' settings, loss, caption dropout and EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histosynth.errors import ConfigError
from histosynth.models.denoiser import build_denoiser
from histosynth.models.diffusion import diffusion_loss, make_ema, noise_scheduler, sampling_scheduler
from histosynth.presets import DiffusionConfig, Preset, load_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def little_unet():
    preset = Preset.from_dict({
        "image_size": 64,
        "autoencoder": {"block_out_channels": [32, 32, 32]},
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention": [False, True]},
    })
    torch.manual_seed(0)
    return build_denoiser(preset, context_dim=8)


def compvis_betas() -> np.ndarray:
    """CompVis make_beta_schedule('linear'): linear in sqrt(beta), computed in float64."""
    return np.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=np.float64) ** 2


def test_training_schedule_is_compvis_linear():
    scheduler = noise_scheduler(load_preset("pathldm"))
    assert np.allclose(scheduler.betas.numpy(), compvis_betas(), rtol=1e-6, atol=0)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False


def test_alphas_cumprod_match_the_checkpoint_buffer(compvis_dir):
    from safetensors.torch import load_file

    stored = load_file(str(compvis_dir / "tiny_ldm.safetensors"))["alphas_cumprod"]
    assert (noise_scheduler().alphas_cumprod - stored).abs().max().item() < 3e-7


def test_ddim_settings_reproduce_compvis_spacing_and_last_step():
    scheduler = sampling_scheduler(None, "ddim")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    # set_alpha_to_one=False: the last step lands on alphas_cumprod[0], as CompVis' ddim_alphas_prev
    assert scheduler.final_alpha_cumprod.item() == scheduler.alphas_cumprod[0].item()
    assert scheduler.config.clip_sample is False


def test_dpm_solver_and_unknown_scheduler():
    dpm = sampling_scheduler(load_preset("tiny"), "dpm++")
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.beta_schedule == "scaled_linear"
    for diffusion in (None, DiffusionConfig(prediction_type="flow_prediction")):
        with pytest.raises(ConfigError, match="unknown scheduler 'euler'; use one of ddim, dpm\\+\\+"):
            sampling_scheduler(diffusion, "euler")


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 8, generator=g)


def test_loss_is_the_noise_prediction_mse(little_unet):
    latents, context = batch()
    t = torch.tensor([10, 900])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    loss = diffusion_loss(little_unet, latents, context, timesteps=t, noise=noise)
    abar = noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        expected = F.mse_loss(little_unet(noisy, t, encoder_hidden_states=context).sample, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_reproducible_from_a_seed(little_unet):
    latents, context = batch()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    losses = [diffusion_loss(little_unet, latents, context, mask, torch.Generator().manual_seed(s)).item()
              for s in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(little_unet):
    import copy

    unet = copy.deepcopy(little_unet).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    latents, context = batch(3)
    t = torch.tensor([300, 600])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(6):
        loss = diffusion_loss(unet, latents, context, timesteps=t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_mask_conditioning_channels_are_concatenated():
    preset = Preset.from_dict({
        "image_size": 64, "autoencoder": {"block_out_channels": [32, 32, 32]},
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention": [False, True]},
    })
    unet = build_denoiser(preset, context_dim=8, extra_in_channels=2)
    latents, context = batch()
    loss = diffusion_loss(unet, latents, context, generator=torch.Generator().manual_seed(0),
                          label_maps=torch.zeros(2, 2, 16, 16))
    assert torch.isfinite(loss)


def test_ema_follows_the_weights_with_warm_up():
    model = torch.nn.Linear(2, 2)
    ema = make_ema(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.step(model.parameters())  # first update copies the weights
    assert torch.allclose(ema.shadow_params[0], model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.step(model.parameters())  # decay warms up: min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.shadow_params[0], torch.full((2, 2), d * 1.0 + (1 - d) * 3.0))


def test_the_ema_updates_all_weights_at_once_as_it_would_one_by_one():
    """``foreach`` (the training EMA) against diffusers' per-tensor update, a frozen weight included."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    ema, one_by_one = make_ema(model, decay=0.99), EMAModel(model.parameters(), decay=0.99)
    assert ema.foreach and not one_by_one.foreach
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
        one_by_one.step(model.parameters())
    for a, b in zip(ema.shadow_params, one_by_one.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(ema.shadow_params[-1], model[1].bias)  # a frozen weight is copied, not averaged

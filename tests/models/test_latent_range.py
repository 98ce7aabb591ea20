"""The training latents' range: measured per channel, clamped into, and the model output re-derived."""

from __future__ import annotations

import pytest
import torch

from histosynth.errors import ConfigError, ModelError
from histosynth.models.diffusion import sampling_scheduler
from histosynth.models.latent_range import LatentRange, clamp_model_output
from histosynth.models.sampling import SamplingOptions
from histosynth.sample.sampler import Conditions, denoise


def test_the_range_is_each_channels_quantiles():
    values = torch.arange(1000, dtype=torch.float32).reshape(40, 25)
    # (N=2 patches, 2 flip variants, C=2, 40, 25): channel 0 holds 0..999, channel 1 -2 times that
    latents = torch.stack([values, -2 * values]).expand(2, 2, 2, 40, 25)
    measured = LatentRange.of_latents(latents, quantile=0.01)
    assert measured.low == pytest.approx((9.99, -1978.02))
    assert measured.high == pytest.approx((989.01, -19.98))
    assert measured.quantile == 0.01 and measured.channels == 2
    full = LatentRange.of_latents(latents, quantile=0.0)
    assert (full.low, full.high) == ((0.0, -1998.0), (999.0, 0.0))


def test_clamping_is_per_channel():
    latent_range = LatentRange((-1.0, 0.0), (1.0, 0.5))
    x = torch.tensor([[[[-3.0, 0.2, 4.0]], [[-3.0, 0.2, 4.0]]]])
    torch.testing.assert_close(latent_range.clamp(x), torch.tensor([[[[-1.0, 0.2, 1.0]], [[0.0, 0.2, 0.5]]]]))


def test_the_range_round_trips_and_bad_ones_are_refused():
    latent_range = LatentRange((-1.0, 0.0), (1.0, 0.5), 0.01)
    assert LatentRange.from_dict(latent_range.to_dict()) == latent_range
    with pytest.raises(ModelError, match="low bounds must not exceed"):
        LatentRange((1.0,), (0.0,))
    with pytest.raises(ModelError, match="one low and one high bound per channel"):
        LatentRange((0.0, 1.0), (1.0,))
    with pytest.raises(ModelError, match="lists 'low' and 'high'"):
        LatentRange.from_dict({"low": [0.0]})
    with pytest.raises(ConfigError, match=r"quantile must be in \[0, 0.5\)"):
        LatentRange.of_latents(torch.zeros(1, 1, 2, 2), quantile=0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_prediction"])
def test_the_output_implies_the_clamped_clean_latent(prediction_type):
    generator = torch.Generator().manual_seed(0)
    if prediction_type == "flow_prediction":  # x = (1 - sigma) x0 + sigma eps
        signal, noise_level = torch.tensor(0.3), torch.tensor(0.7)
    else:  # x = sqrt(a) x0 + sqrt(1 - a) eps
        signal, noise_level = torch.tensor(0.6).sqrt(), torch.tensor(0.4).sqrt()
    x0 = torch.randn(2, 3, 4, 4, generator=generator) * 3
    eps = torch.randn(2, 3, 4, 4, generator=generator)
    x = signal * x0 + noise_level * eps
    output = {"epsilon": eps, "v_prediction": signal * eps - noise_level * x0,
              "flow_prediction": eps - x0}[prediction_type]
    latent_range = LatentRange((-1.0, -2.0, -0.5), (1.0, 0.0, 4.0))
    clamped = clamp_model_output(output, x, signal, noise_level, latent_range, prediction_type)
    implied = {"epsilon": (x - noise_level * clamped) / signal, "v_prediction": signal * x - noise_level * clamped,
               "flow_prediction": x - noise_level * clamped}[prediction_type]
    torch.testing.assert_close(implied, latent_range.clamp(x0), atol=1e-5, rtol=1e-5)
    wide = LatentRange((-100.0,) * 3, (100.0,) * 3)  # nothing to clamp: the output is left as it was
    torch.testing.assert_close(clamp_model_output(output, x, signal, noise_level, wide, prediction_type), output,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="prediction type"):
        clamp_model_output(output, x, signal, noise_level, wide, "sample")


class ConstantNoise(torch.nn.Module):
    """A stand-in denoiser that always predicts the same noise (only for driving the sampler's loop)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
        return type("Out", (), {"sample": torch.full_like(x, self.value)})()


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_denoise_clamps_every_steps_clean_latent(kind):
    scheduler = sampling_scheduler(kind=kind)
    latent_range = LatentRange((-0.5, 0.0), (0.5, 0.25))
    start = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    context = torch.zeros(1, 1, 8)
    seen = []

    def observe(index, t, x, eps):
        alpha = scheduler.alphas_cumprod[t]
        seen.append((x - (1 - alpha).sqrt() * eps) / alpha.sqrt())

    options = SamplingOptions(steps=10, guidance=1.0)
    unclamped = denoise(ConstantNoise(-3.0), scheduler, start, Conditions(context), options)
    clamped = denoise(ConstantNoise(-3.0), scheduler, start, Conditions(context), options,
                      on_step=observe, latent_range=latent_range)
    assert len(seen) == 10
    for x0 in seen:
        torch.testing.assert_close(latent_range.clamp(x0), x0, atol=1e-4, rtol=0)
    # DDIM's last step lands on alphas_cumprod[0], not 1: a noise term of std 0.03 stays in the result
    assert float((clamped - latent_range.clamp(clamped)).abs().max()) < 0.1
    assert float((unclamped - latent_range.clamp(unclamped)).abs().max()) > 5  # without it: far out


def test_many_latents_are_measured_on_every_kth_one(monkeypatch):
    import histosynth.models.latent_range as latent_range_module

    latents = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).reshape(4, 2, 3, 3)  # 4 items of 2 x 3 x 3
    monkeypatch.setattr(latent_range_module, "MAX_VALUES_PER_CHANNEL", 18)  # half the 36 values per channel
    measured = LatentRange.of_latents(latents, quantile=0.0)
    # items 0 and 2: channel 0 holds 0..8 and 36..44, channel 1 9..17 and 45..53
    assert (measured.low, measured.high) == ((0.0, 9.0), (44.0, 53.0))

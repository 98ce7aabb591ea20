"""The training recipe's options: min-SNR-gamma loss weights, v-prediction and flow matching, trained, stored and
sampled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.cli import main
from histosynth.errors import ConfigError
from histosynth.models.bundle import load_bundle, read_bundle_config
from histosynth.models.diffusion import diffusion_loss, min_snr_weights, noise_scheduler, sampling_scheduler
from histosynth.models.latent_range import LatentRange
from histosynth.models.sampling import SamplingOptions
from histosynth.presets import DiffusionConfig, Preset
from histosynth.sample.sampler import Conditions, denoise

from .conftest import check_patches_and_a_slide

#: these runs use the preset's untrained autoencoder on purpose (speed); its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")

FAST = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1",
        "--steps", "6", "--checkpoint-every", "3"]


def snr(t: int) -> float:
    alpha_bar = float(noise_scheduler().alphas_cumprod[t])
    return alpha_bar / (1 - alpha_bar)


def test_min_snr_weights_follow_hang_et_al():
    t = torch.tensor([0, 200, 999])
    # the first step's SNR: alpha_bar_0 = 1 - 0.0015
    assert snr(0) == pytest.approx(0.9985 / 0.0015, rel=1e-5)  # (alphas_cumprod is float32)
    eps = min_snr_weights(noise_scheduler(), t, 5.0)
    expected_eps = [5 / snr(0), min(snr(200), 5) / snr(200), 1.0]
    torch.testing.assert_close(eps, torch.tensor(expected_eps), rtol=1e-6, atol=0)
    assert eps[0].item() == pytest.approx(0.007511, abs=1e-6) and snr(999) < 5
    velocity = min_snr_weights(noise_scheduler(DiffusionConfig(prediction_type="v_prediction")), t, 5.0)
    expected_v = [5 / (snr(0) + 1), min(snr(200), 5) / (snr(200) + 1), snr(999) / (snr(999) + 1)]
    torch.testing.assert_close(velocity, torch.tensor(expected_v), rtol=1e-6, atol=0)


class ZeroNet(torch.nn.Module):
    """Predicts zeros: the loss is then the mean square of the target, which the weights scale."""

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=torch.zeros_like(sample))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_weighted_loss_is_each_items_error_times_its_weight(prediction_type):
    scheduler = noise_scheduler(DiffusionConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([0, 200, 999])
    args = (ZeroNet(), latents, torch.zeros(3, 1, 8))
    plain = diffusion_loss(*args, scheduler=scheduler, timesteps=t, noise=noise)
    weighted = diffusion_loss(*args, scheduler=scheduler, timesteps=t, noise=noise, min_snr_gamma=5.0)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    per_item = target.square().flatten(1).mean(1)
    torch.testing.assert_close(plain, per_item.mean())
    torch.testing.assert_close(weighted, (min_snr_weights(scheduler, t, 5.0) * per_item).mean())
    assert weighted < 0.8 * plain


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_sampling_reaches_the_clean_latent_of_an_exact_network(prediction_type, kind):
    """A network that knows the data is one latent x0 predicts the exact noise or velocity of every x; the
    guided sampler, with the latent-range clamp, must then follow x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps_T to
    its last step, for either prediction type: x0 itself for DPM-Solver++, the noise level of the first
    training step for CompVis' DDIM (which ends on alphas_cumprod[0], not 1)."""
    x0 = torch.tensor([0.8, -0.5, 0.2]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    scheduler = sampling_scheduler(DiffusionConfig(prediction_type=prediction_type), kind)
    alphas = scheduler.alphas_cumprod

    class Exact(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
            from types import SimpleNamespace

            a = alphas[int(timestep)]
            target = x0.repeat(sample.shape[0] // x0.shape[0], 1, 1, 1)
            eps = (sample - a.sqrt() * target) / (1 - a).sqrt()
            out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * target
            return SimpleNamespace(sample=out)

    text = torch.zeros(2, 1, 8)
    conditions = Conditions(text, unconditional=torch.ones(1, 1, 8))
    wide = LatentRange((-1.0,) * 3, (1.0,) * 3)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    options = SamplingOptions(steps=20, scheduler=kind)
    scheduler.set_timesteps(options.steps)
    first = alphas[int(scheduler.timesteps[0])]
    eps_T = (x_T - first.sqrt() * x0) / (1 - first).sqrt()
    last = alphas[0] if kind == "ddim" else torch.tensor(1.0)
    expected = last.sqrt() * x0 + (1 - last).sqrt() * eps_T
    for latent_range in (None, wide):
        out = denoise(Exact(), scheduler, x_T, conditions, options, latent_range=latent_range)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)


class Recording(torch.nn.Module):
    """Predicts zeros and keeps what it was given."""

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        from types import SimpleNamespace

        self.sample, self.timestep = sample, timestep
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_the_flow_loss_is_the_error_of_the_straight_paths_velocity():
    scheduler = noise_scheduler(DiffusionConfig(prediction_type="flow_prediction"))
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([0.0, 250.0, 999.5])
    net = Recording()
    loss = diffusion_loss(net, latents, torch.zeros(3, 1, 8), scheduler=scheduler, timesteps=t, noise=noise)
    sigma = torch.tensor([0.0, 0.25, 0.9995]).view(3, 1, 1, 1)
    torch.testing.assert_close(net.sample, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(net.sample[0], latents[0])  # level 0: the clean latent
    assert torch.equal(net.timestep, t)
    torch.testing.assert_close(loss, (noise - latents).square().mean())
    diffusion_loss(net, latents, torch.zeros(3, 1, 8), generator=generator, scheduler=scheduler)
    drawn = net.timestep  # continuous levels, told as sigma x 1000
    assert drawn.dtype == torch.float32 and ((drawn >= 0) & (drawn < 1000)).all() and (drawn != drawn.round()).all()
    with pytest.raises(ConfigError, match="min-SNR-gamma weights are defined for a diffusion schedule"):
        diffusion_loss(net, latents, torch.zeros(3, 1, 8), scheduler=scheduler, timesteps=t, min_snr_gamma=5.0)


@pytest.mark.parametrize("kind", ["ddim", "dpm++"])
def test_a_flow_sampler_reaches_the_clean_latent_of_an_exact_network(kind):
    """On the straight path from x0 to the noise the exact velocity is (x - x0) / sigma, and both samplers (Euler
    and DPM-Solver++ on flow sigmas) end on x0 itself; with the latent-range clamp, on x0 clamped into the range."""
    x0 = torch.tensor([0.8, -0.5, 0.2]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    scheduler = sampling_scheduler(DiffusionConfig(prediction_type="flow_prediction"), kind)
    assert (kind, scheduler.config.solver_order) in (("ddim", 1), ("dpm++", 2))
    calls = []

    class Exact(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
            from types import SimpleNamespace

            (index,) = (scheduler.timesteps == timestep).nonzero()[0]
            sigma = scheduler.sigmas[index]
            calls.append(float(sigma))
            target = x0.repeat(sample.shape[0] // x0.shape[0], 1, 1, 1)
            return SimpleNamespace(sample=(sample - target) / sigma)

    conditions = Conditions(torch.zeros(2, 1, 8), unconditional=torch.ones(1, 1, 8))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    options = SamplingOptions(steps=10, scheduler=kind)
    narrow = LatentRange((-0.3,) * 3, (0.3,) * 3)
    for latent_range, expected in ((None, x0), (LatentRange((-1.0,) * 3, (1.0,) * 3), x0),
                                   (narrow, narrow.clamp(x0.contiguous()))):
        calls.clear()
        out = denoise(Exact(), scheduler, x_T, conditions, options, latent_range=latent_range)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert calls[0] == pytest.approx(0.999) and len(calls) == 10  # from 1 - 1/T, one call per step


def test_a_flow_model_refuses_ddim_step_noise():
    scheduler = sampling_scheduler(DiffusionConfig(prediction_type="flow_prediction"), "ddim")
    conditions = Conditions(torch.zeros(1, 1, 8), unconditional=torch.ones(1, 1, 8))
    with pytest.raises(ConfigError, match="eta 0.5 adds DDIM's noise to each step, which a flow_prediction model's"):
        denoise(ZeroNet(), scheduler, torch.zeros(1, 3, 4, 4), conditions, SamplingOptions(steps=2, eta=0.5),
                generators=[torch.Generator()])


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, blob_dataset):
    root = tmp_path_factory.mktemp("recipe")
    args = ["train", str(blob_dataset.root), "--out", str(root / "model"), "--cache-dir", str(root / "cache"),
            *FAST, "--prediction-type", "v_prediction", "--min-snr-gamma", "5"]
    assert main(args) == 0
    return root


def test_a_v_prediction_min_snr_model_trains_keeps_its_recipe_and_samples(recipe_run, tmp_path):
    model = recipe_run / "model"
    config = read_bundle_config(model)
    assert config.preset["diffusion"]["prediction_type"] == "v_prediction"
    assert config.preset["training"]["min_snr_gamma"] == 5.0
    assert load_bundle(model).scheduler_config["prediction_type"] == "v_prediction"
    assert "Trained to predict the velocity (v-prediction), with min-SNR-5 loss weights." in \
        (model / "README.md").read_text()
    run_settings = json.loads((recipe_run / "model.run" / "run.json").read_text())
    assert run_settings["preset"]["training"]["min_snr_gamma"] == 5.0
    for kind in ("ddim", "dpm++"):
        out = tmp_path / kind
        assert main(["generate", "--model", str(model), "--levels", "Glomeruli=high", "--n", "1", "--steps", "3",
                     "--scheduler", kind, "--out", str(out), "--seed", "0"]) == 0
        images = sorted(out.rglob("*.png"))
        assert len(images) == 1 and np.asarray(Image.open(images[0])).shape == (32, 32, 3)


def test_a_min_snr_noise_prediction_model_trains_and_samples(recipe_run, blob_dataset, tmp_path):
    model = tmp_path / "model"
    assert main(["train", str(blob_dataset.root), "--out", str(model), "--cache-dir", str(recipe_run / "cache"),
                 *FAST, "--min-snr-gamma", "5"]) == 0
    config = read_bundle_config(model)
    assert (config.preset["diffusion"]["prediction_type"], config.preset["training"]["min_snr_gamma"]) == \
        ("epsilon", 5.0)
    assert "Trained to predict the noise, with min-SNR-5 loss weights." in (model / "README.md").read_text()
    out = tmp_path / "images"
    assert main(["generate", "--model", str(model), "--levels", "Glomeruli=high", "--n", "1", "--steps", "3",
                 "--out", str(out), "--seed", "0"]) == 0
    assert len(sorted(out.rglob("*.png"))) == 1


def test_a_flow_matching_model_trains_keeps_its_recipe_and_samples_patches_and_slides(recipe_run, blob_dataset,
                                                                                        tmp_path):
    model = tmp_path / "model"
    assert main(["train", str(blob_dataset.root), "--out", str(model), "--cache-dir", str(recipe_run / "cache"),
                 *FAST, "--prediction-type", "flow_prediction"]) == 0
    assert read_bundle_config(model).preset["diffusion"]["prediction_type"] == "flow_prediction"
    assert load_bundle(model).scheduler_config["prediction_type"] == "flow_prediction"
    card = (model / "README.md").read_text()
    assert "Trained to predict the velocity eps - x0 of a straight flow (flow matching)." in card
    assert "Sampling defaults: ddim (on a flow: its Euler step) with 50 steps" in card
    check_patches_and_a_slide(model, tmp_path)


def test_fine_tuning_keeps_the_prediction_type(recipe_run, blob_dataset, tmp_path, refused):
    args = ["train", str(blob_dataset.root), "--out", str(tmp_path / "tuned"), "--init", str(recipe_run / "model"),
            "--cache-dir", str(recipe_run / "cache"), *FAST]
    assert refused(args) == (f"error: --init {recipe_run / 'model'} predicts v_prediction but this run would train "
                             "it to predict epsilon; give --prediction-type v_prediction (or start without --init)")
    assert not (tmp_path / "tuned").exists()


def test_an_init_model_with_a_damaged_scheduler_is_refused_with_the_part_named(recipe_run, blob_dataset, tmp_path,
                                                                               refused):
    import shutil

    init = shutil.copytree(recipe_run / "model", tmp_path / "init")
    (init / "scheduler" / "scheduler_config.json").write_text("{")
    message = refused(["train", str(blob_dataset.root), "--out", str(tmp_path / "tuned"), "--init", str(init),
                       "--cache-dir", str(recipe_run / "cache"), *FAST, "--prediction-type", "v_prediction"])
    assert message.startswith(f"error: {init}: part 'scheduler' cannot be loaded: ")
    assert not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("options, message", [
    (["--prediction-type", "x0"], "--prediction-type must be one of epsilon, v_prediction, flow_prediction, got 'x0'"),
    (["--min-snr-gamma", "0"], "--min-snr-gamma must be above 0, got 0.0"),
    (["--min-snr-gamma", "nan"], "--min-snr-gamma must be a finite number, got nan"),
    (["--prediction-type", "flow_prediction", "--min-snr-gamma", "5"],
     "the training recipe: min_snr_gamma weighs the noise or velocity target of a diffusion schedule; a "
     "flow_prediction model trains without it (leave min_snr_gamma unset)"),
])
def test_bad_recipe_options_are_refused_before_anything_is_written(blob_dataset, tmp_path, refused, options,
                                                                   message):
    args = ["train", str(blob_dataset.root), "--out", str(tmp_path / "model"), *FAST, *options]
    assert refused(args) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_models_without_the_options_read_as_compvis_recipe(tiny_bundle_path):
    """A model saved before the options existed (no min_snr_gamma in its preset) loads with the defaults, and a
    preset without them is written as before."""
    config = read_bundle_config(tiny_bundle_path)
    assert "min_snr_gamma" not in config.preset["training"]
    preset = Preset.from_dict(config.preset)
    assert preset.training.min_snr_gamma is None and preset.diffusion.prediction_type == "epsilon"
    assert preset.to_dict() == config.preset
    assert preset.with_recipe(min_snr_gamma=5).to_dict()["training"]["min_snr_gamma"] == 5

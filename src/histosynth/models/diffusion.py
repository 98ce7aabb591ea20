"""The diffusion objective: noise schedule, samplers' schedules, the training loss, EMA.

The schedule is CompVis' "linear" one as PathLDM trains it: beta = linspace(sqrt(0.0015),
sqrt(0.0195), 1000) ** 2, which diffusers calls ``scaled_linear``. The DDIM settings that reproduce
CompVis' ``DDIMSampler`` exactly (checked on the CompVis reference fixture): "leading" timestep
spacing with ``steps_offset=1`` (t = 1, 21, ..., 981 for 50 steps), ``set_alpha_to_one=False`` (the
last step lands on alphas_cumprod[0], not 1) and no clipping of the predicted x0.

A ``flow_prediction`` model is trained by flow matching on the straight path (rectified flow; Liu et al.
2022, Lipman et al. 2023, as Stable Diffusion 3 and SiT train): x_s = (1 - s) x0 + s eps at a level s drawn
uniformly from [0, 1], told to the network as the timestep s x T, and the network predicts the velocity
eps - x0. It samples with diffusers' DPM-Solver++ on flow sigmas from 1 - 1/T to 0 (:func:`_flow_scheduler`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from ..errors import ConfigError
from ..presets import DiffusionConfig, Preset
from .sampling import SAMPLER_KINDS

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


def _diffusion_section(cfg: DiffusionConfig | Preset | None) -> DiffusionConfig:
    if cfg is None:
        return DiffusionConfig()
    return cfg.diffusion if isinstance(cfg, Preset) else cfg


def _schedule(cfg: DiffusionConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
    }


#: the prediction type of a flow-matching model (diffusers' name)
FLOW_PREDICTION = "flow_prediction"


def is_flow(scheduler) -> bool:
    """Whether a scheduler (or its config) belongs to a flow-matching model."""
    config = getattr(scheduler, "config", scheduler)
    return config.get("prediction_type") == FLOW_PREDICTION


def noise_scheduler(cfg: DiffusionConfig | Preset | None = None) -> DDPMScheduler:
    """The training-time forward process (``add_noise``) with the CompVis settings."""
    return DDPMScheduler(
        **_schedule(_diffusion_section(cfg)),
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def sampling_scheduler(cfg: DiffusionConfig | Preset | None = None, kind: str = "ddim"):
    """A sampling scheduler: ``ddim`` (CompVis DDIM, eta 0) or ``dpm++`` (DPM-Solver++ 2M, multistep)."""
    if kind not in SAMPLER_KINDS:
        raise ConfigError(f"unknown scheduler {kind!r}; use one of {', '.join(SAMPLER_KINDS)}")
    section = _diffusion_section(cfg)
    if section.prediction_type == FLOW_PREDICTION:
        return _flow_scheduler(section, kind)
    schedule = _schedule(section)
    if kind == "ddim":
        return DDIMScheduler(
            **schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
            thresholding=False,
        )
    # dpm++: DPM-Solver++ needs no CompVis parity; diffusers' defaults (linspace spacing, second order,
    # first order on the last steps) are what it was tuned with.
    return DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)


def _flow_scheduler(cfg: DiffusionConfig, kind: str) -> DPMSolverMultistepScheduler:
    """A flow-matching model's sampler: DPM-Solver++ on evenly spaced flow sigmas, first order for ``ddim``
    (the Euler step of the flow's ODE, which on the straight path is DDIM's update) and second order for
    ``dpm++``. Both end on sigma 0, the clean latent."""
    return DPMSolverMultistepScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type=FLOW_PREDICTION,
                                       use_flow_sigmas=True, algorithm_type="dpmsolver++",
                                       solver_order=1 if kind == "ddim" else 2)


def check_eta(scheduler, eta: float) -> None:
    """Refuse DDIM's step noise (eta > 0) on a flow model, whose sampler is deterministic."""
    if eta and is_flow(scheduler):
        raise ConfigError(f"eta {eta} adds DDIM's noise to each step, which a flow_prediction model's sampler "
                          "does not take; sample it with eta 0")


def signal_and_noise(scheduler, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights (a, b) of x_t = a x0 + b eps at a sampling scheduler's timestep ``t``: sqrt(alpha_bar_t) and
    sqrt(1 - alpha_bar_t) on a diffusion schedule, 1 - sigma and sigma on a flow's (its sigma at this step)."""
    if is_flow(scheduler):
        index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(t)
        sigma = scheduler.sigmas[index].float()
        return 1.0 - sigma, sigma
    alpha_bar = scheduler.alphas_cumprod[int(t)].float()
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


def diffusion_loss(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    *,
    scheduler: Optional[DDPMScheduler] = None,
    label_maps: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """The denoising MSE of one batch at uniformly drawn timesteps.

    The target is the noise, the velocity or (``flow_prediction``) the flow's velocity eps - x0, as the
    scheduler's ``prediction_type`` says; a flow's timesteps are continuous in [0, T). With
    ``min_snr_gamma`` each item's error is weighted by :func:`min_snr_weights` (Min-SNR-gamma, Hang et
    al. 2023); without it, all items weigh the same (CompVis' loss).
    ``label_maps`` (B, K, h, w) of a mask-conditioned model are concatenated to the noisy latent.
    ``timesteps`` / ``noise`` can be given to make a step reproducible; otherwise they are drawn from
    ``generator``.
    """
    scheduler = scheduler or noise_scheduler()
    if timesteps is None:
        timesteps = _draw_timesteps(scheduler, latents, generator)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noisy, target = _noisy_and_target(scheduler, latents, noise, timesteps)
    if label_maps is not None:
        noisy = torch.cat([noisy, label_maps.to(noisy)], dim=1)
    prediction = unet(
        noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=attention_mask
    ).sample
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_item = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    weights = min_snr_weights(scheduler, timesteps, min_snr_gamma).to(per_item)
    return (weights * per_item).mean()


def _draw_timesteps(scheduler: DDPMScheduler, latents: torch.Tensor,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """One timestep per item: an integer in [0, T) of a diffusion schedule, a real number in [0, T) of a flow."""
    steps, batch = scheduler.config.num_train_timesteps, latents.shape[0]
    if is_flow(scheduler):
        return torch.rand((batch,), generator=generator, device=latents.device) * steps
    return torch.randint(0, steps, (batch,), generator=generator, device=latents.device)


def _noisy_and_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised latents at ``timesteps`` and what the network is to predict from them."""
    if is_flow(scheduler):
        sigma = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.dim() - 1))
        sigma = sigma.to(latents)
        return (1.0 - sigma) * latents + sigma * noise, noise - latents
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    return noisy, noise


def signal_to_noise(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) of the forward process at each timestep (float64)."""
    alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): the x0-space weight min(SNR, gamma) expressed for the network's target, i.e. divided by
    SNR for a noise prediction and by SNR + 1 for a velocity prediction. Low-noise timesteps, whose easy
    errors otherwise dominate the gradient, are weighted down; where SNR <= gamma a noise prediction's
    weight is 1."""
    if is_flow(scheduler):
        raise ConfigError("min-SNR-gamma weights are defined for a diffusion schedule; a flow_prediction model "
                          "trains without them")
    snr = signal_to_noise(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return (clipped / (snr + 1.0)).float()
    return (clipped / snr).float()


def make_ema(model: torch.nn.Module, decay: float = 0.9999) -> "EMAModel":
    """An exponential moving average of ``model``'s weights (diffusers' ``EMAModel``).

    Its decay warms up as (1 + n) / (10 + n) after the first update (which copies the weights),
    capped at ``decay``, so short runs are not dominated by the initial weights.
    ``ema.step(model.parameters())`` after each optimiser step; ``ema.copy_to(model.parameters())``
    before saving for inference. The update runs as a few ``torch._foreach`` kernels over all the
    weights instead of a handful of kernels per tensor (``foreach``, diffusers >= 0.27); a resumed run
    updates the same way, so its EMA stays bit-exact.
    """
    from diffusers.training_utils import EMAModel  # imports diffusers' pipelines: keep it off start-up

    config = getattr(model, "config", None)  # diffusers models: lets the EMA be saved as a model folder
    return EMAModel(model.parameters(), decay=decay, model_cls=type(model) if config else None, model_config=config,
                    foreach=True)

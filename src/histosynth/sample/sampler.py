"""The numerical core of sampling: classifier-free guided denoising of a latent batch.

``denoise`` reproduces CompVis' ``DDIMSampler.sample`` (eta 0, guidance as
``e_u + scale * (e_c - e_u)``, one UNet call on the doubled batch [uncond, cond]) when given the DDIM
scheduler of :func:`histosynth.models.diffusion.sampling_scheduler`; any other diffusers scheduler
with ``set_timesteps`` / ``step`` (DPM-Solver++) works the same way.

Contexts of different token lengths (a BERT-style encoder gives "" fewer tokens than a caption) are
zero-padded to a common length and masked, so they can share one UNet call.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import UNet2DConditionModel

from ..errors import ConfigError

#: called after each step with (steps done, number of steps)
ProgressFn = Callable[[int, int], None]
#: called before each step's update with (step index, timestep, UNet input x, guided eps)
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _pad_tokens(context: torch.Tensor, mask: Optional[torch.Tensor], length: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Zero-pad a (B, L, D) context to ``length`` tokens; the mask marks the padding as ignored."""
    tokens = context.shape[1]
    if tokens == length:
        return context, mask
    if mask is None:
        mask = _all_tokens(context)
    context = torch.nn.functional.pad(context, (0, 0, 0, length - tokens))
    mask = torch.nn.functional.pad(mask, (0, length - tokens))
    return context, mask


def stack_conditions(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    uncond_mask: Optional[torch.Tensor] = None,
    cond_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The doubled-batch context [uncond, cond] (and its attention mask, if any side has one)."""
    if uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        uncond_mask = None if uncond_mask is None else uncond_mask.expand(cond.shape[0], -1)
    length = max(uncond.shape[1], cond.shape[1])
    uncond, uncond_mask = _pad_tokens(uncond, uncond_mask, length)
    cond, cond_mask = _pad_tokens(cond, cond_mask, length)
    if uncond_mask is None and cond_mask is None:
        return torch.cat([uncond, cond]), None
    masks = [_all_tokens(c) if m is None else m for m, c in ((uncond_mask, uncond), (cond_mask, cond))]
    return torch.cat([uncond, cond]), torch.cat(masks)


def _all_tokens(context: torch.Tensor) -> torch.Tensor:
    return torch.ones(context.shape[:2], dtype=torch.long, device=context.device)


def guided_eps(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    guidance: float,
    cond_mask: Optional[torch.Tensor] = None,
    uncond_mask: Optional[torch.Tensor] = None,
    cond_extra: Optional[torch.Tensor] = None,
    uncond_extra: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The classifier-free guided model output ``e_u + guidance * (e_c - e_u)`` at one timestep.

    ``guidance == 1`` (or no ``uncond``) costs a single conditional call. ``*_extra`` are channels
    concatenated to ``x`` (mask conditioning); ``uncond_extra`` defaults to ``cond_extra``.
    """
    if guidance == 1.0 or uncond is None:
        unet_in = x if cond_extra is None else torch.cat([x, cond_extra], dim=1)
        return unet(unet_in, t, encoder_hidden_states=cond, encoder_attention_mask=cond_mask).sample
    context, mask = stack_conditions(uncond, cond, uncond_mask, cond_mask)
    doubled = torch.cat([x, x])
    if cond_extra is not None:
        uncond_extra = cond_extra if uncond_extra is None else uncond_extra
        doubled = torch.cat([doubled, torch.cat([uncond_extra, cond_extra])], dim=1)
    eps_uncond, eps_cond = unet(doubled, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def check_sampling_options(steps: int, guidance: float) -> None:
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if guidance < 0:
        raise ConfigError(f"guidance must be 0 or more (1 = no guidance), got {guidance}")


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    steps: int = 50,
    guidance: float = 1.5,
    cond_mask: Optional[torch.Tensor] = None,
    uncond_mask: Optional[torch.Tensor] = None,
    progress: Optional[ProgressFn] = None,
    *,
    cond_extra: Optional[torch.Tensor] = None,
    uncond_extra: Optional[torch.Tensor] = None,
    on_step: Optional[StepObserver] = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` and return the final latents (the scheduler is reset).

    ``cond`` is (B, L, D); ``uncond`` is (B or 1, L', D), typically the embedding of "".
    """
    check_sampling_options(steps, guidance)
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(x, t)
        eps = guided_eps(
            unet, model_in, t, cond, uncond, guidance, cond_mask, uncond_mask, cond_extra, uncond_extra
        )
        if on_step is not None:
            on_step(index, int(t), x, eps)
        x = scheduler.step(eps, t, x).prev_sample
        if progress is not None:
            progress(index + 1, len(timesteps))
    return x

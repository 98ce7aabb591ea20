"""The numerical core of sampling: classifier-free guided denoising of a latent batch.

``denoise`` reproduces CompVis' ``DDIMSampler.sample`` (eta 0, guidance as
``e_u + scale * (e_c - e_u)``, one UNet call on the doubled batch [uncond, cond]) when given the DDIM
scheduler of :func:`histosynth.models.diffusion.sampling_scheduler`; any other diffusers scheduler
with ``set_timesteps`` / ``step`` (DPM-Solver++) works the same way.

Contexts of different token lengths (a BERT-style encoder gives "" fewer tokens than a caption) are
zero-padded to a common length and masked, so they can share one UNet call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel

from ..models.diffusion import check_eta, signal_and_noise
from ..models.latent_range import LatentRange, clamp_model_output
from ..models.precision import channels_last_input, network_precision
from ..models.sampling import SamplingOptions

#: called after each step with (steps done, number of steps)
ProgressFn = Callable[[int, int], None]
#: called before each step's update with (step index, timestep, UNet input x, guided eps)
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _pad_tokens(context: torch.Tensor, mask: Optional[torch.Tensor],
                length: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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
    return stack_contexts([(uncond, uncond_mask), (cond, cond_mask)], cond.shape[0])


def stack_contexts(contexts: list[tuple[torch.Tensor, Optional[torch.Tensor]]], batch: int
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(context, mask) pairs, each (B or 1, L_i, D), stacked on the batch axis: a context of one item is
    repeated ``batch`` times, all are zero-padded to one length, and the mask marks the padding."""
    expanded = []
    for context, mask in contexts:
        if context.shape[0] == 1 and batch > 1:
            context = context.expand(batch, *context.shape[1:])
            mask = None if mask is None else mask.expand(batch, -1)
        expanded.append((context, mask))
    length = max(context.shape[1] for context, _ in expanded)
    padded = [_pad_tokens(context, mask, length) for context, mask in expanded]
    stacked = torch.cat([context for context, _ in padded])
    if all(mask is None for _, mask in padded):
        return stacked, None
    return stacked, torch.cat([_all_tokens(context) if mask is None else mask for context, mask in padded])


def _all_tokens(context: torch.Tensor) -> torch.Tensor:
    return torch.ones(context.shape[:2], dtype=torch.long, device=context.device)


@dataclass(frozen=True)
class Conditions:
    """What a batch of B latents is conditioned on.

    ``text`` (B, L, D) are the captions' token states; ``unconditional`` (B or 1, L', D) the empty
    caption's, or None when the text is not guided (the caption is the unconditional one);
    ``label_maps`` (B, K, h, w) the label maps of a mask-conditioned model (channels concatenated to
    the latent). The masks mark the tokens to attend to (None: all).
    """

    text: torch.Tensor
    unconditional: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    unconditional_mask: Optional[torch.Tensor] = None
    label_maps: Optional[torch.Tensor] = None


def guided_eps(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor | int, conditions: Conditions,
               guidance: float, mask_guidance: float = 1.0, precision: str = "fp32") -> torch.Tensor:
    """The classifier-free guided model output at one timestep.

    Text only: ``e(u) + g * (e(c) - e(u))`` with ``g = guidance``, ``c`` the caption's context and
    ``u`` the unconditional one. With a label map ``M`` and ``m = mask_guidance``, the text is guided
    given the mask, and the mask against the null (all-zero) map under the unconditional text::

        e(u, 0) + m * (e(u, M) - e(u, 0)) + g * (e(c, M) - e(u, M))

    ``m == 1`` is plain text guidance with the mask on both sides (two predictions); no
    unconditional context means the caption is the unconditional one (``c == u``), which leaves
    ``e(u, 0) + m * (e(u, M) - e(u, 0))`` (two predictions); otherwise three. Only the predictions
    a formula needs are computed, in one UNet call on the stacked batch, which runs at ``precision``
    (see :mod:`histosynth.models.precision`); the predictions and their combination are float32.
    """
    cond, cond_mask, label_maps = conditions.text, conditions.text_mask, conditions.label_maps
    uncond, uncond_mask = conditions.unconditional, conditions.unconditional_mask
    text_guided = uncond is not None and guidance != 1.0
    mask_guided = label_maps is not None and mask_guidance != 1.0
    # (name, context, its attention mask, label map) of each prediction needed
    wanted = [("cond", cond, cond_mask, label_maps)]
    if uncond is not None and (text_guided or mask_guided):
        wanted.insert(0, ("uncond", uncond, uncond_mask, label_maps))
    if mask_guided:
        null_text, null_mask = (cond, cond_mask) if uncond is None else (uncond, uncond_mask)
        wanted.insert(0, ("null", null_text, null_mask, torch.zeros_like(label_maps)))
    eps = _predict(unet, x, t, wanted, precision)
    if uncond is None:
        if not mask_guided:
            return eps["cond"]
        return eps["null"] + mask_guidance * (eps["cond"] - eps["null"])
    guided = eps["cond"] if not text_guided else eps["uncond"] + guidance * (eps["cond"] - eps["uncond"])
    if mask_guided:
        guided = guided + (mask_guidance - 1.0) * (eps["uncond"] - eps["null"])
    return guided


def _predict(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor | int,
             wanted: list[tuple[str, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]],
             precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The UNet's float32 predictions for x under several conditions, from one call on the stacked batch
    (run at ``precision``)."""
    if len(wanted) == 1:
        _, contexts, masks, label_maps = wanted[0]
        unet_in = x if label_maps is None else torch.cat([x, label_maps], dim=1)
    else:
        contexts, masks = stack_contexts([(c, m) for _, c, m, _ in wanted], x.shape[0])
        unet_in = torch.cat([x] * len(wanted))
        if wanted[0][3] is not None:
            unet_in = torch.cat([unet_in, torch.cat([label_maps for _, _, _, label_maps in wanted])], dim=1)
    with network_precision(precision, x.device):
        out = unet(channels_last_input(unet_in, precision), t, encoder_hidden_states=contexts,
                   encoder_attention_mask=masks).sample
    return dict(zip([name for name, *_ in wanted], out.float().contiguous().chunk(len(wanted)), strict=True))


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler,
    x_T: torch.Tensor,
    conditions: Conditions,
    options: SamplingOptions,
    *,
    latent_range: Optional[LatentRange] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
    progress: Optional[ProgressFn] = None,
    on_step: Optional[StepObserver] = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` and return the final latents (the scheduler is reset).

    ``options`` give the steps, the guidance scales and DDIM's eta (the scheduler itself is made by
    the caller, of ``options.scheduler``) and the precision of the UNet calls (None: the device's
    default); the latents, the guidance and the scheduler's update stay float32. With ``latent_range``
    each step's predicted clean latent is clamped into it (see :mod:`histosynth.models.latent_range`).
    With eta > 0, item i's step noise is drawn from ``generators[i]`` (CPU generators keep it the same
    on every device).
    """
    precision = options.on_device(x_T.device).precision
    scheduler.set_timesteps(options.steps, device=x_T.device)
    check_eta(scheduler, options.eta)
    step_noise: dict = {}
    if options.eta:
        if generators is None or len(generators) != x_T.shape[0]:
            raise ValueError("sampling with eta > 0 needs one generator per item")
        step_noise = {"eta": options.eta, "generator": list(generators)}
    x = x_T * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(x, t)
        eps = guided_eps(unet, model_in, t, conditions, options.guidance, options.mask_guidance, precision)
        if latent_range is not None:
            # x, not model_in: x = sqrt(a) x0 + sqrt(1-a) eps holds for the sample itself, and a scheduler may
            # rescale its model input
            eps = clamp_model_output(eps, x, *signal_and_noise(scheduler, t), latent_range,
                                     scheduler.config.prediction_type)
        if on_step is not None:
            on_step(index, int(t), x, eps)
        x = scheduler.step(eps, t, x, **step_noise).prev_sample
        if progress is not None:
            progress(index + 1, len(timesteps))
    return x

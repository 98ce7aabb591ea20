"""The conditional denoiser: a diffusers ``UNet2DConditionModel`` laid out like the CompVis UNet.

The settings that make a diffusers UNet compute what a CompVis ``openaimodel.UNetModel`` computes
(verified on the CompVis reference fixture): sinusoidal embedding as [cos, sin]
(``flip_sin_to_cos=True``, ``freq_shift=0``), 1x1-conv projections around the transformers
(``use_linear_projection=False``) and ``attention_head_dim`` set to the *number* of heads, which is
how diffusers reads that legacy field.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..presets import Preset


def denoiser_config(preset: Preset, context_dim: int, extra_in_channels: int = 0) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config for a preset.

    ``extra_in_channels`` are conditioning channels (e.g. a label map) concatenated to the noisy latent
    on the channel axis; the output has only the latent channels.
    """
    unet = preset.unet
    latent_channels = preset.autoencoder.latent_channels
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet.cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet.cross_attention)]
    return {
        "sample_size": preset.latent_size,
        "in_channels": latent_channels + extra_in_channels,
        "out_channels": latent_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if unet.mid_block_attention else None,
        "block_out_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": unet.transformer_depth,
        "attention_head_dim": unet.num_heads,
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
    }


def build_denoiser(preset: Preset, context_dim: int, extra_in_channels: int = 0) -> UNet2DConditionModel:
    """A freshly initialised denoiser for ``preset`` whose cross-attention reads ``context_dim`` features."""
    return UNet2DConditionModel(**denoiser_config(preset, context_dim, extra_in_channels))


#: the first convolution of a diffusers UNet: the only weights that see the input channels
CONV_IN_WEIGHT = "conv_in.weight"


def widen_input(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A UNet state dict whose first convolution reads ``in_channels`` channels instead of fewer.

    The added input channels (a label map appended to the latent) get zero weights, so the widened
    UNet computes exactly what the original computes, whatever those channels hold: fine-tuning a
    text model into a text+mask model starts from the text model and learns to use the mask.
    """
    weight = state[CONV_IN_WEIGHT]
    extra = in_channels - weight.shape[1]
    if extra < 0:
        raise ValueError(f"cannot narrow conv_in from {weight.shape[1]} to {in_channels} input channels")
    if extra == 0:
        return state
    zeros = weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])
    return {**state, CONV_IN_WEIGHT: torch.cat([weight, zeros], dim=1)}


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())

"""The conditional denoiser: a diffusers ``UNet2DConditionModel`` laid out like the CompVis UNet, or a
transformer (:class:`DiTDenoiser`, ``denoiser: dit`` in a preset).

Both are called alike, ``denoiser(sample, timestep, encoder_hidden_states=..., encoder_attention_mask=...)``,
so the loss, the samplers, windowed slide sampling and the model folder treat them alike; what differs
(the context size they read, the grid their input must fit, the weights that see the input channels) is
asked of this module.

The UNet settings that make a diffusers UNet compute what a CompVis ``openaimodel.UNetModel`` computes
(verified on the CompVis reference fixture): sinusoidal embedding as [cos, sin]
(``flip_sin_to_cos=True``, ``freq_shift=0``), 1x1-conv projections around the transformers
(``use_linear_projection=False``) and ``attention_head_dim`` set to the *number* of heads, which is
how diffusers reads that legacy field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

# ModelMixin must be a name of this module: diffusers finds a component's load method by looking its base
# classes' names up in the module the model folder's model_index.json names (here, for a DiTDenoiser).
from diffusers import ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel  # noqa: F401

from ..errors import ModelError
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


class DiTDenoiser(PixArtTransformer2DModel):
    """PixArt-alpha's transformer (diffusers ``PixArtTransformer2DModel``) called as the UNet is called: one
    timestep for the whole batch or one per item, real-valued timesteps (a flow's) included.

    The caption's token states pass through the model's caption projection into its width; a label map of a
    mask-conditioned model is cut into tokens with the latent (input channels concatenated, as the UNet's).
    The positions are PixArt's 2-D sine-cosine embedding, made for the input's grid on each call: a latent of
    another size than the training patches' spans the same range of positions (PixArt's interpolation), so
    an image smaller than those patches is drawn as a whole squeezed into it rather than as a crop. (Larger
    images and slides are sampled in windows of the training size.)
    """

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None, return_dict: bool = True, **kwargs: Any):
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        return super().forward(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                               encoder_attention_mask=encoder_attention_mask, return_dict=return_dict, **kwargs)


#: what a model's denoiser is
Denoiser = Union[UNet2DConditionModel, DiTDenoiser]


def dit_config(preset: Preset, context_dim: int, extra_in_channels: int = 0) -> dict[str, Any]:
    """The :class:`DiTDenoiser` config for a preset's ``dit`` section (PixArt-alpha's layout: adaLN-single,
    a caption projection, no resolution or aspect-ratio conditions)."""
    dit = preset.dit
    latent_channels = preset.autoencoder.latent_channels
    return {
        "sample_size": preset.latent_size,
        "patch_size": dit.patch_size,
        "in_channels": latent_channels + extra_in_channels,
        "out_channels": latent_channels,
        "num_layers": dit.depth,
        "num_attention_heads": dit.num_heads,
        "attention_head_dim": dit.width // dit.num_heads,
        "cross_attention_dim": dit.width,
        "caption_channels": context_dim,
        "norm_type": "ada_norm_single",
        "use_additional_conditions": False,
        "interpolation_scale": 1,
    }


def build_denoiser(preset: Preset, context_dim: int,
                   extra_in_channels: int = 0) -> Denoiser:
    """A freshly initialised denoiser for ``preset`` whose cross-attention reads ``context_dim`` features."""
    if preset.denoiser == "dit":
        return DiTDenoiser(**dit_config(preset, context_dim, extra_in_channels))
    return UNet2DConditionModel(**denoiser_config(preset, context_dim, extra_in_channels))


#: the denoiser classes a model folder's unet/ part may hold, by the class name its config.json records
DENOISER_CLASSES = {cls.__name__: cls for cls in (UNet2DConditionModel, DiTDenoiser)}


def denoiser_class(folder: str | Path) -> type:
    """The class of the denoiser saved in ``folder`` (a model folder's unet/ part), as its config names it."""
    config = Path(folder) / "config.json"
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{config} cannot be read ({exc.__class__.__name__}); the model folder is damaged") from None
    if class_name not in DENOISER_CLASSES:
        raise ModelError(f"{config}: {class_name!r} is not a denoiser (expected one of {', '.join(DENOISER_CLASSES)})")
    return DENOISER_CLASSES[class_name]


def denoiser_kind(folder: str | Path) -> str:
    """``dit`` or ``unet``: the preset's name of the denoiser saved in ``folder``."""
    return "dit" if denoiser_class(folder) is DiTDenoiser else "unet"


def load_denoiser(folder: str | Path) -> Denoiser:
    """The denoiser saved in ``folder`` (a model folder's unet/ part), of the class its config names."""
    return denoiser_class(folder).from_pretrained(folder, low_cpu_mem_usage=False)


def denoiser_library(class_name: str) -> str:
    """The module diffusers imports a denoiser class from when it loads a model folder as a pipeline."""
    return __name__ if class_name == DiTDenoiser.__name__ else "diffusers"


def _is_dit(denoiser: Any) -> bool:
    return isinstance(denoiser, DiTDenoiser)


def context_features(denoiser: Any) -> int:
    """The caption features the denoiser's cross-attention reads (the text encoder's hidden size)."""
    config = denoiser.config
    return int(config.caption_channels if _is_dit(denoiser) else config.cross_attention_dim)


def denoiser_factor(denoiser: Any) -> int:
    """Latent pixels per position of the denoiser's coarsest grid: a latent's sides must be multiples of it."""
    config = denoiser.config
    return int(config.patch_size) if _is_dit(denoiser) else 2 ** (len(config.block_out_channels) - 1)


def input_weight_name(denoiser: Any) -> str:
    """The only weights of the denoiser that see its input channels: the UNet's first convolution, the DiT's
    patch embedding."""
    return "pos_embed.proj.weight" if _is_dit(denoiser) else "conv_in.weight"


def widen_input(state: dict[str, torch.Tensor], in_channels: int, name: str) -> dict[str, torch.Tensor]:
    """A denoiser state dict whose input weights ``name`` (see :func:`input_weight_name`) read ``in_channels``
    channels instead of fewer.

    The added input channels (a label map appended to the latent) get zero weights, so the widened
    denoiser computes exactly what the original computes, whatever those channels hold: fine-tuning a
    text model into a text+mask model starts from the text model and learns to use the mask.
    """
    weight = state[name]
    extra = in_channels - weight.shape[1]
    if extra < 0:
        raise ValueError(f"cannot narrow {name} from {weight.shape[1]} to {in_channels} input channels")
    if extra == 0:
        return state
    zeros = weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])
    return {**state, name: torch.cat([weight, zeros], dim=1)}


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())

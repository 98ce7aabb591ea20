"""The ControlNet-style mask branch: a frozen text denoiser steered by a trainable copy of its encoder.

The second way a model can read a label mask, beside concatenating it to the UNet's input
(:mod:`histosynth.models.denoiser`). diffusers' ``ControlNetModel`` made from the text UNet copies
its encoder (first convolution, time embedding, down blocks, middle block) and adds the label map,
through a small embedding whose last convolution starts at zero, to its first feature map. Its
outputs pass through zero-initialised 1x1 convolutions and are added to the frozen UNet's skip
connections and middle block. So at the start the pair computes exactly what the text model
computes, and training changes only the branch: the text model's images are kept.

:class:`MaskControlledUNet` takes what a concatenation model takes — the noisy latent with the label
map appended on the channel axis — and has the UNet's call signature and ``config``, so the loss,
the samplers and windowed slide sampling treat both kinds alike.

The branch's cross-attention reads the caption without its padding mask (``ControlNetModel`` has no
such input); the frozen UNet still applies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict

from ..errors import ModelError

#: the bundle part that holds the branch (beside ``unet/``, which holds the frozen text UNet)
CONTROLNET_DIR = "controlnet"
#: channels of the label-map embedding (one convolution at latent resolution; no downsampling)
EMBEDDING_CHANNELS = (32,)


class MaskControlledUNet(torch.nn.Module):
    """A frozen text UNet plus a ControlNet branch that reads the label-map channels of the input."""

    def __init__(self, base: UNet2DConditionModel, controlnet: ControlNetModel):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.controlnet = controlnet
        self.latent_channels = int(base.config.in_channels)
        mask_channels = int(controlnet.config.conditioning_channels)
        # what callers read of a UNet's config: its input includes the label-map channels
        self.config = FrozenDict({**base.config, "in_channels": self.latent_channels + mask_channels})

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None, return_dict: bool = True, **kwargs: Any):
        latent, label_maps = sample[:, :self.latent_channels], sample[:, self.latent_channels:]
        control = self.controlnet(latent, timestep, encoder_hidden_states, controlnet_cond=label_maps)
        return self.base(latent, timestep, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask,
                         down_block_additional_residuals=control.down_block_res_samples,
                         mid_block_additional_residual=control.mid_block_res_sample,
                         return_dict=return_dict, **kwargs)

    def save_parts(self, folder: Path) -> None:
        """Write the frozen UNet to ``folder/unet`` and the branch to ``folder/controlnet``."""
        self.base.save_pretrained(Path(folder) / "unet")
        self.controlnet.save_pretrained(Path(folder) / CONTROLNET_DIR)


def add_mask_branch(base: UNet2DConditionModel, mask_channels: int) -> MaskControlledUNet:
    """A new branch for ``base`` reading ``mask_channels`` label-map channels; the pair computes
    what ``base`` computes until the branch is trained."""
    if base.config.mid_block_type is None:
        raise ModelError("the ControlNet mask branch needs a UNet with a middle block (a preset with "
                         "mid_block_attention: true); use --mask-branch concat for this model")
    controlnet = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=EMBEDDING_CHANNELS,
                                           conditioning_channels=mask_channels)
    return MaskControlledUNet(base, controlnet)


def load_mask_branch(folder: Path) -> ControlNetModel:
    return ControlNetModel.from_pretrained(Path(folder) / CONTROLNET_DIR, low_cpu_mem_usage=False)

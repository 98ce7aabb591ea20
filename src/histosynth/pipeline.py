"""A model folder as a diffusers pipeline: :class:`HistosynthPipeline`.

A model folder (:mod:`histosynth.models.bundle`) holds diffusers sub-folders and a ``model_index.json``
that names this pipeline and its components, so diffusers loads it offline::

    from histosynth.pipeline import HistosynthPipeline

    pipe = HistosynthPipeline.from_pretrained("path/to/model")      # or .to("cuda")
    caption = "There is a lot of Glomeruli visible in the image."
    images = pipe(caption, num_inference_steps=50, guidance_scale=1.5, seed=0).images

Importing this module also makes the class known to diffusers, so that after it
``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads the same pipeline (diffusers looks the
``_class_name`` of ``model_index.json`` up in its own namespace, and imports the text encoder
component's module only when the caller has imported it).

Components: ``unet`` (the denoiser: UNet2DConditionModel, or :class:`histosynth.models.denoiser.DiTDenoiser`),
``autoencoder`` (AutoencoderKL or VQModel),
``scheduler`` (the DDPMScheduler of the training noise schedule; sampling makes its DDIM or
DPM-Solver++ from it), ``text_encoder`` (:class:`HistosynthTextEncoder`: the encoder
``histosynth.json`` names, the default from its package or a copy in ``text_encoder/``) and, for a
ControlNet mask branch, ``controlnet``. Sampling is histosynth's own
(:func:`histosynth.sample.generate.generate_batches`: caption rules, CompVis DDIM, guidance, the
latent-range clamp), so an image is the one ``histosynth generate`` writes: ``pipe(caption, seed=S,
num_images_per_prompt=n)`` gives the bytes of ``histosynth generate --caption CAPTION --seed S --n n``
on the same kind of device and thread count: item i's seed is derived from S and i, ``batch_size`` is
the command's ``--batch-size`` (8), and a batch holds at most the images asked for, as a job's.
Several prompts are the job of a captions file with those prompts (cycled); the images come back
prompt by prompt, as diffusers orders them. A mask-conditioned model also takes label masks,
``pipe(caption, mask=masks, seed=S)``: one image per mask, in the masks' order and of their size, the
bytes of ``histosynth generate --mask MASKS --caption CAPTION --seed S`` (several prompts cycle over the
masks, as ``--mask-captions`` gives each mask its own); without ``mask`` it samples as ``generate`` does
without ``--mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import diffusers
import numpy as np
import torch

# ModelMixin must be a name of this module: diffusers finds a custom component's load method by looking up
# its base classes' names (ModelMixin, SchedulerMixin, ...) in the component's module.
from diffusers import ControlNetModel, DDPMScheduler, DiffusionPipeline, ModelMixin
from diffusers.utils import BaseOutput, is_accelerate_available
from PIL import Image

from .api import conditioning_masks
from .captions import UNCONDITIONAL_CAPTION, canonical_caption
from .errors import ConfigError, ModelError
from .models.bundle import (
    CONFIG_FILE,
    MODEL_INDEX_FILE,
    PIPELINE_CLASS,
    Autoencoder,
    Bundle,
    bundle_of_parts,
    load_bundle_text_encoder,
    read_bundle_config,
    save_bundle,
)
from .models.control import MaskControlledUNet
from .models.denoiser import Denoiser
from .models.text import TextEncoder
from .sample.generate import DEFAULT_BATCH_SIZE, check_seeds, prepare_for_sampling
from .sample.jobs import job_in_memory

#: the seed of ``histosynth generate`` when none is given
DEFAULT_SEED = 0
OUTPUT_TYPES = ("pil", "np")


class HistosynthTextEncoder(ModelMixin):
    """The text encoder as a pipeline component: a histosynth :class:`~histosynth.models.text.TextEncoder`
    (its transformers model is a sub-module, so that ``pipe.to(device)`` moves it)."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model

    @classmethod
    def from_pretrained(cls, folder: str | Path, **loading_options: Any) -> "HistosynthTextEncoder":
        """The encoder of the model folder ``folder`` (or of its ``text_encoder/`` sub-folder, which diffusers
        passes when there is one), as its ``histosynth.json`` names it; diffusers' loading options (dtype,
        device map) do not apply: the encoder loads in float32 on the CPU."""
        folder = Path(folder)
        model_folder = folder if (folder / CONFIG_FILE).is_file() else folder.parent
        return cls(load_bundle_text_encoder(model_folder, read_bundle_config(model_folder)))

    def save_pretrained(self, folder: str | Path, **options: Any) -> None:
        """Write the encoder's model and tokenizer to ``folder``."""
        self.encoder.save_to(folder)


@dataclass
class HistosynthPipelineOutput(BaseOutput):
    """``images`` (PIL images, or a float array (N, H, W, 3) in [0, 1]) and one generation record each
    (caption, seed, steps, guidance, scheduler, model id, size), in prompt order."""

    images: Any
    records: list


class HistosynthPipeline(DiffusionPipeline):
    """Text- (and mask-) conditioned latent diffusion of a histosynth model folder; see the module docstring."""

    model_cpu_offload_seq = "text_encoder->unet->autoencoder"
    _optional_components = ["controlnet"]

    def __init__(self, unet: Denoiser, autoencoder: Autoencoder, scheduler: DDPMScheduler,
                 text_encoder: HistosynthTextEncoder, controlnet: Optional[ControlNetModel] = None):
        super().__init__()
        self.register_modules(unet=unet, autoencoder=autoencoder, scheduler=scheduler, text_encoder=text_encoder,
                              controlnet=controlnet)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **options: Any) -> "HistosynthPipeline":
        """Load a model folder (diffusers' options apply to the networks); a local folder that is not a
        histosynth model folder, or one saved without ``model_index.json``, is refused in one line."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            read_bundle_config(folder)
            if not (folder / MODEL_INDEX_FILE).is_file():
                raise ModelError(f"{folder} has no {MODEL_INDEX_FILE} (it was saved by an older histosynth); write "
                                 f"it with histosynth.models.bundle.write_model_index('{folder}')")
        if not is_accelerate_available():  # what diffusers falls back to, without its warning
            options.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(str(pretrained_model_name_or_path), **options)

    def save_pretrained(self, save_directory: str | Path, **options: Any) -> None:
        """Write the pipeline as a model folder (:func:`~histosynth.models.bundle.save_bundle`, atomically):
        its networks, the description of the folder it was loaded from, model_index.json and the card.
        Diffusers' saving options (variants, sharding, pushing to the hub) are refused."""
        if options:
            raise ConfigError(f"save_pretrained writes a histosynth model folder and takes no options; got "
                              f"{', '.join(sorted(options))}")
        bundle = self.bundle()
        config = bundle.config
        meta = {"image_size": config.image_size, "preset": config.preset, "unet_weights": config.unet_weights,
                "conditioning": config.conditioning.model_dump(), "latent_range": config.latent.range,
                "provenance": config.provenance}
        save_bundle(save_directory, bundle.unet, bundle.autoencoder, bundle.scheduler_config, bundle.text_encoder,
                    bundle.schema, meta)

    def bundle(self) -> Bundle:
        """The pipeline's networks with the description of the folder it was loaded from, on its device."""
        folder = self.name_or_path
        if not folder or not Path(folder).is_dir():
            raise ModelError("this pipeline knows no model folder; load it with HistosynthPipeline.from_pretrained")
        unet = self.unet if self.controlnet is None else MaskControlledUNet(self.unet, self.controlnet)
        device = self.device
        return bundle_of_parts(folder, unet, self.autoencoder, dict(self.scheduler.config), device,
                               text_encoder=self.text_encoder.encoder.to(device))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] = UNCONDITIONAL_CAPTION,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        *,
        mask: Any = None,
        mask_guidance_scale: Optional[float] = None,
        scheduler: Optional[str] = None,
        eta: Optional[float] = None,
        precision: Optional[str] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images of ``prompt`` (a caption in the schema's templates, or a list; "" is unconditional).

        ``mask`` (a mask-conditioned model): a label mask (array or PIL image of class ids, or a mask
        file), a folder of mask files, or a list of them; one image per mask (``num_images_per_prompt``
        stays 1), with ``mask_guidance_scale``. ``num_inference_steps``, ``guidance_scale``,
        ``mask_guidance_scale``, ``scheduler`` (ddim or dpm++), ``eta`` and ``precision`` default to the
        model's own sampling options. ``seed`` (or a ``generator``'s seed, its
        ``initial_seed()``; default 0) is the job seed of ``histosynth generate --seed``. ``output_type``:
        ``pil`` or ``np`` (float32 in [0, 1]). Returns a :class:`HistosynthPipelineOutput`, or a tuple
        (images, records) when ``return_dict`` is False.
        """
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output_type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ConfigError("num_images_per_prompt must be a whole number of at least 1, "
                              f"got {num_images_per_prompt!r}")
        bundle = self.bundle()
        prepare_for_sampling(bundle)
        options = bundle.sampling.overridden(steps=num_inference_steps, guidance=guidance_scale, scheduler=scheduler,
                                             eta=eta, precision=precision, mask_guidance=mask_guidance_scale)
        captions = [canonical_caption(p, bundle.schema) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        if not captions:
            raise ConfigError("give at least one prompt")
        masks = None if mask is None else conditioning_masks(mask, bundle.schema)
        if masks is not None and num_images_per_prompt != 1:
            raise ConfigError("with mask, one image is made per mask: leave num_images_per_prompt at 1 and give "
                              "each mask as often as images of it are wanted")
        job_seed = _job_seed(seed, generator)
        count = len(masks) if masks is not None else len(captions) * num_images_per_prompt
        images, records = [], []
        for _, part in job_in_memory(bundle, captions, None if masks is not None else count, job_seed, options,
                                     batch_size=batch_size, masks=masks):
            images.append(part.images)
            records += part.records
        # the job's order is caption i % k for item i; diffusers returns each prompt's images together
        order = list(range(count)) if masks is not None else [
            r * len(captions) + j for j in range(len(captions)) for r in range(num_images_per_prompt)]
        made = np.concatenate(images)[order]
        records = [records[i] for i in order]
        output = [Image.fromarray(image) for image in made] if output_type == "pil" else made.astype(np.float32) / 255
        if not return_dict:
            return output, records
        return HistosynthPipelineOutput(images=output, records=records)


def _job_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The job seed of a call: ``seed``, or the seed ``generator`` was made with, else the command's default."""
    if seed is not None and generator is not None:
        raise ConfigError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ConfigError("generator must be one torch.Generator (its seed is the job seed: image i gets the "
                              f"seed derived from it and i), got {type(generator).__name__}")
        seed = generator.initial_seed()
    seed = DEFAULT_SEED if seed is None else seed
    check_seeds([seed], "seed")
    return int(seed)


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` find the class that ``model_index.json`` names."""
    if getattr(diffusers, PIPELINE_CLASS, None) is None:
        setattr(diffusers, PIPELINE_CLASS, HistosynthPipeline)


_register_with_diffusers()

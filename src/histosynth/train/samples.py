"""Sample grids during training: a few of the dataset's conditions, drawn with the EMA weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch

from ..captions import UNCONDITIONAL_CAPTION
from ..data.torchdata import to_uint8
from ..io import write_png_atomic, write_text_atomic
from ..models.autoencoder import Autoencoder, decode_latents
from ..models.diffusion import sampling_scheduler
from ..models.label_maps import counts_to_shares, ids_from_label_map
from ..models.latent_range import LatentRange
from ..presets import Preset
from ..sample.generate import batch_conditions, denoise_seeds
from ..schema import ClassSchema
from .cache import TrainingData


class SampleGrids(L.Callback):
    """Every ``every`` steps, write ``samples/step-NNNNNNN.png``: one row of images, one per condition.

    A text model draws the dataset's most frequent captions. A mask-conditioned model draws the
    first training patches' label maps (with their captions, if it reads text too) and shows each
    map above its image, in the schema's colours. The initial noise is the same at every grid (fixed
    seeds), so successive grids show how the model changes, not the noise. The images are sampled as
    ``generate`` samples them, with the preset's sampling options (``steps`` fewer, for speed) and
    the default mask guidance; with ``latent_range`` sampling clamps into it, as the finished model's will.
    """

    def __init__(self, folder: Path, autoencoder: Autoencoder, data: TrainingData, every: int, preset: Preset,
                 schema: Optional[ClassSchema] = None, count: int = 4, steps: int = 25,
                 latent_range: Optional[LatentRange] = None):
        self.folder = Path(folder)
        self.latent_range = latent_range
        self.autoencoder = autoencoder
        self.every = every
        self.options = preset.sampling.to_options().overridden(steps=steps)
        self.diffusion = preset.diffusion
        self.schema = schema
        self.label_maps: Optional[torch.Tensor] = None
        if data.label_counts is not None:
            first = torch.arange(min(count, len(data)))
            self.rows = data.caption_rows[first]
            self.captions = [data.embeddings.captions[int(r)] for r in self.rows]
            self.label_maps = counts_to_shares(data.label_counts[first], data.label_factor)
            self.label_classes = data.label_classes
        else:
            ranked = Counter(data.embeddings.captions[int(r)] for r in data.caption_rows).most_common(count)
            self.captions = [caption for caption, _ in ranked]
            self.rows = data.embeddings.rows(self.captions)
        self.embeddings = data.embeddings
        self.latent_shape = tuple(data.latents.shape[2:])

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every == 0 and trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_png_atomic(self.folder / f"step-{step:07d}.png", self.grid(module))
            write_text_atomic(self.folder / "captions.txt", "\n\n".join(self.captions) + "\n")

    @torch.no_grad()
    def grid(self, module: L.LightningModule) -> np.ndarray:
        unet = module.averaged_unet().to(module.device).eval()
        device = module.device
        text = tuple(t.to(device) for t in self.embeddings.lookup(self.rows))
        unconditional = tuple(t.to(device) for t in self.embeddings.encode([UNCONDITIONAL_CAPTION]))
        label_maps = None if self.label_maps is None else self.label_maps.to(device)
        conditions = batch_conditions(text, unconditional, label_maps,
                                      all(c == UNCONDITIONAL_CAPTION for c in self.captions))
        latents = denoise_seeds(unet, sampling_scheduler(self.diffusion, self.options.scheduler),
                                range(len(self.captions)), self.latent_shape, conditions, self.options, device,
                                self.latent_range)
        images = to_uint8(decode_latents(self.autoencoder.to(device), latents))
        row = np.concatenate(list(images), axis=1)
        if self.label_maps is None or self.schema is None:
            return row
        return np.concatenate([self._mask_row(images.shape[1]), row], axis=0)

    def _mask_row(self, size: int) -> np.ndarray:
        """The conditioning label maps (most frequent class per latent pixel), coloured, at image size."""
        pictures = []
        for shares in self.label_maps:
            ids = ids_from_label_map(shares, self.label_classes)
            scale = size // ids.shape[0]
            pictures.append(self.schema.colorize(ids.repeat(scale, 0).repeat(scale, 1)))
        return np.concatenate(pictures, axis=1)

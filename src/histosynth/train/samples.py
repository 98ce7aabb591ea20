"""Sample grids during training: a few of the dataset's captions, drawn with the EMA weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ..data.torchdata import to_uint8
from ..io import write_png_atomic, write_text_atomic
from ..models.autoencoder import Autoencoder, decode_latents
from ..models.diffusion import sampling_scheduler
from ..presets import Preset
from ..sample.sampler import denoise
from .cache import TrainingData


class SampleGrids(L.Callback):
    """Every ``every`` steps, write ``samples/step-NNNNNNN.png``: one row of images, one per caption.

    The captions are the dataset's most frequent ones; the initial noise is the same at every grid
    (fixed seeds), so successive grids show how the model changes, not the noise.
    """

    def __init__(self, folder: Path, autoencoder: Autoencoder, data: TrainingData, every: int, preset: Preset,
                 count: int = 4, steps: int = 25):
        self.folder = Path(folder)
        self.autoencoder = autoencoder
        self.every = every
        self.guidance = preset.sampling.guidance
        self.diffusion = preset.diffusion
        self.steps = steps
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
        cond, cond_mask = (t.to(device) for t in self.embeddings.lookup(self.rows))
        uncond, uncond_mask = (t.to(device) for t in self.embeddings.encode([""]))
        noise = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(i))
                             for i in range(len(self.captions))]).to(device)
        latents = denoise(unet, sampling_scheduler(self.diffusion), noise, cond, uncond, self.steps, self.guidance,
                          cond_mask, uncond_mask)
        images = to_uint8(decode_latents(self.autoencoder.to(device), latents))
        return np.concatenate(list(images), axis=1)

"""Training sample grids draw their images as `generate` does: the same seeds, path and sampling options."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from histosynth.captions import GENERATING_CAPTION
from histosynth.models.text import MemoryEmbeddingCache
from histosynth.presets import Preset
from histosynth.sample.generate import generate
from histosynth.train.cache import TrainingData
from histosynth.train.samples import SampleGrids


def test_a_grid_image_is_the_image_generate_makes(tiny_bundle, tmp_path):
    encoder = tiny_bundle.text_encoder
    cache = MemoryEmbeddingCache(encoder.id)
    cache.add([GENERATING_CAPTION, ""], encoder, show_progress=False)
    data = TrainingData(latents=torch.zeros(2, 4, 3, 16, 16), caption_rows=torch.tensor([0, 0]),
                        patch_ids=["a", "b"], embeddings=cache)
    preset = Preset.from_dict(tiny_bundle.config.preset)
    grids = SampleGrids(tmp_path, tiny_bundle.autoencoder, data, every=1, preset=preset, count=1, steps=2)
    assert grids.options == tiny_bundle.sampling.overridden(steps=2)
    module = SimpleNamespace(averaged_unet=lambda: tiny_bundle.unet, device=torch.device("cpu"))
    row = grids.grid(module)
    made = generate(tiny_bundle, [GENERATING_CAPTION], [0], grids.options, batch_size=1).images[0]
    # the caption's context is padded differently (to its batch, not to the model's caption set)
    assert row.shape == made.shape and np.abs(row.astype(int) - made).max() <= 1

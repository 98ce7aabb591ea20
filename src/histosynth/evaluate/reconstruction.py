"""How well an autoencoder gives back held-out patches: PSNR, SSIM, and whether a classifier can tell its
reconstructions from the originals (the two-sample test of :mod:`.realism` on colour / texture features).

PSNR and SSIM are means over patches (each patch's own PSNR), as the README's autoencoder rows report
them. The two-sample AUC is 0.5 when the reconstructions keep every colour, gradient and spectral
statistic of the originals, and 1.0 when a blur (lost high-frequency power) gives each one away; no
diffusion model on the autoencoder's latents can look more real than its decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.dataset import open_dataset
from ..data.torchdata import to_model_range, to_uint8
from ..models.autoencoder import Autoencoder, decode_latents, encode_latents, psnr, ssim

#: patches per set below which no AUC is given (a 2-fold test needs two of each)
FEWEST_FOR_AUC = 2


@dataclass
class ReconstructionQuality:
    patches: int
    psnr_db: float
    ssim: float
    two_sample_auc: Optional[float]  # None below FEWEST_FOR_AUC patches

    def to_dict(self) -> dict:
        values = asdict(self)
        values.update(psnr_db=round(self.psnr_db, 2), ssim=round(self.ssim, 4))
        if self.two_sample_auc is not None:
            values["two_sample_auc"] = round(self.two_sample_auc, 3)
        return values


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The autoencoder's reconstructions (posterior mean / quantised latents) of images in [-1, 1]."""
    parts = [decode_latents(autoencoder, encode_latents(autoencoder, images[start:start + batch_size]))
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts)


def reconstruction_quality(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = 8, seed: int = 0,
                           bootstrap: int = 200) -> ReconstructionQuality:
    """PSNR / SSIM (means over patches) and the two-sample AUC of the reconstructions against ``images``."""
    from .realism import classifier_two_sample_test, colour_texture_features

    was_training = autoencoder.training
    autoencoder.eval()
    try:
        reconstructions = reconstruct(autoencoder, images, batch_size)
    finally:
        autoencoder.train(was_training)
    pairs = [(float(psnr(x[None], y[None])), float(ssim(x[None], y[None])))
             for x, y in zip(images, reconstructions, strict=True)]
    scores = np.asarray(pairs)
    auc = None
    if len(images) >= FEWEST_FOR_AUC:
        folds = min(5, len(images))
        auc = classifier_two_sample_test(colour_texture_features(to_uint8(images)),
                                         colour_texture_features(to_uint8(reconstructions)),
                                         folds=folds, seed=seed, bootstrap=bootstrap).auc
    return ReconstructionQuality(len(images), float(scores[:, 0].mean()), float(scores[:, 1].mean()), auc)


def held_out_images(dataset: str | Path, split: str = "val", count: int = 64) -> torch.Tensor:
    """The first ``count`` patches of a dataset's split, in [-1, 1] (what the autoencoder rows measure)."""
    patches = open_dataset(dataset)
    rows = patches.rows(split).head(count)
    return torch.stack([to_model_range(patches.image(row)) for _, row in rows.iterrows()])

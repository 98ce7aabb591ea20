"""The torch view of a patch dataset: images in [-1, 1], masks, captions, paired flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import PatchDataset, open_dataset


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounding to the nearest level."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class PatchTorchDataset(Dataset):
    """Items are dicts: image (3,H,W) float32 in [-1,1], mask (H,W) int64, caption str, index int.

    With `flips`, the image and mask are flipped together horizontally and vertically, each with
    p = 0.5. Flips are drawn from a generator seeded by (seed, epoch, index) so that a run is
    reproducible across worker counts; call `set_epoch` to vary them between epochs.
    """

    def __init__(self, dataset: PatchDataset | str | Path, split: str | None = "train",
                 flips: bool = True, seed: int = 0):
        self.dataset = dataset if isinstance(dataset, PatchDataset) else open_dataset(dataset)
        self.rows = self.dataset.rows(split)
        self.flips = flips
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.iloc[index]
        image = self.dataset.image(row)
        mask = self.dataset.mask(row)
        if self.flips:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            flip_h, flip_v = rng.random(2) < 0.5
            if flip_h:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if flip_v:
                image, mask = image[::-1], mask[::-1]
        return {
            "image": to_model_range(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
            "caption": row["caption"],
            "index": index,
        }

"""Label masks as a condition of the denoiser: label maps of class shares at latent resolution.

A label mask (H, W) of class ids becomes K channels at the latent grid (H/f, W/f), one per class of
the schema in ascending id order: the share of that class's pixels in each f x f block of the mask
(area downsampling of the one-hot mask). Compared with picking one pixel per block (nearest), the
shares keep structures thinner than a block and mark borders as mixtures; and since blocks tile the
mask exactly, flipping the mask and then downsampling equals downsampling and then flipping, so the
training cache stores one map per patch and flips it with its latent's flip variant.

A map is stored compactly as uint8 pixel counts per block (0 ... f*f) and turned into float shares
when it meets the network. The all-zero map is the dropped (unconditional) mask: no class anywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


def check_mask_grid(shape: Sequence[int], factor: int, source: str = "mask") -> None:
    """A mask's sides must be multiples of the latent factor (each latent pixel covers a whole block)."""
    height, width = shape[-2:]
    if height % factor or width % factor:
        fit = f"{width // factor * factor or factor}x{height // factor * factor or factor}"
        raise DataError(
            f"{source} is {width}x{height} px; a mask's sides must be multiples of {factor} (the model's "
            f"latent factor): crop or pad it, e.g. to {fit} px"
        )


def label_counts(masks: np.ndarray | torch.Tensor, class_ids: Sequence[int], factor: int) -> torch.Tensor:
    """(..., H, W) class ids -> uint8 (..., K, H/f, W/f): pixels of each class in each f x f block."""
    if factor * factor > 255:
        raise ValueError(f"a latent factor of {factor} does not fit pixel counts in uint8")
    masks = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    check_mask_grid(masks.shape, factor)
    *lead, height, width = masks.shape
    blocks = masks.reshape(*lead, height // factor, factor, width // factor, factor)
    counts = [(blocks == class_id).sum(dim=(-3, -1), dtype=torch.int16) for class_id in class_ids]
    return torch.stack(counts, dim=-3).to(torch.uint8)


def counts_to_shares(counts: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 pixel counts -> float32 class shares in [0, 1] (what the denoiser reads)."""
    return counts.float() / float(factor * factor)


def label_map(masks: np.ndarray | torch.Tensor, class_ids: Sequence[int], factor: int) -> torch.Tensor:
    """(..., H, W) class ids -> float32 (..., K, H/f, W/f) class shares per latent pixel."""
    return counts_to_shares(label_counts(masks, class_ids, factor), factor)


def ids_from_label_map(label_map: torch.Tensor, class_ids: Sequence[int]) -> np.ndarray:
    """The most frequent class of each latent pixel, as schema ids (K, h, w) -> uint8 (h, w)."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.uint8)
    return ids[label_map.argmax(dim=-3)].numpy()


def check_mask_ids(mask: np.ndarray, class_ids: Sequence[int], source: str = "mask") -> None:
    """Every id of the mask must be one of the model's label-map classes."""
    unknown = sorted(set(np.unique(mask).tolist()) - set(class_ids))
    if unknown:
        raise DataError(
            f"{source}: mask ids {unknown} are not classes of the model (ids {list(class_ids)}); "
            "use masks in the model's class schema"
        )

"""Patch-dataset rows as segmentation training pairs for a valid-padding U-Net.

The network sees 92 px of context around every pixel it predicts. A patch is therefore mirror-padded
by that context (as at prediction time) and the *label* window is what gets cropped: in training a
random `input_size - 184` px label window of the patch (plus its context), after random horizontal
and vertical flips; in evaluation the whole patch, in one window of the smallest size that covers it.
The first output pixel of a window always lines up with the first label pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..data.dataset import PatchDataset
from ..errors import ConfigError, DataError
from .geometry import context_pixels, cover_input_size, full_cover_plan, largest_valid_input, lost_pixels, output_size
from .predict import mirror_pad
from .segmenter import Segmenter


def default_input_size(patch_size: int, depth: int) -> int:
    """The largest valid input whose label window fits in a patch (428 px for 256 px patches)."""
    size = largest_valid_input(patch_size + lost_pixels(depth), depth)
    if size is None:
        raise ConfigError(f"{patch_size} px patches are too small for a valid-padding U-Net")
    return size


@dataclass(frozen=True)
class PatchRows:
    """Some rows of a patch dataset: one source of training or validation pairs."""

    dataset: PatchDataset
    rows: pd.DataFrame

    def __len__(self) -> int:
        return len(self.rows)


class SegmentationPairs(Dataset):
    """Items are dicts: image (3, H, W) float32 in [-1, 1], labels (h, w) int64 in the segmenter's
    label space (schema ids, or 0/1 for a binary segmenter)."""

    def __init__(self, source: PatchRows, segmenter: Segmenter, input_size: int | None = None,
                 augment: bool = True, seed: int = 0, foreground: float = 0.0):
        self.source = source
        self.segmenter = segmenter
        self.depth = segmenter.architecture.depth
        self.augment = augment
        self.seed = seed
        self.foreground = foreground
        self.epoch = 0
        segmenter.check_schema(source.dataset.schema, f"dataset {source.dataset.root}")
        patch = source.dataset.patch_size
        self.input_size = input_size or default_input_size(patch, self.depth)
        self.label_size = output_size(self.input_size, self.depth)
        if augment and self.label_size > patch:
            raise ConfigError(
                f"input size {self.input_size} px predicts {self.label_size} px, more than the "
                f"{patch} px patches of {source.dataset.root}; choose an input size of at most "
                f"{default_input_size(patch, self.depth)} px"
            )

    def set_epoch(self, epoch: int) -> None:
        """Vary the random crops and flips between epochs, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.source.rows.iloc[index]
        image = self.source.dataset.image(row)
        labels = self.segmenter.labels(self.source.dataset.mask(row))
        if image.shape[:2] != labels.shape:
            raise DataError(f"{row['image']}: image {image.shape[:2]} and mask {labels.shape} differ in size")
        if self.augment:
            window, target = self._random_pair(image, labels, np.random.default_rng((self.seed, self.epoch, index)))
        else:
            window, target = self._whole_pair(image, labels)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "labels": torch.from_numpy(np.ascontiguousarray(target)).long(),
        }

    def _random_pair(self, image: np.ndarray, labels: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        flip_h, flip_v = rng.random(2) < 0.5
        if flip_h:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if flip_v:
            image, labels = image[::-1], labels[::-1]
        size = self.label_size
        top, left = self._window_corner(labels, size, rng)
        context = context_pixels(self.depth)
        padded = np.pad(image, [(context, context), (context, context), (0, 0)], mode="reflect")
        window = padded[top:top + self.input_size, left:left + self.input_size]
        return window, labels[top:top + size, left:left + size]

    def _window_corner(self, labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
        """A random label window; with probability `foreground` one that holds a random pixel of a rare
        label of the patch (the class of a binary segmenter, else any label but the patch's commonest),
        as nnU-Net oversamples foreground: in small windows of few patches a rare class is otherwise
        almost never seen."""
        if self.foreground and rng.random() < self.foreground:
            pixels = np.flatnonzero(labels == self._rare_label(labels, rng))
            if len(pixels):
                y, x = np.unravel_index(pixels[rng.integers(len(pixels))], labels.shape)
                return (int(rng.integers(max(0, y - size + 1), min(y, labels.shape[0] - size) + 1)),
                        int(rng.integers(max(0, x - size + 1), min(x, labels.shape[1] - size) + 1)))
        return int(rng.integers(0, labels.shape[0] - size + 1)), int(rng.integers(0, labels.shape[1] - size + 1))

    def _rare_label(self, labels: np.ndarray, rng: np.random.Generator) -> int:
        if self.segmenter.binary:
            return 1
        present, counts = np.unique(labels, return_counts=True)
        rare = present[counts < counts.max()]
        return int(rng.choice(rare)) if len(rare) else -1

    def _whole_pair(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = (full_cover_plan(n, cover_input_size(n, self.depth), self.depth) for n in labels.shape)
        return mirror_pad(image, rows, cols), labels

"""Label masks to generate from: a user's mask files, or the masks of a patch dataset.

Each mask is a 2-D image of class ids (read with the model's schema, raw ids remapped) and is
generated into one image of its own size. Where it came from is kept with it (``source``) for the
generation records, and a digest of its ids identifies it in a job's manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import validation
from ..data.dataset import open_dataset
from ..data.images import with_numbered_subfolders
from ..data.masks import read_mask
from ..errors import ConfigError, DataError
from ..models.bundle import Bundle
from ..models.label_maps import check_mask_grid, check_mask_ids
from ..schema import ClassSchema
from .generate import image_latent_size, require_mask_conditioning
from .large import Size

#: files of a mask folder that are read as masks
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True, eq=False)
class ConditioningMask:
    """One label mask (H, W) of schema ids and where it came from (a file, or DATASET:patch_id)."""

    source: str
    mask: np.ndarray

    @property
    def digest(self) -> str:
        """A short hash of the mask's size and ids: the same mask from anywhere has the same digest."""
        digest = hashlib.sha256(np.asarray(self.mask.shape, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.mask, dtype=np.uint8).tobytes())
        return digest.hexdigest()[:16]

    @property
    def name(self) -> str:
        """The file stem of a mask file, or the patch id of a dataset's mask."""
        return Path(self.source.rsplit(":", 1)[-1]).stem

    @property
    def size(self) -> Size:
        return int(self.mask.shape[0]), int(self.mask.shape[1])


def read_masks(path: str | Path, schema: ClassSchema) -> list[ConditioningMask]:
    """The mask in a file, or every mask file of a folder and of its numbered sub-folders (a generation job's
    ``masks/``), sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = [p for folder in with_numbered_subfolders(path) for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix.lower() in MASK_SUFFIXES]
        if not files:
            raise DataError(f"{path} holds no mask files ({', '.join(MASK_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"mask file or folder {path} does not exist")
    return [ConditioningMask(str(file), read_mask(file, schema)) for file in files]


def dataset_masks(path: str | Path, split: Optional[str] = None) -> list[ConditioningMask]:
    """The masks of a patch dataset (one split, or all), in the dataset's order."""
    dataset = open_dataset(path)
    rows = dataset.rows(split)
    if len(rows) == 0:
        raise DataError(f"{dataset.root} has no {f'{split!r} ' if split else ''}patches to take masks from")
    return [ConditioningMask(f"{dataset.root}:{row['patch_id']}", dataset.mask(row)) for _, row in rows.iterrows()]


def choose_masks(masks: Sequence[ConditioningMask], n: Optional[int], seed: int) -> list[ConditioningMask]:
    """``n`` of the masks drawn with ``seed``, kept in their order (all for None)."""
    validation.seed(seed)
    if n is None:
        return list(masks)
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if n > len(masks):
        raise DataError(f"there are {len(masks)} masks but {n} were asked for; pass --n {len(masks)} or fewer")
    picked = np.random.default_rng(seed).choice(len(masks), size=n, replace=False)
    return [masks[i] for i in sorted(picked)]


def check_masks_fit(bundle: Bundle, masks: Sequence[ConditioningMask]) -> Size:
    """The common size of ``masks``, after checking that ``bundle`` can generate from each of them."""
    require_mask_conditioning(bundle)
    if not masks:
        raise DataError("no masks to generate from")
    sizes = {m.size for m in masks}
    if len(sizes) > 1:
        listing = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
        raise DataError(f"the masks have different sizes ({listing} px); generate each size as its own job")
    for item in masks:
        check_mask_ids(item.mask, bundle.mask_classes, item.source)
    check_mask_grid(masks[0].size, bundle.latent_factor, masks[0].source)
    try:
        image_latent_size(bundle, masks[0].size)
    except ConfigError as exc:
        raise ConfigError(f"{masks[0].source}: {exc}") from None
    return masks[0].size

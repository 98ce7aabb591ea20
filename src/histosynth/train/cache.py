"""Encode a patch dataset once, so that training runs neither the autoencoder nor the text encoder.

Latents: every training patch is encoded in its four flip variants (as is, horizontal, vertical,
both), because a trained autoencoder is not exactly flip-equivariant: flipping a latent is not the
latent of the flipped image. Training then picks a variant per item, which is the same augmentation
PathLDM applied to the image before encoding it on every step.

Label maps (mask conditioning): each patch's mask as uint8 pixel counts per class and latent pixel
(:mod:`histosynth.models.label_maps`), computed once per patch, not per flip: a label map, unlike a
latent, flips exactly, so a batch flips the stored map with the variant it draws for the latent.
Counts are a quarter of the bytes of float shares and turn into shares on the batch.

On disk, in the dataset's ``cache/`` folder (or one the user names)::

    latents/<autoencoder id>-<split>/index.json          what was encoded with what
    latents/<autoencoder id>-<split>/part-00000.safetensors   latents (n, 4, C, h, w) of 1024 patches
    labels/f<factor>-<classes>-<split>/part-00000.safetensors   label-map counts (n, K, h, w), uint8
    text/<encoder id>.safetensors                        caption embeddings (models.text.EmbeddingCache)

Parts are written atomically and one at a time, so a killed run resumes with the parts it lacks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..captions import UNCONDITIONAL_CAPTION
from ..data.dataset import PatchDataset, open_dataset
from ..data.torchdata import to_model_range
from ..errors import DataError
from ..io import atomic_path, write_json_atomic
from ..models.autoencoder import Autoencoder, downsampling_factor, encode_latents
from ..models.label_maps import label_counts
from ..models.latent_range import DEFAULT_QUANTILE, LatentRange, check_quantile
from ..models.text import EmbeddingCache, TextEncoder, cached_caption_embeddings, weights_digest
from ..terminal import progress_bar

FORMAT = "histosynth.latents/1"
LABELS_FORMAT = "histosynth.label-maps/1"
#: the flip variants of each patch, in storage order: (horizontal, vertical)
FLIP_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
PART_SIZE = 1024


def default_cache_dir(dataset: PatchDataset) -> Path:
    return dataset.root / "cache"


def autoencoder_id(autoencoder: Autoencoder) -> str:
    return f"{type(autoencoder).__name__}-{weights_digest(autoencoder)}"


def flip_variants(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H, W): the images under each flip of :data:`FLIP_VARIANTS`."""
    variants = []
    for horizontal, vertical in FLIP_VARIANTS:
        dims = [d for d, flip in ((-1, horizontal), (-2, vertical)) if flip]
        variants.append(images.flip(dims) if dims else images)
    return torch.stack(variants, dim=1)


def flip_each(maps: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
    """(B, ..., h, w) maps, each flipped by its own variant of :data:`FLIP_VARIANTS` (indices (B,))."""
    flipped = maps.clone()
    for variant, (horizontal, vertical) in enumerate(FLIP_VARIANTS):
        dims = [d for d, flip in ((-1, horizontal), (-2, vertical)) if flip]
        chosen = variants == variant
        if dims and chosen.any():
            flipped[chosen] = maps[chosen].flip(dims)
    return flipped


@dataclass
class TrainingData:
    """Everything a training step reads, in memory: latents, caption rows and their embeddings, and
    (for mask conditioning) the label maps of the patches."""

    latents: torch.Tensor  # (N, 4, C, h, w): flip variants of each patch
    caption_rows: torch.Tensor  # (N,): row of each patch's caption in ``embeddings``
    patch_ids: list[str]
    embeddings: EmbeddingCache
    label_counts: Optional[torch.Tensor] = None  # (N, K, h, w) uint8, unflipped (see models.label_maps)
    label_classes: tuple[int, ...] = ()
    label_factor: int = 1

    def __len__(self) -> int:
        return len(self.patch_ids)

    @property
    def empty_caption_row(self) -> int:
        return int(self.embeddings.rows([UNCONDITIONAL_CAPTION])[0])


def training_rows(dataset: PatchDataset, split: str = "train", need_captions: bool = True):
    rows = dataset.rows(split)
    if len(rows) == 0:
        raise DataError(f"{dataset.root} has no '{split}' patches to train on")
    if need_captions and (rows["caption"].str.strip() == "").all():
        raise DataError(
            f"{dataset.root}: none of its {len(rows)} '{split}' patches has a caption; caption them with "
            f"'histosynth caption --dataset {dataset.root}'"
        )
    return rows


def prepare_training_data(
    dataset: PatchDataset | str | Path,
    autoencoder: Autoencoder,
    text_encoder: TextEncoder,
    cache_dir: Optional[Path] = None,
    split: str = "train",
    batch_size: int = 4,
    show_progress: bool = True,
    *,
    text: bool = True,
    label_classes: Optional[Sequence[int]] = None,
) -> TrainingData:
    """Latents and caption embeddings of a dataset's split, from the cache, encoding what is missing.

    With ``label_classes`` (schema ids, one label-map channel each) the patches' label maps are
    cached too. Without ``text`` (a mask-only model) every patch reads the empty caption.
    """
    dataset = dataset if isinstance(dataset, PatchDataset) else open_dataset(dataset)
    rows = training_rows(dataset, split, need_captions=text)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(dataset)
    latents = cached_latents(dataset, rows, autoencoder, cache_dir / "latents", split, batch_size, show_progress)
    captions = rows["caption"].tolist() if text else [UNCONDITIONAL_CAPTION] * len(rows)
    embeddings = cached_caption_embeddings(cache_dir / "text", text_encoder, captions, show_progress=show_progress)
    data = TrainingData(latents, embeddings.rows(captions), rows["patch_id"].tolist(), embeddings)
    if label_classes is not None:
        factor = downsampling_factor(autoencoder)
        data.label_counts = cached_label_counts(dataset, rows, label_classes, factor, cache_dir / "labels", split,
                                                show_progress=show_progress)
        data.label_classes, data.label_factor = tuple(int(i) for i in label_classes), factor
    return data


def cached_latents(dataset: PatchDataset, rows, autoencoder: Autoencoder, folder: Path, split: str,
                   batch_size: int = 4, show_progress: bool = True) -> torch.Tensor:
    """(N, 4, C, h, w) latents of ``rows``, read from ``folder`` or encoded (and stored) part by part."""
    _check_patch_size(dataset, autoencoder)
    device = next(autoencoder.parameters()).device

    def encode(batch) -> torch.Tensor:
        images = torch.stack([to_model_range(dataset.image(row)) for _, row in batch.iterrows()])
        return encode_flip_variants(autoencoder, images.to(device)).cpu()

    index = {"format": FORMAT, "autoencoder": autoencoder_id(autoencoder), "split": split}
    return _cached_parts(folder / f"{autoencoder_id(autoencoder)}-{split}", index, rows, encode, "latents",
                         batch_size, show_progress)


def dataset_latent_range(dataset: PatchDataset | str | Path, autoencoder: Autoencoder,
                         quantile: float = DEFAULT_QUANTILE, split: str = "train", cache_dir: Optional[Path] = None,
                         show_progress: bool = True) -> LatentRange:
    """The per-channel range of a dataset split's latents (from the training cache, encoding what is missing)."""
    check_quantile(quantile)
    dataset = dataset if isinstance(dataset, PatchDataset) else open_dataset(dataset)
    rows = training_rows(dataset, split, need_captions=False)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(dataset)
    latents = cached_latents(dataset, rows, autoencoder, cache_dir / "latents", split, show_progress=show_progress)
    return LatentRange.of_latents(latents, quantile)


def cached_label_counts(dataset: PatchDataset, rows, class_ids: Sequence[int], factor: int, folder: Path,
                        split: str, batch_size: int = 64, show_progress: bool = True) -> torch.Tensor:
    """(N, K, h, w) uint8 label-map counts of ``rows``' masks (unflipped), cached like the latents.

    One map per patch serves all four flip variants: a flipped map is the map of the flipped mask
    (see :mod:`histosynth.models.label_maps`), so batches flip it with the latent's variant.
    """
    if dataset.patch_size % factor:
        raise DataError(f"{dataset.root}: {dataset.patch_size} px masks are not a multiple of the latent factor {factor}")
    classes = [int(i) for i in class_ids]

    def encode(batch) -> torch.Tensor:
        masks = np.stack([dataset.mask(row) for _, row in batch.iterrows()])
        return label_counts(masks, classes, factor)

    key = f"f{factor}-{_digest([str(i) for i in classes])[:8]}-{split}"
    index = {"format": LABELS_FORMAT, "classes": classes, "factor": factor, "split": split}
    return _cached_parts(folder / key, index, rows, encode, "label maps", batch_size, show_progress, name="counts")


def _cached_parts(folder: Path, index: dict, rows, encode: Callable[[Any], torch.Tensor], what: str,
                  batch_size: int, show_progress: bool, name: str = "latents") -> torch.Tensor:
    """One tensor per row of ``rows``, stored as tensor ``name`` in parts of :data:`PART_SIZE` rows; only
    missing parts are computed (``encode`` maps a slice of rows to a batch of tensors)."""
    patch_ids = rows["patch_id"].tolist()
    index = {**index, "patches": len(patch_ids), "patch_ids_sha256": _digest(patch_ids), "part_size": PART_SIZE}
    index_path = folder / "index.json"
    if index_path.is_file() and json.loads(index_path.read_text()) != index:
        for stale in folder.glob("part-*.safetensors"):  # the dataset changed since: start over
            stale.unlink()
    write_json_atomic(index_path, index)
    parts = [(start, min(start + PART_SIZE, len(patch_ids))) for start in range(0, len(patch_ids), PART_SIZE)]
    todo = [p for p in parts if not _part_path(folder, p[0]).is_file()]
    if todo:
        _fill_parts(folder, rows, todo, encode, what, name, batch_size, show_progress)
    return torch.cat([load_file(_part_path(folder, start))[name] for start, _ in parts])


def _fill_parts(folder: Path, rows, parts, encode, what: str, name: str, batch_size: int, show_progress: bool) -> None:
    total = sum(end - start for start, end in parts)
    with progress_bar(show_progress, transient=True) as progress:
        task = progress.add_task(f"encoding {what}", total=total)
        for start, end in parts:
            encoded = []
            for first in range(start, end, batch_size):
                batch = rows.iloc[first : min(first + batch_size, end)]
                encoded.append(encode(batch))
                progress.advance(task, len(batch))
            with atomic_path(_part_path(folder, start)) as tmp:
                save_file({name: torch.cat(encoded).contiguous()}, str(tmp))


@torch.no_grad()
def encode_flip_variants(autoencoder: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, 4, C, h, w) latents of their four flip variants."""
    variants = flip_variants(images)
    latents = encode_latents(autoencoder, variants.flatten(0, 1))
    return latents.unflatten(0, variants.shape[:2]).float()


def _check_patch_size(dataset: PatchDataset, autoencoder: Autoencoder) -> None:
    factor = downsampling_factor(autoencoder)
    if dataset.patch_size % factor:
        raise DataError(f"{dataset.root}: {dataset.patch_size} px patches are not a multiple of the "
                        f"autoencoder's factor {factor}")


def _part_path(folder: Path, start: int) -> Path:
    return folder / f"part-{start // PART_SIZE:05d}.safetensors"


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]

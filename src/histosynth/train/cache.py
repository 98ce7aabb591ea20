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

    latents/<autoencoder id>-<split>/index.json     what was encoded with what: dtype, row shape, count
    latents/<autoencoder id>-<split>/part-00000.npy     latents (n, 4, C, h, w) of 1024 patches
    labels/f<factor>-<classes>-<split>/part-00000.npy   label-map counts (n, K, h, w), uint8
    text/<encoder id>/                              caption embeddings, appended to (models.caption_store)

Latents are stored as bfloat16 unless the cache is built with another dtype (``histosynth cache
--dtype float32`` keeps the autoencoder's float32 exactly; float16 is the third choice): half the
bytes, and images decoded from them within a small fraction of a dB of the float32 ones. A cache
keeps the dtype it was built with until it is rebuilt with another. Parts are plain ``.npy`` files
from which training reads single rows (:mod:`histosynth.train.shards`): a process reads only the
rows of its batches, so its memory does not grow with the dataset.

Parts are written atomically and one at a time, so a killed run resumes with the parts it lacks.
Several processes (``torchrun``: :mod:`histosynth.train.ranks`) share the parts a cache lacks: rank
0 lists them, each process encodes every ``world_size``-th of them into its own part files, and
rank 0 writes the finished index once all are there. A part is encoded in the same batches whichever
process encodes it, so the parts are byte for byte those of one process (at the same batch size).
Data-loader workers read and decode the PNGs of the next batches while the autoencoder encodes one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..captions import UNCONDITIONAL_CAPTION
from ..data.dataset import PatchDataset, fraction_column, open_dataset
from ..data.torchdata import to_model_range
from ..errors import DataError
from ..io import remove_partial_files, write_json_atomic
from ..models.autoencoder import Autoencoder, downsampling_factor, encode_latents
from ..models.caption_store import CaptionStore
from ..models.label_maps import label_counts
from ..models.latent_range import DEFAULT_QUANTILE, LatentRange, check_quantile
from ..models.text import EmbeddingCache, TextEncoder, cached_caption_embeddings, weights_digest
from ..terminal import progress_bar
from .balance import repeat_factors
from .ranks import ONE_PROCESS, Ranks
from .shards import ShardedRows, latent_dtype_name, write_part

FORMAT = "histosynth.latents/2"
LABELS_FORMAT = "histosynth.label-maps/2"
#: how latents are stored unless the cache is built (or was built) with another dtype
DEFAULT_LATENT_DTYPE = "bfloat16"
#: the flip variants of each patch, in storage order: (horizontal, vertical)
FLIP_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
PART_SIZE = 1024
#: patches a data-loader batch of label maps holds (the maps are exact whatever the batch)
LABEL_BATCH = 64


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
    """Everything a training step reads: latents and label maps (on disk, read by the rows of a
    batch), caption rows and their embeddings (in memory: one row per unique caption)."""

    latents: ShardedRows  # (N, 4, C, h, w): flip variants of each patch
    caption_rows: torch.Tensor  # (N,): row of each patch's caption in ``embeddings``
    patch_ids: list[str]
    embeddings: EmbeddingCache
    label_counts: Optional[ShardedRows] = None  # (N, K, h, w) uint8, unflipped (see models.label_maps)
    label_classes: tuple[int, ...] = ()
    label_factor: int = 1
    repeat_factors: Optional[np.ndarray] = None  # (N,) float32: how often an epoch visits each patch

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
    latent_dtype: Optional[str] = None,
    workers: int = 0,
    ranks: Ranks = ONE_PROCESS,
    repeat_rare: Optional[float] = None,
) -> TrainingData:
    """Latents and caption embeddings of a dataset's split, from the cache, encoding what is missing.

    With ``label_classes`` (schema ids, one label-map channel each) the patches' label maps are
    cached too. Without ``text`` (a mask-only model) every patch reads the empty caption.
    ``latent_dtype`` (bfloat16, float16, float32) rebuilds a cache of another dtype; without it an
    existing cache is used as it is and a new one is bfloat16. The autoencoder encodes
    ``batch_size`` patches (x 4 flips) at a time, on its device; ``workers`` data-loader processes
    read the patches. With the ``ranks`` of several processes (each calls this), each encodes its
    share of the missing parts; rank 0 embeds the captions and the others read them from the cache.
    With ``repeat_rare`` the patches' repeat factors (:func:`~.balance.repeat_factors`) are computed from the
    manifest's class fractions.
    """
    dataset, rows, cache_dir = _training_split(dataset, split, text, cache_dir)
    latents = cached_latents(dataset, rows, autoencoder, cache_dir / "latents", split, batch_size, show_progress,
                             latent_dtype, workers=workers, ranks=ranks)
    captions = _captions(rows, text)
    embeddings = _caption_embeddings(cache_dir / "text", text_encoder, captions, show_progress, ranks, latent_dtype)
    data = TrainingData(latents, embeddings.rows(captions), rows["patch_id"].tolist(), embeddings)
    if label_classes is not None:
        factor = downsampling_factor(autoencoder)
        data.label_counts = cached_label_maps(dataset, rows, label_classes, factor, cache_dir / "labels", split,
                                              show_progress=show_progress, workers=workers, ranks=ranks)
        data.label_classes, data.label_factor = tuple(int(i) for i in label_classes), factor
    if repeat_rare is not None:
        data.repeat_factors = repeat_factors(class_fractions(dataset, rows), repeat_rare)
    return data


def class_fraction_columns(dataset: PatchDataset) -> list[str]:
    """The manifest's ``frac_<id>`` columns of the classes a caption may name (not the background: patches of
    rare background are not what repeat-factor sampling is for); a manifest without them is refused."""
    columns = [fraction_column(i) for i in dataset.schema.captioned_ids]
    missing = [c for c in columns if c not in dataset.manifest]
    if missing:
        raise DataError(f"{dataset.root}: its manifest lacks the class fractions {', '.join(missing)} that "
                        "--repeat-rare reads; tile the dataset again (histosynth tile writes them)")
    return columns


def class_fractions(dataset: PatchDataset, rows) -> np.ndarray:
    """(N, K) the rows' class fractions, one column per :func:`class_fraction_columns`."""
    return rows[class_fraction_columns(dataset)].to_numpy(dtype=np.float32)


def missing_from_cache(dataset: PatchDataset | str | Path, autoencoder: Autoencoder, text_encoder: TextEncoder,
                       cache_dir: Optional[Path] = None, split: str = "train", *, text: bool = True,
                       label_classes: Optional[Sequence[int]] = None) -> list[str]:
    """What :func:`prepare_training_data` (same arguments) would encode: none of ``latents``, ``label maps``
    and ``caption embeddings`` when the cache is complete. Nothing is encoded or written."""
    dataset, rows, cache_dir = _training_split(dataset, split, text, cache_dir)
    parts = _parts(len(rows))
    missing = []
    if _missing_parts(*_latent_cache(cache_dir / "latents", autoencoder, split, None, rows), parts):
        missing.append("latents")
    if label_classes is not None:
        factor = downsampling_factor(autoencoder)
        if _missing_parts(*_label_cache(cache_dir / "labels", label_classes, factor, split, rows), parts):
            missing.append("label maps")
    stored = CaptionStore.existing(cache_dir / "text", text_encoder.id)
    if stored is None or stored.missing([UNCONDITIONAL_CAPTION, *_captions(rows, text)]):
        missing.append("caption embeddings")
    return missing


def _training_split(dataset: PatchDataset | str | Path, split: str, text: bool, cache_dir: Optional[Path]):
    """The dataset, the rows of its split that training reads, and the folder of their cache."""
    dataset = dataset if isinstance(dataset, PatchDataset) else open_dataset(dataset)
    rows = training_rows(dataset, split, need_captions=text)
    return dataset, rows, Path(cache_dir) if cache_dir else default_cache_dir(dataset)


def _captions(rows, text: bool) -> list[str]:
    """Each row's caption, or the empty caption for all (a model that reads no text)."""
    return rows["caption"].tolist() if text else [UNCONDITIONAL_CAPTION] * len(rows)


def _caption_embeddings(folder: Path, encoder: TextEncoder, captions: list[str], show_progress: bool,
                        ranks: Ranks, dtype: Optional[str]) -> EmbeddingCache:
    """The captions' embedding store: rank 0 embeds what is missing, the other processes then read it."""
    if ranks.main:
        embeddings = cached_caption_embeddings(folder, encoder, captions, show_progress=show_progress, dtype=dtype)
    ranks.wait_for_all("for rank 0's caption embeddings")
    if not ranks.main:
        embeddings = cached_caption_embeddings(folder, encoder, captions, show_progress=False, dtype=dtype)
    return embeddings


def cached_latents(dataset: PatchDataset, rows, autoencoder: Autoencoder, folder: Path, split: str,
                   batch_size: int = 4, show_progress: bool = True, dtype: Optional[str] = None, *,
                   workers: int = 0, ranks: Ranks = ONE_PROCESS) -> ShardedRows:
    """(N, 4, C, h, w) latents of ``rows``, read from ``folder`` or encoded (and stored) part by part;
    stored as ``dtype``, or as an existing cache's dtype, or as :data:`DEFAULT_LATENT_DTYPE`."""
    _check_patch_size(dataset, autoencoder)
    device = next(autoencoder.parameters()).device

    def encode(images: torch.Tensor) -> torch.Tensor:
        return encode_flip_variants(autoencoder, images.to(device)).cpu()

    folder, index = _latent_cache(folder, autoencoder, split, dtype, rows)
    return _cached_parts(folder, index, PatchImages(dataset, rows), encode, "latents", batch_size, show_progress,
                         workers, ranks)


def _latent_cache(folder: Path, autoencoder: Autoencoder, split: str, dtype: Optional[str], rows
                  ) -> tuple[Path, dict]:
    """The folder of an autoencoder's latents of ``rows`` and the index they are stored under (see
    :func:`cached_latents` for the dtype)."""
    folder = folder / f"{autoencoder_id(autoencoder)}-{split}"
    stored = _read_index(folder)
    if dtype is not None:
        dtype = latent_dtype_name(dtype)
    elif stored.get("format") == FORMAT and stored.get("dtype") in ("bfloat16", "float16", "float32"):
        dtype = stored["dtype"]
    else:
        dtype = DEFAULT_LATENT_DTYPE
    index = {"format": FORMAT, "autoencoder": autoencoder_id(autoencoder), "split": split, "dtype": dtype}
    return folder, _rows_index(index, rows)


def dataset_latent_range(dataset: PatchDataset | str | Path, autoencoder: Autoencoder,
                         quantile: float = DEFAULT_QUANTILE, split: str = "train", cache_dir: Optional[Path] = None,
                         show_progress: bool = True) -> LatentRange:
    """The per-channel range of a dataset split's latents (from the training cache, encoding what is missing)."""
    check_quantile(quantile)
    dataset, rows, cache_dir = _training_split(dataset, split, False, cache_dir)
    latents = cached_latents(dataset, rows, autoencoder, cache_dir / "latents", split, show_progress=show_progress)
    return latent_range(latents, quantile)


def latent_range(latents: ShardedRows, quantile: float = DEFAULT_QUANTILE, chunk: int = 256) -> LatentRange:
    """:meth:`LatentRange.of_latents` of cached latents, reading only the latents it measures.

    The range of latents (N, 4, C, h, w) is measured on every k-th of their N * 4 flip variants (at
    most :data:`~histosynth.models.latent_range.MAX_VALUES_PER_CHANNEL` values per channel), the
    ones ``of_latents`` picks from a tensor of them all, so the result is the same. One channel at
    a time, read ``chunk`` latents at a time: memory holds one channel's values, not all of them.
    """
    from ..models.latent_range import MAX_VALUES_PER_CHANNEL

    check_quantile(quantile)
    count, variants, channels = latents.shape[0], latents.shape[1], latents.shape[2]
    pixels = int(np.prod(latents.shape[-2:]))
    step = -(-pixels * count * variants // MAX_VALUES_PER_CHANNEL)  # ceil, as of_latents
    chosen = np.arange(0, count * variants, step)
    values = np.empty(len(chosen) * pixels, np.float32)
    low, high = [], []
    for channel in range(channels):
        for first in range(0, len(chosen), chunk):
            picked = chosen[first : first + chunk]
            block = latents.read(picked // variants, picked % variants)[:, channel].float()
            values[first * pixels : (first + len(picked)) * pixels] = block.reshape(-1).numpy()
        bounds = np.quantile(values, [quantile, 1.0 - quantile], overwrite_input=True)
        low.append(float(bounds[0]))
        high.append(float(bounds[1]))
    latents.close()  # (the pages this scan mapped)
    return LatentRange(tuple(low), tuple(high), float(quantile))


def cached_label_maps(dataset: PatchDataset, rows, class_ids: Sequence[int], factor: int, folder: Path,
                      split: str, batch_size: int = LABEL_BATCH, show_progress: bool = True, *, workers: int = 0,
                      ranks: Ranks = ONE_PROCESS) -> ShardedRows:
    """(N, K, h, w) uint8 label-map counts of ``rows``' masks (unflipped), cached like the latents.

    One map per patch serves all four flip variants: a flipped map is the map of the flipped mask
    (see :mod:`histosynth.models.label_maps`), so batches flip it with the latent's variant.
    """
    if dataset.patch_size % factor:
        raise DataError(
            f"{dataset.root}: {dataset.patch_size} px masks are not a multiple of the latent factor {factor}")
    folder, index = _label_cache(folder, class_ids, factor, split, rows)
    maps = PatchLabelMaps(dataset, rows, index["classes"], factor)
    return _cached_parts(folder, index, maps, _as_computed, "label maps", batch_size, show_progress, workers, ranks)


def _label_cache(folder: Path, class_ids: Sequence[int], factor: int, split: str, rows) -> tuple[Path, dict]:
    """The folder of ``rows``' label maps of ``class_ids`` at latent ``factor`` and their index."""
    classes = [int(i) for i in class_ids]
    key = f"f{factor}-{_digest([str(i) for i in classes])[:8]}-{split}"
    index = {"format": LABELS_FORMAT, "classes": classes, "factor": factor, "split": split, "dtype": "uint8"}
    return folder / key, _rows_index(index, rows)


class _RowItems(torch.utils.data.Dataset):
    """What each of a dataset's ``rows`` is cached from, one item per row (read in data-loader workers)."""

    def __init__(self, dataset: PatchDataset, rows):
        self.dataset = dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.item(self.rows.iloc[i])

    def item(self, row) -> torch.Tensor:
        raise NotImplementedError


class PatchImages(_RowItems):
    """Each row's patch, (3, H, W) in the autoencoder's range [-1, 1]."""

    def item(self, row) -> torch.Tensor:
        return to_model_range(self.dataset.image(row))


class PatchLabelMaps(_RowItems):
    """Each row's label-map counts (K, h, w) of ``classes`` at latent ``factor``."""

    def __init__(self, dataset: PatchDataset, rows, classes: Sequence[int], factor: int):
        super().__init__(dataset, rows)
        self.classes = list(classes)
        self.factor = factor

    def item(self, row) -> torch.Tensor:
        return label_counts(self.dataset.mask(row), self.classes, self.factor)


def _as_computed(batch: torch.Tensor) -> torch.Tensor:
    return batch


def _rows_index(index: dict, rows) -> dict:
    """``index`` with what identifies the rows it caches: their count, a digest of their ids, the part size."""
    patch_ids = rows["patch_id"].tolist()
    return {**index, "patches": len(patch_ids), "patch_ids_sha256": _digest(patch_ids), "part_size": PART_SIZE}


def _parts(count: int) -> list[tuple[int, int]]:
    """(start, end) of the parts of ``count`` rows."""
    return [(start, min(start + PART_SIZE, count)) for start in range(0, count, PART_SIZE)]


def _cached_parts(folder: Path, index: dict, items: _RowItems, encode: Callable[[torch.Tensor], torch.Tensor],
                  what: str, batch_size: int, show_progress: bool, workers: int, ranks: Ranks) -> ShardedRows:
    """One array row per item of ``items``, stored as ``index["dtype"]`` in ``.npy`` parts of
    :data:`PART_SIZE` rows; only missing parts are computed (``encode`` maps a batch of items to a
    batch of rows), each process computing its share of them. The index gains the row shape once
    every part is there."""
    parts = _parts(len(items))
    todo = ranks.from_main(_start_parts(folder, index, parts) if ranks.main else None,
                           f"for the list of {what} parts to encode")
    if todo:
        _fill_parts(folder, ranks.share(todo), items, encode, what, index["dtype"], batch_size, workers,
                    show_progress and ranks.main)
    ranks.wait_for_all(f"for the {what} parts of the other processes")
    if ranks.main and "row_shape" not in _read_index(folder):
        row_shape = list(np.load(_part_path(folder, 0), mmap_mode="r").shape[1:])
        write_json_atomic(folder / "index.json", {**index, "row_shape": row_shape})
    ranks.wait_for_all(f"for rank 0 to finish the {what} index")
    return ShardedRows([_part_path(folder, start) for start, _ in parts], len(items), _read_index(folder)["row_shape"],
                       index["dtype"], PART_SIZE)


def _start_parts(folder: Path, index: dict, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ready ``folder`` for writing parts before any process writes one, and list the parts it lacks.

    Parts of another index (the dataset or the dtype changed since) are deleted, as are the
    temporaries of parts a killed run was writing; an unfinished cache's index lacks the row shape."""
    _refuse_old_format(folder)
    stored = _read_index(folder)
    if _stale(stored, index):
        for stale in folder.glob("part-*.npy"):
            stale.unlink()
    for start, _ in parts:
        remove_partial_files(_part_path(folder, start))
    todo = _missing_parts(folder, index, parts)
    if todo or "row_shape" not in stored:
        write_json_atomic(folder / "index.json", index)
    return todo


def _missing_parts(folder: Path, index: dict, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``parts`` that ``folder`` lacks for ``index`` (all of them when it holds another index's)."""
    if _stale(_read_index(folder), index):
        return list(parts)
    return [part for part in parts if not _part_path(folder, part[0]).is_file()]


def _stale(stored: dict, index: dict) -> bool:
    return bool(stored) and {k: stored.get(k) for k in index} != index


def open_cache_folder(folder: Path) -> ShardedRows:
    """The rows of a finished cache folder (latents or label maps), as its index describes them."""
    index = _read_index(Path(folder))
    if "row_shape" not in index:
        raise DataError(f"{folder} is not a finished cache folder (its index.json lacks the row shape); "
                        "run 'histosynth cache' to finish it")
    parts = range(0, index["patches"], index["part_size"])
    return ShardedRows([Path(folder) / f"part-{k:05d}.npy" for k in range(len(parts))], index["patches"],
                       index["row_shape"], index["dtype"], index["part_size"])


def _read_index(folder: Path) -> dict:
    path = folder / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _refuse_old_format(folder: Path) -> None:
    """Caches of format 1 (safetensors parts, loaded whole) are not read: they are rebuilt on request."""
    if any(folder.glob("part-*.safetensors")):
        raise DataError(f"{folder} is a cache of an older format (whole-file safetensors parts); delete that folder "
                        "and run 'histosynth cache' again to rebuild it as parts read row by row")


def _fill_parts(folder: Path, parts: list[tuple[int, int]], items: _RowItems, encode, what: str, dtype: str,
                batch_size: int, workers: int, show_progress: bool) -> None:
    """Compute and write ``parts``, batch by batch: a part's batches are the same whichever process
    computes it, and ``workers`` processes load the items of the next batches meanwhile."""
    batches, completes = [], []  # the rows of each batch; the part that batch completes (None: none)
    for start, end in parts:
        firsts = range(start, end, batch_size)
        batches += [list(range(first, min(first + batch_size, end))) for first in firsts]
        completes += [None] * (len(firsts) - 1) + [start]
    loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers)
    encoded: list[torch.Tensor] = []
    with progress_bar(show_progress, transient=True) as progress:
        task = progress.add_task(f"encoding {what}", total=sum(end - start for start, end in parts))
        for part, batch in zip(completes, loader, strict=True):
            encoded.append(encode(batch))
            progress.advance(task, len(batch))
            if part is not None:
                write_part(_part_path(folder, part), torch.cat(encoded), dtype)
                encoded = []


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
    return folder / f"part-{start // PART_SIZE:05d}.npy"


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]

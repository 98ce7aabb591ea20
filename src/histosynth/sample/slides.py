"""Synthetic slides: one caption (and, for a mask-conditioned model, a label-map slide), any size,
streamed to a pyramidal tiled TIFF.

Two modes:

* ``stitched`` - the thesis' synthetic slide: independent patches of the model's size side by side
  in a grid (patch i of the grid, counted row by row, has the seed ``item_seed(seed, i)``). Cheap,
  and every patch is an ordinary sample, but neighbouring patches do not agree at their borders.
* ``seamless`` - the whole slide is one image: its latent is denoised in overlapping windows blended
  at every step and decoded in blended tiles (:mod:`histosynth.sample.large`; seed
  ``item_seed(seed, 0)``). Structures continue across what would be patch borders.

Either way the image goes to :func:`histosynth.data.pyramid.write_pyramid_tiff` one band of rows
at a time (JPEG q90, 256 px tiles, exact 2x levels, mpp in the resolution tags, BigTIFF when large),
so the decoded slide is never whole in memory. On the way, a :class:`~histosynth.sample.large.SeamMeter`
measures the seams on the model's patch grid. The record of the slide (caption, seed, sampling
options, model id, mode, seam score) is written beside it as JSON, not inside the TIFF.

Paired slides: given a label-mask slide (level 0 read whole, class ids of the model's schema), a
mask-conditioned model generates a seamless slide of the mask's size that follows it. The mask's
label map at latent resolution is cropped with the latent for every window of every step, and the
mask is written beside the slide as ``<name>-mask.tif`` (a pyramid with nearest-neighbour levels),
so the two form a training pair at slide scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from .. import validation
from ..data.pyramid import TileSource, write_pyramid_tiff
from ..data.slides import open_mask_slide
from ..errors import ConfigError, JobError
from ..io import remove_partial_files, write_json_atomic
from ..models.bundle import Bundle
from ..models.label_maps import check_mask_grid, check_mask_ids, label_map
from .generate import (
    DEFAULT_BATCH_SIZE,
    CaptionEmbeddings,
    SamplingOptions,
    check_fits_in_memory,
    generate_batches,
    generation_record,
    image_latent_size,
    latent_geometry,
    require_mask_conditioning,
    sample_latents,
    sampling_options,
)
from .jobs import item_seed
from .large import DEFAULT_WINDOW_BATCH, SeamMeter, Size, as_size, decode_bands, decode_tile, window_overlap

MODES = ("stitched", "seamless")
#: rows of latent pixels turned into label maps at a time (bounds the memory of the per-class comparison
#: masks each band is counted with)
LABEL_MAP_BAND = 64

#: called with (what is being done, units done, units in all)
PhaseProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SlideReport:
    """What :func:`synth_slide` wrote."""

    path: Path
    record_path: Path
    size: Size
    mode: str
    patch_size: int
    seam_score: float
    seconds: float
    mask_path: Optional[Path] = None

    def summary(self) -> str:
        mask = f" and its label mask {self.mask_path}" if self.mask_path else ""
        return (f"wrote {self.path}{mask} ({self.size[1]} x {self.size[0]} px, {self.mode}) in {self.seconds:.1f} s; "
                f"seam score {self.seam_score:.3f} (gradient energy on the {self.patch_size} px patch grid vs "
                "elsewhere; 1 = no seams)")


def synth_slide(
    bundle: Bundle,
    caption: str,
    size: Optional[int | Size],
    out: str | Path,
    mode: str = "seamless",
    mpp: Optional[float] = 0.5,
    seed: int = 0,
    options: Optional[SamplingOptions] = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    overlap: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[PhaseProgress] = None,
    mask_slide: Optional[str | Path] = None,
) -> SlideReport:
    """Generate a synthetic slide of ``caption`` and write it to ``out`` (pyramidal TIFF) plus its record.

    ``caption`` must be canonical (see :func:`histosynth.captions.canonical_caption`). With
    ``mask_slide`` (seamless mode, a mask-conditioned model) the slide has the mask's size and
    follows it, ``size`` may be None, ``mpp`` None takes the mask slide's (else 0.5), and the mask
    is written beside the slide (:func:`mask_path_for`). ``options`` default to the model's own.
    Every option is checked before any work.
    """
    options = sampling_options(bundle, options)
    out = Path(out)
    record_path = out.with_suffix(".json")
    check_slide_mode(mode)
    validation.seed(seed)
    if mpp is not None:
        check_mpp(mpp)
    mask_out = mask_path_for(out) if mask_slide is not None else None
    existing = [p for p in (out, record_path, mask_out) if p is not None and p.exists()]
    if existing and not overwrite:
        raise JobError(f"{existing[0]} exists; choose another output path or allow overwriting")
    mask, label_maps = None, None
    if mask_slide is not None:
        if mode != "seamless":
            raise ConfigError("a slide that follows a mask slide is generated seamless; use the seamless mode")
        mask, mask_mpp = read_mask_slide(mask_slide, bundle)
        if size is not None and as_size(size) != mask.shape:
            raise ConfigError(f"the slide takes the size of its mask slide ({mask.shape[1]}x{mask.shape[0]} px); "
                              "leave out the size")
        size, mpp = mask.shape, mpp or mask_mpp or 0.5
        label_maps = slide_label_map(mask, bundle)
    if size is None:
        raise ConfigError("give the slide's size (or a mask slide to take it from)")
    mpp = 0.5 if mpp is None else mpp
    check_mpp(mpp)
    size = as_size(size)
    image_latent_size(bundle, size)  # refuses sizes the model cannot make, before any work
    window_overlap(latent_geometry(bundle)[2], overlap)
    for name, value in (("batch size", batch_size), ("window batch", window_batch)):
        if value < 1:
            raise ConfigError(f"the {name} must be at least 1, got {value}")
    if mode == "seamless":  # the latent is whole, the image streams out in bands
        check_fits_in_memory(bundle, size, whole_image=False)
    remove_partial_files(record_path)  # the slide's and mask's temporaries go as they are written again
    started = time.perf_counter()
    embeddings = CaptionEmbeddings.for_bundle(bundle, [caption])
    if mode == "stitched":
        bands = stitched_bands(bundle, caption, size, seed, options, embeddings, batch_size, progress)
    else:
        bands = seamless_bands(bundle, caption, size, seed, options, embeddings, window_batch, overlap, progress,
                               label_maps=label_maps)
    meter = SeamMeter(bundle.image_size)
    write_pyramid_tiff(out, TileSource.from_bands(size[0], size[1], _measured(bands, meter)), mpp)
    if mask is not None:
        write_pyramid_tiff(mask_out, mask, mpp, is_mask=True)
    seconds = time.perf_counter() - started
    item = item_seed(seed, 0) if mode == "seamless" else None
    record: dict[str, Any] = {
        **generation_record(caption, seed, options, bundle.id, size),
        "mode": mode,
        "mpp": mpp,
        "patch_size": bundle.image_size,
        "seam_score": meter.score if math.isfinite(meter.score) else None,
        "seconds": round(seconds, 3),
    }
    if item is not None:
        record["item_seed"] = item
    if mask is not None:
        record.update(mask_slide=str(mask_slide), mask=mask_out.name, mask_guidance=options.mask_guidance)
    write_json_atomic(record_path, record)
    return SlideReport(out, record_path, size, mode, bundle.image_size, meter.score, seconds, mask_out)


def mask_path_for(out: Path) -> Path:
    """Where the label mask of a paired slide goes: ``<name>-mask.tif`` beside ``<name>.tif``."""
    return out.with_name(f"{out.stem}-mask{out.suffix or '.tif'}")


def read_mask_slide(path: str | Path, bundle: Bundle) -> tuple[np.ndarray, Optional[float]]:
    """Level 0 of a label-mask slide in the model's schema (checked to fit the model), and its mpp."""
    require_mask_conditioning(bundle)
    with open_mask_slide(path, bundle.schema) as slide:
        mask, mpp = slide.read_level(0), slide.mpp
    check_mask_ids(mask, bundle.mask_classes, str(path))
    check_mask_grid(mask.shape, bundle.latent_factor, f"mask slide {path}")
    return mask, mpp


def slide_label_map(mask: np.ndarray, bundle: Bundle) -> torch.Tensor:
    """The (1, K, h, w) label map of a whole mask slide, made a band of rows at a time."""
    factor = bundle.latent_factor
    rows = LABEL_MAP_BAND * factor
    bands = [label_map(mask[top:top + rows], bundle.mask_classes, factor) for top in range(0, mask.shape[0], rows)]
    return torch.cat(bands, dim=-2)[None]


def check_mpp(mpp: float) -> None:
    validation.positive_float(mpp, "--mpp")


def check_slide_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown slide mode {mode!r}; use one of {', '.join(MODES)}")


def _measured(bands: Iterable[np.ndarray], meter: SeamMeter) -> Iterator[np.ndarray]:
    for band in bands:
        meter.update(band)
        yield band


def stitched_bands(bundle: Bundle, caption: str, size: Size, seed: int, options: SamplingOptions,
                   embeddings: CaptionEmbeddings, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: Optional[PhaseProgress] = None) -> Iterator[np.ndarray]:
    """Rows of independent patches, cropped to ``size`` at the right and bottom edges."""
    patch = bundle.image_size
    rows, cols = math.ceil(size[0] / patch), math.ceil(size[1] / patch)
    seeds = [item_seed(seed, index) for index in range(rows * cols)]
    batches = generate_batches(bundle, [caption] * len(seeds), seeds, options,
                               batch_size=min(batch_size, len(seeds)), embeddings=embeddings)
    row_patches: list[np.ndarray] = []
    done = 0
    for batch in batches:
        row_patches += list(batch.images)
        done += len(batch.images)
        if progress is not None:
            progress("patches", done, len(seeds))
        while len(row_patches) >= cols:
            top = (done - len(row_patches)) // cols * patch
            band = np.concatenate(row_patches[:cols], axis=1)
            del row_patches[:cols]
            yield band[:min(patch, size[0] - top), :size[1]]


def seamless_bands(bundle: Bundle, caption: str, size: Size, seed: int, options: SamplingOptions,
                   embeddings: CaptionEmbeddings, window_batch: int = DEFAULT_WINDOW_BATCH,
                   overlap: Optional[int] = None, progress: Optional[PhaseProgress] = None,
                   label_maps: Optional[torch.Tensor] = None) -> Iterator[np.ndarray]:
    """The bands of one image of ``size`` denoised in blended windows, decoded in blended tiles.

    ``label_maps`` (1, K, h, w) condition a mask-conditioned model over the whole latent.
    """
    steps = None if progress is None else (lambda done, total: progress("denoising steps", done, total))
    latents = sample_latents(bundle, [caption], [item_seed(seed, 0)], options, embeddings, size,
                             window_batch, overlap, progress=steps, label_maps=label_maps)
    strips = None if progress is None else (lambda done, total: progress("decoding strips", done, total))
    _, _, window = latent_geometry(bundle)
    yield from decode_bands(bundle.autoencoder, latents, tile=decode_tile(window), progress=strips,
                            precision=options.precision)

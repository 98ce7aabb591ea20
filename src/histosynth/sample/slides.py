"""Synthetic slides: one caption, any size, streamed to a pyramidal tiled TIFF.

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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from ..data.pyramid import TileSource, write_pyramid_tiff
from ..errors import ConfigError, JobError
from ..io import write_json_atomic
from ..models.bundle import Bundle
from .generate import (
    DEFAULT_BATCH_SIZE,
    CaptionEmbeddings,
    SamplingOptions,
    generate_batches,
    generation_record,
    image_latent_size,
    latent_geometry,
    sample_latents,
)
from .jobs import item_seed
from .large import DEFAULT_WINDOW_BATCH, SeamMeter, Size, as_size, decode_bands, decode_tile

MODES = ("stitched", "seamless")

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

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.size[1]} x {self.size[0]} px, {self.mode}) in {self.seconds:.1f} s; "
                f"seam score {self.seam_score:.3f} (gradient energy on the {self.patch_size} px patch grid vs elsewhere; "
                "1 = no seams)")


def synth_slide(
    bundle: Bundle,
    caption: str,
    size: int | Size,
    out: str | Path,
    mode: str = "seamless",
    mpp: float = 0.5,
    seed: int = 0,
    options: SamplingOptions = SamplingOptions(),
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    overlap: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[PhaseProgress] = None,
) -> SlideReport:
    """Generate a synthetic slide of ``caption`` and write it to ``out`` (pyramidal TIFF) plus its record.

    ``caption`` must be canonical (see :func:`histosynth.sample.generate.canonical_caption`).
    """
    out = Path(out)
    record_path = out.with_suffix(".json")
    check_slide_mode(mode)
    existing = [p for p in (out, record_path) if p.exists()]
    if existing and not overwrite:
        raise JobError(f"{existing[0]} exists; choose another output path or allow overwriting")
    if not mpp or mpp <= 0:
        raise ConfigError(f"microns per pixel must be positive, got {mpp}")
    size = as_size(size)
    image_latent_size(bundle, size)  # refuses sizes the model cannot make, before any work
    started = time.perf_counter()
    embeddings = CaptionEmbeddings.for_bundle(bundle, [caption])
    if mode == "stitched":
        bands = stitched_bands(bundle, caption, size, seed, options, embeddings, batch_size, progress)
    else:
        bands = seamless_bands(bundle, caption, size, seed, options, embeddings, window_batch, overlap, progress)
    meter = SeamMeter(bundle.image_size)
    write_pyramid_tiff(out, TileSource.from_bands(size[0], size[1], _measured(bands, meter)), mpp)
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
    write_json_atomic(record_path, record)
    return SlideReport(out, record_path, size, mode, bundle.image_size, meter.score, seconds)


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
    batches = generate_batches(bundle, [caption] * len(seeds), seeds, options.steps, options.guidance,
                               options.scheduler, batch_size=min(batch_size, len(seeds)), embeddings=embeddings)
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
                   overlap: Optional[int] = None, progress: Optional[PhaseProgress] = None) -> Iterator[np.ndarray]:
    """The bands of one image of ``size`` denoised in blended windows, decoded in blended tiles."""
    steps = None if progress is None else (lambda done, total: progress("denoising steps", done, total))
    latents = sample_latents(bundle, [caption], [item_seed(seed, 0)], options, embeddings, size,
                             window_batch, overlap, progress=steps)
    strips = None if progress is None else (lambda done, total: progress("decoding strips", done, total))
    _, _, window = latent_geometry(bundle)
    yield from decode_bands(bundle.autoencoder, latents, tile=decode_tile(window), progress=strips)

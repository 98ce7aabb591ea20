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

A seamless slide's latent is kept in host memory, or on disk beyond a size, never whole on the
device (:mod:`histosynth.sample.seamless`); under torchrun the processes share each step's windows
and write the slide one process would (rank 0 writes it).

Paired slides: given a label-mask slide (class ids of the model's schema, level 0 read a band of
rows at a time), a mask-conditioned model generates a seamless slide of the mask's size that
follows it. The mask's label map at latent resolution is kept beside the latent and cropped with it
for every window of every step, and the mask is written beside the slide as ``<name>-mask.tif`` (a
pyramid with nearest-neighbour levels), so the two form a training pair at slide scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from .. import validation
from ..data.pyramid import TileSource, write_pyramid_tiff
from ..data.slides import open_mask_slide
from ..errors import ConfigError, JobError
from ..io import remove_partial_files, remove_scratch_folders, write_json_atomic
from ..models.bundle import Bundle
from ..models.label_maps import check_mask_grid
from ..train.ranks import ONE_PROCESS, Ranks
from .generate import (
    DEFAULT_BATCH_SIZE,
    CaptionEmbeddings,
    SamplingOptions,
    batch_label_maps,
    bundle_scheduler,
    generate_batches,
    generation_record,
    image_latent_size,
    latent_geometry,
    require_mask_conditioning,
    sampling_options,
)
from .jobs import item_seed
from .large import (
    DEFAULT_WINDOW_BATCH,
    SeamMeter,
    Size,
    WindowGrid,
    as_size,
    decode_row_bands,
    decode_tile,
    window_overlap,
)
from .seamless import (
    SCRATCH_KIND,
    SlideDenoiser,
    SlideStore,
    check_store_fits,
    choose_store,
    latent_rows,
    scheduler_history,
    slide_store,
    store_bytes,
    store_label_counts,
)

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
    latent_store: str = "auto",
    ranks: Ranks = ONE_PROCESS,
) -> Optional[SlideReport]:
    """Generate a synthetic slide of ``caption`` and write it to ``out`` (pyramidal TIFF) plus its record.

    ``caption`` must be canonical (see :func:`histosynth.captions.canonical_caption`). With
    ``mask_slide`` (seamless mode, a mask-conditioned model) the slide has the mask's size and
    follows it, ``size`` may be None, ``mpp`` None takes the mask slide's (else 0.5), and the mask
    is written beside the slide (:func:`mask_path_for`). ``options`` default to the model's own.
    ``latent_store`` (seamless mode) keeps the latent on the ``device``, in ``host`` memory or on
    ``disk`` (``auto``: see :func:`histosynth.sample.seamless.choose_store`); the slide is the same
    either way. With several ``ranks`` (torchrun) every process calls this, they share the work of a
    seamless slide and rank 0 writes it (the others return None). Every option is checked before any work.
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
    if mode != "seamless" and ranks.distributed:
        raise ConfigError("a stitched slide is made by one process; use --mode seamless under torchrun")
    if mask_slide is not None:
        if mode != "seamless":
            raise ConfigError("a slide that follows a mask slide is generated seamless; use the seamless mode")
        mask_size, mask_mpp = mask_slide_geometry(mask_slide, bundle)
        if size is not None and as_size(size) != mask_size:
            raise ConfigError(f"the slide takes the size of its mask slide ({mask_size[1]}x{mask_size[0]} px); "
                              "leave out the size")
        size, mpp = mask_size, mpp or mask_mpp or 0.5
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
    store_kind = seamless_store(bundle, size, options, latent_store, out) if mode == "seamless" else None
    if ranks.main:  # the slide's and mask's temporaries go as they are written again
        remove_partial_files(record_path)
        remove_scratch_folders(out, SCRATCH_KIND)
    ranks.wait_for_all("for the others to start the slide")
    started = time.perf_counter()
    embeddings = CaptionEmbeddings.for_bundle(bundle, [caption])
    meter = SeamMeter(bundle.image_size)
    if mode == "stitched":
        bands = stitched_bands(bundle, caption, size, seed, options, embeddings, batch_size, progress)
        write_pyramid_tiff(out, TileSource.from_bands(size[0], size[1], _measured(bands, meter)), mpp)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)  # the disk store's scratch folder goes beside the slide
        with slide_store(store_kind, bundle.device, out) as kept:
            denoise_slide(bundle, kept, caption, size, seed, options, embeddings, window_batch, overlap, progress,
                          mask_slide, ranks)
            if not ranks.main:
                return None
            bands = decoded_bands(bundle, kept, size, options, progress)
            write_pyramid_tiff(out, TileSource.from_bands(size[0], size[1], _measured(bands, meter)), mpp)
    if mask_slide is not None:
        write_mask_pyramid(mask_slide, bundle, mask_out, size, mpp)
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
    if mask_slide is not None:
        record.update(mask_slide=str(mask_slide), mask=mask_out.name, mask_guidance=options.mask_guidance)
    write_json_atomic(record_path, record)
    return SlideReport(out, record_path, size, mode, bundle.image_size, meter.score, seconds, mask_out)


def mask_path_for(out: Path) -> Path:
    """Where the label mask of a paired slide goes: ``<name>-mask.tif`` beside ``<name>.tif``."""
    return out.with_name(f"{out.stem}-mask{out.suffix or '.tif'}")


def mask_slide_geometry(path: str | Path, bundle: Bundle) -> tuple[Size, Optional[float]]:
    """(height, width) of level 0 of a label-mask slide (checked to fit the model's latent grid) and its mpp.

    Its ids are checked as it is read, a band at a time (see
    :func:`histosynth.sample.seamless.store_label_counts`)."""
    require_mask_conditioning(bundle)
    with open_mask_slide(path, bundle.schema) as slide:
        (width, height), mpp = slide.dimensions, slide.mpp
    check_mask_grid((height, width), bundle.latent_factor, f"mask slide {path}")
    return (height, width), mpp


def write_mask_pyramid(path: str | Path, bundle: Bundle, out: Path, size: Size, mpp: float) -> None:
    """Write level 0 of a label-mask slide again as the slide's mask pyramid, read a band at a time."""
    with open_mask_slide(path, bundle.schema) as slide:
        source = TileSource(size[0], size[1], lambda x, y, width, height: slide.read_region(x, y, 0, width, height))
        write_pyramid_tiff(out, source, mpp, is_mask=True)


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


def seamless_store(bundle: Bundle, size: Size, options: SamplingOptions, kind: str, out: Path) -> str:
    """Where a seamless slide's latent is kept (``kind``, or ``auto``'s choice), refused where it does not fit."""
    latent = image_latent_size(bundle, size)
    history = scheduler_history(bundle_scheduler(bundle, options.scheduler))
    need = store_bytes(latent, bundle.latent_channels, bundle.mask_channels, history)
    kind = choose_store(kind, need)
    check_store_fits(kind, need, size, bundle.device, out.parent)
    return kind


def denoise_slide(bundle: Bundle, store: SlideStore, caption: str, size: Size, seed: int, options: SamplingOptions,
                  embeddings: CaptionEmbeddings, window_batch: int = DEFAULT_WINDOW_BATCH,
                  overlap: Optional[int] = None, progress: Optional[PhaseProgress] = None,
                  mask_slide: Optional[str | Path] = None, ranks: Ranks = ONE_PROCESS) -> None:
    """The denoised latent of a seamless slide of ``size`` in ``store`` (seed ``item_seed(seed, 0)``).

    With ``mask_slide`` a mask-conditioned model follows its label map (kept in the store); without,
    such a model reads the null map (and its mask guidance is moot).
    """
    channels, factor, window = latent_geometry(bundle)
    latent = image_latent_size(bundle, size)
    if mask_slide is not None:
        with open_mask_slide(mask_slide, bundle.schema) as slide:
            store_label_counts(store, slide, bundle.mask_classes, factor, latent, str(mask_slide))
    elif bundle.mask_channels:
        batch_label_maps(bundle, None, 1, (factor, factor))  # refuses a model trained with every mask given
        options = replace(options, mask_guidance=1.0)
    denoiser = SlideDenoiser(
        bundle.unet, bundle_scheduler(bundle, options.scheduler),
        WindowGrid(latent[0], latent[1], window, window_overlap(window, overlap)), options,
        embeddings([caption]), embeddings.unconditional(), caption == embeddings.unconditional_caption,
        bundle.device, window_batch, bundle.latent_range, bundle.mask_channels, mask_slide is not None, factor, ranks)
    steps = None if progress is None else (lambda done, total: progress("denoising steps", done, total))
    with torch.no_grad():
        denoiser.run(store, channels, item_seed(seed, 0), steps)


def decoded_bands(bundle: Bundle, store: SlideStore, size: Size, options: SamplingOptions,
                  progress: Optional[PhaseProgress] = None) -> Iterator[np.ndarray]:
    """The bands of a seamless slide decoded in blended tiles from the latent in ``store``."""
    strips = None if progress is None else (lambda done, total: progress("decoding strips", done, total))
    _, _, window = latent_geometry(bundle)
    latent = image_latent_size(bundle, size)
    return decode_row_bands(bundle.autoencoder, latent_rows(store), latent[0], tile=decode_tile(window),
                            progress=strips, precision=options.precision)

"""Images on command: captions and seeds in, uint8 images and one record per image out.

``generate(bundle, conditions, seeds)`` runs the guided reverse process of
:func:`histosynth.sample.sampler.denoise` (DDIM with CompVis spacing, or DPM-Solver++) and decodes
the latents. An image is a function of its caption, its seed and the sampling options:

* each item's start noise is drawn on the CPU from its own seed, so every device sees the same noise;
* captions are encoded once as a set and zero-padded to one token length (masked), so an item's
  context is the same tensor whatever shares its batch;
* every UNet and decoder call of a run has the same batch shape: the last batch is filled up by
  repeating its last item.

Float32 kernels still round slightly differently with the batch shape, an item's place in the batch
and the thread count: another batching can move a few pixel values in ten thousand by one level.
:mod:`histosynth.sample.jobs` fixes the batches of a job, so that shards and resumed runs write
exactly the bytes of one uninterrupted run.

The networks run at the options' precision (:mod:`histosynth.models.precision`; default bf16 on CUDA
GPUs that support it, fp32 elsewhere); the same precision on the same kind of device gives the same
bytes, another precision other bytes (a bf16 image is a close relative of the fp32 one, not a copy).

Images larger than the model's patches go through :mod:`histosynth.sample.large` (overlapping
windows blended at every step, tiled decoding).

Conditions are captions in the schema's templates (thesis §4.1.4). A user's caption is parsed and
rewritten in canonical form (:func:`histosynth.captions.canonical_caption`: intro line, classes in id
order, one sentence per line), which is the form the model was trained on; an unknown class or level
is an error naming it. The empty caption is the unconditional one.

A mask-conditioned model also takes one label mask per image (the image has the mask's size); its
label map enters the UNet beside the latent, and ``mask_guidance`` weights it against the null map
(see :func:`histosynth.sample.sampler.guided_eps` for the formula). Without masks such a model
generates from the null map, as it was trained to when the mask was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import validation
from ..captions import UNCONDITIONAL_CAPTION
from ..data.torchdata import to_uint8
from ..devices import pick_device
from ..errors import ConfigError, DataError, ModelError
from ..models.autoencoder import decode_latents, decode_latents_tiled
from ..models.bundle import Bundle
from ..models.denoiser import denoiser_factor
from ..models.diffusion import sampling_scheduler
from ..models.label_maps import check_mask_ids, label_map
from ..models.precision import prepare_unet
from ..models.sampling import SamplingOptions
from ..models.text import MemoryEmbeddingCache, TextEncoder
from ..presets import DiffusionConfig
from .large import DEFAULT_WINDOW_BATCH, Size, WindowedUNet, as_size, decode_tile, latent_size, window_overlap
from .sampler import Conditions, denoise

#: Items per UNet call when the caller does not say.
DEFAULT_BATCH_SIZE = 8

#: called with the number of images finished since the last call
ImagesDone = Callable[[int], None]
#: called after each denoising step with (step, steps)
StepsDone = Callable[[int, int], None]


# --- records ---------------------------------------------------------------------------------------------
def generation_record(caption: str, seed: int, options: SamplingOptions, model_id: str,
                      size: int | Size, *, masked: bool = False) -> dict[str, Any]:
    """What it takes to regenerate one image: kept in manifests, never inside the image file (the precision
    when not fp32, eta when not 0).

    An image generated from a mask (``masked``) also records the mask guidance; the mask itself is
    recorded by whoever keeps it (a job stores it beside the image).
    """
    height, width = as_size(size)
    record = {
        "caption": caption,
        "seed": int(seed),
        "steps": options.steps,
        "guidance": options.guidance,
        "scheduler": options.scheduler,
        "model_id": model_id,
        "height": height,
        "width": width,
    }
    if masked:
        record["mask_guidance"] = options.mask_guidance
    if options.eta:
        record["eta"] = options.eta
    if options.precision not in (None, "fp32"):
        record["precision"] = options.precision
    return record


# --- devices and model parts ---------------------------------------------------------------------------
def bundle_scheduler(bundle: Bundle, kind: str):
    """A fresh sampling scheduler (``ddim`` or ``dpm++``) on the bundle's training noise schedule."""
    fields = DiffusionConfig.model_fields
    schedule = DiffusionConfig(**{k: v for k, v in bundle.scheduler_config.items() if k in fields})
    return sampling_scheduler(schedule, kind)


def latent_geometry(bundle: Bundle) -> tuple[int, int, int]:
    """(latent channels, autoencoder factor, UNet window in latent pixels) of a bundle."""
    factor = bundle.latent_factor
    return bundle.latent_channels, factor, bundle.image_size // factor


def image_latent_size(bundle: Bundle, size: Optional[int | Size] = None) -> Size:
    """The latent (height, width) of an image of ``size`` px (default: the model's patch size).

    Refuses sizes the networks cannot produce: see :func:`histosynth.sample.large.latent_size`.
    """
    _, factor, window = latent_geometry(bundle)
    return latent_size(bundle.image_size if size is None else size, factor, window, denoiser_factor(bundle.unet))


#: bytes per output pixel of one image made whole (decoded float32 RGB and uint8 RGB) ...
WHOLE_IMAGE_BYTES_PER_PIXEL = 15
#: ... and per latent or label-map value (float32; the sampler and scheduler hold several copies)
LATENT_VALUE_BYTES = 4 * 8


def check_fits_in_memory(bundle: Bundle, size: Size, items: int = 1) -> None:
    """Refuse an image size whose sampling would need more memory than the device has free.

    The estimate counts what grows with the image: the latents and label maps of ``items`` images
    (several copies during sampling) and the decoded images. Where the free memory is unknown nothing
    is refused. (A seamless slide's latent is kept off the device: see
    :func:`histosynth.sample.seamless.check_store_fits`.)
    """
    free = free_memory(bundle.device)
    if free is None:
        return
    per_pixel = _bytes_per_pixel(bundle) * items
    need = per_pixel * size[0] * size[1]
    if need <= free:
        return
    factor = bundle.latent_factor
    largest = int((free / per_pixel) ** 0.5) // factor * factor
    raise ConfigError(f"an image of {size[1]}x{size[0]} px needs about {need / 2**30:.1f} GiB on {bundle.device} "
                      f"({items} at a time) but {free / 2**30:.1f} GiB are free; the largest square size that fits is "
                      f"about {largest} px" + (" (fewer per batch fit larger ones)" if items > 1 else ""))


def _bytes_per_pixel(bundle: Bundle) -> float:
    values = (bundle.latent_channels + bundle.mask_channels) / bundle.latent_factor ** 2
    return values * LATENT_VALUE_BYTES + WHOLE_IMAGE_BYTES_PER_PIXEL


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device``: the GPU's free memory, or the system's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class CaptionEmbeddings:
    """Token states of a fixed set of captions and the unconditional one, zero-padded to one length.

    Encoding the whole set up front, in a fixed order, gives every item the same context tensor in
    any batch and in any process that builds the set from the same captions.
    """

    def __init__(self, encoder: TextEncoder, captions: Sequence[str], device: torch.device | str,
                 unconditional: str = UNCONDITIONAL_CAPTION):
        cache = MemoryEmbeddingCache(encoder.id)
        cache.add([unconditional, *captions], encoder, show_progress=False)
        self.unconditional_caption = unconditional
        self._row_of = cache.row_of
        states, mask = cache.lookup(range(len(cache)))
        self.states, self.mask = states.to(device), mask.to(device)

    @classmethod
    def for_bundle(cls, bundle: Bundle, captions: Sequence[str]) -> "CaptionEmbeddings":
        """With the bundle's text encoder, device and unconditional caption."""
        return cls(bundle.text_encoder, captions, bundle.device, bundle.config.unconditional_caption)

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in captions if c not in self._row_of]
        if missing:
            raise ValueError(f"caption not in this embedding set: {missing[0]!r}")
        rows = torch.tensor([self._row_of[c] for c in captions], device=self.states.device)
        return self.states[rows], self.mask[rows]

    def unconditional(self) -> tuple[torch.Tensor, torch.Tensor]:
        """States (1, L, D) and mask (1, L) of the unconditional caption."""
        return self([self.unconditional_caption])


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Start latents (B, *shape): item i is standard normal noise from a CPU generator seeded ``seeds[i]``."""
    return _draw_noise(item_generators(seeds), shape)


def item_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per item: it draws the item's start noise, then its step noise (DDIM, eta > 0)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


# --- generation -------------------------------------------------------------------------------------------
@dataclass
class Generated:
    """Images (N, H, W, 3) uint8 and their records, in the order of the seeds given."""

    images: np.ndarray
    records: list[dict[str, Any]]


def sample_latents(bundle: Bundle, captions: Sequence[str], seeds: Sequence[int], options: SamplingOptions,
                   embeddings: CaptionEmbeddings, size: Optional[int | Size] = None,
                   window_batch: int = DEFAULT_WINDOW_BATCH, overlap: Optional[int] = None,
                   progress: Optional[StepsDone] = None, label_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final latents (B, C, h, w) of one batch; latents larger than the UNet's window are windowed.

    ``label_maps`` (B, K, h, w) condition a mask-conditioned model (see :func:`batch_label_maps`;
    default: the null map). A model with a latent range is clamped into it at every step.
    """
    channels, _, window = latent_geometry(bundle)
    latent_hw = image_latent_size(bundle, size)
    if label_maps is None:
        label_maps = batch_label_maps(bundle, None, len(seeds), as_size(bundle.image_size if size is None else size))
        options = replace(options, mask_guidance=1.0)  # nothing to guide towards: the null map against itself
    unet = bundle.unet
    if max(latent_hw) > window:
        unet = WindowedUNet(bundle.unet, window, overlap, window_batch)
    conditions = batch_conditions(embeddings(captions), embeddings.unconditional(),
                                  None if label_maps is None else label_maps.to(bundle.device),
                                  all(c == embeddings.unconditional_caption for c in captions))
    return denoise_seeds(unet, bundle_scheduler(bundle, options.scheduler), seeds, (channels, *latent_hw), conditions,
                         options, bundle.device, bundle.latent_range, progress)


def batch_conditions(text: tuple[torch.Tensor, torch.Tensor], unconditional: tuple[torch.Tensor, torch.Tensor],
                     label_maps: Optional[torch.Tensor], text_is_unconditional: bool) -> Conditions:
    """A batch's conditions from its captions' (states, mask), the unconditional caption's and its label maps.

    With label maps and only the unconditional caption, the text is not guided (only the mask is: fewer
    UNet calls).
    """
    if label_maps is not None and text_is_unconditional:
        return Conditions(text[0], None, text[1], None, label_maps)
    return Conditions(text[0], unconditional[0], text[1], unconditional[1], label_maps)


def denoise_seeds(unet, scheduler, seeds: Sequence[int], latent_shape: Sequence[int], conditions: Conditions,
                  options: SamplingOptions, device: torch.device | str, latent_range=None,
                  progress: Optional[StepsDone] = None) -> torch.Tensor:
    """Final latents of the items seeded ``seeds``: the one path from seeds to latents, shared by
    generation and the sample grids of training. Each item's noise comes from its own CPU generator."""
    generators = item_generators(seeds)
    noise = _draw_noise(generators, latent_shape)
    return denoise(unet, scheduler, noise.to(device), conditions, options, latent_range=latent_range,
                   generators=generators, progress=progress)


def batch_label_maps(bundle: Bundle, masks: Optional[Sequence[np.ndarray]], count: int,
                     size: Size) -> Optional[torch.Tensor]:
    """The label maps (count, K, h, w) a batch feeds the UNet: its masks', or the null map.

    None for a text-only model (which refuses masks). A mask-conditioned model without masks reads
    the all-zero map, the dropped condition it was trained with.
    """
    if masks is not None:
        check_generation_masks(bundle, masks, size)
        return label_map(np.stack(masks), bundle.mask_classes, bundle.latent_factor)
    if not bundle.mask_channels:
        return None
    if bundle.conditioning.mask_dropout == 0:
        raise ModelError(f"{bundle.path} was trained with every mask given (no mask dropout); give it masks")
    factor = bundle.latent_factor
    return torch.zeros(count, bundle.mask_channels, size[0] // factor, size[1] // factor)


def check_generation_masks(bundle: Bundle, masks: Sequence[np.ndarray], size: Size) -> None:
    """Masks must suit the model (mask-conditioned, their ids its classes) and have the images' size."""
    require_mask_conditioning(bundle)
    for index, mask in enumerate(masks):
        if tuple(np.shape(mask)) != tuple(size):
            raise DataError(f"mask {index} is {np.shape(mask)[1]}x{np.shape(mask)[0]} px but the images are "
                            f"{size[1]}x{size[0]} px; an image has its mask's size")
        check_mask_ids(mask, bundle.mask_classes, f"mask {index}")


def require_mask_conditioning(bundle: Bundle) -> None:
    if not bundle.mask_channels:
        raise ModelError(f"{bundle.path} is not mask-conditioned (it reads text only); generate from masks with "
                         "a model trained with --condition mask or text+mask")


def check_caption_conditioning(bundle: Bundle, captions: Sequence[str]) -> None:
    """A model that reads no text takes the unconditional caption only."""
    if not bundle.conditioning.text and any(c != UNCONDITIONAL_CAPTION for c in captions):
        raise ConfigError(f"{bundle.path} is conditioned on masks only; generate without a caption")


@torch.no_grad()
def decode_images(bundle: Bundle, latents: torch.Tensor, precision: Optional[str] = None) -> np.ndarray:
    """uint8 (B, H, W, 3) images of latents, decoded at ``precision``; large latents decode in blended tiles."""
    _, _, window = latent_geometry(bundle)
    tile = decode_tile(window)
    if max(latents.shape[-2:]) > tile:
        images = decode_latents_tiled(bundle.autoencoder, latents, tile=tile, overlap=window_overlap(tile),
                                      precision=precision)
    else:
        images = decode_latents(bundle.autoencoder, latents, precision)
    return to_uint8(images)


def generate_batches(
    bundle: Bundle,
    conditions: Sequence[str],
    seeds: Sequence[int],
    options: Optional[SamplingOptions] = None,
    batch_size: Optional[int] = None,
    size: Optional[int | Size] = None,
    *,
    embeddings: Optional[CaptionEmbeddings] = None,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    overlap: Optional[int] = None,
    masks: Optional[Sequence[np.ndarray]] = None,
) -> Iterator[Generated]:
    """:func:`generate`, one batch at a time (for writing images as they are made)."""
    options = sampling_options(bundle, options)
    conditions, seeds = list(conditions), [int(s) for s in seeds]
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds; give one of each per image")
    check_seeds(seeds, "an image's seed", validation.MAX_IMAGE_SEED)
    masks = None if masks is None else list(masks)
    if masks is not None and len(masks) != len(seeds):
        raise ValueError(f"{len(masks)} masks but {len(seeds)} seeds; give one of each per image")
    check_caption_conditioning(bundle, conditions)
    if masks and size is None:
        size = tuple(np.shape(masks[0]))
    out_size = as_size(bundle.image_size if size is None else size)
    image_latent_size(bundle, out_size)  # refuse an impossible size, model or mask before any work
    if masks is not None:
        check_generation_masks(bundle, masks, out_size)
    batch = batch_size if batch_size is not None else min(DEFAULT_BATCH_SIZE, max(1, len(seeds)))
    if batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch}")
    check_fits_in_memory(bundle, out_size, batch)
    if not seeds:
        return
    embeddings = embeddings or CaptionEmbeddings.for_bundle(bundle, conditions)
    for start in range(0, len(seeds), batch):
        captions, batch_seeds = conditions[start:start + batch], seeds[start:start + batch]
        batch_masks = None if masks is None else masks[start:start + batch]
        real = len(batch_seeds)
        # Fill the last batch up to the common shape: see the module docstring.
        captions += [captions[-1]] * (batch - real)
        batch_seeds += [batch_seeds[-1]] * (batch - real)
        if batch_masks is not None:
            batch_masks += [batch_masks[-1]] * (batch - real)
        label_maps = None if batch_masks is None else batch_label_maps(bundle, batch_masks, batch, out_size)
        latents = sample_latents(bundle, captions, batch_seeds, options, embeddings, out_size, window_batch, overlap,
                                 label_maps=label_maps)
        images = decode_images(bundle, latents, options.precision)[:real]
        records = [generation_record(c, s, options, bundle.id, out_size, masked=masks is not None)
                   for c, s in zip(captions, batch_seeds, strict=True)]
        yield Generated(images, records[:real])


def generate(
    bundle: Bundle,
    conditions: Sequence[str],
    seeds: Sequence[int],
    options: Optional[SamplingOptions] = None,
    batch_size: Optional[int] = None,
    device: Optional[str | torch.device] = None,
    size: Optional[int | Size] = None,
    progress: Optional[ImagesDone] = None,
    *,
    masks: Optional[Sequence[np.ndarray]] = None,
) -> Generated:
    """One image per (condition, seed): uint8 (N, H, W, 3) images and one record each.

    ``conditions`` are captions (see :func:`histosynth.captions.canonical_caption`; pass them
    canonical). ``options`` default to the model's own (:attr:`Bundle.sampling`; a precision left
    to the device is settled by :meth:`SamplingOptions.on_device`, and recorded when not fp32). ``batch_size``
    items share each UNet call (default: up to 8). ``device`` moves the bundle's networks first
    (default: where the bundle is). ``size`` (px, or (height, width)) defaults to the model's patch
    size, or the masks' size; larger images are denoised in blended windows. ``masks`` (one (H, W)
    array of schema ids per image, all of one size) condition a mask-conditioned model.
    """
    if device is not None:
        move_bundle(bundle, pick_device(str(device)))
    images, records = [], []
    if masks is not None and size is None and len(masks):
        size = tuple(np.shape(masks[0]))
    for part in generate_batches(bundle, conditions, seeds, options, batch_size, size, masks=masks):
        images.append(part.images)
        records += part.records
        if progress is not None:
            progress(len(part.records))
    height, width = as_size(bundle.image_size if size is None else size)
    stacked = np.concatenate(images) if images else np.zeros((0, height, width, 3), dtype=np.uint8)
    return Generated(stacked, records)


def check_seeds(seeds: Sequence[int], name: str = "--seed", high: int = validation.MAX_SEED) -> None:
    """Refuse seeds a generator cannot take (see :func:`histosynth.validation.seed`): by default seeds a
    user gives; an image's own seed, derived from a job's, may be as large as ``validation.MAX_IMAGE_SEED``."""
    for seed in seeds:
        validation.seed(seed, name, high=high)


def sampling_options(bundle: Bundle, options: Optional[SamplingOptions] = None) -> SamplingOptions:
    """``options`` (default: the model's own) with the precision settled for the bundle's device."""
    return (bundle.sampling if options is None else options).on_device(bundle.device)


def prepare_for_sampling(bundle: Bundle, compile: bool = False) -> None:
    """Make the bundle's UNet faster for sampling, in place: see :func:`histosynth.models.precision.prepare_unet`."""
    prepare_unet(bundle.unet, bundle.device, compile)


def move_bundle(bundle: Bundle, device: torch.device) -> None:
    """Move a loaded bundle's networks and text encoder to ``device``."""
    if bundle.device == device:
        return
    bundle.unet.to(device)
    bundle.autoencoder.to(device)
    bundle.text_encoder.to(device)
    bundle.device = device

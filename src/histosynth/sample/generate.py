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

Images larger than the model's patches go through :mod:`histosynth.sample.large` (overlapping
windows blended at every step, tiled decoding).

Conditions are captions in the schema's templates (SPEC §3). A user's caption is parsed and rewritten
in canonical form (intro line, classes in id order, one sentence per line), which is the form the
model was trained on; an unknown class or level is an error naming it. The empty caption is the
unconditional one.

A mask-conditioned model also takes one label mask per image (the image has the mask's size); its
label map enters the UNet beside the latent, and ``mask_guidance`` weights it against the null map
(see :func:`histosynth.sample.sampler.guided_eps` for the formula). Without masks such a model
generates from the null map, as it was trained to when the mask was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ..captions import UNCONDITIONAL_CAPTION, Level, caption_from_levels, parse_caption, parse_levels_option
from ..data.torchdata import to_uint8
from ..devices import pick_device
from ..errors import CaptionError, ConfigError, DataError, ModelError
from ..models.autoencoder import decode_latents, decode_latents_tiled
from ..models.bundle import Bundle
from ..models.diffusion import SAMPLER_KINDS, sampling_scheduler
from ..models.conditioning import DEFAULT_MASK_GUIDANCE
from ..models.label_maps import check_mask_ids, label_map
from ..models.text import EmbeddingCache, TextEncoder
from ..presets import DiffusionConfig
from ..schema import ClassSchema
from .large import DEFAULT_WINDOW_BATCH, Size, WindowedUNet, as_size, decode_tile, latent_size, window_overlap
from .sampler import check_sampling_options, denoise

#: Items per UNet call when the caller does not say.
DEFAULT_BATCH_SIZE = 8

#: called with the number of images finished since the last call
ImagesDone = Callable[[int], None]
#: called after each denoising step with (step, steps)
StepsDone = Callable[[int, int], None]


# --- conditions ------------------------------------------------------------------------------------
def canonical_caption(text: str, schema: ClassSchema) -> str:
    """The caption in the form the model was trained on; the empty caption stays empty."""
    text = text.replace("\\n", "\n").strip()
    if not text:
        return ""
    return caption_from_levels(parse_caption(text, schema), schema)


def caption_for_levels(levels: str | Mapping[str, Level | str], schema: ClassSchema) -> str:
    """The SPEC §3 caption of levels given as ``Glomeruli=high,Tubuli=medium`` or a mapping."""
    if isinstance(levels, str):
        levels = parse_levels_option(levels, schema)
    return caption_from_levels(levels, schema)


def read_captions_file(path: str | Path, schema: ClassSchema) -> list[str]:
    """Captions from a text file, one per line (sentences separated by spaces or a literal ``\\n``).

    Blank lines are skipped. A line that does not parse is an error naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read captions file {path}: {exc.__class__.__name__}: {exc}") from None
    captions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            captions.append(canonical_caption(line, schema))
        except CaptionError as exc:
            raise CaptionError(f"{path}, line {number}: {exc}") from None
    if not captions:
        raise DataError(f"captions file {path} holds no caption; write one caption per line")
    return captions


# --- sampling options and records --------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingOptions:
    """How the reverse process runs. Checked on creation: steps >= 1, guidances >= 0, a known scheduler.

    ``guidance`` weights the text, ``mask_guidance`` the label mask (used only with masks).
    """

    steps: int = 50
    guidance: float = 1.5
    scheduler: str = "ddim"
    mask_guidance: float = DEFAULT_MASK_GUIDANCE

    def __post_init__(self) -> None:
        check_sampling_options(self.steps, self.guidance, self.mask_guidance)
        if self.scheduler not in SAMPLER_KINDS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SAMPLER_KINDS)}")


def generation_record(caption: str, seed: int, options: SamplingOptions, model_id: str,
                      size: int | Size, *, masked: bool = False) -> dict[str, Any]:
    """What it takes to regenerate one image: kept in manifests, never inside the image file.

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
    return record


# --- devices and model parts ---------------------------------------------------------------------------
def bundle_scheduler(bundle: Bundle, kind: str):
    """A fresh sampling scheduler (``ddim`` or ``dpm++``) on the bundle's training noise schedule."""
    fields = DiffusionConfig.model_fields
    schedule = DiffusionConfig(**{k: v for k, v in bundle.scheduler_config.items() if k in fields})
    return sampling_scheduler(schedule, kind)


def latent_geometry(bundle: Bundle) -> tuple[int, int, int]:
    """(latent channels, autoencoder factor, UNet window in latent pixels) of a bundle."""
    latent = bundle.config["latent"]
    factor = int(latent["downsampling"])
    return int(latent["channels"]), factor, bundle.image_size // factor


def image_latent_size(bundle: Bundle, size: Optional[int | Size] = None) -> Size:
    """The latent (height, width) of an image of ``size`` px (default: the model's patch size).

    Refuses sizes the networks cannot produce: see :func:`histosynth.sample.large.latent_size`.
    """
    _, factor, window = latent_geometry(bundle)
    unet_factor = 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    return latent_size(size or bundle.image_size, factor, window, unet_factor)


class CaptionEmbeddings:
    """Token states of a fixed set of captions and the unconditional one, zero-padded to one length.

    Encoding the whole set up front, in a fixed order, gives every item the same context tensor in
    any batch and in any process that builds the set from the same captions.
    """

    def __init__(self, encoder: TextEncoder, captions: Sequence[str], device: torch.device | str,
                 unconditional: str = UNCONDITIONAL_CAPTION):
        cache = EmbeddingCache(encoder.id)
        cache.add([unconditional, *captions], encoder, show_progress=False)
        self.unconditional_caption = unconditional
        self._row_of = cache.row_of
        states, mask = cache.lookup(range(len(cache)))
        self.states, self.mask = states.to(device), mask.to(device)

    @classmethod
    def for_bundle(cls, bundle: Bundle, captions: Sequence[str]) -> "CaptionEmbeddings":
        """With the bundle's text encoder, device and unconditional caption."""
        unconditional = bundle.config.get("unconditional_caption", UNCONDITIONAL_CAPTION)
        return cls(bundle.text_encoder, captions, bundle.device, unconditional)

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
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


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

    ``label_maps`` (B, K, h, w) condition a mask-conditioned model (see :func:`conditioning_maps`;
    default: the null map). A model with a latent range is clamped into it at every step.
    """
    channels, _, window = latent_geometry(bundle)
    latent_hw = image_latent_size(bundle, size)
    mask_guidance = options.mask_guidance
    if label_maps is None:
        label_maps = conditioning_maps(bundle, None, len(seeds), as_size(size or bundle.image_size))
        mask_guidance = 1.0  # nothing to guide towards: the null map against itself
    noise = initial_noise(seeds, (channels, *latent_hw)).to(bundle.device)
    unet = bundle.unet
    if max(latent_hw) > window:
        unet = WindowedUNet(bundle.unet, window, overlap, window_batch)
    cond, cond_mask = embeddings(captions)
    uncond, uncond_mask = embeddings.unconditional()
    if label_maps is not None and all(c == embeddings.unconditional_caption for c in captions):
        uncond = uncond_mask = None  # the text is unconditional: only the mask is guided (fewer UNet calls)
    extra = None if label_maps is None else label_maps.to(bundle.device)
    return denoise(unet, bundle_scheduler(bundle, options.scheduler), noise, cond, uncond,
                   options.steps, options.guidance, cond_mask, uncond_mask, progress,
                   cond_extra=extra, mask_guidance=mask_guidance, latent_range=bundle.latent_range)


def conditioning_maps(bundle: Bundle, masks: Optional[Sequence[np.ndarray]], count: int,
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
def decode_images(bundle: Bundle, latents: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3) images of latents; large latents decode in blended tiles."""
    _, _, window = latent_geometry(bundle)
    tile = decode_tile(window)
    if max(latents.shape[-2:]) > tile:
        images = decode_latents_tiled(bundle.autoencoder, latents, tile=tile, overlap=window_overlap(tile))
    else:
        images = decode_latents(bundle.autoencoder, latents)
    return to_uint8(images)


def generate_batches(
    bundle: Bundle,
    conditions: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 1.5,
    scheduler: str = "ddim",
    batch_size: Optional[int] = None,
    size: Optional[int | Size] = None,
    *,
    embeddings: Optional[CaptionEmbeddings] = None,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    overlap: Optional[int] = None,
    masks: Optional[Sequence[np.ndarray]] = None,
    mask_guidance: float = DEFAULT_MASK_GUIDANCE,
) -> Iterator[Generated]:
    """:func:`generate`, one batch at a time (for writing images as they are made)."""
    conditions, seeds = list(conditions), [int(s) for s in seeds]
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds; give one of each per image")
    masks = None if masks is None else list(masks)
    if masks is not None and len(masks) != len(seeds):
        raise ValueError(f"{len(masks)} masks but {len(seeds)} seeds; give one of each per image")
    options = SamplingOptions(steps, guidance, scheduler, mask_guidance)
    check_caption_conditioning(bundle, conditions)
    if masks and size is None:
        size = tuple(np.shape(masks[0]))
    out_size = as_size(size or bundle.image_size)
    image_latent_size(bundle, out_size)  # refuse an impossible size, model or mask before any work
    if masks is not None:
        check_generation_masks(bundle, masks, out_size)
    batch = batch_size if batch_size is not None else min(DEFAULT_BATCH_SIZE, max(1, len(seeds)))
    if batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch}")
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
        maps = None if batch_masks is None else conditioning_maps(bundle, batch_masks, batch, out_size)
        latents = sample_latents(bundle, captions, batch_seeds, options, embeddings, out_size, window_batch, overlap,
                                 label_maps=maps)
        images = decode_images(bundle, latents)[:real]
        records = [generation_record(c, s, options, bundle.id, out_size, masked=masks is not None)
                   for c, s in zip(captions, batch_seeds)]
        yield Generated(images, records[:real])


def generate(
    bundle: Bundle,
    conditions: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 1.5,
    scheduler: str = "ddim",
    batch_size: Optional[int] = None,
    device: Optional[str | torch.device] = None,
    size: Optional[int | Size] = None,
    progress: Optional[ImagesDone] = None,
    *,
    masks: Optional[Sequence[np.ndarray]] = None,
    mask_guidance: float = DEFAULT_MASK_GUIDANCE,
) -> Generated:
    """One image per (condition, seed): uint8 (N, H, W, 3) images and one record each.

    ``conditions`` are captions (see :func:`canonical_caption`; pass them canonical). ``batch_size``
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
    for part in generate_batches(bundle, conditions, seeds, steps, guidance, scheduler, batch_size, size,
                                 masks=masks, mask_guidance=mask_guidance):
        images.append(part.images)
        records += part.records
        if progress is not None:
            progress(len(part.records))
    height, width = as_size(size or bundle.image_size)
    stacked = np.concatenate(images) if images else np.zeros((0, height, width, 3), dtype=np.uint8)
    return Generated(stacked, records)


def move_bundle(bundle: Bundle, device: torch.device) -> None:
    """Move a loaded bundle's networks and text encoder to ``device``."""
    if bundle.device == device:
        return
    bundle.unet.to(device)
    bundle.autoencoder.to(device)
    bundle.text_encoder.to(device)
    bundle.device = device

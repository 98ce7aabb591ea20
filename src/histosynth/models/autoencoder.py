"""The f4 autoencoder between images and diffusion latents.

Conventions (as PathLDM uses its VQ-f4, the thesis' autoencoder, §4.1.1):

* images are float tensors in [-1, 1], shape (B, 3, H, W);
* ``encode_latents`` returns the *un-quantised* encoder output (VQ) or the posterior mean (KL),
  multiplied by the latent scale (``config.scaling_factor``; 1.0 for the PathLDM VQ-f4);
* ``decode_latents`` divides by the latent scale and, for VQ, snaps every latent pixel to its nearest
  codebook vector before decoding (:func:`quantize_latents`: diffusers' quantiser, to the last bit, with
  the distances to the codebook computed for a bounded number of latent pixels at a time: the whole
  matrix, (B*h*w) x codes in float32, is 8.6 GB for a batch of 64 PathLDM latents and 8192 codes);
* the decoder may run in bf16 (``precision``, see :mod:`histosynth.models.precision`); the codebook
  look-up and the images it returns are float32.

Images larger than a tile go through ``encode_latents_tiled`` / ``decode_latents_tiled``: overlapping
tiles, each coded on its own and blended with linear ramps where they overlap, so peak memory is set
by the tile size rather than the image size.

An autoencoder folder is what diffusers' ``save_pretrained`` writes (``config.json`` and the weights), with
notes beside them (``metrics.json`` of ``histosynth train-autoencoder``, ``import.json`` of ``histosynth
import-compvis``); a plain diffusers folder without notes is one too, its latent scale being its config's
``scaling_factor``.

Training support for the autoencoder lives here too (losses that need no downloads: L1 plus an SSIM
term, the VQ commitment or KL term, a perceptual term when the user gives a feature network) together
with the PSNR / SSIM metrics used to report it; the adversarial part is :mod:`.discriminator`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..errors import ModelError
from ..io import staged_folder
from ..presets import AutoencoderConfig, Preset
from .precision import channels_last_input, decoder_precision, network_precision

Autoencoder = Union[VQModel, AutoencoderKL]

#: images live in [-1, 1], so their value range is 2.
DATA_RANGE = 2.0


def build_autoencoder(cfg: AutoencoderConfig | Preset, sample_size: int = 256) -> Autoencoder:
    """A freshly initialised ``VQModel`` or ``AutoencoderKL`` for a preset (or its autoencoder section)."""
    if isinstance(cfg, Preset):
        sample_size = cfg.image_size
        cfg = cfg.autoencoder
    levels = len(cfg.block_out_channels)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=cfg.latent_scale,
        mid_block_add_attention=cfg.mid_block_attention,
    )
    if cfg.kind == "vq":
        return VQModel(
            **common,
            num_vq_embeddings=cfg.num_vq_embeddings,
            vq_embed_dim=cfg.vq_embed_dim or cfg.latent_channels,
            norm_type="group",
        )
    return AutoencoderKL(**common)


def is_vq(ae: Autoencoder) -> bool:
    return isinstance(ae, VQModel)


def latent_scale(ae: Autoencoder) -> float:
    return float(ae.config.scaling_factor)


def downsampling_factor(ae: Autoencoder) -> int:
    return 2 ** (len(ae.config.block_out_channels) - 1)


# --- folders ---------------------------------------------------------------------------------------

#: diffusers config entries of a latent convention other than ``latents * scaling_factor`` (SD3, Flux, SDXL
#: variants): latents made without them would not be the ones the autoencoder's owners trained on
FOREIGN_LATENT_SETTINGS = ("shift_factor", "latents_mean", "latents_std")


def write_autoencoder_folder(out: str | Path, autoencoder: Autoencoder, notes: dict[str, dict[str, Any]]) -> None:
    """Save ``autoencoder`` as diffusers does, with each of ``notes`` (file name -> content) as JSON beside it.

    The folder appears whole or not at all: it is written under a temporary name and renamed; ``out``
    must not exist or be empty.
    """
    with staged_folder(out) as staging:
        autoencoder.save_pretrained(staging)
        for name, content in notes.items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")


def load_checked_autoencoder(path: str | Path) -> Autoencoder:
    """The autoencoder of an autoencoder folder (histosynth's or a plain diffusers ``VQModel`` /
    ``AutoencoderKL`` one) or of a model folder, refused in one line when it cannot be loaded or scales its
    latents otherwise than by ``scaling_factor`` alone."""
    from .bundle import load_autoencoder_folder

    try:
        autoencoder = load_autoencoder_folder(path)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"{path}: the autoencoder cannot be loaded: {first_line}") from None
    foreign = {name: autoencoder.config.get(name) for name in FOREIGN_LATENT_SETTINGS
               if autoencoder.config.get(name) is not None}
    if foreign:
        settings = ", ".join(f"{name} {value}" for name, value in foreign.items())
        raise ModelError(f"{path}: the autoencoder's config sets {settings}; histosynth scales latents by "
                         "scaling_factor alone, so it would make other latents than the ones its owners used")
    return autoencoder


def encode_latents(
    ae: Autoencoder,
    images: torch.Tensor,
    sample: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Images in [-1, 1] -> diffusion latents (un-quantised for VQ; KL mean unless ``sample``)."""
    if is_vq(ae):
        raw = ae.encode(images).latents
    else:
        posterior = ae.encode(images).latent_dist
        raw = posterior.sample(generator=generator) if sample else posterior.mean
    return raw * latent_scale(ae)


def decode_latents(ae: Autoencoder, latents: torch.Tensor, precision: Optional[str] = None) -> torch.Tensor:
    """Diffusion latents -> float32 images, roughly in [-1, 1] (not clamped). VQ quantises first.

    The decoder runs at ``precision`` (fp16 decodes in fp32: see :func:`~.precision.decoder_precision`;
    None: in the caller's context).
    """
    h, precision = latents / latent_scale(ae), decoder_precision(precision)
    with network_precision(precision, latents.device):
        if is_vq(ae) and not ae.config.lookup_from_codebook:
            decoded = ae.decode(channels_last_input(quantize_latents(ae, h), precision), force_not_quantize=True)
        else:
            decoded = ae.decode(channels_last_input(h, precision))
    return decoded.sample.float().contiguous()


#: latent pixels whose distances to every code are held at once (4096 x 8192 codes: 128 MiB of float32)
QUANTIZE_CHUNK = 4096


@torch.no_grad()
def quantize_latents(ae: VQModel, h: torch.Tensor, chunk: int = QUANTIZE_CHUNK) -> torch.Tensor:
    """Unscaled VQ latents (B, C, h, w) snapped to their nearest codebook vectors, in float32: the output of
    the model's quantiser (``ae.quantize(h)[0]``, bit for bit) with its distance matrix made ``chunk``
    latent pixels at a time (:func:`nearest_codes`)."""
    quantizer = ae.quantize
    with torch.autocast(h.device.type, enabled=False):
        z = h.float().permute(0, 2, 3, 1).contiguous()
        codes = nearest_codes(z.view(-1, quantizer.vq_embed_dim), quantizer.embedding.weight, chunk)
        z_q = quantizer.embedding(codes).view(z.shape)
        z_q = z + (z_q - z)  # the quantiser's straight-through output, rounded as it rounds it
    return z_q.permute(0, 3, 1, 2).contiguous()


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int = QUANTIZE_CHUNK) -> torch.Tensor:
    """Index of the nearest codebook row (K, D) of each vector (N, D), the first on ties.

    ``argmin(torch.cdist(vectors, codebook))`` as diffusers' quantiser computes it, ``chunk`` rows at a
    time: at most ``chunk`` x K distances are held, and each row's distances are the ones the whole
    matrix would hold (cdist's choice between its matrix-product and direct forms is made for the
    whole matrix, so every chunk computes its rows the same way).
    """
    if chunk < 1:
        raise ValueError(f"the quantiser's chunk must be at least 1 row, got {chunk}")
    count = vectors.shape[0]
    # cdist's default: matrix products when either side has more than 25 rows
    mode = "use_mm_for_euclid_dist" if max(count, codebook.shape[0]) > 25 else "donot_use_mm_for_euclid_dist"
    codes = torch.empty(count, dtype=torch.long, device=vectors.device)
    for start in range(0, count, chunk):
        distances = torch.cdist(vectors[start:start + chunk], codebook, compute_mode=mode)
        codes[start:start + chunk] = distances.argmin(dim=1)
    return codes


# --- tiling ----------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` that cover ``size`` and overlap by at least ``overlap``."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D blend weight: 1 in the middle, rising linearly over ``fade`` pixels at a faded edge."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if fade > 0:
        if fade_start:
            weight = torch.minimum(weight, position / fade)
        if fade_end:
            weight = torch.minimum(weight, (length - position) / fade)
    return weight


def _tiled(
    code: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    out_per_in: float,
) -> torch.Tensor:
    """Apply a size-changing coder to overlapping tiles of ``x`` and blend the results.

    ``out_per_in`` is the coder's output pixels per input pixel (4 for an f4 decoder, 1/4 for its
    encoder). Edge tiles are not faded on the image border, so every output pixel has weight > 0.
    """
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return code(x)

    def scale(n: int) -> int:
        return int(round(n * out_per_in))

    fade = scale(overlap)
    out = weights = None
    for top in rows:
        for left in cols:
            piece = code(x[..., top : top + tile, left : left + tile])
            h, w = piece.shape[-2:]
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], scale(height), scale(width))
                weights = piece.new_zeros(1, 1, scale(height), scale(width))
            wy = blend_ramp(h, fade, top > 0, top + tile < height)
            wx = blend_ramp(w, fade, left > 0, left + tile < width)
            weight = (wy[:, None] * wx[None, :]).to(piece)
            y0, x0 = scale(top), scale(left)
            out[..., y0 : y0 + h, x0 : x0 + w] += piece * weight
            weights[..., y0 : y0 + h, x0 : x0 + w] += weight
    return out / weights


def decode_latents_tiled(ae: Autoencoder, latents: torch.Tensor, tile: int = 64, overlap: int = 16,
                         precision: Optional[str] = None,
                         compute_device: Optional[torch.device] = None) -> torch.Tensor:
    """``decode_latents`` on overlapping ``tile`` x ``tile`` latent tiles, blended over ``overlap`` latent pixels.

    With ``compute_device`` each tile is decoded there and blended on the latents' device (which then
    holds the decoded image, and the compute device one tile).
    """
    factor = downsampling_factor(ae)
    if compute_device is None:
        return _tiled(lambda z: decode_latents(ae, z, precision), latents, tile, overlap, factor)
    return _tiled(lambda z: decode_latents(ae, z.to(compute_device), precision).to(latents.device), latents, tile,
                  overlap, factor)


def encode_latents_tiled(ae: Autoencoder, images: torch.Tensor, tile: int = 256, overlap: int = 64) -> torch.Tensor:
    """``encode_latents`` (mean) on overlapping ``tile`` px image tiles, blended over ``overlap`` pixels."""
    factor = downsampling_factor(ae)
    if tile % factor or overlap % factor:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the factor {factor}")
    return _tiled(lambda x: encode_latents(ae, x), images, tile, overlap, 1 / factor)


# --- training losses and metrics ---------------------------------------------------------------------


def ssim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two image batches in [-1, 1] (Gaussian window 11, sigma 1.5)."""
    return structural_similarity_index_measure(x_hat, x, data_range=DATA_RANGE)


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of two image batches in [-1, 1] (x_hat clamped to the image range first)."""
    return peak_signal_noise_ratio(x_hat.clamp(-1, 1), x, data_range=DATA_RANGE)


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, ssim_weight: float = 1.0,
                        perceptual: Optional[torch.nn.Module] = None, perceptual_weight: float = 1.0) -> torch.Tensor:
    """L1 plus ``ssim_weight`` x (1 - SSIM): sharp, structure-aware, and needs no pretrained network; with a
    ``perceptual`` feature network, plus ``perceptual_weight`` x its distance (:mod:`.perceptual`)."""
    loss = F.l1_loss(x_hat, x) + ssim_weight * (1.0 - ssim(x, x_hat))
    if perceptual is not None:
        from .perceptual import perceptual_distance

        loss = loss + perceptual_weight * perceptual_distance(perceptual, x, x_hat)
    return loss


@dataclass
class AutoencoderLosses:
    total: torch.Tensor
    reconstruction: torch.Tensor
    regularisation: torch.Tensor
    images: torch.Tensor  # the reconstruction, for metrics and sample grids


def autoencoder_losses(
    ae: Autoencoder,
    images: torch.Tensor,
    kl_weight: float = 1e-6,
    ssim_weight: float = 1.0,
    generator: Optional[torch.Generator] = None,
    perceptual: Optional[torch.nn.Module] = None,
    perceptual_weight: float = 1.0,
) -> AutoencoderLosses:
    """One training step's losses: reconstruction (:func:`reconstruction_loss`) plus the VQ codebook/commitment
    or the KL term.

    The KL term is summed over latent elements and divided by the number of image elements, so
    ``kl_weight`` means what it means in CompVis (which sums both terms per image).
    """
    if is_vq(ae):
        h = ae.encode(images).latents
        decoded = ae.decode(h)
        x_hat, regularisation, weight = decoded.sample, decoded.commit_loss.mean(), 1.0
    else:
        posterior = ae.encode(images).latent_dist
        x_hat = ae.decode(posterior.sample(generator=generator)).sample
        regularisation = posterior.kl().mean() / images[0].numel()
        weight = kl_weight
    reconstruction = reconstruction_loss(images, x_hat, ssim_weight, perceptual, perceptual_weight)
    return AutoencoderLosses(reconstruction + weight * regularisation, reconstruction, regularisation, x_hat)


#: the modules after the latent (a VQ autoencoder quantises before them): what a decoder fine-tune trains
DECODER_MODULES = ("post_quant_conv", "decoder")


def is_decoder_weight(name: str) -> bool:
    """Whether the state-dict entry ``name`` belongs to :data:`DECODER_MODULES`."""
    return name.split(".", 1)[0] in DECODER_MODULES


def freeze_all_but_decoder(ae: Autoencoder) -> None:
    """Only :data:`DECODER_MODULES` keep gradients: the latents ``ae`` encodes stay the same."""
    ae.requires_grad_(False)
    for name in DECODER_MODULES:
        module = getattr(ae, name, None)  # (an AutoencoderKL built without post_quant_conv has None)
        if module is not None:
            module.requires_grad_(True)


def latents_differ(ae: Autoencoder, other: Autoencoder) -> Optional[str]:
    """Why ``other`` does not encode the latents ``ae`` encodes (None when it does, bit for bit): another kind,
    latent shape or scale, or other weights before the latent (encoder, quant_conv, a VQ codebook)."""
    if type(ae) is not type(other):
        return f"it is a {type(other).__name__}, not a {type(ae).__name__}"
    for setting in ("latent_channels", "scaling_factor"):
        if ae.config.get(setting) != other.config.get(setting):
            return f"its {setting} is {other.config.get(setting)}, not {ae.config.get(setting)}"
    mine, theirs = ae.state_dict(), other.state_dict()
    for name in sorted(name for name in mine.keys() | theirs.keys() if not is_decoder_weight(name)):
        if name not in mine or name not in theirs or not torch.equal(mine[name], theirs[name]):
            return f"its weights before the latent differ (first: {name!r})"
    return None


def decoder_digest(ae: Autoencoder) -> str:
    """A short digest of the decoder's weights (:data:`DECODER_MODULES`)."""
    from .text import weights_digest

    return weights_digest(torch.nn.ModuleDict({name: getattr(ae, name) for name in DECODER_MODULES
                                               if getattr(ae, name, None) is not None}))[:12]


def decoder_last_layer(ae: Autoencoder) -> torch.Tensor:
    """The weight of the decoder's output convolution: where the adaptive GAN weight compares gradients."""
    return ae.decoder.conv_out.weight


@torch.no_grad()
def estimate_latent_scale(ae: Autoencoder, images: torch.Tensor) -> float:
    """1 / std of the unscaled latents of ``images``: the scale that gives diffusion unit-variance latents."""
    raw = encode_latents(ae, images) / latent_scale(ae)
    return float(1.0 / raw.float().std())

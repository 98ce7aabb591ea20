"""The f4 autoencoder between images and diffusion latents.

Conventions (as PathLDM uses its VQ-f4, the thesis' autoencoder, §4.1.1):

* images are float tensors in [-1, 1], shape (B, 3, H, W);
* ``encode_latents`` returns the *un-quantised* encoder output (VQ) or the posterior mean (KL),
  multiplied by the latent scale (``config.scaling_factor``; 1.0 for the PathLDM VQ-f4);
* ``decode_latents`` divides by the latent scale and, for VQ, snaps every latent pixel to its nearest
  codebook vector before decoding.

Images larger than a tile go through ``encode_latents_tiled`` / ``decode_latents_tiled``: overlapping
tiles, each coded on its own and blended with linear ramps where they overlap, so peak memory is set
by the tile size rather than the image size.

Training support for the autoencoder lives here too (losses that need no downloads: L1 plus an SSIM
term, the VQ commitment or KL term) together with the PSNR / SSIM metrics used to report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..presets import AutoencoderConfig, Preset

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


def decode_latents(ae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images, roughly in [-1, 1] (not clamped). VQ quantises first."""
    return ae.decode(latents / latent_scale(ae)).sample


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


def decode_latents_tiled(ae: Autoencoder, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """``decode_latents`` on overlapping ``tile`` x ``tile`` latent tiles, blended over ``overlap`` latent pixels."""
    factor = downsampling_factor(ae)
    return _tiled(lambda z: decode_latents(ae, z), latents, tile, overlap, factor)


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


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, ssim_weight: float = 1.0) -> torch.Tensor:
    """L1 plus ``ssim_weight`` x (1 - SSIM): sharp, structure-aware, and needs no pretrained network."""
    return F.l1_loss(x_hat, x) + ssim_weight * (1.0 - ssim(x, x_hat))


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
) -> AutoencoderLosses:
    """One training step's losses: reconstruction plus the VQ codebook/commitment or the KL term.

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
    reconstruction = reconstruction_loss(images, x_hat, ssim_weight)
    return AutoencoderLosses(reconstruction + weight * regularisation, reconstruction, regularisation, x_hat)


@torch.no_grad()
def estimate_latent_scale(ae: Autoencoder, images: torch.Tensor) -> float:
    """1 / std of the unscaled latents of ``images``: the scale that gives diffusion unit-variance latents."""
    raw = encode_latents(ae, images) / latent_scale(ae)
    return float(1.0 / raw.float().std())

"""Images of any size from a model trained on small patches, without seams.

Denoising (MultiDiffusion-style): the latent of the whole image is cut into overlapping windows of
the size the UNet was trained on. At every step each window's noise prediction is computed (windows
batched, the guidance pair included) and the predictions are blended with linear ramps where windows
overlap, so one scheduler step moves the whole latent with one coherent prediction. Classifier-free
guidance is linear in the predictions, so blending the unconditional and conditional predictions
separately equals blending the guided ones: :class:`WindowedUNet` stands in for the UNet inside
:func:`histosynth.sample.sampler.denoise` and nothing else changes.

Decoding: :func:`decode_bands` decodes the latent in overlapping tiles blended with the same ramps
(:func:`histosynth.models.autoencoder.decode_latents_tiled`, one full-width strip at a time) and hands
out finished rows top to bottom, so a slide streams to disk without ever being whole in memory. The
result equals ``decode_latents_tiled`` of the whole latent.

Memory: the UNet and decoder work on one window batch / one tile strip at a time; what grows with the
image is the latent itself (3 float32 channels at 1/16 of the pixels: 0.75 byte per output pixel
per copy, and sampling keeps a few copies) and one decoded strip. A slide's latent is kept off the
device by :mod:`histosynth.sample.seamless`, on the same :class:`WindowGrid`.

:class:`SeamMeter` measures seams: how far the gradient energy across the lines of a patch grid
differs from the gradient energy everywhere else (1.0 = the grid lines are like any other line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..data.torchdata import to_uint8
from ..errors import ConfigError
from ..models.autoencoder import Autoencoder, blend_ramp, decode_latents_tiled, downsampling_factor, tile_starts

#: Windows per UNet call (each window counts twice with guidance: unconditional and conditional).
DEFAULT_WINDOW_BATCH = 8
#: Smallest decoder tile in latent pixels: 256 px at f4, the patch size of the PathLDM autoencoder.
#: Models trained on smaller patches decode in tiles of this size too; fewer, larger tiles cost
#: less per pixel and have fewer seams to blend.
MIN_DECODE_TILE = 64

Size = tuple[int, int]


def window_overlap(window: int, overlap: Optional[int] = None) -> int:
    """Latent pixels shared by neighbouring windows (and decoder tiles): a quarter window by default."""
    overlap = window // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < window:
        raise ConfigError(f"the window overlap must be 0 to {window - 1} latent pixels, got {overlap}")
    return overlap


def as_size(size: int | Size) -> Size:
    """(height, width) from a side length or a (height, width) pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def latent_size(size: int | Size, factor: int, window: int, unet_factor: int) -> Size:
    """The latent (height, width) of an image size, refusing sizes the networks cannot produce.

    A side must be a multiple of the autoencoder's factor (no rounding: the user gets the size they
    asked for or an error naming the nearest sizes that work). A side shorter than the UNet's window
    is denoised whole, so its latent must also halve cleanly through the UNet.
    """
    sides = []
    for side in as_size(size):
        step = factor if side // factor >= window else factor * unet_factor
        if side <= 0 or side % step:
            lower, upper = (side // step) * step, (side // step + 1) * step
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            why = (f"a multiple of {factor} (the autoencoder's downsampling factor)" if step == factor
                   else f"a multiple of {step} when smaller than the model's {window * factor} px patches")
            raise ConfigError(f"image size {side} px must be {why}; use {nearest}")
        sides.append(side // factor)
    return sides[0], sides[1]


@dataclass(frozen=True)
class WindowGrid:
    """The overlapping ``window`` x ``window`` crops that cover a (height, width) latent, and their blend weights.

    Windows start at :func:`~histosynth.models.autoencoder.tile_starts` along each axis (row-major
    order); a window's weight is the product of a row and a column ramp, linear over ``overlap``
    pixels at the sides it shares with a neighbour, so the sum of all weights is separable too
    (:meth:`weight_sums`).
    """

    height: int
    width: int
    window: int
    overlap: int

    @property
    def window_size(self) -> Size:
        """(rows, columns) of every window: the window, or the latent's side where that is shorter."""
        return min(self.window, self.height), min(self.window, self.width)

    @property
    def tops(self) -> list[int]:
        return tile_starts(self.height, self.window, self.overlap)

    @property
    def lefts(self) -> list[int]:
        return tile_starts(self.width, self.window, self.overlap)

    def windows(self) -> list[tuple[int, int]]:
        """(top, left) of every window, row by row."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def _ramp(self, start: int, length: int, side: int) -> torch.Tensor:
        return blend_ramp(length, self.overlap, start > 0, start + length < side)

    def weights(self, corners: list[tuple[int, int]]) -> torch.Tensor:
        """(n, 1, rows, columns) float32 blend weights of the windows at ``corners``."""
        win_h, win_w = self.window_size
        rows = torch.stack([self._ramp(top, win_h, self.height) for top, _ in corners])
        cols = torch.stack([self._ramp(left, win_w, self.width) for _, left in corners])
        return (rows[:, :, None] * cols[:, None, :])[:, None]

    def weight_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(height,) and (width,) float32: the sum of all window weights at (y, x) is ``rows[y] * cols[x]``."""
        win_h, win_w = self.window_size
        return self._ramp_sum(self.tops, win_h, self.height), self._ramp_sum(self.lefts, win_w, self.width)

    def _ramp_sum(self, starts: list[int], length: int, side: int) -> torch.Tensor:
        total = torch.zeros(side)
        for start in starts:
            total[start:start + length] += self._ramp(start, length, side)
        return total


@dataclass
class WindowedUNet:
    """Calls a UNet on overlapping ``window`` x ``window`` crops of a larger latent and blends them.

    Called like the UNet (``(sample, timestep, encoder_hidden_states=..., encoder_attention_mask=...)
    -> .sample``) so that the sampler's loop, guidance and scheduler are used unchanged. Every window
    of every batch element is one crop; ``window_batch`` crops go through the UNet per call. A label
    map concatenated to the latent (mask conditioning) is cropped with it, so each window reads the
    part of the map under it. (A slide's single latent, which may not fit on the device, is denoised
    by :mod:`histosynth.sample.seamless` instead, on the same :class:`WindowGrid`.)
    """

    unet: torch.nn.Module
    window: int
    overlap: Optional[int] = None
    window_batch: int = DEFAULT_WINDOW_BATCH
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.overlap = window_overlap(self.window, self.overlap)
        if self.window_batch < 1:
            raise ConfigError(f"the window batch must be at least 1, got {self.window_batch}")

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 encoder_attention_mask: Optional[torch.Tensor] = None, **kwargs) -> UNet2DConditionOutput:
        height, width = sample.shape[-2:]
        grid = WindowGrid(height, width, self.window, self.overlap)
        win_h, win_w = grid.window_size
        crops = [(top, left, n) for top, left in grid.windows() for n in range(sample.shape[0])]
        blended: Optional[torch.Tensor] = None  # shaped like the output: without the input's label-map channels
        timesteps = torch.as_tensor(timestep, device=sample.device)
        for start in range(0, len(crops), self.window_batch):
            chunk = crops[start:start + self.window_batch]
            members = torch.tensor([n for _, _, n in chunk], device=sample.device)
            x = torch.stack([sample[n, :, top:top + win_h, left:left + win_w] for top, left, n in chunk])
            eps = self.unet(
                x,
                timesteps if timesteps.ndim == 0 else timesteps[members],
                encoder_hidden_states=None if encoder_hidden_states is None else encoder_hidden_states[members],
                encoder_attention_mask=None if encoder_attention_mask is None else encoder_attention_mask[members],
                **kwargs,
            ).sample.float()  # blended in float32 whatever the precision the UNet ran in
            self.calls += 1
            if blended is None:
                blended = eps.new_zeros(sample.shape[0], eps.shape[1], height, width)
            weighted = eps * grid.weights([(top, left) for top, left, _ in chunk]).to(eps)
            for (top, left, n), piece in zip(chunk, weighted, strict=True):
                blended[n, :, top:top + win_h, left:left + win_w] += piece
        row_sum, col_sum = (total.to(blended) for total in grid.weight_sums())
        return UNet2DConditionOutput(sample=blended / row_sum[:, None] / col_sum[None, :])


def decode_tile(window: int) -> int:
    """The decoder tile (latent pixels) for a model whose UNet window is ``window``."""
    return max(window, MIN_DECODE_TILE)


def window_count(latent: Size, window: int, overlap: int) -> int:
    """How many windows cover a latent of this (height, width)."""
    return len(tile_starts(latent[0], window, overlap)) * len(tile_starts(latent[1], window, overlap))


def decode_bands(ae: Autoencoder, latents: torch.Tensor, tile: int, overlap: Optional[int] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 precision: Optional[str] = None) -> Iterator[np.ndarray]:
    """uint8 (rows, width, 3) bands of the decoded image of one latent (1, C, h, w), top to bottom.

    See :func:`decode_row_bands`, which reads the latent a strip of rows at a time.
    """
    if latents.shape[0] != 1:
        raise ValueError("decode_bands decodes one latent at a time")
    yield from decode_row_bands(ae, lambda top, bottom: latents[..., top:bottom, :], latents.shape[-2], tile,
                                overlap, progress, precision)


#: (first latent row, end row) -> the latent's rows (1, C, rows, w), wherever the latent is kept
LatentRows = Callable[[int, int], torch.Tensor]


def decode_row_bands(ae: Autoencoder, latent_rows: LatentRows, height: int, tile: int, overlap: Optional[int] = None,
                     progress: Optional[Callable[[int, int], None]] = None,
                     precision: Optional[str] = None) -> Iterator[np.ndarray]:
    """uint8 (rows, width, 3) bands of the decoded image of a latent of ``height`` rows, top to bottom.

    Strips of ``tile`` latent rows (read with ``latent_rows``) are decoded with
    ``decode_latents_tiled`` (which blends across columns; each tile is decoded on the autoencoder's
    device and blended where the strip is) and blended across rows with the same ramps; rows are
    handed out as soon as no later strip touches them. ``progress(strips done, strips)`` is called
    after each strip. The decoder runs at ``precision`` (see
    :func:`histosynth.models.autoencoder.decode_latents`).
    """
    factor = downsampling_factor(ae)
    overlap = window_overlap(tile, overlap)
    device = next(ae.parameters()).device
    starts = tile_starts(height, tile, overlap)
    strip_rows = min(tile, height) * factor
    pending: Optional[torch.Tensor] = None  # weighted sum of decoded rows from `top` on
    pending_weight: Optional[torch.Tensor] = None
    top = 0
    for index, start in enumerate(starts):
        with torch.no_grad():
            strip = decode_latents_tiled(ae, latent_rows(start, start + min(tile, height)), tile, overlap,
                                         precision, compute_device=device)[0]
        weight = blend_ramp(strip_rows, overlap * factor, start > 0, start + tile < height).to(strip)
        pending, pending_weight = _add_rows(pending, pending_weight, top, strip * weight[:, None], weight,
                                            start * factor)
        final_until = starts[index + 1] * factor if index + 1 < len(starts) else height * factor
        done = final_until - top
        rows = pending[:, :done] / pending_weight[:done, None]
        yield to_uint8(rows[None])[0]
        pending, pending_weight, top = pending[:, done:], pending_weight[done:], final_until
        if progress is not None:
            progress(index + 1, len(starts))


def _add_rows(pending: Optional[torch.Tensor], pending_weight: Optional[torch.Tensor], top: int,
              rows: torch.Tensor, weight: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add weighted rows starting at image row ``at`` to a buffer of rows starting at ``top``."""
    end = at - top + rows.shape[1]
    if pending is None:
        pending, pending_weight = rows.new_zeros(rows.shape[0], 0, rows.shape[2]), weight.new_zeros(0)
    if end > pending.shape[1]:
        grow = end - pending.shape[1]
        pending = torch.cat([pending, pending.new_zeros(pending.shape[0], grow, pending.shape[2])], dim=1)
        pending_weight = torch.cat([pending_weight, pending_weight.new_zeros(grow)])
    pending[:, at - top:end] += rows
    pending_weight[at - top:end] += weight
    return pending, pending_weight


class SeamMeter:
    """How much the lines of a ``period`` px patch grid stand out from every other line of an image.

    The energy of two neighbouring pixels is their squared RGB difference. Pairs that straddle a
    grid line (pixel k*period - 1 and k*period, along either axis) are "on the grid", all other
    neighbouring pairs "off". The score is mean(on) / mean(off) or its inverse, whichever is larger:
    1.0 where the grid lines look like any other line, and above 1 where patches meet visibly -
    whether as an edge (more energy on the grid) or as flat borders (less; an untrained decoder's
    zero padding does that). Fed band by band, so slides of any size are measured as they stream.
    """

    def __init__(self, period: int):
        if period < 2:
            raise ValueError(f"the grid period must be at least 2 px, got {period}")
        self.period = period
        self.sums = np.zeros(2)  # on, off
        self.counts = np.zeros(2)
        self.rows_seen = 0
        self.last_row: Optional[np.ndarray] = None

    def update(self, band: np.ndarray) -> "SeamMeter":
        pixels = np.asarray(band, dtype=np.int32)
        across_cols = ((pixels[:, 1:] - pixels[:, :-1]) ** 2).sum(axis=-1)
        self._add(across_cols, _on_grid(pixels.shape[1], self.period)[None, :])
        first_row = self.rows_seen
        if self.last_row is not None:  # the pairs between the previous band and this one
            pixels = np.concatenate([self.last_row[None], pixels])
            first_row -= 1
        across_rows = ((pixels[1:] - pixels[:-1]) ** 2).sum(axis=-1)
        self._add(across_rows, _on_grid(pixels.shape[0], self.period, offset=first_row)[:, None])
        self.last_row = pixels[-1]
        self.rows_seen += len(band)
        return self

    def _add(self, energy: np.ndarray, on: np.ndarray) -> None:
        on = np.broadcast_to(on, energy.shape)
        self.sums += energy[on].sum(dtype=np.int64), energy[~on].sum(dtype=np.int64)
        self.counts += on.sum(), (~on).sum()

    @property
    def ratio(self) -> float:
        """mean on-grid energy / mean off-grid energy; NaN without grid lines or texture."""
        if self.counts[0] == 0 or self.sums[1] == 0:
            return math.nan
        on, off = self.sums / self.counts
        return float(on / off)

    @property
    def score(self) -> float:
        """max(ratio, 1 / ratio): 1 = no seams; NaN when undefined."""
        ratio = self.ratio
        if ratio == 0:
            return math.inf
        return ratio if math.isnan(ratio) else max(ratio, 1 / ratio)


def _on_grid(length: int, period: int, offset: int = 0) -> np.ndarray:
    """For each of the length - 1 neighbour pairs (i, i+1): whether i + 1 (+ offset) starts a grid cell."""
    return (np.arange(1, length) + offset) % period == 0


def seam_score(image: np.ndarray, period: int) -> float:
    """:class:`SeamMeter` score of a whole (H, W, 3) image."""
    return SeamMeter(period).update(image).score

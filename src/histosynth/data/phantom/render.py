"""Rendering a window of a layout: geometry -> stain amounts -> texture, blur -> RGB, and the mask.

A window is rendered with a small halo so that the blur near its edge sees the same neighbours it
would see inside a larger window: any tiling of a slide gives the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from .fields import window_geometry
from .layout import Layout
from .noise import grid_noise
from .shading import shade_window
from .stain import Stain

#: Optical blur of the scanner, in µm (standard deviation).
BLUR_UM = 0.32


def _halo(mpp: float) -> int:
    return int(math.ceil(3 * BLUR_UM / mpp)) + 1


def render_mask(layout: Layout, x: int, y: int, width: int, height: int) -> np.ndarray:
    """The label mask of a window (uint8 class ids), without rendering its image."""
    xs = np.arange(x, x + width, dtype=np.float64)
    ys = np.arange(y, y + height, dtype=np.float64)
    return window_geometry(layout, xs, ys).label


def render_window(layout: Layout, stain: Stain, x: int, y: int, width: int,
                  height: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (height, width, 3) and label mask (height, width) of the window at (x, y)."""
    halo = _halo(layout.mpp)
    xs = np.arange(x - halo, x + width + halo, dtype=np.float64)
    ys = np.arange(y - halo, y + height + halo, dtype=np.float64)
    geom = window_geometry(layout, xs, ys)
    fields = shade_window(layout, geom)
    h, e = _textured(layout, xs, ys, fields.h, fields.e, fields.texture, geom.tissue)
    sigma = BLUR_UM / layout.mpp
    h = gaussian_filter(h, sigma, mode="nearest", truncate=3.0)
    e = gaussian_filter(e, sigma, mode="nearest", truncate=3.0)
    inner = (slice(halo, halo + height), slice(halo, halo + width))
    return stain.to_rgb(h[inner], e[inner]), geom.label[inner]


def _textured(layout: Layout, xs: np.ndarray, ys: np.ndarray, h: np.ndarray, e: np.ndarray,
              texture: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Granular and mottled texture, uneven section thickness, and clean glass outside the tissue."""
    um = 1.0 / layout.mpp
    grain = grid_noise(xs, ys, 1.0 * um, layout.seed + 11)
    mottle = grid_noise(xs, ys, 6.0 * um, layout.seed + 12)
    thickness = 1.0 + 0.12 * grid_noise(xs, ys, 700.0 * um, layout.seed + 13)
    e = e * thickness * (1.0 + texture * (0.22 * mottle + 0.18 * grain))
    h = h * thickness * (1.0 + 0.35 * grain)
    glass = 0.006 + 0.003 * grain
    return (np.where(tissue, h, 0.0).astype(np.float32),
            np.where(tissue, e, glass).astype(np.float32))

"""Deterministic noise as functions of global pixel coordinates.

Every random texture of the phantom is a pure function of (seed, x, y) in level-0 pixels, never
of the window being rendered. That is what lets a slide be rendered tile by tile, in any order and
tiling, with structures and textures continuing seamlessly across tile borders.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)
_GOLDEN = np.uint32(0x9E3779B9)


def _as_u32(value: np.ndarray | int) -> np.ndarray:
    """Integers (negative ones too) as uint32 with wrap-around, ready for hashing."""
    return (np.asarray(value, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _finalize(h: np.ndarray) -> np.ndarray:
    """Murmur3's avalanche step: every input bit flips about half of the output bits."""
    h = h ^ (h >> np.uint32(16))
    h = h * _M1
    h = h ^ (h >> np.uint32(13))
    h = h * _M2
    return h ^ (h >> np.uint32(16))


def hash_u32(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """A well-mixed uint32 hash of integer keys (broadcast together) under a seed."""
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps on purpose
        h = _finalize(_as_u32(seed) * _GOLDEN + np.uint32(1))
        for key in keys:
            h = _finalize(h ^ (_as_u32(key) * _GOLDEN))
    return h


def hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform float32 in [0, 1) from a hash of integer keys."""
    return (hash_u32(seed, *keys) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def split_uniforms(h: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to three independent uniforms in [0, 1) from the 10-bit fields of one uint32 hash."""
    return [((h >> np.uint32(10 * i)) & np.uint32(1023)).astype(np.float32) * np.float32(1 / 1024)
            for i in range(count)]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def grid_noise(xs: np.ndarray, ys: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Value noise in [-1, 1] over the grid ``ys x xs`` (global pixel coordinates), shape (H, W).

    Random values sit on a lattice of spacing `cell` pixels and are interpolated with smoothstep
    weights. The grid is separable, so the lattice is hashed once and interpolated along x, then y.
    """
    gx = np.asarray(xs, dtype=np.float64) / cell
    gy = np.asarray(ys, dtype=np.float64) / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    wx = _smoothstep((gx - ix).astype(np.float32))
    wy = _smoothstep((gy - iy).astype(np.float32))
    lx, ly = ix.min(), iy.min()
    lattice_x = np.arange(lx, ix.max() + 2)
    lattice_y = np.arange(ly, iy.max() + 2)
    values = hash_uniform(seed, lattice_x[None, :], lattice_y[:, None]) * 2.0 - 1.0
    cx, cy = ix - lx, iy - ly
    along_x = values[:, cx] * (1.0 - wx) + values[:, cx + 1] * wx
    return along_x[cy] * (1.0 - wy)[:, None] + along_x[cy + 1] * wy[:, None]


def point_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """The same value noise as :func:`grid_noise`, at scattered points."""
    gx = np.asarray(x, dtype=np.float64) / cell
    gy = np.asarray(y, dtype=np.float64) / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    wx = _smoothstep((gx - ix).astype(np.float32))
    wy = _smoothstep((gy - iy).astype(np.float32))

    def corner(dx: int, dy: int) -> np.ndarray:
        return hash_uniform(seed, ix + dx, iy + dy) * 2.0 - 1.0

    top = corner(0, 0) * (1.0 - wx) + corner(1, 0) * wx
    bottom = corner(0, 1) * (1.0 - wx) + corner(1, 1) * wx
    return top * (1.0 - wy) + bottom * wy


def grid_fbm(xs: np.ndarray, ys: np.ndarray, cell: float, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of :func:`grid_noise` octaves (cell halving, amplitude halving), about [-1, 1]."""
    return _fractal_sum(grid_noise, xs, ys, cell, seed, octaves)


def point_fbm(x: np.ndarray, y: np.ndarray, cell: float, seed: int, octaves: int = 3) -> np.ndarray:
    """:func:`grid_fbm` at scattered points."""
    return _fractal_sum(point_noise, x, y, cell, seed, octaves)


def _fractal_sum(noise: Callable[[np.ndarray, np.ndarray, float, int], np.ndarray], x: np.ndarray, y: np.ndarray,
                 cell: float, seed: int, octaves: int) -> np.ndarray:
    """``octaves`` octaves of ``noise``, each with half the cell, half the amplitude and its own seed."""
    total, norm = 0.0, 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        total = total + amplitude * noise(x, y, cell / 2**octave, seed + 7919 * octave)
        norm += amplitude
    return total / norm

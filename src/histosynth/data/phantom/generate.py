"""Phantom patches and phantom slides, each with its exact label mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ... import validation
from ...errors import DataError
from . import layout as lay
from .mixes import PhantomMix, resolve_mix
from .render import render_mask, render_window
from .stain import Stain

#: Side of the square windows a slide is rendered in.
SLIDE_TILE = 1024


def _check_size(name: str, value: int, minimum: int = 16) -> None:
    if int(value) != value or value < minimum:
        raise DataError(f"{name} must be a whole number of pixels >= {minimum}, got {value}")


def _check_mpp(mpp: float) -> None:
    if not 0.05 <= mpp <= 4.0:
        raise DataError(f"microns per pixel must lie between 0.05 and 4, got {mpp}")


def check_phantom_settings(size: int, seed: int, mpp: float) -> None:
    """A patch side, seed and mpp that phantom rendering can use; checked before anything is written."""
    _check_size("size", size)
    validation.seed(seed, error=DataError)
    _check_mpp(mpp)


@dataclass
class _PatchPlan:
    layout: lay.Layout
    stain: Stain


def _plan_patch(seed: int, size: int, mix: PhantomMix, mpp: float) -> _PatchPlan:
    """A patch's surroundings: large structures may reach in from outside it."""
    rng = np.random.default_rng([seed, 2])
    stain = Stain.random(rng)
    margin = max(spec.radius_um[1] for spec in lay.LARGE_STRUCTURES.values()) / mpp + lay.FILL_SPACING_UM / mpp
    region = (-margin, -margin, size + margin, size + margin)
    focus = lay.place_focus(rng, seed, mix, size, mpp) if mix.focus is not None else None
    tissue = None
    if rng.uniform() < mix.glass:
        normal = rng.uniform(0, 2 * math.pi)
        shift = rng.uniform(0.0, 0.45) * size   # glass covers about 5-50 % of the patch
        tissue = lay.PatchBorder(size / 2 - shift * math.cos(normal), size / 2 - shift * math.sin(normal),
                                 normal, wobble_px=6.0 / mpp, seed=seed + 17)
    return _PatchPlan(lay.plan_layout(seed, mix, region, mpp, tissue=tissue, focus=focus, rng=rng,
                                       wrap=True), stain)


def phantom_patch(seed: int, size: int = 256, mix: str | PhantomMix | None = None,
                  mpp: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A phantom patch: RGB uint8 (size, size, 3) and its label mask (size, size) in the renal schema.

    `mix` is a :class:`PhantomMix` or the name of one (see :data:`MIXES`); the default follows the
    thesis data's class shares. The same seed, size, mix and mpp give identical arrays.
    """
    validation.seed(seed, error=DataError)
    _check_size("size", size)
    _check_mpp(mpp)
    plan = _plan_patch(seed, size, resolve_mix(mix), mpp)
    return render_window(plan.layout, plan.stain, 0, 0, size, size)


def phantom_patch_mask(seed: int, size: int = 256, mix: str | PhantomMix | None = None,
                       mpp: float = 0.5) -> np.ndarray:
    """The label mask :func:`phantom_patch` returns for these arguments, without the image."""
    validation.seed(seed, error=DataError)
    _check_size("size", size)
    _check_mpp(mpp)
    return render_mask(_plan_patch(seed, size, resolve_mix(mix), mpp).layout, 0, 0, size, size)


@dataclass
class PhantomSlide:
    """A whole phantom slide: a kidney section with irregular borders on glass, rendered on demand.

    Any region can be read at level 0 (:meth:`read_region`); regions agree pixel for pixel
    wherever they overlap, so the slide can be rendered band by band at any size.
    """

    seed: int
    width: int
    height: int
    mpp: float
    layout: lay.Layout
    stain: Stain

    @classmethod
    def create(cls, seed: int, width: int, height: int, mpp: float = 0.5,
               mix: str | PhantomMix | None = None) -> "PhantomSlide":
        validation.seed(seed, error=DataError)
        _check_size("width", width)
        _check_size("height", height)
        _check_mpp(mpp)
        rng = np.random.default_rng([seed, 3])
        stain = Stain.random(rng)
        outline = lay.SlideOutline.random(rng, width, height, mpp, seed + 23)
        layout = lay.plan_layout(seed, resolve_mix(mix), (0.0, 0.0, float(width), float(height)), mpp,
                                 tissue=outline, rng=rng)
        return cls(seed, width, height, mpp, layout, stain)

    def read_region(self, x: int, y: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 and label mask of a level-0 region (it may extend past the slide: glass)."""
        return render_window(self.layout, self.stain, x, y, width, height)

    def bands(self, band_height: int = SLIDE_TILE,
              on_tile: Callable[[], None] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Full-width bands (top row, RGB, mask) from top to bottom, rendered in square tiles."""
        for top in range(0, self.height, band_height):
            rows = min(band_height, self.height - top)
            image = np.empty((rows, self.width, 3), dtype=np.uint8)
            mask = np.empty((rows, self.width), dtype=np.uint8)
            for left in range(0, self.width, SLIDE_TILE):
                cols = min(SLIDE_TILE, self.width - left)
                image[:, left:left + cols], mask[:, left:left + cols] = self.read_region(left, top, cols, rows)
                if on_tile is not None:
                    on_tile()
            yield top, image, mask

    def tile_count(self, band_height: int = SLIDE_TILE) -> int:
        return math.ceil(self.height / band_height) * math.ceil(self.width / SLIDE_TILE)

    def render(self, on_tile: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole slide in memory: RGB uint8 (height, width, 3) and mask (height, width)."""
        image = np.empty((self.height, self.width, 3), dtype=np.uint8)
        mask = np.empty((self.height, self.width), dtype=np.uint8)
        for top, band, band_mask in self.bands(on_tile=on_tile):
            image[top:top + len(band)] = band
            mask[top:top + len(band)] = band_mask
        return image, mask


def phantom_slide(seed: int, width: int, height: int, mpp: float = 0.5,
                  mix: str | PhantomMix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole phantom slide in memory: RGB uint8 (height, width, 3) and its label mask.

    For slides too large for memory, use :meth:`PhantomSlide.create` and read it band by band.
    """
    return PhantomSlide.create(seed, width, height, mpp, mix).render()

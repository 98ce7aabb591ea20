"""Edited label masks: phantom structures stamped onto existing masks.

To ask a mask-conditioned model for a layout that no slide has (e.g. a real layout with two more
glomeruli), a mask is edited: elliptical glomeruli, sclerotic glomeruli, arteries or dilated tubuli
of the phantom's sizes (:data:`~histosynth.data.phantom.layout.LARGE_STRUCTURES`, at the mask's µm per
pixel) are drawn onto it. A structure goes where it lies on tissue (any class but the schema's
background classes) for at least ``min_on_tissue`` of its area, and keeps a gap to the large
structures of the mask and to those stamped before it; it overwrites the tubuli and interstitium it
covers, as a structure in a real slide displaces them. When no place is left after a number of
tries, fewer are stamped and the result says so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ... import validation
from ...errors import ConfigError, DataError
from ...io import write_png_atomic
from ...schema import RENAL, ClassSchema
from .export import mask_description, phantom_seed, write_mask_table
from .layout import GAP_UM, LARGE_STRUCTURES

#: random centres tried for each structure before giving up
TRIES = 200


@dataclass(frozen=True)
class Addition:
    """``count`` structures of class ``class_id`` to stamp onto each mask."""

    class_id: int
    count: int


def parse_additions(text: str, schema: ClassSchema) -> list[Addition]:
    """``"Glomeruli=2,Arteries=1"`` (class names, any case) -> additions; only classes the phantom draws
    as large structures can be stamped."""
    additions = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"--add {part!r}: write CLASS=COUNT with a count of at least 1, e.g. Glomeruli=2")
        class_id = schema.id_of(name)
        if class_id not in LARGE_STRUCTURES:
            stampable = ", ".join(schema.name_of(i) for i in LARGE_STRUCTURES)
            raise ConfigError(f"--add: {schema.name_of(class_id)} cannot be stamped; stampable classes: {stampable}")
        additions.append(Addition(class_id, int(count)))
    if not additions:
        raise ConfigError("--add names no structures; e.g. --add Glomeruli=2")
    return additions


@dataclass(frozen=True)
class Stamped:
    mask: np.ndarray
    asked: int
    placed: int


def stamp_structures(mask: np.ndarray, additions: Sequence[Addition], schema: ClassSchema, mpp: float,
                     seed: int, min_on_tissue: float = 0.9) -> Stamped:
    """A copy of ``mask`` with the structures of ``additions`` drawn onto its tissue."""
    rng = np.random.default_rng(seed)
    edited = mask.copy()
    # large structures already there, stamped ones, and the gap around each, are kept clear
    blocked = _grown(np.isin(mask, list(LARGE_STRUCTURES)), GAP_UM / mpp)
    tissue = ~np.isin(mask, schema.uncaptioned_ids)
    placed = 0
    for addition in additions:
        for _ in range(addition.count):
            shape = _ellipse(rng, addition.class_id, mask.shape, mpp)
            for _ in range(TRIES):
                region = shape(rng.uniform(0, mask.shape[1]), rng.uniform(0, mask.shape[0]))
                if region.any() and tissue[region].mean() >= min_on_tissue and not blocked[region].any():
                    edited[region] = addition.class_id
                    blocked |= _grown(region, GAP_UM / mpp)
                    placed += 1
                    break
    return Stamped(edited, sum(a.count for a in additions), placed)


def _ellipse(rng: np.random.Generator, class_id: int, shape: tuple[int, ...], mpp: float):
    """A random ellipse of the class's phantom size and aspect; returns centre -> pixel mask."""
    spec = LARGE_STRUCTURES[class_id]
    radius = rng.uniform(*spec.radius_um) / mpp
    aspect = rng.uniform(*spec.aspect)
    major, minor = radius / math.sqrt(aspect), radius * math.sqrt(aspect)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[:shape[0], :shape[1]]

    def region(cx: float, cy: float) -> np.ndarray:
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        return (u / major) ** 2 + (v / minor) ** 2 <= 1.0

    return region


def _grown(region: np.ndarray, pixels: float) -> np.ndarray:
    """``region`` dilated by about ``pixels`` (a square neighbourhood; the gap need not be exact)."""
    from scipy.ndimage import binary_dilation

    steps = max(1, int(round(pixels)))
    return binary_dilation(region, iterations=steps)


def write_stamped_masks(masks: Sequence[tuple[str, str, np.ndarray]], additions: Sequence[Addition],
                        out: str | Path, mpp: float = 0.5, seed: int = 0) -> tuple[Path, int, int]:
    """Each (name, source, mask) edited into ``out/<name>.png``, with ``masks.csv`` (mask, source,
    structures added, caption, class shares). Returns the table's path and the structures placed
    and asked for in all."""
    validation.positive_float(mpp, "--mpp")
    validation.seed(seed)
    out = Path(out)
    repeated = sorted(name for name, count in Counter(name for name, _, _ in masks).items() if count > 1)
    if repeated:
        raise DataError(f"several masks are named {', '.join(repeated[:3])}; edit them in separate runs")
    out.mkdir(parents=True, exist_ok=True)
    rows, placed, asked = [], 0, 0
    for index, (name, source, mask) in enumerate(masks):
        stamped = stamp_structures(mask, additions, RENAL, mpp, phantom_seed(seed, index))
        write_png_atomic(out / f"{name}.png", stamped.mask)
        rows.append({"mask": f"{name}.png", "source": source, "added": stamped.placed,
                     **mask_description(stamped.mask)})
        placed, asked = placed + stamped.placed, asked + stamped.asked
    return write_mask_table(out, rows), placed, asked

"""Where the phantom's structures lie: a layout planned once, in global level-0 pixels.

A layout is a list of elliptical structures (tubuli, glomeruli, arteries...), a list of
interstitial cells and the tissue outline. Rendering any window of a slide reads the same layout,
so a structure that crosses a tile border continues exactly on the other side.

Placement, in this order:

* *Large structures* (glomeruli, sclerotic glomeruli, arteries, dilated tubuli) are thrown at
  random and kept when they do not touch one already placed. Their number is the mix's share
  times the tissue area divided by their mean area (rounded up or down at random). Sclerotic
  glomeruli and dilated tubuli prefer "damaged" cortex (a smooth random field), as they cluster
  in real kidneys.
* *Tubuli* fill the rest on a jittered hexagonal grid. Neighbours overlap a little and are
  flattened against each other when rendered, as packed tubuli are. A smooth random field thins
  the grid to leave interstitium where the mix wants it; atrophic tubuli (small, with wide
  interstitium around them) take the sites in damaged cortex.
* *Interstitial cells* (fibroblasts, lymphocytes, red blood cells) are scattered everywhere and
  only show where no structure covers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Protocol

import numpy as np

from . import mixes as m
from .noise import grid_fbm, hash_u32, point_fbm


class Kind(IntEnum):
    """Structure kinds; several can share a class (proximal and distal tubuli are both Tubuli)."""

    PROXIMAL = 0
    DISTAL = 1
    ATROPHIC = 2
    DILATED = 3
    GLOMERULUS = 4
    SCLEROTIC = 5
    ARTERY = 6


#: Renal class id of each kind.
LABEL_OF_KIND = np.array([m.TUBULI, m.TUBULI, m.ATROPHIC, m.DILATED, m.GLOMERULI, m.SCLEROTIC, m.ARTERIES],
                         dtype=np.uint8)


@dataclass(frozen=True)
class LargeSpec:
    """Size and placement of a large structure kind."""

    kind: Kind
    radius_um: tuple[float, float]   # equivalent radius sqrt(a * b)
    aspect: tuple[float, float]      # minor / major semi-axis
    damage_bias: float               # > 0: prefers damaged cortex

    def mean_area_um2(self) -> float:
        lo, hi = self.radius_um
        return math.pi * (lo * lo + lo * hi + hi * hi) / 3.0


#: Large structures by class, largest first (they are placed in this order).
LARGE_STRUCTURES: dict[int, LargeSpec] = {
    m.GLOMERULI: LargeSpec(Kind.GLOMERULUS, (50.0, 85.0), (0.85, 1.0), 0.0),
    m.SCLEROTIC: LargeSpec(Kind.SCLEROTIC, (45.0, 75.0), (0.85, 1.0), 1.5),
    m.ARTERIES: LargeSpec(Kind.ARTERY, (25.0, 70.0), (0.75, 1.0), 0.0),
    m.DILATED: LargeSpec(Kind.DILATED, (30.0, 60.0), (0.6, 1.0), 1.5),
}

#: Centre-to-centre spacing of the tubule grid, and tubule radii as fractions of it.
FILL_SPACING_UM = 46.0
FILL_RADIUS = {Kind.PROXIMAL: 0.54, Kind.DISTAL: 0.44, Kind.ATROPHIC: 0.30}
DISTAL_FRACTION = 0.35
#: Label area per grid site (in site areas) of a tubule of each kind. With every site filled,
#: neighbours flatten each other and keep a gap of interstitium: 0.79 for proximal and distal
#: tubuli (measured on large masks); atrophic ones sit in thinned, damaged cortex, which leaves
#: them less than their measured 0.33 on average.
FILL_COVERAGE = {"tubule": 0.79, "atrophic": 0.285}
#: Share of the tubule grid lost next to large structures (their margins cut tubuli short).
#: This and the atrophic coverage are calibrated so that the default mix's mean patch shares
#: match the thesis data (tests/data/test_phantom.py checks them).
FILL_LOSS_NEAR_LARGE = 1.14

#: Interstitium kept between neighbouring structures (µm).
GAP_UM = 2.2
#: Interstitial cells per µm² of tissue.
FIBROBLAST_DENSITY = 1 / 450.0
LYMPHOCYTE_DENSITY = 1 / 200.0   # at full damage
RBC_DENSITY = 1 / 4000.0
CAPILLARY_DENSITY = 1 / 1500.0

#: Scales (µm) of the smooth fields that steer placement.
DAMAGE_CELL_UM = 420.0
THINNING_CELL_UM = 160.0


class TissueShape(Protocol):
    """Where the tissue is: a signed distance-like field in pixels, positive inside."""

    def field(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray: ...

    def field_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SlideOutline:
    """A kidney section: an ellipse with a hilum notch, a wavy outline and a ragged edge."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    notch_x: float
    notch_y: float
    notch_r: float
    wobble_px: float
    ragged_px: float
    seed: int

    @classmethod
    def random(cls, rng: np.random.Generator, width: int, height: int, mpp: float, seed: int) -> "SlideOutline":
        rx, ry = width * rng.uniform(0.36, 0.43), height * rng.uniform(0.36, 0.43)
        angle = rng.uniform(-0.4, 0.4)
        side = rng.choice([-1.0, 1.0])
        # the hilum sits on a long side of the kidney
        nx = width / 2 - side * ry * math.sin(angle) * 1.05
        ny = height / 2 + side * ry * math.cos(angle) * 1.05
        return cls(width / 2, height / 2, rx, ry, angle, nx, ny, min(rx, ry) * rng.uniform(0.18, 0.3),
                   wobble_px=min(rx, ry) * 0.12, ragged_px=min(8.0 / mpp, min(rx, ry) * 0.05), seed=seed)

    def _shape(self, dx: np.ndarray, dy: np.ndarray, ndx: np.ndarray, ndy: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.rx
        v = (-dx * s + dy * c) / self.ry
        ellipse = (1.0 - np.sqrt(u * u + v * v)) * min(self.rx, self.ry)
        notch = np.sqrt(ndx * ndx + ndy * ndy) - self.notch_r
        return np.minimum(ellipse, notch)

    def field(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        dx = (xs - self.cx).astype(np.float32)[None, :]
        dy = (ys - self.cy).astype(np.float32)[:, None]
        ndx = (xs - self.notch_x).astype(np.float32)[None, :]
        ndy = (ys - self.notch_y).astype(np.float32)[:, None]
        wobble = grid_fbm(xs, ys, self.wobble_px * 4, self.seed, octaves=4)
        ragged = grid_fbm(xs, ys, self.ragged_px * 5, self.seed + 1, octaves=2)
        return self._shape(dx, dy, ndx, ndy) + self.wobble_px * wobble + self.ragged_px * ragged

    def field_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        shape = self._shape(x - self.cx, y - self.cy, x - self.notch_x, y - self.notch_y)
        return (shape + self.wobble_px * point_fbm(x, y, self.wobble_px * 4, self.seed, octaves=4)
                + self.ragged_px * point_fbm(x, y, self.ragged_px * 5, self.seed + 1, octaves=2))


@dataclass(frozen=True)
class PatchBorder:
    """A rough, nearly straight tissue border crossing a patch; glass on one side."""

    px: float
    py: float
    normal: float
    wobble_px: float
    seed: int

    def _line(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        return dx * math.cos(self.normal) + dy * math.sin(self.normal)

    def field(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        line = self._line((xs - self.px).astype(np.float32)[None, :], (ys - self.py).astype(np.float32)[:, None])
        return line + self.wobble_px * grid_fbm(xs, ys, self.wobble_px * 6, self.seed, octaves=3)

    def field_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._line(x - self.px, y - self.py) + self.wobble_px * point_fbm(x, y, self.wobble_px * 6,
                                                                                 self.seed, octaves=3)


@dataclass
class _Ellipses:
    """Ellipses as equal-length columns, one row each: kind, centre (px), semi-axes (px), orientation."""

    kind: np.ndarray
    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray

    def take(self, index: np.ndarray):
        """The rows at ``index``, as the same kind of table."""
        return type(self)(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def near(self, x0: float, y0: float, x1: float, y1: float, reach: np.ndarray | None = None) -> np.ndarray:
        """Indices of the rows whose centre lies within ``reach`` (default: the semi-axis ``a``) of the window."""
        reach = self.a if reach is None else reach
        return np.flatnonzero((self.x + reach > x0) & (self.x - reach < x1)
                              & (self.y + reach > y0) & (self.y - reach < y1))


@dataclass
class Structures(_Ellipses):
    """Elliptical structures: kind, centre, semi-axes (px), orientation and a hash key each."""

    key: np.ndarray

    @classmethod
    def empty(cls) -> "Structures":
        return cls(*(np.zeros(0, dtype=t) for t in (np.int8, np.float64, np.float64, np.float32,
                                                     np.float32, np.float32, np.uint32)))

    @classmethod
    def concat(cls, parts: list["Structures"]) -> "Structures":
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def radius(self) -> np.ndarray:
        """Equivalent radius sqrt(a * b) in pixels."""
        return np.sqrt(self.a * self.b)


class CellKind(IntEnum):
    FIBROBLAST = 0
    LYMPHOCYTE = 1
    RED_BLOOD_CELL = 2
    CAPILLARY = 3


@dataclass
class Cells(_Ellipses):
    """Interstitial cells: kind, centre (px), semi-axes (px), orientation."""


@dataclass
class Layout:
    """Everything placed on a slide (or a patch's surroundings), in level-0 pixels."""

    seed: int
    mpp: float
    large: Structures
    tubuli: Structures
    cells: Cells
    tissue: TissueShape | None = None


# --- the smooth fields that steer placement -------------------------------------------------------

def damage_at(x: np.ndarray, y: np.ndarray, seed: int, mpp: float) -> np.ndarray:
    """How damaged the cortex is around each point, in [0, 1] (about 0.5 on average)."""
    return _damage(point_fbm(x, y, DAMAGE_CELL_UM / mpp, seed + 101, octaves=2))


def damage_grid(xs: np.ndarray, ys: np.ndarray, seed: int, mpp: float) -> np.ndarray:
    """:func:`damage_at` over the grid ``ys x xs``."""
    return _damage(grid_fbm(xs, ys, DAMAGE_CELL_UM / mpp, seed + 101, octaves=2))


def _damage(value: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + 0.9 * value, 0.0, 1.0)


def damage_weight(damage: np.ndarray, bias: float) -> np.ndarray:
    return np.exp(bias * (damage - 0.5))


def _thinning_score(x: np.ndarray, y: np.ndarray, seed: int, mpp: float, jitter: np.ndarray) -> np.ndarray:
    """Low where tubuli are kept: clustered by a smooth field, higher in damaged cortex."""
    smooth = point_fbm(x, y, THINNING_CELL_UM / mpp, seed + 202, octaves=2)
    return 0.55 * smooth + 0.35 * (damage_at(x, y, seed, mpp) - 0.5) + 0.25 * jitter


@lru_cache(maxsize=1)
def _reference_scores() -> tuple[np.ndarray, float]:
    """The distributions of the steering fields, from many random points of a fixed layout.

    Turning a target share into a threshold needs their distributions; they are the same for
    every seed, so they are measured once.
    """
    rng = np.random.default_rng(12345)
    x, y = rng.uniform(0, 2e6, 40000), rng.uniform(0, 2e6, 40000)
    scores = np.sort(_thinning_score(x, y, 777, 1.0, rng.uniform(-1, 1, x.size)))
    damage = damage_at(x, y, 777, 1.0)
    return scores, float(np.mean(damage ** 3))


def _keep_threshold(fraction: float) -> float:
    scores = _reference_scores()[0]
    if fraction >= 1.0:
        return math.inf
    return float(np.quantile(scores, max(fraction, 0.0)))


# --- placement -----------------------------------------------------------------------------------

def _structure_keys(seed: int, kind: Kind, count: int, offset: int) -> np.ndarray:
    return hash_u32(seed, int(kind) + 1, np.arange(offset, offset + count))


def _inside(tissue: TissueShape | None, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if tissue is None:
        return np.ones(np.shape(x), dtype=bool)
    return tissue.field_at(x, y) > 0


def _ellipse_axes(rng: np.random.Generator, radius: np.ndarray, aspect: tuple[float, float]):
    ratio = rng.uniform(*aspect, size=np.shape(radius))
    return (radius / np.sqrt(ratio)).astype(np.float32), (radius * np.sqrt(ratio)).astype(np.float32)


class _LargePlacer:
    """Random sequential placement of non-overlapping large structures.

    With a `period` (width, height), overlap is checked as if the region wrapped around: without
    it, rejected structures would drift to the region's edges, away from a patch at its centre.
    """

    def __init__(self, gap_px: float, period: tuple[float, float] | None = None):
        self.gap = gap_px
        self.period = period
        self.parts: list[Structures] = []
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.rs: list[float] = []

    def fits(self, x: float, y: float, r: float) -> bool:
        if not self.xs:
            return True
        dx, dy = np.abs(np.asarray(self.xs) - x), np.abs(np.asarray(self.ys) - y)
        if self.period is not None:
            dx, dy = np.minimum(dx, self.period[0] - dx), np.minimum(dy, self.period[1] - dy)
        d = np.hypot(dx, dy)
        return bool(np.all(d > np.asarray(self.rs) + r + self.gap))

    def add(self, structure: Structures) -> None:
        self.parts.append(structure)
        self.xs.extend(structure.x.tolist())
        self.ys.extend(structure.y.tolist())
        self.rs.extend(np.maximum(structure.a, structure.b).tolist())

    def result(self) -> Structures:
        return Structures.concat(self.parts)


def place_focus(rng: np.random.Generator, seed: int, mix: m.PhantomMix, size: int, mpp: float) -> Structures:
    """The mix's focus structure, placed so that it covers a share of the patch in focus_coverage."""
    spec = LARGE_STRUCTURES[mix.focus]
    low, high = mix.focus_coverage
    radius = rng.uniform(*spec.radius_um) / mpp
    # large enough to cover the wanted share of the patch even for large patches or coarse mpp
    radius = max(radius, math.sqrt(min(1.0, low * 1.15) * size * size / math.pi))
    a, b = _ellipse_axes(rng, np.array([radius]), (max(spec.aspect[0], 0.8), 1.0))
    angle = np.float32(rng.uniform(0, math.pi))
    grid = (np.arange(48) + 0.5) * size / 48
    gx, gy = np.meshgrid(grid, grid)

    def coverage(cx: float, cy: float) -> float:
        c, s = math.cos(angle), math.sin(angle)
        u = ((gx - cx) * c + (gy - cy) * s) / a[0]
        v = (-(gx - cx) * s + (gy - cy) * c) / b[0]
        return float(np.mean(u * u + v * v < 1.0))

    target = rng.uniform(low, max(low, min(high, coverage(size / 2, size / 2))))
    direction = rng.uniform(0, 2 * math.pi)
    near, far = 0.0, size + radius   # coverage falls as the centre moves out along `direction`
    for _ in range(24):
        mid = (near + far) / 2
        if coverage(size / 2 + mid * math.cos(direction), size / 2 + mid * math.sin(direction)) >= target:
            near = mid
        else:
            far = mid
    x = np.array([size / 2 + near * math.cos(direction)])
    y = np.array([size / 2 + near * math.sin(direction)])
    return Structures(np.array([spec.kind], np.int8), x, y, a, b, np.array([angle], np.float32),
                      _structure_keys(seed, spec.kind, 1, 10**6))


def _candidates(rng: np.random.Generator, seed: int, spec: LargeSpec, region: tuple[float, float, float, float],
                mpp: float, tissue: TissueShape | None, count: int, first_key: int) -> Structures:
    """`count` random structures of a kind, thinned towards damaged cortex and to the tissue."""
    x0, y0, x1, y1 = region
    x, y = rng.uniform(x0, x1, count), rng.uniform(y0, y1, count)
    a, b = _ellipse_axes(rng, rng.uniform(*spec.radius_um, count) / mpp, spec.aspect)
    angle = rng.uniform(0, math.pi, count).astype(np.float32)
    chance = damage_weight(damage_at(x, y, seed, mpp), spec.damage_bias) / damage_weight(np.array(1.0),
                                                                                         spec.damage_bias)
    kept = (rng.uniform(0, 1, count) < chance) & _inside(tissue, x, y)
    keys = _structure_keys(seed, spec.kind, count, first_key)
    return Structures(np.full(count, spec.kind, np.int8), x, y, a, b, angle, keys).take(np.flatnonzero(kept))


def place_large(rng: np.random.Generator, seed: int, mix: m.PhantomMix, region: tuple[float, float, float, float],
                tissue_area_px: float, mpp: float, tissue: TissueShape | None,
                placed: Structures | None = None, wrap: bool = False) -> Structures:
    """Large structures in proportion to the mix's shares, thrown at random without overlap."""
    x0, y0, x1, y1 = region
    placer = _LargePlacer(GAP_UM / mpp * 2, period=(x1 - x0, y1 - y0) if wrap else None)
    if placed is not None and len(placed):
        placer.add(placed)
    for class_id, spec in LARGE_STRUCTURES.items():
        expected = mix.share(class_id) * tissue_area_px / (spec.mean_area_um2() / mpp**2)
        wanted = int(expected) + int(rng.uniform() < expected - int(expected))  # unbiased, low variance
        kept, thrown = 0, 0
        for _attempt in range(40):
            if kept >= wanted:
                break
            batch = max(8, 2 * (wanted - kept))
            candidates = _candidates(rng, seed, spec, region, mpp, tissue, batch, thrown)
            thrown += batch
            for i in range(len(candidates)):
                if kept < wanted and placer.fits(candidates.x[i], candidates.y[i],
                                                 max(candidates.a[i], candidates.b[i])):
                    placer.add(candidates.take(np.array([i])))
                    kept += 1
    return placer.result()


def _hex_sites(rng: np.random.Generator, region: tuple[float, float, float, float], spacing: float):
    x0, y0, x1, y1 = region
    row = spacing * math.sqrt(3) / 2
    j = np.arange(math.floor(y0 / row) - 1, math.ceil(y1 / row) + 2)
    i = np.arange(math.floor(x0 / spacing) - 1, math.ceil(x1 / spacing) + 2)
    jj, ii = np.meshgrid(j, i, indexing="ij")
    x = (ii + 0.5 * (jj % 2)) * spacing
    y = jj * row
    x = x.ravel() + rng.uniform(-0.18, 0.18, x.size) * spacing
    y = y.ravel() + rng.uniform(-0.18, 0.18, y.size) * spacing
    inside = (x > x0) & (x < x1) & (y > y0) & (y < y1)
    return x[inside], y[inside]


def fill_plan(mix: m.PhantomMix) -> tuple[float, float]:
    """(share of grid sites kept, share of kept sites that are atrophic) for a mix's tubule shares."""
    large = sum(mix.share(c) for c in LARGE_STRUCTURES)
    room = max(1e-6, 1.0 - FILL_LOSS_NEAR_LARGE * large)
    tubuli = mix.share(m.TUBULI) / FILL_COVERAGE["tubule"]
    atrophic = mix.share(m.ATROPHIC) / FILL_COVERAGE["atrophic"]
    sites = tubuli + atrophic
    if sites <= 0:
        return 0.0, 0.0
    return min(1.0, sites / room), atrophic / sites


def place_tubuli(rng: np.random.Generator, seed: int, mix: m.PhantomMix, region: tuple[float, float, float, float],
                 mpp: float, tissue: TissueShape | None, large: Structures) -> Structures:
    """Tubuli on a jittered hexagonal grid, thinned to the mix's share, clear of large structures."""
    spacing = FILL_SPACING_UM / mpp
    x, y = _hex_sites(rng, region, spacing)
    keep_fraction, atrophic_fraction = fill_plan(mix)
    score = _thinning_score(x, y, seed, mpp, rng.uniform(-1, 1, x.size))
    keep = (score < _keep_threshold(keep_fraction)) & _inside(tissue, x, y)
    for i in range(len(large)):  # sites whose centre a large structure covers
        dx, dy = x - large.x[i], y - large.y[i]
        c, s = math.cos(large.angle[i]), math.sin(large.angle[i])
        u = (dx * c + dy * s) / (large.a[i] + 0.25 * spacing)
        v = (-dx * s + dy * c) / (large.b[i] + 0.25 * spacing)
        keep &= u * u + v * v > 1.0
    x, y = x[keep], y[keep]
    damage = damage_at(x, y, seed, mpp)
    # atrophy follows damage; the more of it a mix asks for, the more evenly it spreads
    preference = damage**3 / _reference_scores()[1]
    atrophic_chance = atrophic_fraction * ((1.0 - atrophic_fraction) * preference + atrophic_fraction)
    kind = np.where(rng.uniform(0, 1, x.size) < DISTAL_FRACTION, Kind.DISTAL, Kind.PROXIMAL).astype(np.int8)
    kind[rng.uniform(0, 1, x.size) < atrophic_chance] = Kind.ATROPHIC
    relative = np.choose(kind, [FILL_RADIUS[Kind.PROXIMAL], FILL_RADIUS[Kind.DISTAL], FILL_RADIUS[Kind.ATROPHIC]])
    radius = relative * spacing * rng.uniform(0.9, 1.1, x.size)
    a, b = _ellipse_axes(rng, radius, (0.6, 1.0))
    angle = rng.uniform(0, math.pi, x.size).astype(np.float32)
    keys = _structure_keys(seed, Kind.PROXIMAL, x.size, 0)
    return Structures(kind, x, y, a, b, angle, keys)


def place_cells(rng: np.random.Generator, seed: int, region: tuple[float, float, float, float], mpp: float) -> Cells:
    """Fibroblasts, lymphocytes (in damaged cortex), red blood cells and capillaries, scattered."""
    x0, y0, x1, y1 = region
    area_um2 = (x1 - x0) * (y1 - y0) * mpp * mpp
    parts = []
    for kind, density, size_um, aspect in (
        (CellKind.FIBROBLAST, FIBROBLAST_DENSITY, (3.6, 4.8), (0.3, 0.5)),
        (CellKind.LYMPHOCYTE, LYMPHOCYTE_DENSITY, (2.4, 3.0), (0.85, 1.0)),
        (CellKind.RED_BLOOD_CELL, RBC_DENSITY, (3.0, 3.6), (0.8, 1.0)),
        (CellKind.CAPILLARY, CAPILLARY_DENSITY, (5.0, 13.0), (0.25, 0.5)),
    ):
        n = rng.poisson(density * area_um2)
        x, y = rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)
        if kind == CellKind.LYMPHOCYTE:  # infiltrates gather where the cortex is damaged
            keep = rng.uniform(0, 1, n) < np.clip(damage_at(x, y, seed, mpp) - 0.55, 0, 1) ** 2 * 6
            x, y, n = x[keep], y[keep], int(keep.sum())
        major = rng.uniform(*size_um, n) / mpp
        minor = major * rng.uniform(*aspect, n)
        parts.append((np.full(n, kind, np.int8), x, y, major.astype(np.float32), minor.astype(np.float32),
                      rng.uniform(0, math.pi, n).astype(np.float32)))
    return Cells(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def tissue_area(tissue: TissueShape | None, region: tuple[float, float, float, float]) -> float:
    """Tissue area of a region in px², from the tissue field on a coarse grid."""
    x0, y0, x1, y1 = region
    area = (x1 - x0) * (y1 - y0)
    if tissue is None:
        return area
    xs = np.linspace(x0, x1, 129)[:-1] + (x1 - x0) / 256
    ys = np.linspace(y0, y1, 129)[:-1] + (y1 - y0) / 256
    return area * float(np.mean(tissue.field(xs, ys) > 0))


def plan_layout(seed: int, mix: m.PhantomMix, region: tuple[float, float, float, float], mpp: float,
                tissue: TissueShape | None = None, focus: Structures | None = None,
                rng: np.random.Generator | None = None, wrap: bool = False) -> Layout:
    """Place every structure and cell of a region for a mix (see the module docstring).

    `wrap` checks large structures for overlap across opposite edges of the region, which keeps
    their density even up to the edges (used for a patch's surroundings).
    """
    rng = rng or np.random.default_rng([seed, 1])
    large = place_large(rng, seed, mix, region, tissue_area(tissue, region), mpp, tissue, placed=focus, wrap=wrap)
    tubuli = place_tubuli(rng, seed, mix, region, mpp, tissue, large)
    cells = place_cells(rng, seed, region, mpp)
    return Layout(seed=seed, mpp=mpp, large=large, tubuli=tubuli, cells=cells, tissue=tissue)

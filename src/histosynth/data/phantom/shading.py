"""Stain amounts (hematoxylin, eosin) of every tissue part of a window.

Nuclei are hematoxylin, cytoplasm, stroma, basement membranes and red blood cells are eosin, glass
is neither. Shapes come from the window geometry; every random detail (nucleus positions, sizes,
which nuclei are missing from a section) is a hash of the structure's key and the nucleus' index,
so a structure looks the same whichever tile renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fields import WindowGeometry, structure_box
from .layout import CellKind, Cells, Kind, Layout, Structures, damage_grid
from .noise import grid_noise, hash_u32, hash_uniform, split_uniforms

TAU = np.float32(2 * math.pi)


@dataclass
class StainFields:
    """Hematoxylin and eosin amounts of a window, and how much texture each pixel takes."""

    h: np.ndarray
    e: np.ndarray
    texture: np.ndarray


# --- small building blocks -----------------------------------------------------------------------

def nucleus_profile(d: np.ndarray, semi_minor_px: np.ndarray | float) -> np.ndarray:
    """Hematoxylin across a nucleus at normalised distance `d` from its centre: a soft edge and a
    darker rim of chromatin against the nuclear membrane."""
    edge = np.clip((1.0 - d) * semi_minor_px + 0.5, 0.0, 1.0)
    return edge * (0.72 + 0.4 * np.clip((d - 0.5) * 2.5, 0.0, 1.0))


def stamp_ellipses(field: np.ndarray, x0: float, y0: float, cx: np.ndarray, cy: np.ndarray,
                   a: np.ndarray, b: np.ndarray, angle: np.ndarray, value: np.ndarray | float,
                   nucleus: bool = False) -> None:
    """Draw soft-edged ellipses into `field` (pixel (0, 0) at global (x0, y0)), keeping the maximum.

    With `nucleus`, each ellipse has the darker rim of :func:`nucleus_profile`.
    """
    if len(cx) == 0:
        return
    half = int(math.ceil(float(max(a.max(), b.max())))) + 1
    offsets = np.arange(-half, half + 1)
    col = (np.floor(cx - x0).astype(np.int64))[:, None, None] + offsets[None, None, :]
    row = (np.floor(cy - y0).astype(np.int64))[:, None, None] + offsets[None, :, None]
    dx = (col + x0 - cx[:, None, None]).astype(np.float32)
    dy = (row + y0 - cy[:, None, None]).astype(np.float32)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (dx * c + dy * s) / a[:, None, None]
    v = (dy * c - dx * s) / b[:, None, None]
    d = np.sqrt(u * u + v * v)
    if nucleus:
        weight = nucleus_profile(d, b[:, None, None])
    else:
        weight = np.clip((1.0 - d) * b[:, None, None] + 0.5, 0.0, 1.0)
    weight = weight * np.broadcast_to(np.asarray(value, dtype=np.float32), (len(cx),))[:, None, None]
    height, width = field.shape
    valid = (weight > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    rows, cols, weights = np.broadcast_arrays(row, col, weight)
    np.maximum.at(field, (rows[valid], cols[valid]), weights[valid].astype(field.dtype))


def ring_nuclei(p: np.ndarray, theta: np.ndarray, radius: np.ndarray, key: np.ndarray, ring: np.ndarray,
                count: np.ndarray, arc_semi: np.ndarray, radial_semi: np.ndarray,
                missing: np.ndarray | float, jitter: float = 0.3,
                radial_rate: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei evenly spaced around a ring of a structure, evaluated at pixels.

    `p` is the pixel's radial position (0 centre, 1 rim) and `theta` its angle; the ring at
    radial position `ring` holds `count` cells. Each cell's nucleus is shifted, resized or left
    out (a section misses some nuclei) by a hash of (key, cell). `radial_rate` is how fast
    ``p * radius`` grows per pixel outwards along the pixel's ray (below 1 where a flattened side
    runs obliquely to the ray); dividing by it keeps nuclei round there instead of drawn out.
    Returns the nucleus intensity in [0, 1] and the pixel's position across its cell (-0.5..0.5;
    +-0.5 is a cell border).
    """
    t = theta * (count / TAU)
    cell = np.floor(t)
    across = t - cell - np.float32(0.5)
    index = np.mod(cell.astype(np.int64), count.astype(np.int64))
    u_shift, u_radial, u_size = split_uniforms(hash_u32(0, key, index), 3)
    present = u_size >= missing
    size = np.float32(0.8) + np.float32(0.4) * u_size
    arc_px = (across - (u_shift - 0.5) * jitter) * (TAU * ring * radius / count)
    radial_px = (p - ring) * radius / radial_rate - (u_radial - 0.5) * radial_semi
    d = np.sqrt((arc_px / (arc_semi * size)) ** 2 + (radial_px / (radial_semi * size)) ** 2)
    nucleus = nucleus_profile(d, radial_semi * size) * present
    return nucleus.astype(np.float32), across.astype(np.float32)


def _local_polar(s: Structures, index: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptical radius and angle of points about structure(s) `index`."""
    c, sn = np.cos(s.angle[index]), np.sin(s.angle[index])
    dx = (x - s.x[index]).astype(np.float32)
    dy = (y - s.y[index]).astype(np.float32)
    u = (dx * c + dy * sn) / s.a[index]
    v = (dy * c - dx * sn) / s.b[index]
    return np.sqrt(u * u + v * v), np.arctan2(v, u).astype(np.float32)


def _structure_uniforms(key: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` (<= 6) uniforms per structure, from its key."""
    first = split_uniforms(hash_u32(1, key), 3)
    second = split_uniforms(hash_u32(2, key), 3)
    return (first + second)[:count]


# --- interstitium ---------------------------------------------------------------------------------

def shade_interstitium(layout: Layout, geom: WindowGeometry) -> StainFields:
    """Pale stroma of wispy collagen fibres with capillaries and scattered cells; denser (fibrosis)
    where the cortex is damaged."""
    xs, ys = geom.xs, geom.ys
    um = 1.0 / layout.mpp
    damage = damage_grid(xs, ys, layout.seed, layout.mpp)
    # collagen fibres run around the tubuli, wavy and broken
    wave = grid_noise(xs, ys, 10.0 * um, layout.seed + 31)
    fibres = (1.0 - np.abs(np.sin(geom.nearest_rim * np.float32(math.pi / (4.0 * um)) + 2.0 * wave))) ** 4
    broken = np.clip(grid_noise(xs, ys, 6.0 * um, layout.seed + 33) + 0.3, 0.0, 1.0)
    e = 0.08 + 0.12 * damage + (0.14 + 0.1 * damage) * fibres * broken
    h = 0.02 + 0.04 * damage
    _shade_cells(layout, geom, h, e)
    return StainFields(h=h.astype(np.float32), e=e.astype(np.float32), texture=np.ones_like(e, dtype=np.float32))


def _shade_cells(layout: Layout, geom: WindowGeometry, h: np.ndarray, e: np.ndarray) -> None:
    """Capillaries (some full of red blood cells), fibroblasts, lymphocytes and loose red cells."""
    xs, ys = geom.xs, geom.ys
    um = 1.0 / layout.mpp
    cells: Cells = layout.cells.take(layout.cells.near(xs[0], ys[0], xs[-1], ys[-1]))
    fields = {name: np.zeros(h.shape, dtype=np.float32) for name in ("nuclei", "blood", "wall", "lumen", "full")}

    def draw(kind: CellKind, field: str, value: float | np.ndarray = 1.0, grow: float = 0.0,
             nucleus: bool = False, pick: np.ndarray | None = None) -> None:
        chosen = cells.kind == kind if pick is None else pick
        stamp_ellipses(fields[field], xs[0], ys[0], cells.x[chosen], cells.y[chosen], cells.a[chosen] + grow,
                       cells.b[chosen] + grow, cells.angle[chosen], value, nucleus=nucleus)

    capillary = cells.kind == CellKind.CAPILLARY
    full = hash_uniform(layout.seed, np.floor(cells.x).astype(np.int64), np.floor(cells.y).astype(np.int64)) < 0.6
    draw(CellKind.CAPILLARY, "wall", grow=np.float32(1.3 * um))
    draw(CellKind.CAPILLARY, "lumen")
    draw(CellKind.CAPILLARY, "full", pick=capillary & full)
    draw(CellKind.FIBROBLAST, "nuclei", 0.8, nucleus=True)
    draw(CellKind.LYMPHOCYTE, "nuclei", 1.35, nucleus=True)
    draw(CellKind.RED_BLOOD_CELL, "blood")
    lumen, full_lumen = fields["lumen"], fields["full"]
    e += 0.15 * np.clip(fields["wall"] - lumen, 0, 1)
    e *= 1.0 - 0.6 * lumen
    e += 0.8 * full_lumen + 0.85 * fields["blood"]
    np.maximum(h, fields["nuclei"], out=h)
    h += 0.05 * (full_lumen + fields["blood"])


# --- tubuli (proximal, distal, atrophic, dilated) -------------------------------------------------

#: Per-kind look of a tubule, indexed by Kind (PROXIMAL, DISTAL, ATROPHIC, DILATED).
_TUBULE = {
    "lumen": np.array([0.42, 0.55, 0.25, 0.87], np.float32),      # lumen radius, share of the radius
    "lumen_spread": np.array([0.24, 0.2, 0.2, 0.06], np.float32),
    "lumen_e": np.array([0.08, 0.03, 0.05, 0.02], np.float32),
    "slit": np.array([0.55, 0.2, 0.35, 0.05], np.float32),        # lumen squashed towards a slit
    "membrane_um": np.array([0.8, 0.8, 3.4, 0.8], np.float32),    # basement membrane thickness
    "membrane_e": np.array([0.58, 0.55, 0.36, 0.5], np.float32),
    "cytoplasm_e": np.array([0.58, 0.36, 0.40, 0.30], np.float32),
    "cytoplasm_h": np.array([0.08, 0.10, 0.10, 0.06], np.float32),
    "nucleus_at": np.array([0.32, 0.45, 0.5, 0.5], np.float32),   # from the membrane, share of the epithelium
    "cell_um": np.array([9.0, 7.0, 6.5, 13.0], np.float32),
    "nucleus_arc_um": np.array([2.9, 2.7, 2.5, 4.6], np.float32),
    "nucleus_radial_um": np.array([2.7, 2.5, 2.3, 1.3], np.float32),
    "missing": np.array([0.3, 0.15, 0.15, 0.35], np.float32),
    "nucleus_h": np.array([0.95, 1.05, 1.2, 1.0], np.float32),
    "cell_border_e": np.array([0.0, 0.14, 0.05, 0.0], np.float32),
    "brush_border": np.array([1.0, 0.0, 0.0, 0.0], np.float32),
}


def _tubule_properties(table: Structures, mpp: float) -> dict[str, np.ndarray]:
    """Per-structure shape and colour of each tubule: its kind's look, varied by its key.

    The table may hold other large structures too; their rows are computed but never used.
    """
    kind = np.minimum(table.kind, Kind.DILATED).astype(np.int64)
    look = {name: values[kind] for name, values in _TUBULE.items()}
    u_lumen, u_phase, u_nuclei, u_cast, u_eosin, u_cast_size = _structure_uniforms(table.key, 6)
    px_per_um = np.float32(1.0 / mpp)
    radius = table.radius
    round_lumen = look["lumen"] + look["lumen_spread"] * (u_lumen - 0.5)
    membrane = look["membrane_um"] * px_per_um / radius
    # nuclei keep to a round ring even where the lumen is squashed to a slit
    ring = 1.0 - membrane - look["nucleus_at"] * (1.0 - membrane - round_lumen)
    cell_px = look["cell_um"] * px_per_um
    return {
        "radius": radius, "key": table.key, "round_lumen": round_lumen, "slit": look["slit"],
        "phase": TAU * u_phase, "nuclei_phase": TAU * u_nuclei, "membrane": membrane,
        "wrinkle": np.where(kind == Kind.ATROPHIC, 0.25, 0.0).astype(np.float32), "ring": ring,
        "count": np.maximum(4, np.round(TAU * ring * radius / cell_px)).astype(np.float32), "cell_px": cell_px,
        "arc_px": look["nucleus_arc_um"] * px_per_um, "radial_px": look["nucleus_radial_um"] * px_per_um,
        "missing": look["missing"], "nucleus_h": look["nucleus_h"],
        "cytoplasm_e": look["cytoplasm_e"] * (0.85 + 0.3 * u_eosin), "cytoplasm_h": look["cytoplasm_h"],
        "border_e": look["cell_border_e"], "brush": look["brush_border"], "membrane_e": look["membrane_e"],
        "lumen_e": look["lumen_e"], "smooth_membrane": (kind == Kind.ATROPHIC).astype(np.float32),
        "cast": ((kind == Kind.DILATED) & (u_cast < 0.3)).astype(np.float32), "cast_size": 0.8 + 0.15 * u_cast_size,
    }


def _outward_rate(geom: WindowGeometry, pixels: np.ndarray, table: Structures, index: np.ndarray) -> np.ndarray:
    """How fast the depth inside a tubule falls per pixel along the ray from its centre (1 on a
    round rim, less where the edge is a flattened side met obliquely)."""
    width = len(geom.xs)
    rows, cols = pixels // width, pixels % width
    is_tubule = geom.tubule_index.ravel()[pixels] >= 0
    rates = np.ones(pixels.size, dtype=np.float32)
    for depth, chosen in ((geom.tubule_depth, is_tubule), (geom.large_depth, ~is_tubule)):
        if not chosen.any():
            continue
        d_row, d_col = np.gradient(depth)
        r, c, i = rows[chosen], cols[chosen], index[chosen]
        dx = (geom.xs[c] - table.x[i]).astype(np.float32)
        dy = (geom.ys[r] - table.y[i]).astype(np.float32)
        length = np.maximum(np.hypot(dx, dy), 1.0)
        rates[chosen] = -(d_col[r, c] * dx + d_row[r, c] * dy) / length
    return np.clip(rates, 0.3, 1.0)


def _ring_pixels(geom: WindowGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, Structures]:
    """Flat pixel indices drawn as tubuli, the structure of each (in the returned table) and the
    pixel's depth inside it (px): the tubuli's own pixels and those of dilated tubuli."""
    table = Structures.concat([geom.tubuli, geom.large])
    flat_tubule = np.flatnonzero(geom.tubule_index.ravel() >= 0)
    parts = [(flat_tubule, geom.tubule_index.ravel()[flat_tubule], geom.tubule_depth.ravel()[flat_tubule])]
    if len(geom.large):
        large_index = geom.large_index.ravel()
        dilated = np.flatnonzero((large_index >= 0) & (geom.large.kind[np.maximum(large_index, 0)] == Kind.DILATED))
        parts.append((dilated, len(geom.tubuli) + large_index[dilated], geom.large_depth.ravel()[dilated]))
    pixels, index, depth = (np.concatenate(column) for column in zip(*parts, strict=True))
    return pixels, index, depth, table


def shade_tubuli(layout: Layout, geom: WindowGeometry, fields: StainFields) -> None:
    """Epithelial rings with round nuclei around a lumen; flattened where tubuli touch."""
    pixels, index, depth, table = _ring_pixels(geom)
    if pixels.size == 0:
        return
    width = len(geom.xs)
    x, y = geom.xs[pixels % width], geom.ys[pixels // width]
    _, theta = _local_polar(table, index, x, y)
    at = {name: np.take(values, index) for name, values in _tubule_properties(table, layout.mpp).items()}
    radius = at["radius"]
    p = 1.0 - depth / radius

    # an elliptical lumen, squashed towards a slit and a little irregular
    turned = theta - at["phase"]
    squash = 1.0 - at["slit"]
    lumen = at["round_lumen"] * squash / np.sqrt((squash * np.cos(turned)) ** 2 + np.sin(turned) ** 2)
    lumen = lumen * (1.0 + 0.08 * np.sin(3 * theta + 2 * at["phase"]))
    membrane = at["membrane"] * (1.0 + at["wrinkle"] * np.sin(9 * theta + at["phase"]))
    in_lumen = p < lumen
    in_membrane = p > 1.0 - membrane
    in_epithelium = ~in_lumen & ~in_membrane

    # nuclei only need evaluating near their ring
    near_ring = np.flatnonzero(in_epithelium & (np.abs(p - at["ring"]) * radius < 1.3 * at["radial_px"]))
    nucleus = np.zeros_like(p)
    across = np.zeros_like(p)
    nucleus[near_ring], across[near_ring] = ring_nuclei(
        p[near_ring], theta[near_ring] + at["nuclei_phase"][near_ring], radius[near_ring], at["key"][near_ring],
        at["ring"][near_ring], at["count"][near_ring], at["arc_px"][near_ring], at["radial_px"][near_ring],
        at["missing"][near_ring], radial_rate=_outward_rate(geom, pixels[near_ring], table, index[near_ring]))
    if np.any(at["border_e"] > 0):  # lateral cell borders, where they show (distal tubuli)
        t = (theta + at["nuclei_phase"]) * (at["count"] / TAU)
        across = t - np.floor(t) - np.float32(0.5)
        border = at["border_e"] * np.exp(-(((0.5 - np.abs(across)) * at["cell_px"] / 0.9) ** 2))
    else:
        border = 0.0
    brush = at["brush"] * np.clip(1.0 - (p - lumen) * radius * np.float32(layout.mpp / 2.0), 0, 1)
    cytoplasm = at["cytoplasm_e"] * (1.0 - 0.35 * brush) + border
    cast_edge = lumen * at["cast_size"] * (1.0 + 0.06 * np.sin(5 * theta + at["phase"]))
    cast = (at["cast"] > 0) & (p < cast_edge)

    e = np.where(in_lumen, np.where(cast, 0.42, at["lumen_e"]),
                 np.where(in_membrane, at["membrane_e"], cytoplasm * (1.0 - 0.5 * nucleus)))
    h = np.where(in_epithelium, at["cytoplasm_h"] + at["nucleus_h"] * nucleus, 0.01)
    smooth = np.where((in_membrane & (at["smooth_membrane"] > 0)) | cast, 0.3, 1.0)
    fields.h.ravel()[pixels] = h
    fields.e.ravel()[pixels] = e
    fields.texture.ravel()[pixels] = smooth


# --- large structures drawn one at a time (glomeruli, arteries) -----------------------------------

@dataclass
class _Frame:
    """Structure i of `geom.large` seen from the part of the window it covers."""

    structure: Structures
    index: int
    box: tuple[slice, slice]
    owned: np.ndarray       # pixels of the box the structure owns
    xs: np.ndarray          # global x of the box's columns
    ys: np.ndarray          # global y of the box's rows
    rho: np.ndarray         # normalised elliptical radius (1 on the rim)
    theta: np.ndarray       # angle in the structure's frame
    u: list[float]          # the structure's six uniforms
    radius: float           # equivalent radius, px
    key: int

    @classmethod
    def of(cls, geom: WindowGeometry, i: int) -> "_Frame | None":
        box = structure_box(geom.large, i, 1.0, geom.xs, geom.ys)
        if box is None:
            return None
        xs, ys = geom.xs[box[1]], geom.ys[box[0]]
        gx, gy = np.meshgrid(xs, ys)
        rho, theta = _local_polar(geom.large, np.full(gx.shape, i), gx, gy)
        u = [float(v[0]) for v in _structure_uniforms(geom.large.key[i:i + 1], 6)]
        return cls(geom.large, i, box, geom.large_index[box] == i, xs, ys, rho, theta, u,
                   float(geom.large.radius[i]), int(geom.large.key[i]))

    def to_global(self, r: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global pixel coordinates of points at normalised radius r and angle t."""
        s, i = self.structure, self.index
        c, sn = math.cos(s.angle[i]), math.sin(s.angle[i])
        px, py = r * np.cos(t) * s.a[i], r * np.sin(t) * s.b[i]
        return s.x[i] + px * c - py * sn, s.y[i] + px * sn + py * c

    def scatter(self, field: np.ndarray, rng: np.random.Generator, r: np.ndarray, t: np.ndarray,
                size_px: tuple[float, float], aspect: tuple[float, float], nucleus: bool = False,
                outline: tuple[np.ndarray, float] | None = None) -> None:
        """Ellipses of random size and orientation at the given points; with `outline` (a field
        and a width in px), also their outlines grown by that width into the second field."""
        cx, cy = self.to_global(r, t)
        major = rng.uniform(*size_px, r.size).astype(np.float32)
        minor = (major * rng.uniform(*aspect, r.size)).astype(np.float32)
        angle = rng.uniform(0, math.pi, r.size).astype(np.float32)
        stamp_ellipses(field, self.xs[0], self.ys[0], cx, cy, major, minor, angle, 1.0, nucleus=nucleus)
        if outline is not None:
            grow = np.float32(outline[1])
            stamp_ellipses(outline[0], self.xs[0], self.ys[0], cx, cy, major + grow, minor + grow, angle, 1.0)

    def ring(self, ring: np.ndarray | float, count: float, key: np.ndarray | int, arc_px: float,
             radial_px: float, missing: float, turn: np.ndarray | float = 0.0) -> np.ndarray:
        """Nuclei around a ring of the structure (see :func:`ring_nuclei`)."""
        shape = self.rho.shape
        return ring_nuclei(self.rho, self.theta + turn, np.full(shape, self.radius, np.float32),
                           np.broadcast_to(np.asarray(key, dtype=np.uint32), shape),
                           np.broadcast_to(np.asarray(ring, dtype=np.float32), shape),
                           np.broadcast_to(np.asarray(count, dtype=np.float32), shape),
                           np.float32(arc_px), np.float32(radial_px), missing)[0]

    def write(self, fields: StainFields, h: np.ndarray, e: np.ndarray, texture: np.ndarray | None = None) -> None:
        fields.h[self.box] = np.where(self.owned, h, fields.h[self.box])
        fields.e[self.box] = np.where(self.owned, e, fields.e[self.box])
        if texture is not None:
            fields.texture[self.box] = np.where(self.owned, texture, fields.texture[self.box])


def _tuft_edge(theta: np.ndarray, u: list[float], base: float) -> np.ndarray:
    """Lobulated outline of a glomerular tuft (normalised radius), reaching the capsule at the hilum."""
    edge = base * (1.0 + 0.05 * np.sin(3 * theta + TAU * u[0]) + 0.04 * np.sin(5 * theta + TAU * u[1])
                   + 0.035 * np.abs(np.sin(4.5 * theta + TAU * u[2])) - 0.02)
    hilum = np.abs(np.angle(np.exp(1j * (theta - TAU * u[3])))).astype(np.float32)
    return np.maximum(edge, 1.0 - (1.0 - base) * (hilum / 0.35) ** 2)


def _points_in_tuft(rng: np.random.Generator, count: int, base: float, u: list[float]):
    """Random points (normalised radius, angle) inside a tuft."""
    r = np.sqrt(rng.uniform(0, 1, count)) * base * 1.1
    theta = rng.uniform(-math.pi, math.pi, count).astype(np.float32)
    keep = r < _tuft_edge(theta, u, base) - 0.03
    return r[keep], theta[keep]


def _healthy_tuft(frame: _Frame, rng: np.random.Generator, base: float, edge: np.ndarray, um: float):
    """Capillary loops with pink walls, some holding red cells, dense nuclei, podocytes on the rim."""
    area_um2 = math.pi * (frame.radius * base / um) ** 2
    loops, walls, nuclei, blood = (np.zeros(frame.rho.shape, np.float32) for _ in range(4))
    frame.scatter(loops, rng, *_points_in_tuft(rng, int(area_um2 / 40), base, frame.u), (2.6 * um, 4.6 * um),
                  (0.45, 1.0), outline=(walls, 0.9 * um))
    frame.scatter(nuclei, rng, *_points_in_tuft(rng, int(area_um2 / 48), base, frame.u), (2.2 * um, 3.0 * um),
                  (0.7, 1.0), nucleus=True)
    frame.scatter(blood, rng, *_points_in_tuft(rng, int(area_um2 / 110), base, frame.u), (2.6 * um, 3.1 * um),
                  (0.8, 1.0))
    open_loop = loops * (1.0 - nuclei)
    wall = np.clip(walls - loops, 0.0, 1.0)
    e = (0.34 + 0.26 * wall) * (1.0 - 0.7 * open_loop) + 0.8 * blood * open_loop
    podocytes = frame.ring(edge - 2.2 * um / frame.radius, max(8, round(TAU * frame.radius * base / (10 * um))),
                           frame.key ^ 1, 3.0 * um, 2.2 * um, 0.4)
    h = np.maximum(0.10 + 0.06 * wall + 1.15 * nuclei, 1.1 * podocytes)
    return h, e


def _sclerotic_tuft(frame: _Frame, rng: np.random.Generator, base: float, um: float):
    """Pale glassy hyaline with few nuclei and collapsed, slit-like loops."""
    area_um2 = math.pi * (frame.radius * base / um) ** 2
    nuclei, slits = np.zeros(frame.rho.shape, np.float32), np.zeros(frame.rho.shape, np.float32)
    frame.scatter(nuclei, rng, *_points_in_tuft(rng, int(area_um2 / 380), base, frame.u), (2.2 * um, 2.8 * um),
                  (0.6, 0.9), nucleus=True)
    frame.scatter(slits, rng, *_points_in_tuft(rng, int(area_um2 / 500), base, frame.u), (2.0 * um, 4.0 * um),
                  (0.15, 0.35))
    return 0.04 + 1.0 * nuclei, 0.36 + 0.1 * frame.u[2] - 0.22 * slits


def shade_glomerulus(layout: Layout, geom: WindowGeometry, fields: StainFields, i: int) -> None:
    """A lobulated tuft of capillary loops and dense nuclei in Bowman's space, inside a thin capsule.

    Sclerotic glomeruli: a shrunken, pale, glassy tuft with few nuclei and collapsed loops, in a
    thick layered capsule.
    """
    frame = _Frame.of(geom, i)
    if frame is None:
        return
    sclerotic = geom.large.kind[i] == Kind.SCLEROTIC
    um = 1.0 / layout.mpp
    u, rho = frame.u, frame.rho
    capsule = (2.5 + 5.0 * u[4] if sclerotic else 1.6) * um / frame.radius
    base = 0.66 + 0.14 * u[5] if sclerotic else 0.84 + 0.05 * u[5]
    edge = _tuft_edge(frame.theta, u, base)
    tuft = rho < edge
    in_capsule = rho > 1.0 - capsule
    rng = np.random.default_rng([frame.key, 7])
    if sclerotic:
        tuft_h, tuft_e = _sclerotic_tuft(frame, rng, base, um)
    else:
        tuft_h, tuft_e = _healthy_tuft(frame, rng, base, edge, um)
    lamellae = np.sin(rho * frame.radius / (1.5 * um) * TAU) if sclerotic else 0.0
    parietal = frame.ring(1.0 - capsule - 1.0 * um / frame.radius, max(6, round(TAU * frame.radius / (22 * um))),
                          frame.key, 4.5 * um, 1.2 * um, 0.3)
    e = np.where(in_capsule, 0.48 + 0.1 * lamellae, np.where(tuft, tuft_e, 0.2 if sclerotic else 0.04))
    h = np.where(tuft & ~in_capsule, tuft_h, 0.02 + 0.95 * parietal * ~tuft)
    frame.write(fields, h, e, texture=np.where(tuft & sclerotic, 0.35, 1.0))


# --- arteries -------------------------------------------------------------------------------------

def shade_artery(layout: Layout, geom: WindowGeometry, fields: StainFields, i: int) -> None:
    """Lumen, wavy elastic lamina, a thick media of circular smooth muscle, a fibrous adventitia."""
    frame = _Frame.of(geom, i)
    if frame is None:
        return
    um = 1.0 / layout.mpp
    u, rho, theta, radius = frame.u, frame.rho, frame.theta, frame.radius
    lumen = (0.28 + 0.1 * u[0]) * (1.0 + 0.04 * np.sin(2 * theta + TAU * u[1]) + 0.03 * np.sin(5 * theta))
    lamina = lumen + 1.2 * um / radius * (1.0 + 0.6 * np.sin(40 * theta))
    media_out = 0.68 + 0.06 * u[2]
    # smooth muscle in concentric layers, each with its own nuclei
    layer = 5.0 * um / radius
    layers = np.floor((rho - lamina) / layer)
    muscle = frame.ring(lamina + (layers + 0.5) * layer,
                        np.maximum(6, np.round(TAU * (lamina + (layers + 0.5) * layer) * radius / (11 * um))),
                        hash_u32(frame.key, layers.astype(np.int64)), 5.5 * um, 1.3 * um, 0.2, turn=layers * 0.7)

    rng = np.random.default_rng([frame.key, 11])
    n_blood = int(math.pi * (float(lumen.mean()) * radius / um) ** 2 / 60)
    blood = np.zeros(rho.shape, np.float32)
    frame.scatter(blood, rng, np.sqrt(rng.uniform(0, 1, n_blood)) * float(lumen.min()) * 0.9,
                  rng.uniform(-math.pi, math.pi, n_blood), (3.0 * um, 3.5 * um), (0.85, 0.95))

    wave = grid_noise(frame.xs, frame.ys, 6.0 * um, layout.seed + 41)
    adventitia = 0.34 + 0.1 * np.sin(rho * radius / (2.5 * um) * TAU + 2.5 * wave)
    in_media = (rho >= lamina) & (rho < media_out)
    e = np.where(rho < lumen, 0.03 + 0.9 * blood,
                 np.where(rho < lamina, 0.95, np.where(in_media, 0.6 * (1 - 0.4 * muscle), adventitia)))
    h = np.where(in_media, 0.05 + 1.0 * muscle, 0.03 + 0.05 * blood)
    frame.write(fields, h, e)


def shade_window(layout: Layout, geom: WindowGeometry) -> StainFields:
    """Stain amounts of every pixel of a window (before texture, blur and colour)."""
    fields = shade_interstitium(layout, geom)
    shade_tubuli(layout, geom, fields)
    for i, kind in enumerate(geom.large.kind):
        if kind in (Kind.GLOMERULUS, Kind.SCLEROTIC):
            shade_glomerulus(layout, geom, fields, i)
        elif kind == Kind.ARTERY:
            shade_artery(layout, geom, fields, i)
    return fields

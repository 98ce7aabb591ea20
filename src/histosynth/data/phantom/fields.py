"""Geometry of a window: which structure owns each pixel, and how deep inside it the pixel lies.

The label rule, which the masks follow exactly:

* a large structure (glomerulus, sclerotic glomerulus, artery, dilated tubule) owns every pixel
  of its ellipse — a glomerulus *with* Bowman's space and capsule, an artery with its lumen and
  adventitia, a dilated tubule with its lumen;
* a tubule (proximal, distal or atrophic) owns the pixels of its ellipse on its side of the chord
  it shares with an overlapping neighbour (the power-diagram boundary d² - r²), less half the
  interstitial gap — lumen, epithelium and basement membrane together — so packed tubuli flatten
  against each other with interstitium between;
* everything else inside the tissue is interstitium ("other kidney tissue"), outside it is glass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import FILL_SPACING_UM, GAP_UM, LABEL_OF_KIND, Layout, Structures
from .mixes import OTHER

#: How far (in tubule-grid spacings) a tubule's rim still pushes on its neighbours.
_REACH_SPACINGS = 0.4


@dataclass
class WindowGeometry:
    """Per-pixel ownership of a window (arrays of shape (H, W))."""

    xs: np.ndarray            # global x of each column
    ys: np.ndarray            # global y of each row
    tissue: np.ndarray        # bool
    large_index: np.ndarray   # index into `large` or -1
    large_depth: np.ndarray   # signed px: > 0 inside the owning large structure
    tubule_index: np.ndarray  # index into `tubuli` or -1 (only where the tubule owns the pixel)
    tubule_depth: np.ndarray  # px from the tubule's (flattened) edge, > 0 where it owns the pixel
    nearest_rim: np.ndarray   # signed px to the rim of the nearest tubule (< 0 inside), within the reach
    large: Structures         # the large structures near the window
    tubuli: Structures        # the tubuli near the window
    label: np.ndarray         # uint8 class ids


def _ellipse_rho(s: Structures, i: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Normalised elliptical radius of structure i over the grid ys x xs (1 on its rim)."""
    c, sn = np.cos(s.angle[i]), np.sin(s.angle[i])
    dx = (xs - s.x[i]).astype(np.float32)[None, :]
    dy = (ys - s.y[i]).astype(np.float32)[:, None]
    u = (dx * c + dy * sn) / s.a[i]
    v = (dy * c - dx * sn) / s.b[i]
    return np.sqrt(u * u + v * v)


def structure_box(s: Structures, i: int, reach: float, xs: np.ndarray, ys: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns of the window within `reach` px of structure i's ellipse."""
    half = float(max(s.a[i], s.b[i])) + reach
    c0 = max(0, int(np.ceil(s.x[i] - half - xs[0])))
    c1 = min(len(xs), int(np.floor(s.x[i] + half - xs[0])) + 1)
    r0 = max(0, int(np.ceil(s.y[i] - half - ys[0])))
    r1 = min(len(ys), int(np.floor(s.y[i] + half - ys[0])) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _distance_to_chord(tubuli: Structures, owner: np.ndarray, runner_up: np.ndarray,
                       power1: np.ndarray, power2: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel to the power-diagram line between its two nearest tubuli:
    (p2 - p1) / 2D for centres D apart; infinite where there is no runner-up."""
    has_two = runner_up >= 0
    if not has_two.any():
        return np.full(owner.shape, np.inf, dtype=np.float32)
    first, second = np.maximum(owner, 0), np.maximum(runner_up, 0)
    centre_gap = np.hypot(np.take(tubuli.x, first) - np.take(tubuli.x, second),
                          np.take(tubuli.y, first) - np.take(tubuli.y, second)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf where there is no runner-up; masked below
        return np.where(has_two, (power2 - power1) / (2.0 * np.maximum(centre_gap, 1.0)), np.inf)


def _claim_large(layout: Layout, xs: np.ndarray, ys: np.ndarray, reach: float):
    """Large structures own their ellipse outright. Returns them, the index of the owner of each
    pixel (-1: none) and the signed distance (px) to the nearest one's rim, capped at `reach`."""
    shape = (len(ys), len(xs))
    large = layout.large.take(layout.large.near(xs[0], ys[0], xs[-1], ys[-1],
                                                np.maximum(layout.large.a, layout.large.b) + reach))
    outside = np.full(shape, reach, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int32)
    for i in range(len(large)):
        box = structure_box(large, i, reach, xs, ys)
        if box is None:
            continue
        signed = (_ellipse_rho(large, i, xs[box[1]], ys[box[0]]) - 1.0) * large.radius[i]
        np.minimum(outside[box], signed, out=outside[box])
        owner[box][signed < 0] = i
    return large, owner, outside


def _compete_tubuli(layout: Layout, xs: np.ndarray, ys: np.ndarray, reach: float):
    """Tubuli compete for pixels by power distance d² - r²: two overlapping tubuli meet on the
    straight chord through the points where their rims cross, as packed tubuli flatten against
    each other. Returns the tubuli near the window, each pixel's owner and runner-up (-1: none)
    with their power distances, and the signed distance (px) to the owner's rim."""
    shape = (len(ys), len(xs))
    tubuli = layout.tubuli.take(layout.tubuli.near(xs[0], ys[0], xs[-1], ys[-1],
                                                   np.maximum(layout.tubuli.a, layout.tubuli.b) + reach))
    power1 = np.full(shape, np.inf, dtype=np.float32)
    power2 = np.full(shape, np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int32)
    runner_up = np.full(shape, -1, dtype=np.int32)
    own_rim = np.full(shape, reach, dtype=np.float32)
    for i in range(len(tubuli)):
        box = structure_box(tubuli, i, reach, xs, ys)
        if box is None:
            continue
        rho = _ellipse_rho(tubuli, i, xs[box[1]], ys[box[0]])
        radius = tubuli.radius[i]
        power = (rho * rho - 1.0) * (radius * radius)
        p1, p2, o1, o2, rim = power1[box], power2[box], owner[box], runner_up[box], own_rim[box]
        first = power < p1
        second = ~first & (power < p2)
        p2[first], o2[first] = p1[first], o1[first]
        p2[second], o2[second] = power[second], i
        p1[first], o1[first] = power[first], i
        rim[first] = (rho[first] - 1.0) * radius
    return tubuli, owner, runner_up, power1, power2, own_rim


def window_geometry(layout: Layout, xs: np.ndarray, ys: np.ndarray) -> WindowGeometry:
    """Ownership and depth of every pixel of the window ``ys x xs`` (see the module docstring)."""
    gap = GAP_UM / layout.mpp
    reach = _REACH_SPACINGS * FILL_SPACING_UM / layout.mpp
    large, large_index, outside = _claim_large(layout, xs, ys, reach + gap)
    tubuli, owner, runner_up, power1, power2, own_rim = _compete_tubuli(layout, xs, ys, reach)

    # a tubule's depth: to its own rim, to the chord it shares with the runner-up less half the
    # gap (the neighbour keeps the other half), and to the nearest large structure less the gap
    to_chord = _distance_to_chord(tubuli, owner, runner_up, power1, power2)
    depth = np.minimum(np.minimum(-own_rim, to_chord - 0.5 * gap), outside - gap)
    tissue = np.ones(depth.shape, dtype=bool) if layout.tissue is None else layout.tissue.field(xs, ys) > 0
    is_large = large_index >= 0
    is_tubule = (depth > 0) & ~is_large & (owner >= 0)

    label = np.where(tissue, np.uint8(OTHER), np.uint8(0))
    if len(tubuli):
        label = np.where(is_tubule & tissue, LABEL_OF_KIND[tubuli.kind[np.maximum(owner, 0)]], label)
    if len(large):
        label = np.where(is_large & tissue, LABEL_OF_KIND[large.kind[np.maximum(large_index, 0)]], label)
    return WindowGeometry(
        xs=xs, ys=ys, tissue=tissue, large_index=np.where(tissue, large_index, -1),
        large_depth=-outside, tubule_index=np.where(is_tubule & tissue, owner, -1),
        tubule_depth=depth, nearest_rim=own_rim, large=large, tubuli=tubuli, label=label.astype(np.uint8),
    )

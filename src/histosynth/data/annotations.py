"""Polygon annotations (QuPath GeoJSON export, ASAP XML) and their rasterisation to label masks.

Every polygon must carry a class name of the schema: QuPath's ``classification.name`` or ASAP's
``PartOfGroup``. Coordinates are level-0 pixels of the slide.

Rasterisation rule
    A pixel belongs to a polygon when its centre lies inside the polygon's exterior and outside
    all of its holes. A centre exactly on an edge counts as inside a ring on its left and top
    edges and outside on its right and bottom ones, so polygons that share an edge split the pixels
    along it with no gap and no overlap. Where polygons overlap, the smaller one wins (they are
    painted from the largest area to the smallest; equal areas in file order): a glomerulus drawn
    inside a cortex outline keeps its class, and a polygon of the background class (id 0) inside
    another cuts a hole in it — the way to draw holes in ASAP, which has none of its own.
    Pixels outside every polygon are id 0.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..schema import RENAL, ClassSchema

#: Largest |x| or |y| accepted, in level-0 pixels: far beyond any slide, small enough that the
#: scanline arithmetic stays exact.
MAX_COORDINATE = 2**31

#: Scanline rows rasterised at once, bounded so (rows x edges) float arrays stay small.
_ROW_BUDGET = 4_000_000


@dataclass(frozen=True)
class Annotation:
    """One polygon with holes, in level-0 pixel coordinates (x, y)."""

    class_id: int
    class_name: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the exterior."""
        (x_min, y_min), (x_max, y_max) = self.exterior.min(axis=0), self.exterior.max(axis=0)
        return float(x_min), float(y_min), float(x_max), float(y_max)

    @property
    def area(self) -> float:
        return _ring_area(self.exterior) - sum(_ring_area(h) for h in self.holes)


def read_annotations(path: str | Path, schema: ClassSchema = RENAL) -> list[Annotation]:
    """The polygons of a QuPath GeoJSON (.geojson/.json) or ASAP XML (.xml) file.

    A polygon without a class name, or with one the schema does not know, is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        named = list(_qupath_polygons(path))
    elif suffix == ".xml":
        named = list(_asap_polygons(path))
    else:
        raise DataError(f"{path}: unknown annotation format; give a QuPath GeoJSON export (.geojson) or ASAP XML "
                        "(.xml)")
    if not named:
        raise DataError(f"{path}: holds no polygon annotations; export the annotations as polygons")
    return [_with_class(path, schema, name, rings) for name, rings in named]


def _with_class(path: Path, schema: ClassSchema, name: str | None, rings: list[np.ndarray]) -> Annotation:
    if not name:
        raise DataError(
            f"{path}: an annotation has no class name; classify every annotation "
            f"with a class of schema '{schema.name}' before exporting"
        )
    try:
        class_id = schema.id_of(name)
    except ConfigError as exc:
        raise DataError(f"{path}: {exc}; rename the class or use a schema that has it") from None
    return Annotation(class_id, name, rings[0], tuple(rings[1:]))


# --- QuPath GeoJSON -------------------------------------------------------------------------

def _qupath_polygons(path: Path) -> Iterator[tuple[str | None, list[np.ndarray]]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DataError(f"{path}: not valid JSON ({reason}); re-export it from QuPath as GeoJSON") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
        if not isinstance(features, list):
            raise DataError(f"{path}: 'features' must be a list of GeoJSON features, got "
                            f"{type(features).__name__}; re-export it from QuPath as GeoJSON")
    else:
        features = data if isinstance(data, list) else [data]
    for index, feature in enumerate(features):
        where = _feature_label(feature, index)
        if not isinstance(feature, dict) or "geometry" not in feature:
            raise DataError(f"{path}: {where} is not a GeoJSON feature with a 'geometry'; "
                            "re-export it from QuPath as GeoJSON")
        name = _qupath_class_name(feature.get("properties"), path, where)
        for rings in _polygons_of(feature["geometry"], path, where):
            yield name, rings


def _feature_label(feature: Any, index: int) -> str:
    """'feature 3' or 'feature 3 (id ...)', as a user finds it again in the file."""
    label = f"feature {index}"
    if isinstance(feature, dict):
        ident = feature.get("id")
        if ident is None and isinstance(feature.get("properties"), dict):
            ident = feature["properties"].get("name")
        if isinstance(ident, (str, int)) and not isinstance(ident, bool):
            label += f" ({str(ident)[:60]!r})"
    return label


def _qupath_class_name(properties: Any, path: Path, where: str) -> str | None:
    if properties is None:
        return None
    if not isinstance(properties, dict):
        raise DataError(f"{path}: {where} has 'properties' of type {type(properties).__name__}, not an object; "
                        "re-export it from QuPath as GeoJSON")
    classification = properties.get("classification")
    name = classification.get("name") if isinstance(classification, dict) else classification
    if name is None or isinstance(name, str):
        return name
    raise DataError(f"{path}: {where} has a class name that is not text ({name!r}); "
                    "classify it with a class name of the schema")


def _polygons_of(geometry: Any, path: Path, where: str) -> Iterator[list[np.ndarray]]:
    """Polygons (exterior + holes) of a geometry; points and lines carry no area and are skipped."""
    if geometry is None:
        return
    if not isinstance(geometry, dict):
        raise DataError(f"{path}: {where} has a geometry of type {type(geometry).__name__}, not a GeoJSON "
                        "geometry object; re-export it from QuPath as GeoJSON")
    kind = geometry.get("type")
    try:
        if kind == "Polygon":
            yield _polygon(geometry["coordinates"])
        elif kind == "MultiPolygon":
            polygons = geometry["coordinates"]
            if not isinstance(polygons, list):
                raise ValueError("MultiPolygon coordinates must be a list of polygons")
            for polygon in polygons:
                yield _polygon(polygon)
        elif kind == "GeometryCollection":
            parts = geometry.get("geometries", [])
            if not isinstance(parts, list):
                raise ValueError("'geometries' must be a list")
            for part in parts:
                yield from _polygons_of(part, path, where)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise DataError(f"{path}: {where}: a {kind} has malformed coordinates ({exc})") from None


def _polygon(rings: Any) -> list[np.ndarray]:
    if not isinstance(rings, list) or not rings:
        raise ValueError("a polygon must be a non-empty list of rings")
    return [_ring(r) for r in rings]


def _ring(coordinates: Any) -> np.ndarray:
    if not isinstance(coordinates, (list, tuple)) or any(
            not isinstance(point, (list, tuple)) or
            any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in point)
            for point in coordinates):
        raise ValueError("a ring must be a list of [x, y] number pairs")
    ring = np.asarray(coordinates, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] < 2:
        raise ValueError(f"a ring needs at least 3 (x, y) points, got shape {ring.shape}")
    ring = ring[:, :2]
    if not np.isfinite(ring).all():
        raise ValueError("a coordinate is NaN or infinite; every x and y must be a finite number of pixels")
    if np.abs(ring).max() > MAX_COORDINATE:
        raise ValueError(f"a coordinate lies beyond {MAX_COORDINATE} pixels, farther than any slide reaches")
    return ring


# --- ASAP XML -------------------------------------------------------------------------------

_ASAP_AREA_TYPES = {"polygon", "spline", "rectangle"}


def _asap_polygons(path: Path) -> Iterator[tuple[str | None, list[np.ndarray]]]:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc}); re-export it from ASAP") from None
    if root.tag != "ASAP_Annotations":
        raise DataError(f"{path}: not an ASAP annotation file (root element <{root.tag}>)")
    for index, element in enumerate(root.iter("Annotation")):
        if element.get("Type", "Polygon").lower() not in _ASAP_AREA_TYPES:
            continue
        group = element.get("PartOfGroup")
        name = None if group in (None, "", "None") else group
        try:
            points = sorted(
                ((int(c.get("Order", i)), float(c.get("X")), float(c.get("Y")))
                 for i, c in enumerate(element.iter("Coordinate"))),
            )
            yield name, [_ring([(x, y) for _, x, y in points])]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: annotation {index} ({element.get('Name')!r}) has malformed coordinates "
                            f"({exc})") from None


# --- rasterisation --------------------------------------------------------------------------

def rasterize(annotations: list[Annotation], x: float, y: float, width: int, height: int,
              downsample: float = 1.0) -> np.ndarray:
    """Label ids (height, width) of the region with level-0 corner (x, y), `downsample`
    level-0 pixels per output pixel, by the rule in this module's docstring."""
    labels = np.zeros((height, width), dtype=np.uint8)
    x_end, y_end = x + width * downsample, y + height * downsample
    order = sorted(range(len(annotations)), key=lambda i: -annotations[i].area)
    for index in order:
        annotation = annotations[index]
        x_min, y_min, x_max, y_max = annotation.bounds
        if x_max < x or y_max < y or x_min > x_end or y_min > y_end:
            continue
        exterior, *holes = [(ring - (x, y)) / downsample for ring in (annotation.exterior, *annotation.holes)]
        inside = _inside([exterior], width, height)
        if holes:
            inside &= ~_inside(holes, width, height)
        labels[inside] = annotation.class_id
    return labels


def _inside(rings: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Pixels whose centres lie inside the rings (even-odd), by scanlines through the centres.

    Libraries' polygon fills either leave the edge rule unstated or test every pixel against
    every edge; a scanline pass costs (rows x edges) and makes the rule exact.
    """
    starts = np.concatenate([ring for ring in rings])
    ends = np.concatenate([np.roll(ring, -1, axis=0) for ring in rings])
    x1, y1, x2, y2 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    inside = np.zeros((height, width), dtype=bool)
    top = max(0, int(np.floor(min(y1.min(), y2.min()))))
    bottom = min(height, int(np.ceil(max(y1.max(), y2.max()))) + 1)
    chunk = max(1, _ROW_BUDGET // max(1, len(x1)))
    for first in range(top, bottom, chunk):
        rows = np.arange(first, min(bottom, first + chunk))
        inside[rows] = _scanline_fill(rows + 0.5, x1, y1, x2, y2, width)
    return inside


def _scanline_fill(centres: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                   width: int) -> np.ndarray:
    """Rows of the fill: pixel j of a row is inside when an odd number of crossings lie at or left of j + 0.5."""
    yc = centres[:, None]
    # Half-open in y: an edge crosses the rows from its lower y up to, not including, its upper y.
    crosses = (y1 <= yc) != (y2 <= yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x1 + (yc - y1) * (x2 - x1) / (y2 - y1), np.inf)
    xs.sort(axis=1)
    pairs = int(crosses.sum(axis=1).max()) // 2 if crosses.size else 0
    fill = np.zeros((len(centres), width + 1), dtype=np.int32)
    if pairs:
        # Pixel j is in [start, end) when start <= j + 0.5 < end.
        first = np.clip(np.ceil(xs[:, 0:2 * pairs:2] - 0.5), 0, width).astype(np.int64)
        stop = np.clip(np.ceil(xs[:, 1:2 * pairs:2] - 0.5), 0, width).astype(np.int64)
        rows = np.broadcast_to(np.arange(len(centres))[:, None], first.shape)
        np.add.at(fill, (rows, first), 1)
        np.add.at(fill, (rows, stop), -1)
    return np.cumsum(fill, axis=1)[:, :width] > 0


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)

"""Whole-slide images: open a slide or its label-mask slide, pick a level, detect tissue.

Slides are read with openslide (every vendor format it knows), falling back to tiffslide for
what openslide cannot open or opens poorly (stripped TIFF, OME-TIFF whose levels are SubIFDs).
Label-mask slides are read with tiffslide first, which hands back the stored ids rather than
colours. Either way a slide reads as RGB uint8 and a mask slide as 2-D uint8 class ids.

Coordinates follow openslide: a region's top-left corner is given in level-0 pixels, its size in
pixels of the level read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk

from ..errors import DataError
from ..schema import RENAL, ClassSchema

#: A level whose resolution is within this relative distance of the target is read as is.
LEVEL_TOLERANCE = 0.05
#: Resolution of the thumbnail tissue is detected on.
THUMBNAIL_MPP = 8.0

Backend = Literal["openslide", "tiffslide"]


@dataclass(frozen=True)
class LevelChoice:
    """Where to read pixels for a target resolution.

    `scale` is level pixels per output pixel: 1.0 reads the level as is, above 1 reads a larger
    region and shrinks it (area average for RGB, nearest neighbour for labels).
    """

    level: int
    downsample: float
    scale: float
    mpp: float

    def region_size(self, size: int) -> int:
        """Side, in level pixels, of the region that becomes an output patch of `size` pixels."""
        return size if self.scale == 1.0 else round(size * self.scale)


def choose_level(downsamples: list[float] | tuple[float, ...], mpp: float, target_mpp: float,
                 tolerance: float = LEVEL_TOLERANCE, source: str = "slide") -> LevelChoice:
    """The level for `target_mpp`: one within `tolerance`, else the nearest finer one plus a resize.

    Never upsamples: a target finer than level 0 (beyond the tolerance) is an error.
    """
    level_mpps = [mpp * d for d in downsamples]
    close = [i for i, m in enumerate(level_mpps) if abs(m / target_mpp - 1) <= tolerance]
    if close:
        level = min(close, key=lambda i: abs(level_mpps[i] / target_mpp - 1))
        return LevelChoice(level, float(downsamples[level]), 1.0, level_mpps[level])
    finer = [i for i, m in enumerate(level_mpps) if m < target_mpp]
    if not finer:
        raise DataError(
            f"{source}: its finest level is {level_mpps[0]:.4g} µm/px, coarser than the requested "
            f"{target_mpp:g} µm/px, and slides are never upsampled; choose --mpp {level_mpps[0]:.4g} or more"
        )
    level = max(finer, key=lambda i: level_mpps[i])
    return LevelChoice(level, float(downsamples[level]), target_mpp / level_mpps[level], target_mpp)


def resize_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Shrink RGB by averaging the source pixels each output pixel covers."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BOX))


def resize_nearest(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize label ids by nearest neighbour: output (i, j) takes source (i*H//height, j*W//width).

    The same top-left rule builds the lower levels of a mask pyramid, so a patch read from a
    finer level and shrunk equals the patch read from the matching coarser level.
    """
    rows = np.arange(height) * labels.shape[0] // height
    cols = np.arange(width) * labels.shape[1] // width
    return labels[rows[:, None], cols[None, :]]


class Slide:
    """An open slide (RGB) or label-mask slide (class ids); use as a context manager."""

    def __init__(self, path: Path, reader: Any, backend: Backend, mpp: float | None, mpp_source: str,
                 is_mask: bool = False, schema: ClassSchema = RENAL):
        self.path = path
        self.reader = reader
        self.backend = backend
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.is_mask = is_mask
        self.schema = schema
        self._tiles: dict[int, _TiffTiles | None] = {}  # per level, for masks read through tiffslide

    # --- geometry ------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return tuple(self.reader.dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self.reader.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self.reader.level_downsamples]

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise DataError(
                f"{self.path}: no microns-per-pixel in the slide's metadata (reader properties or TIFF "
                "resolution tags); give it with --mpp-override MPP"
            )
        return self.mpp

    def choose_level(self, target_mpp: float, mpp: float | None = None) -> LevelChoice:
        """Level for `target_mpp`; `mpp` replaces this slide's own (a mask slide takes its slide's)."""
        return choose_level(self.level_downsamples, mpp or self.require_mpp(), target_mpp, source=str(self.path))

    # --- pixels --------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels of `level` at level-0 corner (x, y): RGB uint8, or class ids for a mask slide."""
        try:
            if self.backend == "openslide":
                region = np.asarray(self.reader.read_region((int(x), int(y)), level, (int(width), int(height))))
            elif (region := self._read_tiles(x, y, level, width, height)) is not None:
                pass
            else:
                region = self.reader.read_region((int(x), int(y)), level, (int(width), int(height)), as_array=True)
        except Exception as exc:  # readers raise their own types for damaged tiles
            raise DataError(
                f"{self.path}: cannot read level {level} at ({x}, {y}) ({type(exc).__name__}: {exc}); "
                "the file is damaged or incomplete — re-export or re-copy it"
            ) from None
        return self._as_labels(region) if self.is_mask else _as_rgb(region, self.path)

    def _read_tiles(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray | None:
        """The region straight from a mask's TIFF tiles, or None where :class:`_TiffTiles` cannot read it."""
        if not self.is_mask:
            return None
        if level not in self._tiles:
            self._tiles[level] = _TiffTiles.of(self.reader, level)
        tiles = self._tiles[level]
        if tiles is None:
            return None
        downsample = self.reader.level_downsamples[level]  # tiffslide's rounding of level-0 corners
        return tiles.read(int(x / downsample), int(y / downsample), int(width), int(height))

    def read_patch(self, x: int, y: int, size: int, choice: LevelChoice) -> np.ndarray:
        """A `size` x `size` patch at the choice's resolution with level-0 corner (x, y)."""
        side = choice.region_size(size)
        region = self.read_region(x, y, choice.level, side, side)
        if side == size:
            return region
        return resize_nearest(region, size, size) if self.is_mask else resize_area(region, size, size)

    def read_level(self, level: int) -> np.ndarray:
        width, height = self.level_dimensions[level]
        return self.read_region(0, 0, level, width, height)

    def thumbnail(self, mpp: float = THUMBNAIL_MPP, slide_mpp: float | None = None) -> tuple[np.ndarray, float]:
        """The whole slide near `mpp` µm/px and its level-0 pixels per thumbnail pixel.

        Reads the coarsest level at least as fine as `mpp` and shrinks it to `mpp`; a slide
        coarser than `mpp` everywhere is returned at level 0.
        """
        slide_mpp = slide_mpp or self.require_mpp()
        downsamples = self.level_downsamples
        finer = [i for i, d in enumerate(downsamples) if slide_mpp * d <= mpp * (1 + LEVEL_TOLERANCE)]
        level = max(finer, key=lambda i: downsamples[i]) if finer else 0
        image = self.read_level(level)
        scale = mpp / (slide_mpp * downsamples[level])
        if scale > 1 + LEVEL_TOLERANCE:
            width0, height0 = self.dimensions
            downsample = mpp / slide_mpp
            width, height = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
            image = resize_nearest(image, width, height) if self.is_mask else resize_area(image, width, height)
            return image, width0 / width
        return image, downsamples[level]

    def _as_labels(self, region: np.ndarray) -> np.ndarray:
        region = np.asarray(region)
        if region.ndim == 3:
            if self.backend == "openslide" and region.shape[2] == 4:
                region = region[..., :3]
            if region.shape[2] == 1 or np.array_equal(region[..., 0:1].repeat(region.shape[2], 2), region):
                region = region[..., 0]
            else:
                raise DataError(
                    f"{self.path}: a label-mask slide must hold one channel of class ids, but it is colour; "
                    "export the mask as 8-bit grayscale ids"
                )
        return self.schema.apply_remap(region, source=str(self.path))

    # --- lifetime ------------------------------------------------------------------------
    def reopen(self) -> "Slide":
        """The same slide through a handle of its own, for another thread: one handle reads one region at a time."""
        reader = _checked(_OPENERS[self.backend](self.path))
        return Slide(self.path, reader, self.backend, self.mpp, self.mpp_source, is_mask=self.is_mask,
                     schema=self.schema)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TiffTiles:
    """Regions of one level of a tiled single-channel TIFF (a label mask), decoded straight from the file.

    tiffslide reads through zarr, whose bookkeeping costs more per region than decoding the tile
    (~2 ms against ~0.2 ms for a 256 px mask patch); tifffile decodes the tiles here instead.
    """

    def __init__(self, page: Any):
        self.page = page
        self.across = -(-page.imagewidth // page.tilewidth)

    @classmethod
    def of(cls, reader: Any, level: int) -> "_TiffTiles | None":
        """The tiles of a tiffslide reader's `level`, or None unless it is one plain tiled 8/16-bit page."""
        try:
            if (reader.properties.get("tiffslide.series-axes") != "YX"
                    or reader.zarr_group.attrs.get("tiffslide.series-composition") is not None):
                return None
            pages = reader.ts_tifffile.series[reader.properties["tiffslide.series-index"]].levels[level].pages
            page = pages[0]
        except Exception:  # a reader not backed by one TIFF file
            return None
        simple = (len(pages) == 1 and page.is_tiled and page.tiledepth == 1 and page.samplesperpixel == 1
                  and page.bitspersample in (8, 16) and page.shape == (page.imagelength, page.imagewidth))
        return cls(page) if simple else None

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """The level's pixels in [y, y + height) x [x, x + width), or None when that leaves the level."""
        page = self.page
        if x < 0 or y < 0 or width < 1 or height < 1 or x + width > page.imagewidth or y + height > page.imagelength:
            return None
        tile_width, tile_height = page.tilewidth, page.tilelength
        region = np.empty((height, width), dtype=page.dtype)
        for row in range(y // tile_height, (y + height - 1) // tile_height + 1):
            for col in range(x // tile_width, (x + width - 1) // tile_width + 1):
                tile = self._tile(row * self.across + col).reshape(tile_height, tile_width)
                top, left = row * tile_height, col * tile_width
                y0, y1 = max(y, top), min(y + height, top + tile_height)
                x0, x1 = max(x, left), min(x + width, left + tile_width)
                region[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - top:y1 - top, x0 - left:x1 - left]
        return region

    def _tile(self, index: int) -> np.ndarray:
        page = self.page
        count = page.databytecounts[index]
        if not count:  # a sparse tile: never written
            return np.zeros((page.tilelength, page.tilewidth), dtype=page.dtype)
        handle = page.parent.filehandle
        handle.seek(page.dataoffsets[index])
        return page.decode(handle.read(count), index, jpegtables=page.jpegtables)[0]


def open_slide(path: str | Path, mpp_override: float | None = None) -> Slide:
    """Open an RGB slide; `mpp_override` (µm/px of level 0) replaces the slide's own metadata."""
    return _open(Path(path), mpp_override, is_mask=False, schema=RENAL)


def open_mask_slide(path: str | Path, schema: ClassSchema = RENAL, like: Slide | None = None) -> Slide:
    """Open a label-mask slide whose pixels are class ids of `schema` (after its remap).

    With `like`, the mask must have that slide's level-0 size, and it takes that slide's mpp.
    """
    path = Path(path)
    mask = _open(path, None, is_mask=True, schema=schema)
    if like is not None:
        if mask.dimensions != like.dimensions:
            mask.close()
            raise DataError(
                f"{path}: the mask slide is {mask.dimensions[0]}x{mask.dimensions[1]} px but slide "
                f"{like.path.name} is {like.dimensions[0]}x{like.dimensions[1]} px; give the mask written "
                "for that slide at its full resolution"
            )
        mask.mpp, mask.mpp_source = like.mpp, f"slide {like.path.name}"
    return mask


def _open(path: Path, mpp_override: float | None, is_mask: bool, schema: ClassSchema) -> Slide:
    if not path.is_file():
        raise DataError(f"slide file {path} does not exist")
    if mpp_override is not None and not 0 < mpp_override < 1000:
        raise DataError(f"{path}: --mpp-override must be a positive number of microns per pixel, got {mpp_override}")
    order: tuple[Backend, ...] = ("tiffslide", "openslide") if is_mask else ("openslide", "tiffslide")
    reader, backend, failures = None, None, []
    for candidate in order:
        try:
            opened = _OPENERS[candidate](path)
        except Exception as exc:  # each reader has its own exception types for unknown formats
            failures.append(f"{candidate}: {type(exc).__name__}: {str(exc).strip() or 'unsupported'}")
            continue
        if reader is None:
            reader, backend = opened, candidate
            if not _misses_levels(path, opened):
                break
        elif len(opened.level_dimensions) > len(reader.level_dimensions):
            reader.close()
            reader, backend = opened, candidate  # e.g. OME SubIFDs, which openslide shows as one level
        else:
            opened.close()
    if reader is None:
        raise DataError(
            f"cannot open {path} as a slide ({'; '.join(failures)}); check that the file is a complete "
            "whole-slide image (SVS, TIFF, NDPI, MRXS, ...)"
        )
    mpp, mpp_source = (mpp_override, "override") if mpp_override is not None else mpp_from_properties(reader.properties)
    return Slide(path, reader, backend, mpp, mpp_source, is_mask=is_mask, schema=schema)


def _misses_levels(path: Path, reader: Any) -> bool:
    """Whether a single-level view of a TIFF might hide a pyramid the other reader sees."""
    return len(reader.level_dimensions) == 1 and path.suffix.lower() in (".tif", ".tiff")


def _open_openslide(path: Path) -> Any:
    import openslide

    return _checked(openslide.OpenSlide(str(path)))


def _open_tiffslide(path: Path) -> Any:
    import tiffslide

    return _checked(tiffslide.TiffSlide(str(path)))


def _checked(reader: Any) -> Any:
    """The reader, once its geometry and metadata load: some readers open lazily and fail later."""
    try:
        if not reader.level_dimensions or min(reader.dimensions) < 1:
            raise ValueError("no image levels")
        dict(reader.properties)
    except Exception:
        reader.close()
        raise
    return reader


_OPENERS = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}

_UNIT_MICRONS = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def mpp_from_properties(properties: Mapping[str, Any]) -> tuple[float | None, str]:
    """Microns per pixel of level 0 and where it came from; (None, 'missing') if unknown.

    Reads openslide's and tiffslide's mpp properties, then the TIFF resolution tags (a
    ResolutionUnit of 'none' carries no physical size and is ignored).
    """
    for prefix in ("openslide", "tiffslide"):
        values = [_positive(properties.get(f"{prefix}.mpp-{axis}")) for axis in "xy"]
        found = [v for v in values if v is not None]
        if found:
            return sum(found) / len(found), f"{prefix}.mpp"
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower().split(".")[-1]
    per_unit = [_positive(properties.get(f"tiff.{axis}Resolution")) for axis in "XY"]
    found = [v for v in per_unit if v is not None]
    if unit in _UNIT_MICRONS and found:
        return _UNIT_MICRONS[unit] / (sum(found) / len(found)), "tiff resolution tags"
    return None, "missing"


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _as_rgb(region: np.ndarray, path: Path) -> np.ndarray:
    region = np.asarray(region)
    if region.dtype != np.uint8:
        raise DataError(f"{path}: slides must be 8-bit per channel, got {region.dtype}; convert it to 8-bit RGB")
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4:
        return _flatten_on_white(region)
    if region.shape[2] == 1:
        return np.repeat(region, 3, axis=2)
    return region[..., :3]


def _flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA region over white: openslide marks pixels outside the scanned area transparent.

    An opaque region comes back as a view of its first three channels, not a copy.
    """
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return rgba[..., :3]
    rgb = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
    return ((rgb + 127) // 255).astype(np.uint8)


# --- tissue ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TissueMap:
    """Where the tissue is: a boolean map over the slide, `downsample` level-0 pixels per cell."""

    mask: np.ndarray
    downsample: float

    def fraction(self, x: float, y: float, width0: float, height0: float) -> float:
        """Share of tissue cells whose centres lie in the level-0 box (x, y, width0, height0);
        a box too small to hold a centre takes the cell under its own centre."""
        d = self.downsample
        rows = slice(max(0, math.ceil(y / d - 0.5)), max(0, math.ceil((y + height0) / d - 0.5)))
        cols = slice(max(0, math.ceil(x / d - 0.5)), max(0, math.ceil((x + width0) / d - 0.5)))
        cells = self.mask[rows, cols]
        if cells.size:
            return float(cells.mean())
        row, col = int((y + height0 / 2) // d), int((x + width0 / 2) // d)
        inside = 0 <= row < self.mask.shape[0] and 0 <= col < self.mask.shape[1]
        return float(self.mask[row, col]) if inside else 0.0

    def touches(self, x: float, y: float, width0: float, height0: float) -> bool:
        """Whether any tissue cell overlaps the box, by even a part (a cheap first filter)."""
        d = self.downsample
        rows = slice(max(0, math.floor(y / d)), max(0, math.ceil((y + height0) / d)))
        cols = slice(max(0, math.floor(x / d)), max(0, math.ceil((x + width0) / d)))
        return bool(self.mask[rows, cols].any())


def detect_tissue(slide: Slide, min_area_um2: float = 10_000.0, min_saturation: float = 0.05) -> TissueMap:
    """Tissue on a thumbnail near 8 µm/px: Otsu on the HSV saturation after a median blur,
    a morphological close, and removal of pieces smaller than `min_area_um2`.

    Stained tissue is saturated and glass is grey, so saturation separates them whatever the
    brightness. `min_saturation` keeps Otsu from splitting the noise of an empty slide in two.
    """
    thumbnail, downsample = slide.thumbnail()
    return TissueMap(tissue_from_thumbnail(thumbnail, slide.require_mpp() * downsample,
                                           min_area_um2, min_saturation), downsample)


def tissue_from_thumbnail(rgb: np.ndarray, mpp: float, min_area_um2: float = 10_000.0,
                          min_saturation: float = 0.05) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail at `mpp` µm/px (see :func:`detect_tissue`)."""
    saturation = _saturation(rgb)
    blurred = ndimage.median_filter(saturation, size=5, mode="nearest")
    threshold = threshold_otsu(blurred) if blurred.min() < blurred.max() else 1.0
    tissue = blurred > max(threshold, min_saturation)
    tissue = closing(tissue, disk(2))
    return _without_small_pieces(tissue, min_cells=max(1, round(min_area_um2 / (mpp * mpp))))


def _without_small_pieces(mask: np.ndarray, min_cells: int) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    keep = np.bincount(labels.ravel()) >= min_cells
    keep[0] = False
    return keep[labels]


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max, in [0, 1]; black pixels have none."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)

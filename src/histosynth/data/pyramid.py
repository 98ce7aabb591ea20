"""Write images and label masks as pyramidal tiled TIFF that openslide and tiffslide both open.

The layout is the "generic tiled TIFF" both readers understand: one tiled page per level, level 0
first, every level exactly half the size of the one above, microns per pixel in the resolution tags
(pixels per centimetre). RGB levels are JPEG-compressed and downsampled by area averaging; label
masks are stored losslessly (deflate) and downsampled by nearest neighbour, so every level holds
only the ids of the mask: pixel (i, j) of level k is pixel (2**k * i, 2**k * j) of level 0, the
same rule :func:`histosynth.data.slides.resize_nearest` applies when tiling.

Exact halving: when a level has an odd size, the readers compute slightly different downsample
factors and disagree by a pixel. Level 0 is therefore padded on the right and bottom to a
multiple of ``2 ** (levels - 1)`` — white for RGB, id 0 for masks — and the file reports that
padded size. An image and its mask of equal size are padded alike and stay aligned.

Large images stream: give a :class:`TileSource` instead of an array, and level 0 is read band by
band; the lower levels (a third of level 0 together) are kept in memory, or in scratch files
beside the output when they are large (in ``.<name>.pyramid-<random>/``). What a killed write
left beside the output (that scratch folder, the ``.<name>.<random>.part.tif`` temporary) is
removed when the same output is written again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tifffile
from PIL import Image

from .. import validation
from ..errors import DataError
from ..io import (
    atomic_path,
    remove_partial_files,
    remove_scratch_folders,
    scratch_folder,
)

#: (x, y, width, height) at level 0 -> (height, width, 3) RGB uint8 or (height, width) label ids.
RegionReader = Callable[[int, int, int, int], np.ndarray]

#: Above this, lower pyramid levels live in scratch files instead of memory.
_IN_MEMORY_BYTES = 256 * 2**20
#: Above this (uncompressed), the file is written as BigTIFF: a classic TIFF stops at 4 GiB.
_BIGTIFF_BYTES = 2**31


@dataclass(frozen=True)
class TileSource:
    """An image too large to hold in memory, read region by region at full resolution.

    The writer asks for full-width bands from top to bottom, each exactly once, so a `read`
    that renders on demand (or :meth:`from_bands`) never needs the whole image.
    """

    height: int
    width: int
    read: RegionReader

    @classmethod
    def from_bands(cls, height: int, width: int, bands: Iterable[np.ndarray]) -> "TileSource":
        """A source over full-width horizontal bands of any heights, given top to bottom."""
        return cls(height, width, _SequentialBands(width, iter(bands)))


class _SequentialBands:
    """Serves top-to-bottom full-width reads from an iterator of bands, buffering one band."""

    def __init__(self, width: int, bands: Iterator[np.ndarray]):
        self.width = width
        self.bands = bands
        self.buffer: np.ndarray | None = None
        self.top = 0  # row of the image at buffer[0]

    def __call__(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        if x != 0 or width != self.width or y != self.top:
            raise ValueError("a band source can only be read in full-width bands from top to bottom")
        parts = [] if self.buffer is None else [self.buffer]
        have = 0 if self.buffer is None else len(self.buffer)
        while have < height:
            band = next(self.bands, None)
            if band is None:
                raise DataError(f"the band source ended at row {self.top + have}; expected {height} more rows")
            parts.append(np.asarray(band))
            have += len(band)
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self.buffer = rows[height:] if len(rows) > height else None
        self.top += height
        return rows[:height]


def pyramid_halvings(height: int, width: int, tile: int = 256) -> int:
    """How many times the image is halved: until its longer side fits in one tile."""
    halvings = 0
    while max(height, width) > tile * 2**halvings:
        halvings += 1
    return halvings


def padded_size(height: int, width: int, tile: int = 256) -> tuple[int, int]:
    """Level-0 size written for an image of this size: a multiple of 2**halvings on each side."""
    step = 2 ** pyramid_halvings(height, width, tile)
    return -(-height // step) * step, -(-width // step) * step


def write_pyramid_tiff(path: str | Path, source: np.ndarray | TileSource, mpp: float, *,
                       is_mask: bool = False, tile: int = 256, quality: int = 90) -> Path:
    """Write `source` (RGB uint8 (H, W, 3), or a label mask (H, W) with `is_mask`) as a pyramid.

    `mpp` is the level-0 resolution in microns per pixel. The file appears under `path` only
    once complete (a killed write leaves no file that looks finished). Returns `path`.
    """
    path = Path(path)
    validation.positive_float(mpp, f"{path}: microns per pixel", error=DataError)
    if tile % 16:
        raise DataError(f"{path}: the tile size must be a multiple of 16, got {tile}")
    source = _as_tile_source(source, is_mask, path)
    height, width = padded_size(source.height, source.width, tile)
    halvings = pyramid_halvings(height, width, tile)
    channels = () if is_mask else (3,)
    bigtiff = height * width * max(1, len(channels)) * 4 // 3 > _BIGTIFF_BYTES
    remove_leftovers(path)
    with atomic_path(path) as tmp, scratch_folder(path, "pyramid") as scratch:
        levels = _LevelBuffers(scratch, channels)
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tiff:
            below = levels.allocate(height // 2, width // 2) if halvings else None
            bands = _level0_bands(source, (height, width, *channels), tile, fill=0 if is_mask else 255)
            tiff.write(_tiles(bands, width, tile, below, is_mask), shape=(height, width, *channels),
                       dtype=np.uint8, **_page_options(mpp, 0, tile, is_mask, quality))
            for level in range(1, halvings + 1):
                current = below
                below = levels.allocate(current.shape[0] // 2, current.shape[1] // 2) if level < halvings else None
                if below is not None:
                    for top in range(0, current.shape[0], tile):
                        _halve_into(below, current[top:top + tile], top, is_mask)
                tiff.write(current, **_page_options(mpp, level, tile, is_mask, quality))
    return path


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete what a killed :func:`write_pyramid_tiff` of exactly `path` left beside it; returns it.

    Only the temporary file of `path` and scratch folders named for `path` go; other files,
    and other outputs' temporaries in the same folder, are left alone.
    """
    return remove_partial_files(path) + remove_scratch_folders(path, "pyramid")


def halve(image: np.ndarray, is_mask: bool) -> np.ndarray:
    """Half-size image of even size: area average for RGB, top-left pixel of each 2x2 for labels."""
    if is_mask:
        return np.ascontiguousarray(image[::2, ::2])
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width // 2, height // 2), Image.BOX))


def _halve_into(below: np.ndarray, band: np.ndarray, top: int, is_mask: bool) -> None:
    """Write the half-size `band` (rows from `top` of the level above) into the next level."""
    below[top // 2:(top + len(band)) // 2] = halve(band, is_mask)


def _as_tile_source(source: np.ndarray | TileSource, is_mask: bool, path: Path) -> TileSource:
    if isinstance(source, TileSource):
        return source
    array = np.asarray(source)
    expected = "(H, W) label ids" if is_mask else "(H, W, 3) RGB"
    if array.dtype != np.uint8 or array.ndim != (2 if is_mask else 3) or (not is_mask and array.shape[2] != 3):
        raise DataError(f"{path}: expected a uint8 {expected} image, got {array.dtype} {array.shape}")
    return TileSource(array.shape[0], array.shape[1],
                      lambda x, y, w, h: array[y:y + h, x:x + w])


def _level0_bands(source: TileSource, shape: tuple[int, ...], tile: int, fill: int) -> Iterator[np.ndarray]:
    """Full-width bands of `tile` rows of the padded level 0 (`shape`), read from the source in order."""
    height = shape[0]
    for top in range(0, height, tile):
        band_height = min(tile, height - top)
        real_rows = max(0, min(band_height, source.height - top))
        band = np.full((band_height, *shape[1:]), fill, dtype=np.uint8)
        if real_rows:
            rows = np.asarray(source.read(0, top, source.width, real_rows))
            expected = (real_rows, source.width, *shape[2:])
            if rows.shape != expected or rows.dtype != np.uint8:
                raise DataError(
                    f"the tile source returned {rows.dtype} {rows.shape} for rows {top}-{top + real_rows}; "
                    f"expected uint8 {expected}"
                )
            band[:real_rows, :source.width] = rows
        yield band


def _tiles(bands: Iterator[np.ndarray], width: int, tile: int, below: np.ndarray | None,
           is_mask: bool) -> Iterator[np.ndarray]:
    """Row-major tiles of level 0 (padded to full tiles), filling the next level on the way."""
    top = 0
    for band in bands:
        if below is not None:
            _halve_into(below, band, top, is_mask)
        top += len(band)
        for left in range(0, width, tile):
            piece = band[:, left:left + tile]
            if piece.shape[:2] != (tile, tile):
                padded = np.zeros((tile, tile) + piece.shape[2:], dtype=np.uint8)
                padded[:piece.shape[0], :piece.shape[1]] = piece
                piece = padded
            yield piece


def _page_options(mpp: float, level: int, tile: int, is_mask: bool, quality: int) -> dict:
    pixels_per_cm = 1e4 / (mpp * 2**level)
    options = dict(
        tile=(tile, tile),
        resolution=(pixels_per_cm, pixels_per_cm),
        resolutionunit="CENTIMETER",
        subfiletype=1 if level else 0,
        metadata=None,
        software="histosynth",
    )
    if is_mask:
        options.update(photometric="minisblack", compression="zlib")
    else:
        options.update(photometric="rgb", compression="jpeg", compressionargs={"level": quality})
    return options


class _LevelBuffers:
    """Arrays for the lower levels: in memory when small, else memory-mapped scratch files."""

    def __init__(self, scratch: Path, channels: tuple[int, ...]):
        self.scratch = scratch
        self.channels = channels
        self.count = 0

    def allocate(self, height: int, width: int) -> np.ndarray:
        shape = (height, width, *self.channels)
        if math.prod(shape) <= _IN_MEMORY_BYTES:
            return np.empty(shape, dtype=np.uint8)
        self.count += 1
        return np.lib.format.open_memmap(self.scratch / f"level{self.count}.npy", mode="w+",
                                         dtype=np.uint8, shape=shape)

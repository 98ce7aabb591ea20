"""A patch dataset from a folder of images and a folder of label masks with the same file stems.

This is how images that were not cut from a slide become training data: images generated from
masks (whose conditioning masks are their ground truth), images labelled by a segmenter
(``histosynth segment predict``), or any hand-labelled set. All pairs go into one pseudo-slide of
one split, as a dataset of generated images has no slides to hold out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.progress import track

from ..errors import DataError
from ..schema import RENAL, ClassSchema
from .dataset import Patch, PatchDataset, PatchDatasetWriter, read_image
from .images import list_images_of_job_folder
from .masks import read_mask

#: How many unmatched names an error lists before it says "and N more".
LISTED_NAMES = 5


@dataclass(frozen=True)
class ImageMaskPair:
    image: Path
    mask: Path


def match_pairs(images: Path, masks: Path) -> list[ImageMaskPair]:
    """Every image of `images` with the mask of the same stem in `masks`; an image without a mask,
    or two masks of one stem, is an error that names them."""
    if not Path(masks).is_dir():
        raise DataError(f"mask folder {masks} does not exist")
    by_stem: dict[str, list[Path]] = {}
    for path in list_images_of_job_folder(masks):
        by_stem.setdefault(path.stem, []).append(path)
    ambiguous = sorted(stem for stem, paths in by_stem.items() if len(paths) > 1)
    if ambiguous:
        raise DataError(f"{masks} holds several masks for {_names(ambiguous)}; keep one file per image stem")
    image_paths = list_images_of_job_folder(images)
    missing = [p.name for p in image_paths if p.stem not in by_stem]
    if missing:
        raise DataError(f"{len(missing)} of {len(image_paths)} images have no mask of the same name in {masks}: "
                        f"{_names(missing)}")
    return [ImageMaskPair(p, by_stem[p.stem][0]) for p in image_paths]


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES])
    return shown if len(names) <= LISTED_NAMES else f"{shown} and {len(names) - LISTED_NAMES} more"


def patch_size_of(pairs: list[ImageMaskPair]) -> int:
    """The common square size of the images (a patch dataset has one patch size)."""
    from PIL import Image

    sizes: dict[tuple[int, int], list[str]] = {}
    for pair in pairs:
        with Image.open(pair.image) as image:
            sizes.setdefault(image.size, []).append(pair.image.name)
    if len(sizes) > 1:
        listed = "; ".join(f"{w}x{h} px: {_names(names)}" for (w, h), names in sorted(sizes.items()))
        raise DataError(f"the images differ in size ({listed}); a patch dataset holds patches of one size")
    (width, height), = sizes
    if width != height:
        raise DataError(f"the images are {width}x{height} px; a patch dataset holds square patches")
    return width


def read_pairs(pairs: list[ImageMaskPair], schema: ClassSchema, progress: bool) -> Iterator[Patch]:
    for pair in track(pairs, description="pairing", disable=not progress):
        image = read_image(pair.image, mode="RGB")
        mask = read_mask(pair.mask, schema)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{pair.mask} is {mask.shape[1]}x{mask.shape[0]} px but its image {pair.image} is "
                            f"{image.shape[1]}x{image.shape[0]} px; a mask must label every pixel of its image")
        yield Patch(image, mask, 0, 0, tissue_fraction=float(np.mean(~np.isin(mask, schema.uncaptioned_ids))))


def default_slide_name(images: Path) -> str:
    """The image folder's name, or its parent's for a folder called 'images' (a generation job's)."""
    images = Path(images).resolve()
    return images.parent.name if images.name == "images" else images.name


def pair_dataset(images: str | Path, masks: str | Path, out: str | Path, schema: ClassSchema = RENAL,
                 slide: str | None = None, split: str = "train", progress: bool = False) -> PatchDataset:
    """Write the image/mask pairs of two folders as a patch dataset of one pseudo-slide."""
    images, masks = Path(images), Path(masks)
    pairs = match_pairs(images, masks)
    slide = slide or default_slide_name(images)
    writer = PatchDatasetWriter(out, schema, patch_size_of(pairs),
                                {"paired_from": {"images": str(images), "masks": str(masks)}})
    if writer.slide_done(slide):
        raise DataError(f"{out} already holds a slide {slide!r}; choose another --out or --slide")
    writer.write_slide(slide, read_pairs(pairs, schema, progress), split)
    return writer.finalize()

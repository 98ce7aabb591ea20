"""Sets of images to evaluate: a patch dataset, a folder of images, or a folder of generated images
with the manifest that records the caption each was generated from."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import pandas as pd

from .. import validation
from ..captions import UNCONDITIONAL_CAPTION
from ..data.dataset import open_dataset
from ..data.images import list_images, list_images_of_job_folder
from ..errors import DataError
from ..segment.predict import read_rgb

T = TypeVar("T")

#: Manifest files a folder of generated images may hold, in the order they are looked for.
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.json")
#: Manifest columns that may name an image file (relative to the folder).
IMAGE_COLUMNS = ("image", "file", "path", "filename")


def is_patch_dataset(path: str | Path) -> bool:
    return (Path(path) / "dataset.json").is_file()


def image_paths(source: str | Path, split: str | None = None) -> list[Path]:
    """Image files of a patch dataset (optionally one split), of a folder, or of a generation job's folder (its
    numbered sub-folders)."""
    source = Path(source)
    if is_patch_dataset(source):
        dataset = open_dataset(source)
        rows = dataset.rows(split)
        return [dataset.root / p for p in rows["image"]]
    return list_images_of_job_folder(source)


def check_choice(n: int | None, seed: int) -> None:
    """--n (when given) of at least 1 and a usable --seed."""
    if n is not None:
        validation.positive_int(n, "--n")
    validation.seed(seed)


def choose(items: Sequence[T], n: int | None, seed: int, what: str) -> list[T]:
    """`n` of the items, drawn with a seed and kept in order (all for None); fewer is an error."""
    check_choice(n, seed)
    if n is None:
        return list(items)
    if n > len(items):
        raise DataError(f"{what} holds {len(items)} images but {n} were asked for; pass --n {len(items)} or add images")
    picked = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(picked)]


def load_images(paths: Sequence[Path], what: str) -> list[np.ndarray]:
    """RGB uint8 images, all of one size (mixed sizes are an error naming the sizes found)."""
    images = [read_rgb(p) for p in paths]
    check_one_size(images, what)
    return images


def check_one_size(images: Sequence[np.ndarray], what: str) -> tuple[int, int]:
    sizes = Counter(img.shape[:2] for img in images)
    if len(sizes) > 1:
        listing = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common())
        raise DataError(f"{what} mixes image sizes: {listing}; use images of one size")
    if not sizes:
        raise DataError(f"{what} holds no images")
    return next(iter(sizes))


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image and the caption it was asked to show."""

    path: Path
    caption: str


def read_generated(folder: str | Path, caption: str | None = None) -> tuple[list[GeneratedImage], str]:
    """The images of a generated folder with their requested captions, and where these came from.

    The captions come from the folder's generation job (its finished images), else its manifest: a
    CSV / JSON-lines / JSON table with a `caption` column and an image column (one of
    image/file/path/filename), or the "items" of a manifest.json. Listed images not (yet) in the
    folder — an unfinished job — are left out and counted in the returned description. Without a
    manifest every image is taken to show `caption`; with neither, it is an error. A given `caption`
    overrides the manifest's.
    """
    from ..sample.jobs import JOB_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of generated images")
    if (folder / JOB_FILE).is_file():
        return _job_images(folder, caption)
    manifest = next((folder / name for name in MANIFEST_NAMES if (folder / name).is_file()), None)
    if manifest is None:
        if caption is None:
            raise DataError(
                f"{folder} has no manifest ({', '.join(MANIFEST_NAMES)}) recording the captions; "
                "pass --caption with the caption the images were generated from"
            )
        return [GeneratedImage(p, caption) for p in list_images([folder])], "--caption (no manifest in the folder)"
    records = _read_manifest(manifest)
    column = next((c for c in IMAGE_COLUMNS if c in records.columns), None)
    if column is None or "caption" not in records.columns:
        raise DataError(
            f"{manifest} needs a 'caption' column and an image column ({', '.join(IMAGE_COLUMNS)}); "
            f"it has {list(records.columns)}"
        )
    items, missing = [], 0
    for record in records.itertuples(index=False):
        path = folder / str(getattr(record, column))
        if not path.is_file():
            missing += 1
            continue
        text = record.caption
        text = UNCONDITIONAL_CAPTION if pd.isna(text) else str(text)
        items.append(GeneratedImage(path, caption if caption is not None else text))
    if not items:
        raise DataError(f"none of the {len(records)} images listed in {manifest} is in {folder}")
    source = manifest.name + (" (captions overridden by --caption)" if caption is not None else "")
    if missing:
        source += f"; {missing} listed images are missing (an unfinished job?) and left out"
    return items, source


def _job_images(folder: Path, caption: str | None) -> tuple[list[GeneratedImage], str]:
    """The finished images of the generation job in ``folder`` and the captions they were made from."""
    from ..sample.jobs import Job

    job = Job.read(folder)
    finished = job.finished(check_files=True)
    if not finished:
        raise DataError(f"{folder} holds no finished images yet; run its generate command (it resumes)")
    items = [GeneratedImage(folder / item["file"], caption if caption is not None else item["caption"])
             for item in finished]
    source = f"generation job {folder} ({len(finished)} of {job.spec.n} images finished)"
    return items, source + (" (captions overridden by --caption)" if caption is not None else "")


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        data = json.loads(path.read_text())
        return pd.DataFrame(data["items"] if isinstance(data, dict) and "items" in data else data)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} cannot be read as a manifest ({exc})") from None

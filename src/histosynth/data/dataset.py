"""The patch-dataset format on disk, and the torch Dataset over it.

A patch dataset is a folder::

    dataset.json              format version, class schema, patch size
    manifest.csv              one row per patch (see MANIFEST_COLUMNS + frac_<id> per class)
    images/<slide>/<id>.png   RGB uint8
    masks/<slide>/<id>.png    label ids (uint8) in the dataset's schema
    slides/<slide>.csv        the slide's manifest rows ...
    slides/<slide>.json       ... and its summary, written last: a slide with a JSON is finished

Writes are atomic and per slide, so a killed tiling run resumes with the slides it had not
finished, and processes writing different slides (shards of a tiling run) do not clobber each
other: manifest.csv is merged from the slides' parts. The dataset's split (train/val/test) is
assigned per slide, never per patch. Until a first slide is finished, dataset.json binds nothing:
a run that failed or was killed before then does not stop a retry with other settings.

A slide's name is a folder name and the start of its file names: it must be non-empty, must not
start with '.', and must not hold a path separator or control character (:func:`check_slide_name`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..captions import caption_for_mask, caption_for_shares, prevalences
from ..errors import DataError
from ..io import (
    atomic_path,
    partial_target,
    read_format_json,
    remove_partial_files,
    write_json_atomic,
    write_png_atomic,
)
from ..parallel import available_cpus, ordered_map
from ..schema import RENAL, ClassSchema

FORMAT = "histosynth.patches/1"
#: Longest slide name: its patch files' temporaries (".<name>_000000.png.<8>.part.png") must fit in 255 bytes.
MAX_SLIDE_NAME = 200
MANIFEST_COLUMNS = [
    "patch_id", "slide", "image", "mask", "x", "y", "level", "mpp", "size",
    "tissue_fraction", "split", "caption",
]


def fraction_column(class_id: int) -> str:
    return f"frac_{class_id}"


@dataclass
class Patch:
    """One patch to write: pixels, labels and where it came from (level-0 coordinates)."""

    image: np.ndarray
    mask: np.ndarray
    x: int = 0
    y: int = 0
    level: int = 0
    mpp: float | None = None
    tissue_fraction: float = 1.0


@dataclass
class PatchDataset:
    """A patch dataset read from disk."""

    root: Path
    schema: ClassSchema
    patch_size: int
    manifest: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.manifest)

    def rows(self, split: str | None = None) -> pd.DataFrame:
        if split is None:
            return self.manifest
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

    def image(self, row: pd.Series | dict) -> np.ndarray:
        return read_image(self.root / row["image"], mode="RGB")

    def mask(self, row: pd.Series | dict) -> np.ndarray:
        mask = read_image(self.root / row["mask"], mode=None)
        self.schema.check_mask(mask, source=str(self.root / row["mask"]))
        return mask


def read_image(path: Path, mode: str | None) -> np.ndarray:
    """Read a PNG; a missing or corrupt file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} is missing from the dataset; re-run the command that wrote it")
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert(mode) if mode else img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(
            f"{path} is corrupt ({exc}); delete its slide's JSON under slides/ and re-run to rewrite it"
        ) from None


class PatchDatasetWriter:
    """Writes a patch dataset slide by slide; finished slides are skipped on a re-run."""

    def __init__(self, root: str | Path, schema: ClassSchema = RENAL, patch_size: int = 256,
                 extra_info: dict[str, Any] | None = None, shared: bool = False):
        self.root = Path(root)
        self.schema = schema
        self.patch_size = patch_size
        #: Other processes (shards on other machines) write slides into the same folder at once, so
        #: the temporaries of dataset.json and manifest.csv beside ours may be theirs, and are kept.
        self.shared = shared
        info_path = self.root / "dataset.json"
        if info_path.exists():
            existing = _read_info(self.root)
            if self.finished_slides():
                if existing.get("patch_size") != patch_size:
                    raise DataError(
                        f"{self.root} holds a dataset of {existing.get('patch_size')} px patches; "
                        f"choose another --out for {patch_size} px patches"
                    )
                if ClassSchema.from_dict(existing["schema"]) != schema:
                    raise DataError(f"{self.root} holds a dataset with another class schema; choose another --out")
                return
        # Written again while no slide is finished: settings of a run that failed bind nothing.
        if not shared:
            remove_partial_files(info_path)
        info = {"format": FORMAT, "patch_size": patch_size, "schema": schema.to_dict(), **(extra_info or {})}
        write_json_atomic(info_path, info)

    def slide_done(self, slide: str) -> bool:
        return (self.root / "slides" / f"{slide}.json").exists()

    def finished_slides(self) -> list[str]:
        """Names of the slides written completely (those with a summary JSON)."""
        return finished_slides(self.root)

    def remove_unfinished(self, slide: str) -> list[Path]:
        """Delete the files a killed run left of `slide`, which must not be finished; returns them.

        Only this slide's own patch files (``<slide>_<index>.png`` and their temporaries) in
        ``images/<slide>/`` and ``masks/<slide>/`` go, and those folders once empty; anything else
        there, and whatever a symbolic link points to, is left alone.
        """
        check_slide_name(slide)
        if self.slide_done(slide):
            raise DataError(f"slide {slide} in {self.root} is finished; its patches are not removed")
        patch_file = re.compile(rf"{re.escape(slide)}_\d{{6,}}\.png")
        removed: list[Path] = []
        for kind in ("images", "masks"):
            kind_folder = self.root / kind
            folder = kind_folder / slide
            if folder.parent != kind_folder or folder.name != slide:
                raise DataError(f"slide name {slide!r} does not name one folder under {kind_folder}")
            if folder.is_symlink() or not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                name = entry.name
                if entry.is_file(follow_symlinks=False) and (
                        patch_file.fullmatch(name) or patch_file.fullmatch(partial_target(name) or "")):
                    (folder / name).unlink(missing_ok=True)
                    removed.append(folder / name)
            try:
                folder.rmdir()
            except OSError:
                pass  # something that is not a patch of this slide is left in it
        for suffix in (".csv", ".json"):
            removed += remove_partial_files(self.root / "slides" / f"{slide}{suffix}")
        return removed

    def write_slide(self, slide: str, patches: Iterable[Patch], split: str = "train",
                    summary: dict[str, Any] | None = None, threads: int | None = None) -> int:
        """Write all patches of one slide, then its manifest part and summary; returns the count.

        The patches are compressed and written on `threads` threads (default: one per CPU) while the
        next ones are taken from `patches` (read from the slide, say): PNG compression releases the GIL.
        """
        check_slide_name(slide)
        rows = self._write_patches(slide, patches, split, threads or available_cpus())
        part = pd.DataFrame(rows, columns=self._columns())
        with atomic_path(self.root / "slides" / f"{slide}.csv") as tmp:
            part.to_csv(tmp, index=False)
        write_json_atomic(self.root / "slides" / f"{slide}.json",
                          {"slide": slide, "patches": len(rows), "split": split, **(summary or {})})
        return len(rows)

    def finalize(self) -> PatchDataset:
        """Merge the finished slides' manifest parts into manifest.csv and return the dataset."""
        parts = []
        for slide in self.finished_slides():
            csv = self.root / "slides" / f"{slide}.csv"
            if csv.exists():
                parts.append(pd.read_csv(csv, keep_default_na=False))
        manifest = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=self._columns())
        if not self.shared:
            remove_partial_files(self.root / "manifest.csv")
        write_manifest(self.root, manifest)
        return open_dataset(self.root)

    def _write_patches(self, slide: str, patches: Iterable[Patch], split: str, threads: int) -> list[dict[str, Any]]:
        """Write the patches on `threads` threads, a bounded number ahead of the reader; their rows in order."""
        numbered = enumerate(patches)
        return list(ordered_map(lambda item: self._write_patch(slide, *item, split), numbered, threads,
                                name="patch-writer"))

    def _columns(self) -> list[str]:
        return MANIFEST_COLUMNS + [fraction_column(i) for i in self.schema.ids]

    def _write_patch(self, slide: str, index: int, patch: Patch, split: str) -> dict[str, Any]:
        size = self.patch_size
        if patch.image.shape != (size, size, 3) or patch.mask.shape != (size, size):
            raise DataError(
                f"slide {slide}: patch {index} has image {patch.image.shape} and mask {patch.mask.shape}; "
                f"expected ({size}, {size}, 3) and ({size}, {size})"
            )
        patch_id = f"{slide}_{index:06d}"
        image_rel = f"images/{slide}/{patch_id}.png"
        mask_rel = f"masks/{slide}/{patch_id}.png"
        write_png_atomic(self.root / image_rel, np.asarray(patch.image, dtype=np.uint8), fast=True)
        write_png_atomic(self.root / mask_rel, np.asarray(patch.mask, dtype=np.uint8), fast=True)
        shares = prevalences(patch.mask, self.schema)
        row = {
            "patch_id": patch_id, "slide": slide, "image": image_rel, "mask": mask_rel,
            "x": patch.x, "y": patch.y, "level": patch.level, "mpp": patch.mpp, "size": size,
            "tissue_fraction": round(float(patch.tissue_fraction), 6), "split": split,
            "caption": caption_for_shares(shares, self.schema),
        }
        row.update({fraction_column(i): round(shares[i], 6) for i in self.schema.ids})
        return row


def slide_name_problem(slide: str) -> str | None:
    """Why `slide` cannot be a folder name in a dataset, or None when it can."""
    if not isinstance(slide, str) or not slide:
        return "it is empty"
    if slide.startswith("."):
        return "it starts with '.' (a hidden file, or '.' / '..')"
    if "/" in slide or "\\" in slide:
        return "it holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in slide):
        return "it holds a control character"
    if len(slide.encode("utf-8", "surrogateescape")) > MAX_SLIDE_NAME:
        return f"it is longer than {MAX_SLIDE_NAME} bytes"
    return None


def check_slide_name(slide: str) -> str:
    """`slide` if it can be a folder name in a dataset, else a DataError saying why."""
    problem = slide_name_problem(slide)
    if problem:
        raise DataError(f"slide name {slide!r} cannot be used as a folder name: {problem}; choose another name")
    return slide


def finished_slides(root: str | Path) -> list[str]:
    """Names of the slides of the dataset at `root` that were written completely."""
    folder = Path(root) / "slides"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))  # not temporaries


def _read_info(root: Path) -> dict[str, Any]:
    return read_format_json(
        root / "dataset.json", FORMAT, DataError, what="dataset",
        missing=f"{root} is not a patch dataset (no dataset.json); create one with "
                "'histosynth tile' or 'histosynth phantom patches'",
    )


def write_manifest(root: Path, manifest: pd.DataFrame) -> None:
    with atomic_path(Path(root) / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False)


def open_dataset(root: str | Path) -> PatchDataset:
    """Read a patch dataset's description and manifest."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    info = _read_info(root)
    schema = ClassSchema.from_dict(info["schema"], source=str(root / "dataset.json"))
    manifest_path = root / "manifest.csv"
    if not manifest_path.is_file():
        raise DataError(f"{root} has no manifest.csv; the run that wrote it did not finish — re-run it")
    manifest = pd.read_csv(manifest_path, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(f"{manifest_path} lacks the columns {missing}")
    manifest["caption"] = manifest["caption"].astype(str)
    return PatchDataset(root=root, schema=schema, patch_size=int(info["patch_size"]),
                        manifest=manifest, info=info)


def recaption_dataset(root: str | Path, schema: ClassSchema | None = None) -> tuple[int, int]:
    """Rewrite every caption of a dataset from its masks; returns (changed, total).

    With a schema other than the dataset's, the masks are checked against it and the dataset
    adopts it (e.g. after renaming classes).
    """
    dataset = open_dataset(root)
    schema = schema or dataset.schema
    captions = [caption_for_mask(dataset.mask(row), schema) for _, row in dataset.manifest.iterrows()]
    changed = int(sum(a != b for a, b in zip(captions, dataset.manifest["caption"], strict=True)))
    dataset.manifest["caption"] = captions
    write_manifest(dataset.root, dataset.manifest)
    if schema != dataset.schema:
        write_json_atomic(dataset.root / "dataset.json", {**dataset.info, "schema": schema.to_dict()})
    return changed, len(captions)

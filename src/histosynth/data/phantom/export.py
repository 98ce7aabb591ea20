"""Phantom data on disk: pyramidal slide TIFFs, patch datasets and label-mask sets."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ...captions import caption_for_mask, prevalences
from ...errors import DataError
from ...io import (
    atomic_path,
    remove_partial_files,
    remove_scratch_folders,
    scratch_folder,
    write_json_atomic,
    write_png_atomic,
)
from ...schema import RENAL
from ...terminal import progress_bar
from ..dataset import Patch, PatchDataset, PatchDatasetWriter, finished_slides
from ..masks import read_mask
from ..pyramid import TileSource, write_pyramid_tiff
from .generate import PhantomSlide, check_phantom_settings, phantom_patch, phantom_patch_mask
from .mixes import resolve_mix


def phantom_seed(seed: int, index: int) -> int:
    """The 32-bit phantom seed of item `index` of a run (a patch, a mask, a stamped mask): a hash of
    (run seed, index), so independent of how items are grouped or batched.

    Not :func:`histosynth.sample.jobs.item_seed`, which gives a generation job's 63-bit noise seeds.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _rounded_shares(mask_counts: np.ndarray) -> dict[str, float]:
    total = max(1, int(mask_counts.sum()))
    return {RENAL.name_of(i): round(float(mask_counts[i]) / total, 6) for i in RENAL.ids}


# --- slides ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlideFiles:
    image: Path
    mask: Path
    info: Path


def write_phantom_slide(out: str | Path, seed: int = 0, width: int = 8192, height: int | None = None,
                        mpp: float = 0.5, mix: str | None = None, name: str | None = None,
                        progress: bool = True) -> SlideFiles:
    """Render a phantom slide band by band into `<name>.tif` and its label mask `<name>-mask.tif`.

    Both are pyramidal tiled TIFFs (the image JPEG-compressed, the mask lossless); `<name>.json`
    records the seed, size, mpp, mix, class shares and timing. Memory stays at a few bands.
    """
    out = Path(out)
    height = width if height is None else height
    name = name or f"phantom-{seed}"
    files = SlideFiles(out / f"{name}.tif", out / f"{name}-mask.tif", out / f"{name}.json")
    started = time.perf_counter()
    slide = PhantomSlide.create(seed, width, height, mpp, mix)
    out.mkdir(parents=True, exist_ok=True)
    remove_scratch_folders(files.image, "phantom")  # a killed run's (the TIFFs' own go as they are written)
    remove_partial_files(files.info)
    counts = np.zeros(256, dtype=np.int64)
    with scratch_folder(files.image, "phantom") as scratch, progress_bar(progress, elapsed=True) as bar:
        task = bar.add_task(f"phantom slide {name}", total=slide.tile_count())
        mask = np.lib.format.open_memmap(scratch / "mask.npy", mode="w+", dtype=np.uint8,
                                         shape=(height, width))

        def image_bands(mask_store: np.ndarray) -> Iterator[np.ndarray]:
            """The image's bands, keeping each band's mask in ``mask_store`` and its class counts."""
            for top, image, band_mask in slide.bands(on_tile=lambda: bar.advance(task)):
                mask_store[top:top + len(band_mask)] = band_mask
                counts[:] += np.bincount(band_mask.ravel(), minlength=256)
                yield image

        write_pyramid_tiff(files.image, TileSource.from_bands(height, width, image_bands(mask)), mpp)
        write_pyramid_tiff(files.mask, mask, mpp, is_mask=True)
        del mask  # close the memory map before its scratch folder is removed
    write_json_atomic(files.info, {
        "kind": "histosynth phantom slide", "seed": seed, "width": width, "height": height, "mpp": mpp,
        "mix": resolve_mix(mix).name, "image": files.image.name, "mask": files.mask.name,
        "pixel_shares": _rounded_shares(counts[:RENAL.num_classes]),
        "seconds": round(time.perf_counter() - started, 2),
    })
    return files


# --- patch datasets -------------------------------------------------------------------------------

def slide_splits(count: int, val: float = 0.1, test: float = 0.1) -> list[str]:
    """Splits of `count` pseudo-slides: the last ones test, those before them val, the rest train.

    With three or more slides, a non-zero fraction gets at least one slide, so small runs still
    have every split.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"val ({val}) and test ({test}) must be fractions that leave room for training")

    def share(fraction: float) -> int:
        wanted = round(count * fraction)
        return max(wanted, 1) if fraction > 0 and count >= 3 else wanted

    n_test, n_val = share(test), share(val)
    n_train = count - n_test - n_val
    if n_train < 1:
        raise DataError(f"{count} slides are too few for val {val} and test {test}; ask for more --slides")
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def write_phantom_patches(out: str | Path, n: int, size: int = 256, seed: int = 0, mix: str | None = None,
                          mpp: float = 0.5, slides: int | None = None, val: float = 0.1, test: float = 0.1,
                          progress: bool = True) -> PatchDataset:
    """A patch dataset of `n` phantom patches grouped into pseudo-slides, split by slide.

    Patch `i` is rendered from seed ``phantom_seed(seed, i)`` whatever the grouping; a re-run skips
    the pseudo-slides already written.
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    check_phantom_settings(size, seed, mpp)
    chosen = resolve_mix(mix)
    slides = min(n, 10, max(5, math.ceil(n / 25))) if slides is None else slides
    if not 1 <= slides <= n:
        raise DataError(f"--slides must lie between 1 and the number of patches ({n}), got {slides}")
    splits = slide_splits(slides, val, test)
    recipe = {"source": "histosynth phantom", "mix": chosen.name, "seed": seed, "mpp": mpp}
    _check_same_recipe(Path(out), recipe)
    writer = PatchDatasetWriter(out, RENAL, patch_size=size, extra_info=recipe)
    bounds = np.linspace(0, n, slides + 1).round().astype(int)
    columns = math.ceil(math.sqrt(max(bounds[1:] - bounds[:-1])))
    with progress_bar(progress, elapsed=True) as bar:
        task = bar.add_task("phantom patches", total=n)
        for k, split in enumerate(splits):
            name = f"phantom-s{seed}-{k:03d}"
            first, last = int(bounds[k]), int(bounds[k + 1])
            if writer.slide_done(name):
                bar.advance(task, last - first)
                continue

            def patches(first: int = first, last: int = last) -> Iterator[Patch]:
                for i in range(first, last):
                    image, mask = phantom_patch(phantom_seed(seed, i), size, chosen, mpp)
                    local = i - first
                    bar.advance(task)
                    yield Patch(image=image, mask=mask, x=(local % columns) * size, y=(local // columns) * size,
                                level=0, mpp=mpp, tissue_fraction=float(np.mean(mask > 0)))

            writer.write_slide(name, patches(), split=split,
                               summary={"source": "histosynth phantom", "mix": chosen.name,
                                        "first_index": first, "seed": seed})
    return writer.finalize()


def _check_same_recipe(out: Path, recipe: dict) -> None:
    """A re-run may only resume a dataset written with the same seed, mix and mpp (once a slide is finished)."""
    info_path = out / "dataset.json"
    if not info_path.is_file() or not finished_slides(out):
        return
    info = json.loads(info_path.read_text())
    different = {k: (info.get(k), v) for k, v in recipe.items() if info.get(k) != v}
    if different:
        described = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in different.items())
        raise DataError(f"{out} holds a dataset written with {described}; choose another --out")


# --- label masks ----------------------------------------------------------------------------------

def write_phantom_masks(out: str | Path, n: int, size: int = 256, seed: int = 0, mix: str | None = None,
                        mpp: float = 0.5, progress: bool = True) -> Path:
    """`n` phantom label masks as PNG (class ids) and `masks.csv` (file, seed, caption, shares).

    Mask `i` is the mask of the phantom patch of seed ``phantom_seed(seed, i)``. A re-run keeps the
    masks already written. Returns the path of the CSV.
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    check_phantom_settings(size, seed, mpp)
    out = Path(out)
    chosen = resolve_mix(mix)
    rows = []
    with progress_bar(progress, elapsed=True) as bar:
        task = bar.add_task("phantom masks", total=n)
        for i in range(n):
            path = out / f"mask_{i:06d}.png"
            patch_seed = phantom_seed(seed, i)
            if path.exists():
                mask = read_mask(path, RENAL)
                if mask.shape != (size, size):
                    raise DataError(f"{path} is {mask.shape[1]}x{mask.shape[0]}, not {size}x{size}; "
                                    "choose another --out for masks of this size")
            else:
                mask = phantom_patch_mask(patch_seed, size, chosen, mpp)
                write_png_atomic(path, mask)
            rows.append({"mask": path.name, "seed": patch_seed, "mix": chosen.name, **mask_description(mask)})
            bar.advance(task)
    return write_mask_table(out, rows)


def mask_description(mask: np.ndarray) -> dict:
    """A row of ``masks.csv``: the mask's caption and class shares."""
    shares = prevalences(mask, RENAL)
    return {"caption": caption_for_mask(mask, RENAL), **{f"frac_{c}": round(shares[c], 6) for c in RENAL.ids}}


def write_mask_table(out: Path, rows: list[dict]) -> Path:
    table = Path(out) / "masks.csv"
    with atomic_path(table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return table

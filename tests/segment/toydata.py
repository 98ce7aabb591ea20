"""Tiny synthetic renal-like tissue for segmentation and evaluation tests.

A textured pink background ("other kidney tissue", id 6), a white band at the top (id 0), and
discs of "Glomeruli" (id 4) and "Sclerotic Glomeruli" (id 5) in distinct colours, with pixel noise.
The conftest files of tests/segment and tests/evaluate load this module by path; what they share
(a dataset, a trained segmenter) lives in the session's base temporary folder, made by whichever
asks first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histosynth.data.dataset import Patch, PatchDataset, PatchDatasetWriter
from histosynth.schema import RENAL

COLOURS = {0: (245, 245, 245), 4: (200, 110, 190), 5: (110, 50, 130), 6: (235, 175, 195)}


def toy_sample(size: int, rng: np.random.Generator, healthy: int = 2, sclerotic: int = 1,
               radius: tuple[int, int] = (6, 12), white_band: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and its mask (RENAL ids 0, 4, 5, 6)."""
    mask = np.full((size, size), 6, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if white_band:
        mask[:int(rng.integers(size // 8, size // 4))] = 0
    for class_id, count in ((4, healthy), (5, sclerotic)):
        for _ in range(count):
            r = int(rng.integers(*radius))
            cy, cx = rng.integers(0, size, 2)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = class_id
    return render(mask, rng), mask


def render(mask: np.ndarray, rng: np.random.Generator, noise: float = 14.0) -> np.ndarray:
    """Colour a mask and add pixel noise plus a faint stripe texture."""
    lut = np.zeros((256, 3), dtype=np.float32)
    for class_id, colour in COLOURS.items():
        lut[class_id] = colour
    image = lut[mask]
    stripes = 8 * np.sin(np.arange(mask.shape[1]) / 3.0)[None, :, None]
    image = image + stripes + rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_toy_dataset(root: Path, slides: dict[str, str], per_slide: int = 6, size: int = 64,
                      seed: int = 0, **sample_options) -> PatchDataset:
    """A patch dataset with one slide per entry of `slides` (name -> split)."""
    writer = PatchDatasetWriter(root, schema=RENAL, patch_size=size)
    for s, (slide, split) in enumerate(sorted(slides.items())):
        rng = np.random.default_rng((seed, s))
        patches = [Patch(*toy_sample(size, rng, **sample_options)) for _ in range(per_slide)]
        writer.write_slide(slide, patches, split=split)
    return writer.finalize()


def write_generated_folder(folder: Path, n: int = 6, seed: int = 5, nested: bool = False) -> Path:
    """Toy images as generated ones, with a manifest of the caption each was asked for (the thesis' generating
    caption); ``nested`` lays them out as generation jobs do (00000/00000.png)."""
    import pandas as pd

    from histosynth.captions import GENERATING_CAPTION
    from histosynth.io import write_png_atomic

    rng = np.random.default_rng(seed)
    records = []
    for index in range(n):
        image, _ = toy_sample(96, rng, healthy=3 if index % 2 else 0)
        name = f"{index:05d}/{index:05d}.png" if nested else f"{index:05d}.png"
        write_png_atomic(folder / name, image)
        records.append({"image": name, "caption": GENERATING_CAPTION, "seed": index})
    pd.DataFrame(records).to_csv(folder / "manifest.csv", index=False)
    return folder


# --- shared between test folders: kept in the session's base temporary folder -------------------
#: A quick training: enough for the plumbing (files, logs, reports), not for good masks.
QUICK_OPTIONS = dict(base_channels=4, batch_size=4, max_epochs=2, patience=2, learning_rate=5e-3,
                     input_size=204, seed=0)
#: Enough to reach Dice >= 0.9 on this tissue (about a minute on 2 free CPU cores).
QUALITY_OPTIONS = dict(base_channels=8, batch_size=4, max_epochs=12, patience=4, learning_rate=5e-3, seed=0)
SLIDES = {"a": "train", "b": "train", "c": "train", "v": "val", "t": "test"}


def shared_dataset(tmp_path_factory) -> PatchDataset:
    from histosynth.data.dataset import open_dataset

    root = tmp_path_factory.getbasetemp() / "toy-dataset"
    if (root / "manifest.csv").exists():
        return open_dataset(root)
    return write_toy_dataset(root, SLIDES, per_slide=8, size=96)


def train_command(dataset: Path, out: Path, options: dict, class_name: str | None = None) -> list[str]:
    """`histosynth segment train` arguments for some training options."""
    flags = {"base_channels": "--base-channels", "batch_size": "--batch-size", "max_epochs": "--epochs",
             "patience": "--patience", "learning_rate": "--lr", "input_size": "--input-size", "seed": "--seed"}
    args = ["segment", "train", str(dataset), "--out", str(out), "--device", "cpu", "--no-progress"]
    for key, value in options.items():
        args += [flags[key], str(value)]
    return args + (["--class", class_name] if class_name else [])


def shared_multiclass_segmenter(tmp_path_factory) -> Path:
    """The folder of a quickly trained multi-class segmenter (made with the command)."""
    from histosynth.cli import main

    out = tmp_path_factory.getbasetemp() / "toy-multiclass"
    if not (out / "segmenter.json").exists():
        dataset = shared_dataset(tmp_path_factory)
        assert main(train_command(dataset.root, out, QUICK_OPTIONS)) == 0
    return out

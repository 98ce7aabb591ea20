"""A tiny captioned patch dataset (32 px) and one-thread torch for the training tests."""

from __future__ import annotations

import numpy as np
import pytest

from histosynth.data.dataset import Patch, PatchDatasetWriter

#: display-ish colours per class id, so that images follow their masks
COLOURS = np.array([[255, 255, 255], [200, 30, 60], [230, 150, 60], [200, 120, 180], [150, 60, 150],
                    [120, 40, 120], [240, 200, 210], [250, 220, 240]], dtype=np.int16)


def write_blob_dataset(root, n: int = 16, size: int = 32, seed: int = 0, captions: bool = True):
    """Patches of kidney-coloured discs on 'other tissue', with their masks (captions follow them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patches = []
    for _ in range(n):
        mask = np.full((size, size), 6, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, size, 2)
            radius = int(rng.integers(3, size // 3))
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.choice([3, 4, 7])
        image = COLOURS[mask] + rng.integers(-20, 21, (size, size, 3))
        patches.append(Patch(np.clip(image, 0, 255).astype(np.uint8), mask))
    writer = PatchDatasetWriter(root, patch_size=size)
    writer.write_slide("s0", patches)
    dataset = writer.finalize()
    if not captions:
        from histosynth.data.dataset import write_manifest

        dataset.manifest["caption"] = ""
        write_manifest(dataset.root, dataset.manifest)
    return dataset


@pytest.fixture(scope="session")
def blob_dataset(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("blobs") / "dataset")


@pytest.fixture()
def dataset_copy(blob_dataset, tmp_path):
    """A private copy (tests that write a cache into the dataset or corrupt it)."""
    import shutil

    return shutil.copytree(blob_dataset.root, tmp_path / "dataset", ignore=shutil.ignore_patterns("cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Every module here runs on one thread (module-scoped, so that module fixtures such as a
    reference training run do too)."""
    yield


@pytest.fixture(scope="module")
def minilm():
    from histosynth.models.text import load_text_encoder

    return load_text_encoder("minilm")


def seeded_autoencoder(seed: int = 0):
    """The tiny preset's autoencoder with weights drawn from `seed` (untrained, deterministic)."""
    import torch

    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.presets import load_preset

    torch.manual_seed(seed)
    return build_autoencoder(load_preset("tiny")).eval()


def check_patches_and_a_slide(model, folder) -> None:
    """The model (trained on the 32 px blobs) samples a patch with each sampler and a 64 px slide in windows."""
    from PIL import Image

    from histosynth.cli import main

    for kind in ("ddim", "dpm++"):
        out = folder / kind
        assert main(["generate", "--model", str(model), "--levels", "Glomeruli=high", "--n", "1", "--steps", "3",
                     "--scheduler", kind, "--out", str(out), "--seed", "0"]) == 0
        (image,) = sorted(out.rglob("*.png"))
        pixels = np.asarray(Image.open(image))
        assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    slide = folder / "slide.tif"
    assert main(["synth-slide", "--model", str(model), "--levels", "Glomeruli=high", "--size", "64", "--steps", "2",
                 "--scheduler", "dpm++", "--out", str(slide)]) == 0
    assert slide.stat().st_size > 1000

"""Phantom generation and tiling speed, printed as ``name value unit`` lines.

* ``phantom_patch_256_ms``: one 256 px phantom patch with the default mix (median of 30 seeds);
* ``phantom_slide_{size}_s``: a whole phantom slide rendered in memory;
* ``phantom_slide_files_{size}_s``: the same slide written as image + mask pyramidal TIFFs;
* ``patch_png_{encoder}_ms`` / ``_kib``: time and size of one 256 px patch image as PNG, with
  Pillow's default compression (what tiling wrote before), Pillow's fastest (``compress_level=1``)
  and :func:`histosynth.io.fast_png` (what tiling writes: the "Up" filter and libdeflate level 1);
* ``raw_read_patches_per_s``: plain single-threaded openslide reads of the image and mask regions of
  the patches tiling keeps (the same region list, same slide, same run);
* ``tile_patches_per_s``: tiling that slide with its mask slide into 256 px patches at 0.5 µm/px with
  the default settings, and ``tile_vs_raw_read_ratio`` the one over the other;
* ``tile_2_slides_{how}_patches_per_s``: two such slides tiled one at a time (``workers1``), two at
  once on threads (``workers2``, the default on two CPUs) and two at once in processes
  (``processes2``, each process tiling one slide on its share of the CPUs).

Tiling and raw reads are each timed ``--repeats`` times, alternating, and the best run counts: the
first run pays for importing the readers, and the best run is the one least disturbed by other work
on a shared machine.

Run (from the repository root)::

    .venv/bin/python benchmarks/phantom_tiling.py [--size 4096] [--repeats 3]

Measured on the 2-core CPU machine (quiet), ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python
benchmarks/phantom_tiling.py --size 8192``, before tiling wrote fast PNGs on threads::

    phantom_patch_256_ms 19.6 ms
    phantom_slide_8192_s 12.19 s
    phantom_slide_files_8192_s 12.04 s
    tile_patches_per_s 52.0 patches/s

MEASURED-HERE
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.data.dataset import PatchDataset, PatchDatasetWriter
from histosynth.data.phantom import phantom_patch, phantom_slide
from histosynth.data.phantom.export import write_phantom_slide
from histosynth.data.tiling import SlideInput, TilingOptions, splits_for, tile_slide, tile_slides
from histosynth.io import fast_png
from histosynth.parallel import available_cpus
from histosynth.schema import RENAL

OPTIONS = TilingOptions(mpp=0.5, size=256)


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def raw_reads_per_s(item: SlideInput, dataset: PatchDataset) -> float:
    """Image + mask regions of the dataset's patches read with openslide, one after the other."""
    import openslide

    with openslide.OpenSlide(str(item.slide)) as slide, openslide.OpenSlide(str(item.mask)) as mask:
        level = int(dataset.manifest["level"].iloc[0])
        side = round(OPTIONS.size * OPTIONS.mpp / (float(slide.properties["openslide.mpp-x"])
                                                   * slide.level_downsamples[level]))
        corners = list(zip(dataset.manifest["x"].tolist(), dataset.manifest["y"].tolist(), strict=True))
        start = time.perf_counter()
        for x, y in corners:
            np.asarray(slide.read_region((x, y), level, (side, side)))
            np.asarray(mask.read_region((x, y), level, (side, side)))
        return len(corners) / (time.perf_counter() - start)


def tile_per_s(items: list[SlideInput], out: Path, **how) -> tuple[float, PatchDataset]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    dataset = tile_slides(items, out, options=OPTIONS, progress=False, **how).dataset
    return len(dataset) / (time.perf_counter() - start), dataset


def _tile_one(args: tuple[PatchDatasetWriter, SlideInput, int]) -> int:
    writer, item, threads = args
    return tile_slide(writer, item, RENAL, OPTIONS, splits_for(item.name, None, OPTIONS), threads=threads)


def tile_in_processes_per_s(items: list[SlideInput], out: Path) -> float:
    """The slides tiled at once in processes (started afresh, as a run would), merged as tile_slides does."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    writer = PatchDatasetWriter(out, RENAL, OPTIONS.size, extra_info={"tiling": OPTIONS.as_info()})
    threads = max(1, available_cpus() // len(items))
    with ProcessPoolExecutor(len(items), mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_tile_one, [(writer, item, threads) for item in items]))
    patches = len(writer.finalize())
    return patches / (time.perf_counter() - start)


def png_lines(images: list[np.ndarray]) -> None:
    def pillow(level: int | None):
        def encode(image: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", **({} if level is None else {"compress_level": level}))
            return buffer.getvalue()
        return encode

    for name, encode in (("pillow_default", pillow(None)), ("pillow_level1", pillow(1)), ("fast", fast_png)):
        sizes, times = [], []
        for image in images:
            start = time.perf_counter()
            sizes.append(len(encode(image)))
            times.append(time.perf_counter() - start)
        print(f"patch_png_{name}_ms {1000 * statistics.median(times):.2f} ms")
        print(f"patch_png_{name}_kib {statistics.mean(sizes) / 1024:.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the benchmarked slide in px")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of tiling and of raw reads (best counts)")
    args = parser.parse_args()
    size = args.size

    patch_times = [seconds(lambda s=seed: phantom_patch(s, 256)) for seed in range(30)]
    print(f"phantom_patch_256_ms {1000 * statistics.median(patch_times):.1f} ms")
    print(f"phantom_slide_{size}_s {seconds(lambda: phantom_slide(0, size, size)):.2f} s")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        took = seconds(lambda: write_phantom_slide(folder / "slides", 0, size, name="bench", progress=False))
        print(f"phantom_slide_files_{size}_s {took:.2f} s")
        item = SlideInput(folder / "slides" / "bench.tif", mask=folder / "slides" / "bench-mask.tif")

        tiled, raw = [], []
        for _ in range(args.repeats):
            rate, dataset = tile_per_s([item], folder / "dataset")
            tiled.append(rate)
            raw.append(raw_reads_per_s(item, dataset))
        png_lines([dataset.image(row) for _, row in dataset.manifest.head(40).iterrows()])
        print(f"raw_read_patches_per_s {max(raw):.1f} patches/s")
        print(f"tile_patches_per_s {max(tiled):.1f} patches/s")
        print(f"tile_vs_raw_read_ratio {max(tiled) / max(raw):.2f} x")

        twin = SlideInput(folder / "slides" / "twin.tif", mask=folder / "slides" / "twin-mask.tif")
        shutil.copyfile(item.slide, twin.slide)
        shutil.copyfile(item.mask, twin.mask)
        rates: dict[str, list[float]] = {"workers1": [], "workers2": [], "processes2": []}
        for _ in range(args.repeats):
            rates["workers1"].append(tile_per_s([item, twin], folder / "two", workers=1)[0])
            rates["workers2"].append(tile_per_s([item, twin], folder / "two", workers=2)[0])
            rates["processes2"].append(tile_in_processes_per_s([item, twin], folder / "two"))
        for how, values in rates.items():
            print(f"tile_2_slides_{how}_patches_per_s {max(values):.1f} patches/s")


if __name__ == "__main__":
    main()

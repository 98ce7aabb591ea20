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
* ``raw_read_cpu_ms_per_patch`` / ``tile_cpu_ms_per_patch``: the CPU time (all threads) each takes a
  patch, which a busy machine disturbs far less than the rates: on ``c`` free CPUs the ratio can
  reach at most ``c`` x raw / tile;
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

With fast PNGs on threads, per-thread slide handles and mask tiles decoded by tifffile, on the same
2-core machine while it was busy (load average 6-9 from other jobs: a phantom patch took
152 ms instead of 19.6, so every rate is several times too low and the ratio is noisy; the CPU times
are the steadier numbers), ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python
benchmarks/phantom_tiling.py --repeats 3``::

    phantom_patch_256_ms 152.0 ms
    phantom_slide_4096_s 26.65 s
    phantom_slide_files_4096_s 28.33 s
    patch_png_pillow_default_ms 66.04 ms
    patch_png_pillow_default_kib 99.5 KiB
    patch_png_pillow_level1_ms 22.65 ms
    patch_png_pillow_level1_kib 106.1 KiB
    patch_png_fast_ms 6.51 ms
    patch_png_fast_kib 106.4 KiB
    raw_read_patches_per_s 79.5 patches/s
    tile_patches_per_s 47.9 patches/s
    tile_vs_raw_read_ratio 0.60 x
    raw_read_cpu_ms_per_patch 5.37 ms
    tile_cpu_ms_per_patch 11.11 ms
    tile_2_slides_workers1_patches_per_s 49.7 patches/s
    tile_2_slides_workers2_patches_per_s 52.3 patches/s
    tile_2_slides_processes2_patches_per_s 18.7 patches/s

With nothing else of the project running (load average ~1.5; the machine's host was still slower
than in the first measurement: a phantom patch took 59 ms), ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/python benchmarks/phantom_tiling.py --repeats 3``, twice in a row::

    patch_png_pillow_default_ms 26.79 ms
    patch_png_pillow_level1_ms 8.53 ms
    patch_png_fast_ms 2.17 ms
    raw_read_patches_per_s 196.3 patches/s      194.7 patches/s
    tile_patches_per_s 156.8 patches/s          141.2 patches/s
    tile_vs_raw_read_ratio 0.80 x               0.73 x
    raw_read_cpu_ms_per_patch 5.09 ms           5.13 ms
    tile_cpu_ms_per_patch 11.46 ms              12.71 ms

Four more runs the same way, after two fewer system calls per file and one pass fewer over each mask,
printed 0.89, 0.71, 0.58 and 0.69 x (phantom patch 52-70 ms: the host's speed varied from run to run;
tiling 11.1-14.8 ms and the reads 4.6-5.9 ms of CPU a patch).

With ``fast_png`` copying the RGB view of openslide's RGBA regions before filtering (its row
differences read memory in order: 5.8 against 8.3 ms a strided patch, side by side), on the quiet
machine, the same command five times in a row::

    tile_vs_raw_read_ratio 0.79 x, 0.89 x, 0.89 x, 0.82 x, 0.86 x   (median 0.86; target >= 0.8)
    tile_cpu_ms_per_patch 12.60, 10.33, 10.85, 11.59, 10.63 ms
    raw_read_cpu_ms_per_patch 5.80, 5.16, 5.61, 5.48, 5.15 ms

the last of them in full::

    phantom_patch_256_ms 66.2 ms
    phantom_slide_4096_s 11.33 s
    phantom_slide_files_4096_s 11.26 s
    patch_png_pillow_default_ms 26.90 ms
    patch_png_pillow_default_kib 99.5 KiB
    patch_png_pillow_level1_ms 8.58 ms
    patch_png_pillow_level1_kib 106.1 KiB
    patch_png_fast_ms 2.16 ms
    patch_png_fast_kib 106.4 KiB
    raw_read_patches_per_s 194.1 patches/s
    tile_patches_per_s 167.6 patches/s
    tile_vs_raw_read_ratio 0.86 x
    raw_read_cpu_ms_per_patch 5.15 ms
    tile_cpu_ms_per_patch 10.63 ms
    tile_2_slides_workers1_patches_per_s 178.6 patches/s
    tile_2_slides_workers2_patches_per_s 174.4 patches/s
    tile_2_slides_processes2_patches_per_s 72.2 patches/s

A run started while another job was finishing printed 0.53 x (tiling 10.4 ms of CPU a patch at
95.6 patches/s: it got one CPU, not two).

Earlier runs while other jobs loaded the machine printed ``tile_vs_raw_read_ratio 0.91 x``
(load average ~11, masks still read through tiffslide), ``0.43 x`` (load ~9) and ``0.44 x``
(load ~5; CPU 12.02 against 5.10 ms a patch; ``workers2`` 65.3 against ``workers1`` 50.5 and
``processes2`` 19.0 patches/s): on a shared machine the ratio is noisy. The CPU times bound it: on
two free CPUs tiling can reach about 2 x 5.1 / 11.5 = 0.89 of the raw reads (target >= 0.8); the
tiling before these changes took 41 ms of CPU a patch (same slide,
same hour), so at most 0.26.

Pillow's default PNG is 7 % smaller than ``fast_png`` but 10x slower; Pillow's fastest level is
as large and 3.5x slower.
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


def raw_reads_per_s(item: SlideInput, dataset: PatchDataset) -> tuple[float, float]:
    """Image + mask regions of the dataset's patches read with openslide, one after the other: per s, CPU ms each."""
    import openslide

    with openslide.OpenSlide(str(item.slide)) as slide, openslide.OpenSlide(str(item.mask)) as mask:
        level = int(dataset.manifest["level"].iloc[0])
        side = round(OPTIONS.size * OPTIONS.mpp / (float(slide.properties["openslide.mpp-x"])
                                                   * slide.level_downsamples[level]))
        corners = list(zip(dataset.manifest["x"].tolist(), dataset.manifest["y"].tolist(), strict=True))
        start, cpu = time.perf_counter(), time.process_time()
        for x, y in corners:
            np.asarray(slide.read_region((x, y), level, (side, side)))
            np.asarray(mask.read_region((x, y), level, (side, side)))
        return len(corners) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(corners)


def tile_per_s(items: list[SlideInput], out: Path, **how) -> tuple[float, float, PatchDataset]:
    """Patches tiled per s, CPU ms a patch, and the dataset."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    dataset = tile_slides(items, out, options=OPTIONS, progress=False, **how).dataset
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(dataset) / took, 1000 * cpu / len(dataset), dataset


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
            rate, cpu, dataset = tile_per_s([item], folder / "dataset")
            tiled.append((rate, cpu))
            raw.append(raw_reads_per_s(item, dataset))
        png_lines([dataset.image(row) for _, row in dataset.manifest.head(40).iterrows()])
        print(f"raw_read_patches_per_s {max(raw)[0]:.1f} patches/s")
        print(f"tile_patches_per_s {max(tiled)[0]:.1f} patches/s")
        print(f"tile_vs_raw_read_ratio {max(tiled)[0] / max(raw)[0]:.2f} x")
        print(f"raw_read_cpu_ms_per_patch {min(cpu for _, cpu in raw):.2f} ms")
        print(f"tile_cpu_ms_per_patch {min(cpu for _, cpu in tiled):.2f} ms")

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

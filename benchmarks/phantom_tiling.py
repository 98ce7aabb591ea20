"""Phantom generation and tiling speed, printed as ``name value unit`` lines.

* ``phantom_patch_256_ms``: one 256 px phantom patch with the default mix (median of 30 seeds);
* ``phantom_slide_{size}_s``: a whole phantom slide rendered in memory;
* ``phantom_slide_files_{size}_s``: the same slide written as image + mask pyramidal TIFFs;
* ``tile_patches_per_s``: tiling that slide with its mask slide into 256 px patches at 0.5 µm/px.

Run (from the repository root)::

    .venv/bin/python benchmarks/phantom_tiling.py [--size 4096]

Measured on the 2-core CPU machine (quiet), ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python
benchmarks/phantom_tiling.py --size 8192``::

    phantom_patch_256_ms 19.6 ms
    phantom_slide_8192_s 12.19 s
    phantom_slide_files_8192_s 12.04 s
    tile_patches_per_s 52.0 patches/s
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from histosynth.data.phantom import phantom_patch, phantom_slide
from histosynth.data.phantom.export import write_phantom_slide
from histosynth.data.tiling import SlideInput, TilingOptions, tile_slides


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the benchmarked slide in px")
    size = parser.parse_args().size

    patch_times = [seconds(lambda s=seed: phantom_patch(s, 256)) for seed in range(30)]
    print(f"phantom_patch_256_ms {1000 * statistics.median(patch_times):.1f} ms")
    print(f"phantom_slide_{size}_s {seconds(lambda: phantom_slide(0, size, size)):.2f} s")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        took = seconds(lambda: write_phantom_slide(folder / "slides", 0, size, name="bench", progress=False))
        print(f"phantom_slide_files_{size}_s {took:.2f} s")
        item = SlideInput(folder / "slides" / "bench.tif", mask=folder / "slides" / "bench-mask.tif")
        start = time.perf_counter()
        result = tile_slides([item], folder / "dataset", options=TilingOptions(mpp=0.5, size=256), progress=False)
        patches = len(result.dataset)
        print(f"tile_patches_per_s {patches / (time.perf_counter() - start):.1f} patches/s")


if __name__ == "__main__":
    main()

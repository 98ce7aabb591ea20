"""Training memory and batch cost as the dataset grows: the streamed latent cache.

Prints ``name value unit`` lines:

* ``cache_rss_ratio``: peak RSS of a short training run over a synthetic cache 20 times larger than
  another, divided by that of the smaller. Each run is its own process and does what ``train`` does
  with its cache: open it, measure the latent range, then train the ``tiny`` preset's denoiser for a
  few steps on batches read through :class:`~histosynth.train.data.StepBatches` (every patch has
  the same caption, embedded by random numbers, so no text encoder is loaded). The caches hold 256 px
  patches (4 flips x 3 x 64 x 64 latents) in bfloat16 and are written to a temporary folder under
  /tmp, one at a time, and deleted after their run. ``cache_rss_growth`` is the difference in MiB.
* ``batch_overhead_1M_ms``: the time a step spends choosing its items at N = 1 M patches (the mean
  over one whole epoch at a global batch of 64, its one permutation included), beside
  ``batch_overhead_1M_before_ms``: a permutation of all N drawn on every step, as before.
* ``cache_bytes_per_patch_float32`` / ``_bfloat16``: bytes a 256 px patch takes in the cache.
* ``cache_psnr_<dtype>_minus_float32``: the PSNR (dB) of 8 phantom patches decoded by the shipped
  autoencoder from latents cached as bfloat16 / float16, minus that from float32 ones.

Sizes: 2,200 and 44,000 patches (0.22 and 4.3 GB on disk: 4.03 GiB); ``--small`` takes 220 and
4,400 (0.02 and 0.43 GB) for a quick run.

Run (from the repository root)::

    PYTHONPATH=src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_scale.py

Measured on the 2-core CPU machine (torch 2.13 CPU, one thread, other jobs running), full sizes,
3 training steps at batch 4 per run (about 5 minutes in all, most of it writing the 4.3 GB cache)::

    cache_bytes_per_patch_float32 196608 B
    cache_bytes_per_patch_bfloat16 98304 B
    batch_overhead_1M_ms 0.0102 ms
    batch_overhead_1M_before_ms 66.7 ms
    cache_psnr_bfloat16_minus_float32 -0.0005 dB
    cache_psnr_float16_minus_float32 -0.0000 dB
    cache_2200_bytes 0.216 GB
    cache_2200_peak_rss 855 MiB
    cache_44000_bytes 4.325 GB
    cache_44000_peak_rss 870 MiB
    cache_rss_growth 15 MiB
    cache_rss_ratio 1.017 x

The growth left is what grows with N by design: a patch id string, a caption row and an epoch-order
entry per patch (about 0.1 KB each), and the latent range's sample, which stops growing at 2^24
values per channel. Reading rows through memory maps instead grew the same run by 760 MB (see
:mod:`histosynth.train.shards`). ``batch_overhead_1M_before_ms`` varies with load (31-177 ms seen).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LATENT_ROW = (4, 3, 64, 64)  # the four flips of a 256 px patch's KL-f4 latents
SIZES = {"full": (2_200, 44_000), "small": (220, 4_400)}


def write_synthetic_cache(folder: Path, patches: int, dtype: str = "bfloat16") -> int:
    """A latent cache folder of ``patches`` random-looking rows, as ``histosynth cache`` writes it; its bytes."""
    from histosynth.io import write_json_atomic
    from histosynth.train.cache import FORMAT, PART_SIZE
    from histosynth.train.shards import write_part

    generator = torch.Generator().manual_seed(0)
    block = torch.randn(64, *LATENT_ROW, generator=generator)
    for k, start in enumerate(range(0, patches, PART_SIZE)):
        rows = min(PART_SIZE, patches - start)
        values = block.repeat(-(-rows // 64), 1, 1, 1, 1)[:rows] + k  # parts differ from each other
        write_part(folder / f"part-{k:05d}.npy", values, dtype)
    write_json_atomic(folder / "index.json", {"format": FORMAT, "dtype": dtype, "patches": patches,
                                              "part_size": PART_SIZE, "row_shape": list(LATENT_ROW)})
    return sum(p.stat().st_size for p in folder.iterdir())


def train_briefly(folder: Path, steps: int, batch_size: int) -> dict:
    """What ``train`` does with a cache, for a few steps (run in a process of its own)."""
    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import diffusion_loss, noise_scheduler
    from histosynth.models.text import MemoryEmbeddingCache
    from histosynth.presets import load_preset
    from histosynth.train.cache import TrainingData, latent_range, open_cache_folder
    from histosynth.train.data import ConditionDropout, StepBatches

    torch.manual_seed(0)
    latents = open_cache_folder(folder)
    hidden = 384
    embeddings = MemoryEmbeddingCache("random", ["", "a caption"], torch.randn(6, hidden), torch.tensor([0, 2, 6]))
    data = TrainingData(latents, torch.ones(len(latents), dtype=torch.long), [f"p{i:07d}" for i in range(len(latents))],
                        embeddings)
    latent_range(data.latents)
    preset = load_preset("tiny")
    unet = build_denoiser(preset, hidden)
    scheduler = noise_scheduler(preset)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    batches = StepBatches(data, batch_size, seed=0, dropout=ConditionDropout())
    started = time.perf_counter()
    for step in range(steps):
        batch = batches[step]
        loss = diffusion_loss(unet, batch.latents, batch.condition.text, batch.condition.text_mask,
                              torch.Generator().manual_seed(step), scheduler=scheduler)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds_per_step = (time.perf_counter() - started) / steps
    return {"peak_rss_mib": peak_rss_mib(), "s_per_step": seconds_per_step, "patches": len(latents)}


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an
    exec from the forked parent, so a child would report the parent's peak (here: writing caches)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_of_run(patches: int, steps: int, batch_size: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="histosynth-scale-", dir="/tmp"))
    try:
        size = write_synthetic_cache(folder, patches)
        child = subprocess.run([sys.executable, __file__, "--child", str(folder), "--steps", str(steps),
                                "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
        return {**json.loads(child.stdout.strip().splitlines()[-1]), "bytes": size}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def batch_overhead_ms(n_items: int = 1_000_000, global_batch: int = 64) -> tuple[float, float]:
    """Mean ms per step to choose a step's items: now (one epoch), and with a permutation per step."""
    from histosynth.train.data import EpochOrders, epoch_order

    orders = EpochOrders(n_items, seed=0)
    steps = n_items // global_batch
    started = time.perf_counter()
    for step in range(steps):
        orders.global_batch(global_batch, step)
    now = (time.perf_counter() - started) / steps * 1e3
    started = time.perf_counter()
    for step in range(5):
        first = step * global_batch
        epoch_order(n_items, 0, first // n_items)[first % n_items : first % n_items + global_batch]
    return now, (time.perf_counter() - started) / 5 * 1e3


def psnr_drops(patches: int = 8) -> dict[str, float]:
    """PSNR of phantom patches decoded from bfloat16 / float16 cached latents minus that from float32 ones."""
    from histosynth.data.dataset import open_dataset
    from histosynth.data.phantom.export import write_phantom_patches
    from histosynth.data.torchdata import to_model_range
    from histosynth.defaults import default_autoencoder_path
    from histosynth.models.autoencoder import decode_latents, psnr
    from histosynth.models.bundle import load_autoencoder_folder
    from histosynth.train.cache import cached_latents

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        dataset = open_dataset(write_phantom_patches(Path(tmp) / "phantom", n=patches, size=128, progress=False).root)
        ae = load_autoencoder_folder(default_autoencoder_path()).eval()
        images = torch.stack([to_model_range(dataset.image(row)) for _, row in dataset.manifest.iterrows()])
        quality = {}
        for dtype in ("float32", "bfloat16", "float16"):
            latents = cached_latents(dataset, dataset.manifest, ae, Path(tmp) / dtype, "all", show_progress=False,
                                     dtype=dtype)
            with torch.no_grad():
                decoded = decode_latents(ae, latents.read(np.arange(patches), np.zeros(patches)).float())
            quality[dtype] = float(psnr(images, decoded))
    return {dtype: quality[dtype] - quality["float32"] for dtype in ("bfloat16", "float16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="220 and 4,400 patches instead of 2,200 and 44,000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(train_briefly(args.child, args.steps, args.batch_size)))
        return

    from histosynth.train.shards import ShardedRows

    for dtype in ("float32", "bfloat16"):
        print(f"cache_bytes_per_patch_{dtype} {ShardedRows([], 0, LATENT_ROW, dtype, 1).bytes_per_row} B")
    now, before = batch_overhead_ms()
    print(f"batch_overhead_1M_ms {now:.4f} ms")
    print(f"batch_overhead_1M_before_ms {before:.1f} ms")
    for dtype, drop in psnr_drops().items():
        print(f"cache_psnr_{dtype}_minus_float32 {drop:+.4f} dB")
    small, large = SIZES["small" if args.small else "full"]
    runs = [rss_of_run(n, args.steps, args.batch_size) for n in (small, large)]
    for run in runs:
        print(f"cache_{run['patches']}_bytes {run['bytes'] / 1e9:.3f} GB")
        print(f"cache_{run['patches']}_peak_rss {run['peak_rss_mib']:.0f} MiB")
    print(f"cache_rss_growth {runs[1]['peak_rss_mib'] - runs[0]['peak_rss_mib']:.0f} MiB")
    print(f"cache_rss_ratio {runs[1]['peak_rss_mib'] / runs[0]['peak_rss_mib']:.3f} x")


if __name__ == "__main__":
    main()

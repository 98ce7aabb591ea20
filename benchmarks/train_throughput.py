"""Training throughput: steps/s and peak RSS of a latent diffusion training step, cached vs on the fly.

Prints ``name value unit`` lines. For the ``tiny`` and ``small`` presets (256 px patches, their batch
size 8, fp32), one training step (batch -> diffusion loss -> backward -> AdamW -> EMA) is timed in
two ways:

* ``cached``: latents and caption embeddings come from the cache (``histosynth cache``), so the step
  runs only the denoiser;
* ``onthefly``: as PathLDM trains, every step reads the PNGs, flips them, encodes them with the
  VQ-f4 autoencoder of the ``pathldm`` preset and encodes the captions with the text encoder.

The latent shape (3 x 64 x 64) is the same either way, so the denoiser's share of a step is equal;
the cache is built here with the preset's own (faster) autoencoder. Each case runs in its own
process, so its peak RSS is its own; weights are random (speed only).

Run (from the repository root)::

    m=glibc.malloc
    GLIBC_TUNABLES=$m.mmap_threshold=33554432:$m.trim_threshold=17179869184:$m.top_pad=1073741824 \
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py --steps 2

``cpu_s_per_step`` is the process's CPU time: on a machine shared with other jobs it is the steadier
number (wall time there includes waiting for a core). Measured on the 2-core CPU machine (torch 2.13
CPU, 1 thread per case, other jobs running: load ~6), 8 phantom patches of 256 px, batch 8::

    train_tiny_cached_steps_per_s 0.8082 steps/s
    train_tiny_cached_s_per_step 1.237 s/step
    train_tiny_cached_cpu_s_per_step 0.6165 cpu-s/step
    train_tiny_cached_peak_rss 1239 MiB
    train_tiny_onthefly_steps_per_s 0.02339 steps/s
    train_tiny_onthefly_s_per_step 42.76 s/step
    train_tiny_onthefly_cpu_s_per_step 21.11 cpu-s/step
    train_tiny_onthefly_peak_rss 2716 MiB
    train_small_cached_steps_per_s 0.1514 steps/s
    train_small_cached_s_per_step 6.607 s/step
    train_small_cached_cpu_s_per_step 3.288 cpu-s/step
    train_small_cached_peak_rss 2415 MiB
    train_small_onthefly_steps_per_s 0.02151 steps/s
    train_small_onthefly_s_per_step 46.49 s/step
    train_small_onthefly_cpu_s_per_step 22.89 cpu-s/step
    train_small_onthefly_peak_rss 3806 MiB
    train_tiny_cache_speedup 34.56 x
    train_tiny_cache_speedup_cpu 34.25 x
    train_small_cache_speedup 7.036 x
    train_small_cache_speedup_cpu 6.963 x
    train_small_cache_speedup_target_met 1 bool

The VQ-f4 encoder dominates an on-the-fly step (about 20 CPU-seconds for 8 images), so the cache's
gain is largest for the cheapest denoiser; the target (small: >= 3x) is met with 7x.

``--precisions 32,bf16 --modes cached`` times the cached step in float32 and under bf16 autocast (what
``histosynth train --precision bf16`` runs: Lightning's bf16-mixed), one case after the other, and prints
the ratio (``train_<preset>_bf16_speedup``). bf16 is fast only on CPUs for which oneDNN has bf16 kernels
(AVX-512: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, printed as ``cpu_native_bf16``); elsewhere it
is emulated. Measured on an AMD EPYC with AVX-512 BF16, three trainings beside it (``--presets tiny --modes
cached --precisions 32,bf16 --steps 5``): 2.081 s float32, 1.395 s bf16 per step, 1.49x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("tiny", "small")
MODES = ("cached", "onthefly")
PRECISIONS = ("32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest where other jobs share the cores)")
    parser.add_argument("--patches", type=int, default=8, help="phantom patches in the benchmark dataset")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated, of " + ", ".join(PRESETS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    parser.add_argument("--precisions", default="32", help="comma-separated, of " + ", ".join(PRECISIONS))
    parser.add_argument("--case", nargs=4, metavar=("DATASET", "PRESET", "MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        dataset, preset, mode, precision = args.case
        print(json.dumps(run_case(Path(dataset), preset, mode, args.steps, args.threads, precision)))
        return
    presets, modes, precisions = (chosen(value, known) for value, known in
                                  ((args.presets, PRESETS), (args.modes, MODES), (args.precisions, PRECISIONS)))
    import torch

    report("cpu_native_bf16", int(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "bool")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "phantom", args.patches)
        for preset in presets:  # outside the timed processes: their peak RSS is training's alone
            build_cache(dataset, preset)
        results = {}
        for preset in presets:
            for mode in modes:
                for precision in precisions:
                    result = run_in_subprocess(dataset, preset, mode, precision, args.steps, args.threads)
                    results[preset, mode, precision] = result
                    name = f"train_{preset}_{mode}" + ("" if precision == "32" else f"_{precision}")
                    report(f"{name}_steps_per_s", result["steps_per_s"], "steps/s")
                    report(f"{name}_s_per_step", result["s_per_step"], "s/step")
                    report(f"{name}_cpu_s_per_step", result["cpu_s_per_step"], "cpu-s/step")
                    report(f"{name}_peak_rss", result["peak_rss_mib"], "MiB")
        report_ratios(results, presets, modes, precisions)


def chosen(value: str, known: tuple[str, ...]) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(picked) - set(known))
    if unknown or not picked:
        raise SystemExit(f"choose among {', '.join(known)} (got {value!r})")
    return picked


def report_ratios(results: dict, presets: list[str], modes: list[str], precisions: list[str]) -> None:
    """The cache's speed-up (both modes measured) and bf16's (both precisions measured), per preset."""
    for preset in presets:
        if set(MODES) <= set(modes):
            cached, on_the_fly = results[preset, "cached", "32"], results[preset, "onthefly", "32"]
            report(f"train_{preset}_cache_speedup", on_the_fly["s_per_step"] / cached["s_per_step"], "x")
            report(f"train_{preset}_cache_speedup_cpu", on_the_fly["cpu_s_per_step"] / cached["cpu_s_per_step"], "x")
        if set(PRECISIONS) <= set(precisions):
            fp32, bf16 = results[preset, modes[0], "32"], results[preset, modes[0], "bf16"]
            report(f"train_{preset}_bf16_speedup", fp32["s_per_step"] / bf16["s_per_step"], "x")
            report(f"train_{preset}_bf16_speedup_cpu", fp32["cpu_s_per_step"] / bf16["cpu_s_per_step"], "x")
    if "small" in presets and set(MODES) <= set(modes):
        small = results["small", "onthefly", "32"]["s_per_step"] / results["small", "cached", "32"]["s_per_step"]
        report("train_small_cache_speedup_target_met", int(small >= 3.0), "bool")


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def make_dataset(root: Path, patches: int) -> Path:
    from histosynth.data.phantom.export import write_phantom_patches

    write_phantom_patches(root, n=patches, size=256, seed=0, val=0.0, test=0.0, progress=False)
    return root


def build_cache(dataset: Path, preset_name: str) -> None:
    import torch

    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.models.text import load_text_encoder
    from histosynth.presets import load_preset
    from histosynth.train.cache import prepare_training_data

    preset = load_preset(preset_name)
    torch.manual_seed(0)
    prepare_training_data(dataset, build_autoencoder(preset).eval(), load_text_encoder(preset.text_encoder),
                          dataset / "cache", show_progress=False)


def run_in_subprocess(dataset: Path, preset: str, mode: str, precision: str, steps: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--steps", str(steps), "--threads", str(threads), "--case",
               str(dataset), preset, mode, precision]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode:
        raise SystemExit(f"case {preset}/{mode}/{precision} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_case(dataset: Path, preset_name: str, mode: str, steps: int, threads: int, precision: str) -> dict:
    import warnings

    import torch

    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import make_ema, noise_scheduler
    from histosynth.models.text import load_text_encoder
    from histosynth.presets import load_preset

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset = load_preset(preset_name)
    encoder = load_text_encoder(preset.text_encoder)
    unet = build_denoiser(preset, context_dim=encoder.hidden_size)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.training.lr)
    ema = make_ema(unet, preset.training.ema_decay)
    scheduler = noise_scheduler(preset)
    batches = (cached_batches if mode == "cached" else on_the_fly_batches)(dataset, preset, encoder)
    batch_size = preset.training.batch_size

    def step(index: int) -> None:
        from histosynth.models.diffusion import diffusion_loss

        latents, context, mask = batches(index, batch_size)
        generator = torch.Generator().manual_seed(index)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # Lightning's bf16-mixed
            loss = diffusion_loss(unet, latents, context, mask, generator, scheduler=scheduler)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    step(0)  # warm-up: first-call allocations
    started, cpu_started = time.perf_counter(), time.process_time()
    for index in range(1, steps + 1):
        step(index)
    seconds = (time.perf_counter() - started) / steps
    cpu_seconds = (time.process_time() - cpu_started) / steps
    return {"steps_per_s": 1 / seconds, "s_per_step": seconds, "cpu_s_per_step": cpu_seconds,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cached_batches(dataset: Path, preset, encoder):
    """Batches from the latent / embedding cache that :func:`build_cache` wrote."""
    import torch

    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.train.cache import prepare_training_data
    from histosynth.train.data import ConditionDropout, StepBatches

    torch.manual_seed(0)  # the same autoencoder weights as build_cache: its cache is found, not rebuilt
    data = prepare_training_data(dataset, build_autoencoder(preset).eval(), encoder, dataset / "cache",
                                 show_progress=False)
    batches = StepBatches(data, preset.training.batch_size, seed=0,
                          dropout=ConditionDropout(preset.training.text_dropout))

    def batch(index: int, batch_size: int):
        item = batches[index]
        return item.latents, item.condition.text, item.condition.text_mask

    return batch


def on_the_fly_batches(dataset: Path, preset, encoder):
    """PathLDM's way: read and flip images, encode them with VQ-f4, encode captions, every step."""
    import random

    import torch

    from histosynth.captions import UNCONDITIONAL_CAPTION
    from histosynth.data.torchdata import PatchTorchDataset
    from histosynth.models.autoencoder import build_autoencoder, encode_latents
    from histosynth.presets import load_preset

    vq_f4 = build_autoencoder(load_preset("pathldm")).eval().requires_grad_(False)
    items = PatchTorchDataset(dataset, split="train", flips=True, seed=0)
    rng = random.Random(0)

    def batch(index: int, batch_size: int):
        picked = [items[(index * batch_size + i) % len(items)] for i in range(batch_size)]
        images = torch.stack([p["image"] for p in picked])
        dropout = preset.training.text_dropout  # classifier-free guidance's caption dropout, on the text
        captions = [UNCONDITIONAL_CAPTION if rng.random() < dropout else p["caption"] for p in picked]
        with torch.no_grad():
            latents = encode_latents(vq_f4, images)
            context, mask = encoder.encode(captions)
        return latents, context, mask

    return batch


if __name__ == "__main__":
    main()

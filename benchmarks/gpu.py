"""Training and cache-encoding speed per GPU: the numbers a team needs to size a cluster run.

Prints ``name value unit`` lines:

* ``train_{preset}_{precision}_b{B}_steps_per_s`` / ``..._images_per_s``: one training step (the
  diffusion loss on cached latents -> backward -> AdamW -> EMA, as ``histosynth train`` runs it) per
  per-device batch size ``B``, under bf16 autocast (Lightning's ``bf16-mixed``) on a GPU, in
  float32 on a CPU (or as ``--precision`` says); with ``--denoisers unet dit`` the transformer denoiser
  of the preset's ``dit`` section is timed too (``train_{preset}_dit_{precision}_b{B}_...``);
* ``train_{preset}_{precision}_b{B}_peak_mem_gib``: peak device memory of that step
  (``torch.cuda.max_memory_allocated``; on a CPU the process's peak RSS so far, which only grows);
* ``cache_{preset}_b{B}_patches_per_s``: ``histosynth cache``'s latent encoding of a phantom patch
  dataset (PNG decoding, the four flips of each patch through the encoder, writing the parts), per
  encoding batch ``B``; ``--cache-patches`` patches, encoded from scratch for each ``B``.

A batch size that does not fit prints ``... oom`` and the next one is tried. Weights are random (speed
only); the text context is random too, shaped as the preset's text encoder gives it (PLIP for
``pathldm``: 154 tokens x 512), so no encoder weights are needed.

Run on a GPU (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py

and on a CPU with smaller sizes (the defaults there: ``tiny`` preset, batches 1 and 2)::

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py --steps 2 --cache-patches 16

Measured on the 2-core CPU machine (torch 2.13 CPU, float32, shared with other work; no GPU has been
available to run it yet), ``OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py
--steps 2 --cache-patches 16``::

    train_tiny_32_b1_steps_per_s 2.785 steps/s
    train_tiny_32_b1_images_per_s 2.785 images/s
    train_tiny_32_b1_peak_mem_gib 0.5628 GiB
    train_tiny_32_b2_steps_per_s 1.557 steps/s
    train_tiny_32_b2_images_per_s 3.115 images/s
    train_tiny_32_b2_peak_mem_gib 0.6165 GiB
    cache_tiny_b4_patches_per_s 0.8355 patches/s

(on a CPU the peak is the process's RSS, which includes the imports; bf16 autocast there is emulated
and many times slower than float32, so the CPU default is float32.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

#: (hidden size, tokens) of the context each preset's text encoder gives: PLIP's two 77-token
#: windows of 512 features for pathldm; MiniLM's 384 features for the others (its token count
#: follows the caption; 64 is a long templated caption)
CONTEXT_SHAPE = {"vinid/plip": (512, 154)}
DEFAULT_CONTEXT = (384, 64)


def main() -> None:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pathldm" if on_gpu else "tiny", help="model preset")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64] if on_gpu else [1, 2],
                        help="per-device training batch sizes to time")
    parser.add_argument("--cache-batch-sizes", type=int, nargs="+", default=[16, 64] if on_gpu else [4],
                        help="encoding batch sizes of the cache")
    parser.add_argument("--precision", choices=["bf16", "32"], default="bf16" if on_gpu else "32",
                        help="training precision (bf16 autocast is emulated, and slow, on most CPUs)")
    parser.add_argument("--denoisers", nargs="+", choices=["unet", "dit"], default=["unet"],
                        help="the denoisers to time (the preset's unet and/or dit section)")
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 2, help="timed steps (after 2 warm-up ones)")
    parser.add_argument("--cache-patches", type=int, default=512 if on_gpu else 16,
                        help="phantom patches encoded per cache batch size (0: skip the cache part)")
    args = parser.parse_args()

    from histosynth.presets import load_preset

    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        report("device", 0, torch.cuda.get_device_name(0).replace(" ", "_"))
    preset = load_preset(args.preset)
    for denoiser in args.denoisers:
        for batch_size in args.batch_sizes:
            train_case(preset.with_recipe(denoiser=denoiser), batch_size, args.precision, args.steps, device)
            if on_gpu:
                torch.cuda.empty_cache()  # (the case's model and optimiser are gone with it)
    if args.cache_patches:
        with tempfile.TemporaryDirectory() as scratch:
            dataset = phantom_dataset(Path(scratch) / "phantom", args.cache_patches, preset.image_size)
            for batch_size in args.cache_batch_sizes:
                cache_case(preset, dataset, batch_size, device)


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def train_case(preset, batch_size: int, precision: str, steps: int, device) -> None:
    """Time ``steps`` training steps at one batch size; report steps/s, images/s and peak memory."""
    import torch

    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import diffusion_loss, make_ema, noise_scheduler

    denoiser = "_dit" if preset.denoiser == "dit" else ""
    name = f"train_{preset.name}{denoiser}_{precision}_b{batch_size}"
    hidden, tokens = CONTEXT_SHAPE.get(preset.text_encoder, DEFAULT_CONTEXT)
    torch.manual_seed(0)
    unet = build_denoiser(preset, context_dim=hidden).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset.training.lr, weight_decay=preset.training.weight_decay)
    ema = make_ema(unet, preset.training.ema_decay)
    ema.to(device)
    scheduler = noise_scheduler(preset)
    channels = unet.config.in_channels
    side = preset.image_size // 2 ** (len(preset.autoencoder.block_out_channels) - 1)
    latents = torch.randn(batch_size, channels, side, side, device=device)
    context = torch.randn(batch_size, tokens, hidden, device=device)
    mask = torch.ones(batch_size, tokens, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(index: int) -> None:
        generator = torch.Generator(device=device).manual_seed(index)
        with autocast:
            loss = diffusion_loss(unet, latents, context, mask, generator, scheduler=scheduler)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    try:
        seconds = seconds_per_step(step, steps, device)
    except torch.cuda.OutOfMemoryError:
        print(f"{name} oom", flush=True)
        return
    report(f"{name}_steps_per_s", 1 / seconds, "steps/s")
    report(f"{name}_images_per_s", batch_size / seconds, "images/s")
    report(f"{name}_peak_mem_gib", peak_memory_gib(device), "GiB")


def cache_case(preset, dataset: Path, batch_size: int, device) -> None:
    """``histosynth cache``'s latent encoding of ``dataset`` from scratch at one encoding batch size."""
    import torch

    from histosynth.data.dataset import open_dataset
    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.train.cache import cached_latents, training_rows

    torch.manual_seed(0)
    autoencoder = build_autoencoder(preset).eval().requires_grad_(False).to(device)
    patches = open_dataset(dataset)
    rows = training_rows(patches, need_captions=False)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        try:
            with torch.no_grad():
                cached_latents(patches, rows, autoencoder, Path(folder), "train", batch_size, show_progress=False)
        except torch.cuda.OutOfMemoryError:
            print(f"cache_{preset.name}_b{batch_size} oom", flush=True)
            return
        synchronize(device)
        seconds = time.perf_counter() - started
    report(f"cache_{preset.name}_b{batch_size}_patches_per_s", len(rows) / seconds, "patches/s")


def phantom_dataset(root: Path, patches: int, size: int) -> Path:
    from histosynth.data.phantom.export import write_phantom_patches

    write_phantom_patches(root, n=patches, size=size, seed=0, val=0.0, test=0.0, progress=False)
    return root


def seconds_per_step(step, steps: int, device) -> float:
    """Mean seconds of ``step(index)`` over ``steps`` calls, after two warm-up calls (allocations, cuDNN's
    algorithm search) whose memory counts in the peak."""
    reset_peak_memory(device)
    for index in range(2):
        step(index)
    synchronize(device)
    started = time.perf_counter()
    for index in range(2, 2 + steps):
        step(index)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    main()

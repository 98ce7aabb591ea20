"""Sampling speed and memory: seconds per image, where the time goes, sampler overhead, seamless RSS, bf16.

Prints ``name value unit`` lines (random weights: speed and memory only):

* ``sample_{preset}_{ddim50|dpm20}_b{B}_s_per_image``: one 256 px image with DDIM-50 or
  DPM-Solver++-20, guidance 1.5 (one UNet call on the doubled batch per step), decoding included,
  for the ``tiny`` and ``small`` presets at batch 1 and 8;
* ``sample_{preset}_ddim50_b{B}_unet_share`` / ``_decode_share``: the part of that time spent inside
  the UNet and inside the autoencoder's decoder (the rest: text encoding, noise, scheduler, copies);
* ``sampler_overhead``: the time ``denoise`` spends outside the UNet calls it has to make (guidance,
  scheduler steps, context stacking), relative to the time inside them (tiny, batch 8, 10 DDIM
  steps, best of 3); target < 5 %;
* ``seamless_{1024|4096}_peak_rss``: peak resident memory of a process while it writes a seamless
  synthetic slide of that size (tiny preset, one denoising step - the step count does not change
  memory - streamed to a pyramidal TIFF), each in its own process, measured from after loading (the
  loaded model counts; loading's own transient peak does not); ``seamless_rss_ratio``: target <= 1.5.
  Linux only (reads /proc);
* ``bf16_vs_fp32_psnr_db``: how far bf16 images are from the fp32 ones of the same seeds, on the shipped
  text model (``src/histosynth/weights/ldm``, DDIM-50, guidance 1.5, ``--precision-images`` images of
  one caption, default 1, on the device the benchmark runs on): PSNR of the uint8 images over all
  pixels (``_min_db``: of the farthest image; ``_max_level_diff``: the largest difference of a pixel
  value); ``bf16_vs_fp32_speed_ratio``: fp32 seconds / bf16 seconds for those images (> 1: bf16 is
  faster).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling.py [--presets tiny,small] [--batches 1,8]
        [--threads 2] [--no-rss] [--precision-images 8]

Measured on the 2-core CPU machine (torch 2.13 CPU, fp32) while other jobs ran on it (load average
4-8), with ``--threads 1``: under that load two OpenMP threads spin against each other (tiny DDIM-50
at batch 1 took 178 s/image with ``--threads 2``, 6.3 s with ``--threads 1``). The seamless lines
come from a second run, ``--threads 1 --presets ''``::

    sample_tiny_ddim50_b1_s_per_image 6.319 s/image
    sample_tiny_ddim50_b1_unet_share 90.63 %
    sample_tiny_ddim50_b1_decode_share 7.67 %
    sample_tiny_dpm20_b1_s_per_image 2.868 s/image
    sample_tiny_ddim50_b8_s_per_image 6.189 s/image
    sample_tiny_ddim50_b8_unet_share 86.79 %
    sample_tiny_ddim50_b8_decode_share 12.93 %
    sample_tiny_dpm20_b8_s_per_image 2.552 s/image
    sampler_overhead 0.1141 %
    sampler_overhead_target_met 1 bool
    sample_small_ddim50_b1_s_per_image 29.17 s/image
    sample_small_ddim50_b1_unet_share 91.01 %
    sample_small_ddim50_b1_decode_share 8.705 %
    sample_small_dpm20_b1_s_per_image 14.04 s/image
    sample_small_ddim50_b8_s_per_image 33.3 s/image
    sample_small_ddim50_b8_unet_share 92.07 %
    sample_small_ddim50_b8_decode_share 7.87 %
    sample_small_dpm20_b8_s_per_image 12.95 s/image
    seamless_1024_peak_rss 950.6 MiB
    seamless_1024_seconds 14 s
    seamless_4096_peak_rss 1021 MiB
    seamless_4096_seconds 178.1 s
    seamless_rss_ratio 1.074 x
    seamless_rss_target_met 1 bool

The bf16 lines, ``--threads 1 --presets '' --no-rss --precision-images 1`` (same machine, load average
about 8; its CPU has no bf16 instructions, so bf16 convolutions and matrix products are emulated, many
times slower than fp32: 8 images would take hours)::

    bf16_vs_fp32_psnr_db 52.17 dB
    bf16_vs_fp32_psnr_min_db 52.17 dB
    bf16_vs_fp32_max_level_diff 11 levels
    fp32_s_per_image 20.97 s/image
    bf16_s_per_image 662.3 s/image
    bf16_vs_fp32_speed_ratio 0.03166 x
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CAPTION = (
    "This image showcases various types of tissue structures found in renal tissue.\n"
    "The prevalence of Tubuli is medium.\n"
    "There is a lot of Glomeruli visible in the image."
)
CASES = (("ddim50", "ddim", 50), ("dpm20", "dpm++", 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets to time ('' for none)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-rss", action="store_true", help="skip the seamless peak-RSS processes")
    parser.add_argument("--precision-images", type=int, default=1,
                        help="images of the bf16-against-fp32 comparison on the shipped model (0: skip it)")
    parser.add_argument("--rss-child", nargs=2, metavar=("BUNDLE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(seamless_slide_rss(Path(args.rss_child[0]), int(args.rss_child[1]))))
        return
    from histosynth.models.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        for preset in filter(None, args.presets.split(",")):
            bundle = load_bundle(make_bundle(Path(tmp) / preset, preset))
            for batch in (int(b) for b in args.batches.split(",")):
                for name, scheduler, steps in CASES:
                    timing = time_generation(bundle, scheduler, steps, batch)
                    prefix = f"sample_{preset}_{name}_b{batch}"
                    report(f"{prefix}_s_per_image", timing["s_per_image"], "s/image")
                    if name == "ddim50":
                        report(f"{prefix}_unet_share", 100 * timing["unet_share"], "%")
                        report(f"{prefix}_decode_share", 100 * timing["decode_share"], "%")
            if preset == "tiny":
                overhead = sampler_overhead(bundle)
                report("sampler_overhead", 100 * overhead, "%")
                report("sampler_overhead_target_met", int(overhead < 0.05), "bool")
        if not args.no_rss:
            tiny = Path(tmp) / "tiny"
            if not tiny.exists():
                make_bundle(tiny, "tiny")
            peaks = {}
            for size in (1024, 4096):
                child = run_child(tiny, size, args.threads)
                peaks[size] = child["peak_rss_mib"]
                report(f"seamless_{size}_peak_rss", peaks[size], "MiB")
                report(f"seamless_{size}_seconds", child["seconds"], "s")
            report("seamless_rss_ratio", peaks[4096] / peaks[1024], "x")
            report("seamless_rss_target_met", int(peaks[4096] <= 1.5 * peaks[1024]), "bool")
    if args.precision_images > 0:
        for name, (value, unit) in bf16_against_fp32(args.precision_images).items():
            report(name, value, unit)


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def make_bundle(path: Path, preset_name: str) -> Path:
    """A model folder of the preset's networks with random weights and the default text encoder."""
    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.models.bundle import save_bundle
    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import noise_scheduler
    from histosynth.models.text import load_text_encoder
    from histosynth.presets import load_preset
    from histosynth.schema import RENAL

    preset = load_preset(preset_name)
    text = load_text_encoder(preset.text_encoder)
    torch.manual_seed(0)
    unet = build_denoiser(preset, context_dim=text.hidden_size)
    return save_bundle(path, unet, build_autoencoder(preset), dict(noise_scheduler(preset).config), text,
                       RENAL, {"image_size": preset.image_size, "preset": preset.to_dict()})


class ModuleClock:
    """Wall time spent inside a module's forward calls (synchronising CUDA around them), while open."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._started = 0.0
        self._module = module
        self._hooks: list = []

    def __enter__(self) -> "ModuleClock":
        self._hooks = [self._module.register_forward_pre_hook(self._start),
                       self._module.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *_) -> None:
        for hook in self._hooks:
            hook.remove()

    def _start(self, *_) -> None:
        _synchronize()
        self._started = time.perf_counter()

    def _stop(self, *_) -> None:
        _synchronize()
        self.seconds += time.perf_counter() - self._started


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_generation(bundle, scheduler: str, steps: int, batch: int) -> dict[str, float]:
    from histosynth.sample.generate import SamplingOptions, generate

    captions, seeds = [CAPTION] * batch, list(range(batch))
    generate(bundle, captions, seeds, SamplingOptions(steps=2, scheduler=scheduler), batch_size=batch)  # warm-up
    with ModuleClock(bundle.unet) as unet, ModuleClock(bundle.autoencoder.decoder) as decoder:
        started = time.perf_counter()
        generate(bundle, captions, seeds, SamplingOptions(steps=steps, scheduler=scheduler), batch_size=batch)
        total = time.perf_counter() - started
    return {"s_per_image": total / batch, "unet_share": unet.seconds / total, "decode_share": decoder.seconds / total}


@torch.no_grad()
def sampler_overhead(bundle, batch: int = 8, steps: int = 10, repeats: int = 3) -> float:
    """Time in ``denoise`` outside its UNet calls, relative to the time inside them (best of ``repeats``).

    Both are measured in the same run, so a burst of load from other processes hits both alike.
    """
    from histosynth.sample.generate import CaptionEmbeddings, SamplingOptions, bundle_scheduler, initial_noise
    from histosynth.sample.sampler import Conditions, denoise

    embeddings = CaptionEmbeddings.for_bundle(bundle, [CAPTION])
    cond, cond_mask = embeddings([CAPTION] * batch)
    uncond, uncond_mask = embeddings.unconditional()
    conditions = Conditions(cond, uncond, cond_mask, uncond_mask)
    x = initial_noise(range(batch), (3, 64, 64)).to(bundle.device)
    scheduler = bundle_scheduler(bundle, "ddim")
    denoise(bundle.unet, scheduler, x, conditions, SamplingOptions(steps=2))  # warm-up
    overheads = []
    for _ in range(repeats):
        with ModuleClock(bundle.unet) as unet:
            _synchronize()
            started = time.perf_counter()
            denoise(bundle.unet, scheduler, x, conditions, SamplingOptions(steps=steps))
            _synchronize()
            total = time.perf_counter() - started
        overheads.append((total - unet.seconds) / unet.seconds)
    return min(overheads)


def bf16_against_fp32(count: int) -> dict[str, tuple[float, str]]:
    """PSNR between the bf16 and fp32 images of ``count`` seeds on the shipped model, and the speed ratio.

    Each precision makes the images once to warm up (two steps) and once timed with the model's
    options (DDIM-50, guidance 1.5), in one batch.
    """
    import numpy as np

    from histosynth.defaults import default_bundle_path
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import generate

    bundle = load_bundle(default_bundle_path())
    captions, seeds = [CAPTION] * count, list(range(count))
    images, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        options = bundle.sampling.overridden(precision=precision)
        generate(bundle, captions[:1], seeds[:1], options.overridden(steps=2))  # warm-up
        _synchronize()
        started = time.perf_counter()
        images[precision] = generate(bundle, captions, seeds, options, batch_size=count).images.astype(np.float64)
        _synchronize()
        seconds[precision] = time.perf_counter() - started
    squared = (images["bf16"] - images["fp32"]) ** 2
    per_image = squared.reshape(count, -1).mean(axis=1)
    return {
        "bf16_vs_fp32_psnr_db": (psnr_db(float(squared.mean())), "dB"),
        "bf16_vs_fp32_psnr_min_db": (psnr_db(float(per_image.max())), "dB"),
        "bf16_vs_fp32_max_level_diff": (float(np.sqrt(squared.max())), "levels"),
        "fp32_s_per_image": (seconds["fp32"] / count, "s/image"),
        "bf16_s_per_image": (seconds["bf16"] / count, "s/image"),
        "bf16_vs_fp32_speed_ratio": (seconds["fp32"] / seconds["bf16"], "x"),
    }


def psnr_db(mean_squared_error: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error of images whose values reach ``peak`` (inf when they are equal)."""
    return float("inf") if mean_squared_error == 0 else 10 * math.log10(peak ** 2 / mean_squared_error)


def run_child(bundle: Path, size: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--rss-child", str(bundle), str(size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def seamless_slide_rss(bundle_path: Path, size: int) -> dict:
    """Peak RSS while a seamless slide is made, after the model is loaded and warmed up.

    The high-water mark is reset once loading is over (Linux ``clear_refs``), so the peak is that
    of generation (model weights included), not of loading the text encoder.
    """
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import SamplingOptions, generate
    from histosynth.sample.slides import synth_slide

    bundle = load_bundle(bundle_path)
    generate(bundle, [CAPTION], [0], SamplingOptions(steps=1))  # loads the text encoder, warms the kernels up
    Path("/proc/self/clear_refs").write_text("5")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        synth_slide(bundle, CAPTION, size, Path(tmp) / "slide.tif", "seamless", options=SamplingOptions(steps=1))
        seconds = time.perf_counter() - started
    return {"peak_rss_mib": _status_mib("VmHWM"), "seconds": seconds}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


if __name__ == "__main__":
    main()

"""Sampling speed and memory: images/s, where the time goes, sampler overhead, seamless RSS, bf16.

Prints ``name value unit`` lines (random weights: speed and memory only):

* ``throughput_{preset}_{size}px_ddim50_{precision}_b{B}[_compiled]_images_per_s``: images per second of
  ``generate`` with DDIM-50 and guidance 1.5, decoding included, per preset and image size (``--throughput``;
  default ``tiny:256,pathldm:32`` on the CPU, where one 256 px pathldm image takes many minutes, and
  ``tiny:256,pathldm:256`` on a GPU), precision (fp32 on the CPU; fp32 and bf16 on a GPU) and batch size
  (1 and 4 on the CPU; 1, 8, 32 and 64 on a GPU), the model prepared as ``histosynth generate`` prepares it
  (channels-last on CUDA); ``_compiled``: with ``--compile`` (``torch.compile`` of the UNet, at the largest
  batch size only, each shape compiling anew; on a GPU always, on the CPU with ``--compile``, where
  compiling takes minutes); ``..._outside_share``: the share of
  that time outside the UNet and the decoder (text encoding, noise, guidance, scheduler, copies, uint8
  conversion), with ``throughput_outside_share_max`` and ``throughput_outside_target_met`` (< 5 %);
  on the CPU ``..._cpu_s_per_image``, the process's CPU seconds per image (on a shared machine the wall
  time follows the other load, the CPU time much less); on a GPU ``..._peak_mem``
  (``torch.cuda.max_memory_allocated``). The pathldm lines use MiniLM as text encoder (PLIP's weights are
  not stored here): a context of 384 features and fewer tokens instead of 512 x 154, which only
  changes the cross-attention, a small part of the UNet's cost;

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
        [--threads 2] [--no-rss] [--precision-images 8] [--throughput tiny:256,pathldm:32]
        [--throughput-batches 1,4] [--throughput-precisions fp32] [--compile]

On a GPU, one command gives every line on it (the bundles load on ``cuda``; the throughput lines of
pathldm at 256 px in fp32 and bf16, batches 1 to 64, and compiled at 64; bf16 against fp32 on 8 images)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling.py --no-rss --precision-images 8

No GPU has been available to run it yet.

The throughput lines on the CPU, ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python
benchmarks/sampling.py --threads 1 --presets '' --no-rss --precision-images 0`` (the 2-core machine at a
load average of 12-17 from other jobs: this process had about an eighth of a core, so images/s are
about 8x below what one quiet core gives, and even the CPU seconds of tiny are 2.3x the 6.3 s/image
below, measured at a lower load; no compiled lines: compiling takes 5-7 minutes on this CPU)::

    throughput_tiny_256px_ddim50_fp32_b1_images_per_s 0.007494 images/s
    throughput_tiny_256px_ddim50_fp32_b1_cpu_s_per_image 15.54 s/image
    throughput_tiny_256px_ddim50_fp32_b1_outside_share 0.6893 %
    throughput_tiny_256px_ddim50_fp32_b4_images_per_s 0.008225 images/s
    throughput_tiny_256px_ddim50_fp32_b4_cpu_s_per_image 14.33 s/image
    throughput_tiny_256px_ddim50_fp32_b4_outside_share 0.2959 %
    throughput_pathldm_32px_ddim50_fp32_b1_images_per_s 0.002378 images/s
    throughput_pathldm_32px_ddim50_fp32_b1_cpu_s_per_image 48.81 s/image
    throughput_pathldm_32px_ddim50_fp32_b1_outside_share 0.1959 %
    throughput_pathldm_32px_ddim50_fp32_b4_images_per_s 0.0068 images/s
    throughput_pathldm_32px_ddim50_fp32_b4_cpu_s_per_image 24.51 s/image
    throughput_pathldm_32px_ddim50_fp32_b4_outside_share 0.1801 %
    throughput_outside_share_max 0.6893 %
    throughput_outside_target_met 1 bool

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
from typing import Optional

import torch

CAPTION = (
    "This image showcases various types of tissue structures found in renal tissue.\n"
    "The prevalence of Tubuli is medium.\n"
    "There is a lot of Glomeruli visible in the image."
)
CASES = (("ddim50", "ddim", 50), ("dpm20", "dpm++", 20))
ON_GPU = torch.cuda.is_available()
#: the throughput lines' presets and image sizes: on the CPU a small pathldm image (a 256 px one takes minutes
#: there), on a GPU the thesis' 256 px
THROUGHPUT = "tiny:256,pathldm:256" if ON_GPU else "tiny:256,pathldm:32"
THROUGHPUT_BATCHES = "1,8,32,64" if ON_GPU else "1,4"
#: the precisions of the throughput lines: fp32 and bf16 on a GPU; fp32 on the CPU (bf16 there is emulated
#: on most CPUs: bf16_vs_fp32_speed_ratio measures it)
THROUGHPUT_PRECISIONS = "fp32,bf16" if ON_GPU else "fp32"
#: target of the share of a generation's time outside the UNet and the decoder
OUTSIDE_TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets to time ('' for none)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-rss", action="store_true", help="skip the seamless peak-RSS processes")
    parser.add_argument("--precision-images", type=int, default=1,
                        help="images of the bf16-against-fp32 comparison on the shipped model (0: skip it)")
    parser.add_argument("--throughput", default=THROUGHPUT,
                        help="PRESET:SIZE,... of the images/s lines ('' for none; pathldm uses MiniLM for PLIP)")
    parser.add_argument("--throughput-batches", default=THROUGHPUT_BATCHES, help="their batch sizes")
    parser.add_argument("--throughput-precisions", default=THROUGHPUT_PRECISIONS, help="their precisions")
    parser.add_argument("--compile", action="store_true",
                        help="also compiled lines on the CPU (always on a GPU; compiling takes minutes on a CPU)")
    parser.add_argument("--rss-child", nargs=2, metavar=("BUNDLE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(seamless_slide_rss(Path(args.rss_child[0]), int(args.rss_child[1]))))
        return
    from histosynth.devices import pick_device
    from histosynth.models.bundle import load_bundle

    device = pick_device("auto")
    if ON_GPU:
        report("device", 0, torch.cuda.get_device_name(0).replace(" ", "_"))
    with tempfile.TemporaryDirectory() as tmp:
        throughput(Path(tmp), device, args.throughput, split_ints(args.throughput_batches),
                   args.throughput_precisions.split(","), (False, True) if ON_GPU or args.compile else (False,))
        for preset in filter(None, args.presets.split(",")):
            bundle = load_bundle(make_bundle(Path(tmp) / preset, preset), device)
            for batch in split_ints(args.batches):
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
        for name, (value, unit) in bf16_against_fp32(args.precision_images, device).items():
            report(name, value, unit)


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def split_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def throughput(tmp: Path, device: torch.device, spec: str, batches: list[int], precisions: list[str],
               compile_modes: tuple[bool, ...]) -> None:
    """images/s of DDIM-50 with guidance 1.5, decoding included, per preset and size, precision, batch size and
    with or without torch.compile; uncompiled, the share of the time outside the UNet and the decoder.

    The model is prepared as ``histosynth generate`` prepares it (channels-last on CUDA). Compiled lines warm up
    with all 50 steps (each step's timestep may compile anew), the others with two.
    """
    from histosynth.errors import ConfigError
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import prepare_for_sampling

    outside = []
    for case in filter(None, spec.split(",")):
        preset, size = case.split(":")
        bundle = load_bundle(make_bundle(tmp / f"{preset}-minilm", preset, text_encoder="minilm"), device)
        prepare_for_sampling(bundle)
        for compiled in compile_modes:
            if compiled:
                try:
                    prepare_for_sampling(bundle, compile=True)
                except ConfigError as exc:  # no C++ compiler
                    print(f"# no compiled lines: {exc}", flush=True)
                    break
            for precision in precisions:
                for batch in batches[-1:] if compiled else batches:  # each shape compiles anew: the largest only
                    name = f"throughput_{preset}_{size}px_ddim50_{precision}_b{batch}" + ("_compiled" * compiled)
                    share = throughput_line(bundle, name, precision, batch, int(size), compiled)
                    outside += [] if share is None else [share]
    if outside:
        report("throughput_outside_share_max", 100 * max(outside), "%")
        report("throughput_outside_target_met", int(max(outside) < OUTSIDE_TARGET), "bool")


def throughput_line(bundle, name: str, precision: str, batch: int, size: int, compiled: bool) -> Optional[float]:
    """Report the images/s of one throughput case (and more, see the module docstring); returns the share of
    its time outside the UNet and the decoder where it was measured (not compiled, no OOM)."""
    try:
        timing = time_generation(bundle, "ddim", 50, batch, precision, size, clocks=not compiled,
                                 warmup_steps=50 if compiled else 2)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        report(name, 0, "oom")
        return None
    report(f"{name}_images_per_s", 1 / timing["s_per_image"], "images/s")
    if ON_GPU:
        report(f"{name}_peak_mem", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB")
        torch.cuda.reset_peak_memory_stats()
    else:  # a shared CPU's wall time follows its other load, the CPU time much less
        report(f"{name}_cpu_s_per_image", timing["cpu_s_per_image"], "s/image")
    if compiled:
        return None
    share = 1 - timing["unet_share"] - timing["decode_share"]
    report(f"{name}_outside_share", 100 * share, "%")
    return share


def make_bundle(path: Path, preset_name: str, text_encoder: Optional[str] = None) -> Path:
    """A model folder of the preset's networks with random weights and its text encoder (or ``text_encoder``)."""
    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.models.bundle import save_bundle
    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import noise_scheduler
    from histosynth.models.text import load_text_encoder
    from histosynth.presets import load_preset
    from histosynth.schema import RENAL

    preset = load_preset(preset_name)
    text = load_text_encoder(text_encoder or preset.text_encoder)
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


def time_generation(bundle, scheduler: str, steps: int, batch: int, precision: Optional[str] = None,
                    size: Optional[int] = None, clocks: bool = True, warmup_steps: int = 2) -> dict[str, float]:
    """Seconds per image of one batch of ``batch`` images (after a warm-up batch of ``warmup_steps``), wall and
    CPU time of this process, and with ``clocks`` the shares of the wall time inside the UNet and inside the
    decoder."""
    from contextlib import ExitStack

    from histosynth.sample.generate import SamplingOptions, generate

    captions, seeds = [CAPTION] * batch, list(range(batch))
    options = SamplingOptions(steps=steps, scheduler=scheduler, precision=precision)
    generate(bundle, captions, seeds, options.overridden(steps=warmup_steps), batch_size=batch, size=size)
    with ExitStack() as stack:
        unet, decoder = ((stack.enter_context(ModuleClock(bundle.unet)),
                          stack.enter_context(ModuleClock(bundle.autoencoder.decoder))) if clocks else (None, None))
        _synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        generate(bundle, captions, seeds, options, batch_size=batch, size=size)
        _synchronize()
        total = time.perf_counter() - started
    timing = {"s_per_image": total / batch, "cpu_s_per_image": (time.process_time() - cpu_started) / batch}
    if clocks:
        timing.update(unet_share=unet.seconds / total, decode_share=decoder.seconds / total)
    return timing


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


def bf16_against_fp32(count: int, device: torch.device) -> dict[str, tuple[float, str]]:
    """PSNR between the bf16 and fp32 images of ``count`` seeds on the shipped model, and the speed ratio.

    Each precision makes the images once to warm up (two steps) and once timed with the model's
    options (DDIM-50, guidance 1.5), in one batch.
    """
    import numpy as np

    from histosynth.defaults import default_bundle_path
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import generate

    bundle = load_bundle(default_bundle_path(), device)
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

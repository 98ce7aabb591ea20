"""Seamless slides: peak host (and device) memory of a large slide against a small one, with the latent on disk.

Prints ``name value unit`` lines:

* ``seamless_{size}_peak_rss``: the peak resident memory of a process while it writes a seamless
  ``size`` px square slide (``synth-slide --mode seamless --latent-store disk``, one denoising step:
  the step count does not change memory), measured from after loading the model and warming up (the
  loaded model counts, loading's own transient peak does not); ``seamless_{size}_seconds`` its time;
* ``seamless_host_memory_ratio``: peak RSS of the largest size / the smallest (16384 px against 4096
  px by default: 16x the area); target <= 2;
* with a CUDA GPU, ``seamless_{size}_device_peak`` (``torch.cuda.max_memory_allocated`` over the
  slide) and ``seamless_device_memory_ratio``; target <= 1.2.

Each size runs in its own process, so that one's peak is not the other's. The model is made here with
random weights: 256 px patches (64 x 64 latent windows, the PathLDM autoencoder's f4 and 3
channels), a UNet of 8 to 16 channels (attention at 16 x 16 only) and a 4-channel decoder, so that
a slide's time goes into the sizes, not the networks; memory is set by the store, the window batch
and the decoder's tiles, not by the networks' width. Linux only (reads ``/proc``).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/seamless.py [--sizes 4096,16384] [--threads 1]
        [--store disk] [--window-batch 8] [--device auto]

Measured on the 2-core CPU machine (torch CPU, fp32, no GPU; load average 14-17 from other jobs),
``--sizes 2048,8192`` (16x the area, as 16384 against 4096; the default sizes would have taken
hours on that machine under that load: the 8192 px slide alone took 12 minutes, mostly decoding)::

    seamless_2048_peak_rss 739.5 MiB
    seamless_2048_seconds 26.58 s
    seamless_8192_peak_rss 974.2 MiB
    seamless_8192_seconds 726.9 s
    seamless_host_memory_ratio 1.317 x
    seamless_host_memory_target_met 1 bool

On the same machine with little else running, the default sizes, ``OMP_NUM_THREADS=1
HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/seamless.py``::

    seamless_4096_peak_rss 818.2 MiB
    seamless_4096_seconds 34.1 s
    seamless_16384_peak_rss 1302 MiB
    seamless_16384_seconds 556.2 s
    seamless_host_memory_ratio 1.592 x
    seamless_host_memory_target_met 1 bool

What grows is not the latent (on disk) but the decoder's strip of 256 px rows and the pyramid's lower
levels below 256 MiB, both with the slide's width. No GPU was at hand: the device lines are unmeasured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sampling import CAPTION, _status_mib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384", help="slide sides in px, smallest first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", default="disk", help="--latent-store of the slides")
    parser.add_argument("--window-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(slide_memory(Path(args.child[0]), int(args.child[1]), args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model")
        measured = {size: run_child(model, size, args) for size in sizes}
    for size, child in measured.items():
        report(f"seamless_{size}_peak_rss", child["peak_rss_mib"], "MiB")
        report(f"seamless_{size}_seconds", child["seconds"], "s")
        if child["device_peak_mib"] is not None:
            report(f"seamless_{size}_device_peak", child["device_peak_mib"], "MiB")
    small, large = measured[sizes[0]], measured[sizes[-1]]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    report("seamless_host_memory_ratio", ratio, "x")
    report("seamless_host_memory_target_met", int(ratio <= 2), "bool")
    if small["device_peak_mib"] is not None:
        ratio = large["device_peak_mib"] / small["device_peak_mib"]
        report("seamless_device_memory_ratio", ratio, "x")
        report("seamless_device_memory_target_met", int(ratio <= 1.2), "bool")


def report(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.4g} {unit}", flush=True)


def make_model(path: Path) -> Path:
    """A model folder with random weights: 256 px patches, f4 latents of 3 channels, narrow networks."""
    import torch

    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.models.bundle import save_bundle
    from histosynth.models.denoiser import build_denoiser
    from histosynth.models.diffusion import noise_scheduler
    from histosynth.models.text import load_text_encoder
    from histosynth.presets import Preset, load_preset
    from histosynth.schema import RENAL

    data = load_preset("tiny").to_dict()
    data["unet"].update(block_out_channels=[8, 16, 16], cross_attention=[False, False, True], norm_num_groups=8)
    data["autoencoder"].update(block_out_channels=[4, 4, 4], mid_block_attention=False, norm_num_groups=4)
    preset = Preset.from_dict(data)
    text = load_text_encoder(preset.text_encoder)
    torch.manual_seed(0)
    unet = build_denoiser(preset, context_dim=text.hidden_size)
    autoencoder = build_autoencoder(preset)
    return save_bundle(path, unet, autoencoder, dict(noise_scheduler(preset).config), text, RENAL,
                       {"image_size": preset.image_size, "preset": preset.to_dict()})


def run_child(model: Path, size: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--threads", str(args.threads), "--store", args.store,
               "--window-batch", str(args.window_batch), "--device", args.device, "--child", str(model), str(size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def slide_memory(model: Path, size: int, args: argparse.Namespace) -> dict:
    """Peak RSS (and device memory) while a seamless slide of ``size`` px is written, after loading and warming up.

    The high-water mark is reset once loading is over (Linux ``clear_refs``), so the peak is that of
    making the slide (model weights included), not of loading the text encoder.
    """
    import torch

    from histosynth.devices import pick_device
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import SamplingOptions
    from histosynth.sample.slides import synth_slide

    bundle = load_bundle(model, pick_device(args.device))
    options = SamplingOptions(steps=1)
    cuda = bundle.device.type == "cuda"
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the disk store goes beside the slide
        synth_slide(bundle, CAPTION, 512, Path(tmp) / "warm.tif", options=options, latent_store=args.store,
                    window_batch=args.window_batch)
        Path("/proc/self/clear_refs").write_text("5")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        synth_slide(bundle, CAPTION, size, Path(tmp) / "slide.tif", options=options, latent_store=args.store,
                    window_batch=args.window_batch)
        seconds = time.perf_counter() - started
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"peak_rss_mib": _status_mib("VmHWM"), "seconds": seconds, "device_peak_mib": device_peak}


if __name__ == "__main__":
    main()

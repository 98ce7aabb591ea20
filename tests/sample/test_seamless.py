"""Seamless slides off the device: the latent's stores (device, host, disk), the order-free blend, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import histosynth
from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.errors import ConfigError
from histosynth.sample.generate import CaptionEmbeddings, SamplingOptions
from histosynth.sample.seamless import (
    DISK_STORE_BYTES,
    SlideStore,
    choose_store,
    store_bytes,
    window_index,
)
from histosynth.sample.slides import denoise_slide, synth_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: DPM-Solver++ keeps a history of predictions in the store too
TWO_STEPS = SamplingOptions(steps=2, scheduler="dpm++")


def test_the_slide_is_the_same_bytes_whichever_store_keeps_its_latent(tiny_bundle, tmp_path):
    seen: dict[str, list[str]] = {}

    def look(store: str):  # what is beside the output while the slide is denoised
        return lambda phase, done, total: seen.setdefault(store, sorted(
            f"{p.name}/{' '.join(sorted(f.name for f in p.iterdir()))}" if p.is_dir() else p.name
            for p in (tmp_path / store).iterdir()))

    slides = {}
    for store in ("device", "host", "disk"):
        out = tmp_path / store / "slide.tif"  # in a folder made on the way
        synth_slide(tiny_bundle, GENERATING_CAPTION, (128, 192), out, options=TWO_STEPS, window_batch=4,
                    latent_store=store, progress=look(store))
        slides[store] = out.read_bytes()
        assert sorted(p.name for p in out.parent.iterdir()) == ["slide.json", "slide.tif"]  # no scratch left
    assert slides["host"] == slides["device"] and slides["disk"] == slides["device"]
    assert seen["host"] == []
    (scratch,) = seen["disk"]  # the disk store: the latent, the accumulator and DPM-Solver++'s two predictions
    assert scratch.startswith(".slide.tif.latent-")
    assert scratch.split("/")[1] == "history0.bin history1.bin sum.bin x.bin"


def test_windows_add_up_to_the_same_sum_in_any_order(tiny_bundle):
    """The blend accumulator sums integers: windows denoised in another order (or by other processes) give
    the same sum, bit for bit, which is what lets torchrun's processes share a step's windows."""
    embeddings = CaptionEmbeddings.for_bundle(tiny_bundle, [GENERATING_CAPTION])
    store = SlideStore("host", torch.device("cpu"))
    denoise_slide(tiny_bundle, store, GENERATING_CAPTION, (128, 192), 5, SamplingOptions(steps=1), embeddings, 4)
    denoiser = _denoiser(tiny_bundle, embeddings)
    sums = []
    for order in (1, -1):
        store._tensors["sum"].zero_()
        batches = [denoiser.grid.windows()[i:i + 3] for i in range(0, len(denoiser.grid.windows()), 3)]
        for batch in batches[::order]:
            denoiser._add_windows(store, batch, 3, torch.tensor(500))
        sums.append(store._tensors["sum"].clone())
    assert len(denoiser.grid.windows()) == 12 and sums[0].dtype == torch.int64
    assert torch.equal(sums[0], sums[1]) and sums[0].abs().max() > 2**30


def _denoiser(bundle, embeddings):
    from histosynth.sample.large import WindowGrid
    from histosynth.sample.seamless import SlideDenoiser

    return SlideDenoiser(bundle.unet, _scheduler(bundle), WindowGrid(32, 48, 16, 4), SamplingOptions(steps=1),
                         embeddings([GENERATING_CAPTION]), embeddings.unconditional(), False, torch.device("cpu"), 3)


def _scheduler(bundle):
    from histosynth.sample.generate import bundle_scheduler

    return bundle_scheduler(bundle, "ddim")


def test_window_positions_in_a_band_of_rows():
    from histosynth.sample.large import WindowGrid

    grid = WindowGrid(32, 28, 16, 4)  # windows at rows 0, 16 and columns 0, 12
    band = torch.arange(16 * 2 * 28).reshape(16, 2, 28)  # rows 16-31 of a (rows, channels, width) array
    crops = band.reshape(-1)[window_index(grid, [(16, 12), (16, 0)], top=16, channels=2)]
    assert torch.equal(crops[0], band[:, :, 12:28].permute(1, 0, 2))
    assert torch.equal(crops[1], band[:, :, 0:16].permute(1, 0, 2))


def test_window_batch_moves_the_latent_by_the_unets_rounding_only(tiny_bundle):
    embeddings = CaptionEmbeddings.for_bundle(tiny_bundle, [GENERATING_CAPTION])
    latents = []
    for window_batch in (1, 5):
        store = SlideStore("host", torch.device("cpu"))
        denoise_slide(tiny_bundle, store, GENERATING_CAPTION, (128, 128), 0, SamplingOptions(steps=2), embeddings,
                      window_batch)
        latents.append(store._tensors["x"])
    # float32 convolutions round a little differently with the batch's shape; the blend adds nothing
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-4)


def test_auto_keeps_the_latent_in_host_memory_up_to_2_gib_then_on_disk():
    # a 30,000 px text slide: 7500^2 latent pixels x 3 channels x (4 + 8) bytes; DPM-Solver++ adds 2 x 4
    assert store_bytes((7500, 7500), 3, 0, 0) == 2_025_000_000 < DISK_STORE_BYTES
    assert store_bytes((10, 10), 3, 7, 2) == 100 * (3 * 20 + 7)
    assert choose_store("auto", DISK_STORE_BYTES) == "host" and choose_store("auto", DISK_STORE_BYTES + 1) == "disk"
    assert choose_store("device", DISK_STORE_BYTES * 10) == "device"
    with pytest.raises(ConfigError, match=r"^unknown latent store 'ram'; use one of auto, device, host, disk$"):
        choose_store("ram", 0)


def test_a_slide_that_does_not_fit_its_store_is_refused_before_any_work(tiny_bundle_path, tmp_path, refused):
    args = ["synth-slide", "--model", str(tiny_bundle_path), "--steps", "1", "--levels", "Glomeruli=high", "--out"]
    assert refused([*args, str(tmp_path / "slide.tif"), "--size", "256", "--latent-store", "ram"]) == (
        "error: unknown latent store 'ram'; use one of auto, device, host, disk")
    message = refused([*args, str(tmp_path / "slide.tif"), "--size", "4000000", "--latent-store", "host"])
    assert message.startswith("error: a seamless slide of 4000000x4000000 px keeps 33527.6 GiB of latents in "
                              "the memory of cpu but ")
    assert message.endswith(" GiB are free; keep it on disk (--latent-store disk)")
    out = tmp_path / "new" / "slide.tif"
    message = refused([*args, str(out), "--size", "4000000", "--latent-store", "disk"])
    assert message.startswith(f"error: a seamless slide of 4000000x4000000 px keeps 33527.6 GiB of latents on "
                              f"the disk of {out.parent} but ")
    assert list(tmp_path.iterdir()) == []


# --- two processes (gloo on CPU) --------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_shares_the_windows_and_writes_the_slide_of_one_process(tiny_bundle_path, tmp_path):
    args = ["synth-slide", "--model", str(tiny_bundle_path), "--levels", "Glomeruli=high", "--size", "256",
            "--steps", "2", "--scheduler", "dpm++", "--eta", "0", "--window-batch", "3", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "histosynth", "--", *args, "--out", str(tmp_path / "two.tif"), "--latent-store", "disk"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(Path(histosynth.__file__).parents[1])}
    done = subprocess.run(torchrun, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "seamless) in" in done.stdout and done.stdout.count("wrote ") == 1 and "by 2 processes" in done.stdout
    assert main([*args, "--out", str(tmp_path / "one.tif")]) == 0
    assert (tmp_path / "two.tif").read_bytes() == (tmp_path / "one.tif").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.tif", "two.json", "two.tif"]
    assert np.frombuffer((tmp_path / "two.tif").read_bytes(), np.uint8).size > 10_000

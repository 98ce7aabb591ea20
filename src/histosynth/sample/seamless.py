"""Seamless slides of any size: the slide's one latent is kept off the device and denoised a window batch at a time.

A seamless slide (:mod:`histosynth.sample.slides`) is one image whose latent is denoised in
overlapping windows blended at every step (MultiDiffusion-style, :class:`~histosynth.sample.large.WindowGrid`).
Here the latent, the blend accumulator and the scheduler's history are kept in a :class:`SlideStore`:
on the compute device, in host memory, or in files of a scratch folder beside the output that are
mapped a band of rows at a time (so the host holds one band, not the latent). The device only ever
holds one window batch (gathered from the store, denoised, weighted and scattered back) and one band
of rows while the scheduler steps it, so device memory is set by the window batch, not the slide.

Every step:

1. each window batch is gathered from the store (its label counts too, for a mask-conditioned
   model), denoised with its guidance predictions in one UNet call, weighted by its blend ramps and
   added to the accumulator with one vectorised scatter;
2. the accumulator is divided by the (separable) sum of the weights and the scheduler steps the
   latent a band of rows at a time, each band with its own copy of the scheduler (a multistep
   scheduler's history of earlier predictions is kept in the store as well).

The weighted predictions are summed as integers in units of 2**-32 (:data:`FIXED_POINT`), so the
sum does not depend on the order in which windows arrive: under torchrun each process denoises
its share of the window batches (every process's UNet calls are those one process would make),
the accumulators are summed over the processes, and each process steps the whole latent; the slide
is the same, byte for byte, as one process's, and the same whichever store holds the latent.

Bytes per latent pixel in the store: 4 per latent channel for the latent, 8 for the accumulator,
4 per channel and solver order for DPM-Solver++'s history, and 1 per class for a mask-conditioned
model's label counts (see :func:`store_bytes`). For the f4, 3-channel latents of the shipped models
that is 2.25 bytes per slide pixel with DDIM (3.75 with DPM-Solver++ 2M), plus K/16 for K mask
classes: about 22 GB for a 100,000 px square text slide, which ``auto`` puts on disk.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..data.slides import Slide
from ..errors import ConfigError
from ..io import scratch_folder
from ..models.diffusion import check_eta, signal_and_noise
from ..models.label_maps import check_mask_ids, counts_to_shares, label_counts
from ..models.latent_range import clamp_model_output
from ..models.sampling import SamplingOptions
from ..train.ranks import ONE_PROCESS, Ranks
from .generate import batch_conditions, free_memory
from .large import Size, WindowGrid
from .sampler import guided_eps

#: where a slide's latent is kept: ``auto`` is host memory up to :data:`DISK_STORE_BYTES`, disk beyond
STORES = ("auto", "device", "host", "disk")
#: the largest store ``auto`` keeps in host memory (a 30,000 px square slide of the shipped text model)
DISK_STORE_BYTES = 2 * 2**30
#: the unit of the blend accumulator's integers
FIXED_POINT = 2.0**32
#: latent values per band of rows the scheduler steps on the device (and per draw of start noise)
BAND_VALUES = 2**21
#: rows of latent pixels of a mask read, checked and turned into label counts at a time
LABEL_MAP_BAND = 64
#: kind of the scratch folder beside the output that holds a disk store
SCRATCH_KIND = "latent"

#: called after each step with (steps done, number of steps)
StepsDone = Callable[[int, int], None]


# --- where the arrays live ----------------------------------------------------------------------------
class SlideStore:
    """Arrays (rows, channels, width) of a slide's latent grid, rows first so that a band of rows is one block.

    ``device``: tensors on the compute device; ``host``: tensors in host memory; ``disk``: raw files
    in ``folder``, of which :meth:`rows` maps only the band asked for (unmapped again when the block
    ends: what the block keeps must be a copy).
    """

    def __init__(self, kind: str, device: torch.device, folder: Optional[Path] = None):
        if kind not in STORES[1:]:
            raise ValueError(f"unknown store {kind!r}")
        if kind == "disk" and folder is None:
            raise ValueError("a disk store needs a folder")
        self.kind, self.folder = kind, folder
        self.device = torch.device(device) if kind == "device" else torch.device("cpu")
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, tuple[Path, np.dtype, tuple[int, int]]] = {}

    def create(self, name: str, rows: int, channels: int, width: int, dtype: torch.dtype) -> None:
        """A new array of zeros."""
        if self.kind != "disk":
            self._tensors[name] = torch.zeros((rows, channels, width), dtype=dtype, device=self.device)
            return
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        path = self.folder / f"{name}.bin"
        with open(path, "wb") as file:
            file.truncate(rows * channels * width * numpy_dtype.itemsize)  # sparse: zeros, no disk written yet
        self._files[name] = (path, numpy_dtype, (channels, width))

    @contextmanager
    def rows(self, name: str, top: int, bottom: int) -> Iterator[torch.Tensor]:
        """Rows ``top:bottom`` of array ``name`` (rows, channels, width): a writable view for the block."""
        if name in self._tensors:
            yield self._tensors[name][top:bottom]
            return
        path, dtype, (channels, width) = self._files[name]
        mapped = np.memmap(path, dtype, mode="r+", offset=top * channels * width * dtype.itemsize,
                           shape=(bottom - top, channels, width))
        try:
            yield torch.from_numpy(mapped)
        finally:
            del mapped  # unmapped once the caller's view is gone too: the band leaves resident memory


def store_bytes(latent: Size, channels: int, mask_classes: int, history: int) -> int:
    """Bytes a slide's store holds: latent (float32) and accumulator (int64) of ``channels``, ``history``
    float32 copies of earlier predictions, and uint8 label counts of ``mask_classes``, per latent pixel."""
    return latent[0] * latent[1] * (channels * (4 + 8 + 4 * history) + mask_classes)


def scheduler_history(scheduler) -> int:
    """How many earlier predictions a scheduler keeps (DPM-Solver++'s ``model_outputs``; DDIM none)."""
    return len(getattr(scheduler, "model_outputs", None) or [])


def choose_store(kind: str, need: int) -> str:
    """The store for a slide whose store holds ``need`` bytes: ``auto`` is host memory up to
    :data:`DISK_STORE_BYTES`, disk beyond."""
    if kind not in STORES:
        raise ConfigError(f"unknown latent store {kind!r}; use one of {', '.join(STORES)}")
    if kind != "auto":
        return kind
    return "host" if need <= DISK_STORE_BYTES else "disk"


def check_store_fits(kind: str, need: int, size: Size, device: torch.device, folder: Path) -> None:
    """Refuse a slide whose store would not fit where it is kept (nothing is refused where that is unknown)."""
    if kind == "disk":
        existing = next(path for path in (folder, *folder.parents) if path.exists())  # the folder may be made later
        free, where = shutil.disk_usage(existing).free, f"on the disk of {folder}"
        advice = "free disk space there or write the slide to another disk"
    else:
        place = torch.device(device) if kind == "device" else torch.device("cpu")
        free, where = free_memory(place), f"in the memory of {place}"
        advice = "keep it on disk (--latent-store disk)" if kind == "host" else "keep it in host memory or on disk"
    if free is None or need <= free:
        return
    raise ConfigError(f"a seamless slide of {size[1]}x{size[0]} px keeps {need / 2**30:.1f} GiB of latents {where} "
                      f"but {free / 2**30:.1f} GiB are free; {advice}")


@contextmanager
def slide_store(kind: str, device: torch.device, out: Path) -> Iterator[SlideStore]:
    """A store of ``kind`` for the slide written to ``out``: a disk store lives in a scratch folder beside it
    (``.<name>.latent-<random>``), removed when the block ends (or, after a kill, when ``out`` is made again)."""
    if kind != "disk":
        yield SlideStore(kind, device)
        return
    with scratch_folder(out, SCRATCH_KIND) as folder:
        yield SlideStore("disk", device, folder)


def row_bands(height: int, row_values: int) -> list[tuple[int, int]]:
    """(top, bottom) bands of rows of ``row_values`` values each, about :data:`BAND_VALUES` values per band."""
    rows = max(1, BAND_VALUES // max(1, row_values))
    return [(top, min(height, top + rows)) for top in range(0, height, rows)]


# --- the label map of a mask slide ----------------------------------------------------------------------
def store_label_counts(store: SlideStore, slide: Slide, class_ids: Sequence[int], factor: int, latent: Size,
                       source: str) -> None:
    """Read a mask slide a band of rows at a time, check its ids and keep its label counts in the store
    as ``labels`` (never the whole mask in memory)."""
    height, width = latent
    store.create("labels", height, len(class_ids), width, torch.uint8)
    for top in range(0, height, LABEL_MAP_BAND):
        bottom = min(height, top + LABEL_MAP_BAND)
        mask = slide.read_region(0, top * factor, 0, width * factor, (bottom - top) * factor)
        check_mask_ids(mask, class_ids, source)
        with store.rows("labels", top, bottom) as rows:
            rows.copy_(label_counts(mask, class_ids, factor).permute(1, 0, 2))


# --- denoising -----------------------------------------------------------------------------------------
@dataclass
class SlideDenoiser:
    """Denoises a slide's latent (in a :class:`SlideStore`) over ``grid``, ``window_batch`` windows per UNet call.

    ``context`` and ``unconditional`` are (states (1, L, D), mask (1, L)) of the caption and of the
    unconditional caption (see :func:`histosynth.sample.generate.batch_conditions`). A mask-conditioned
    model reads the store's label counts (``with_labels``, counts of ``factor`` x ``factor`` blocks), or
    else the null map of its ``mask_channels``.
    """

    unet: torch.nn.Module
    scheduler: object
    grid: WindowGrid
    options: SamplingOptions
    context: tuple[torch.Tensor, torch.Tensor]
    unconditional: tuple[torch.Tensor, torch.Tensor]
    text_is_unconditional: bool
    device: torch.device
    window_batch: int
    latent_range: object = None
    mask_channels: int = 0
    with_labels: bool = False
    factor: int = 1
    ranks: Ranks = ONE_PROCESS

    def run(self, store: SlideStore, channels: int, seed: int, progress: Optional[StepsDone] = None) -> None:
        """Draw the start noise from ``seed`` into ``store`` (``x``) and denoise it in place."""
        check_eta(self.scheduler, self.options.eta)
        height, width = self.grid.height, self.grid.width
        self.scheduler.set_timesteps(self.options.steps, device=self.device)
        history = scheduler_history(self.scheduler)
        store.create("x", height, channels, width, torch.float32)
        store.create("sum", height, channels, width, torch.int64)
        for index in range(history):
            store.create(f"history{index}", height, channels, width, torch.float32)
        generator = torch.Generator().manual_seed(int(seed))
        bands = row_bands(height, channels * width)
        draw_start_noise(store, generator, channels, bands, float(self.scheduler.init_noise_sigma))
        schedulers = [copy.deepcopy(self.scheduler) for _ in bands]
        held = [[False] * history for _ in bands]  # which of each band's history slots hold a prediction
        windows = self.grid.windows()
        calls = min(self.window_batch, len(windows))
        batches = [windows[start:start + calls] for start in range(0, len(windows), calls)]
        step_noise = {"eta": self.options.eta, "generator": [generator]} if self.options.eta else {}
        weight_sums = [total.to(self.device) for total in self.grid.weight_sums()]
        timesteps = self.scheduler.timesteps
        for index, t in enumerate(timesteps):
            for top, bottom in bands:
                with store.rows("sum", top, bottom) as total:
                    total.zero_()
            for batch in self.ranks.share(batches):
                self._add_windows(store, batch, calls, t)
            for (top, bottom), scheduler, band_held in zip(bands, schedulers, held, strict=True):
                if self.ranks.distributed:
                    _sum_over_processes(store, "sum", top, bottom)
                self._step_band(store, top, bottom, scheduler, t, weight_sums, band_held, step_noise)
            if progress is not None:
                progress(index + 1, len(timesteps))

    def _add_windows(self, store: SlideStore, corners: list[tuple[int, int]], calls: int, t: torch.Tensor) -> None:
        """Denoise the windows at ``corners`` (padded to ``calls`` windows, so every UNet call has one shape)
        and add their weighted predictions to the accumulator."""
        real = len(corners)
        corners = corners + [corners[-1]] * (calls - real)
        top, bottom = corners[0][0], max(top for top, _ in corners) + self.grid.window_size[0]
        with store.rows("x", top, bottom) as rows:
            index = window_index(self.grid, corners, top, rows.shape[1]).to(rows.device)
            x = rows.reshape(-1)[index].to(self.device)
        label_maps = None
        if self.with_labels:
            with store.rows("labels", top, bottom) as counts:
                label_index = window_index(self.grid, corners, top, counts.shape[1]).to(counts.device)
                label_maps = counts_to_shares(counts.reshape(-1)[label_index].to(self.device), self.factor)
        elif self.mask_channels:  # the null map: no mask to follow
            label_maps = x.new_zeros(calls, self.mask_channels, *x.shape[-2:])
        states, mask = self.context
        conditions = batch_conditions((states.expand(calls, -1, -1), mask.expand(calls, -1)), self.unconditional,
                                      label_maps, self.text_is_unconditional)
        eps = guided_eps(self.unet, self.scheduler.scale_model_input(x, t), t, conditions, self.options.guidance,
                         self.options.mask_guidance, self.options.on_device(self.device).precision)[:real]
        fixed = to_fixed_point(eps * self.grid.weights(corners[:real]).to(self.device))
        with store.rows("sum", top, bottom) as total:
            total.view(-1).index_add_(0, index[:real].reshape(-1), fixed.reshape(-1).to(total.device))

    def _step_band(self, store: SlideStore, top: int, bottom: int, scheduler, t: torch.Tensor,
                   weight_sums: list[torch.Tensor], held: list[bool], step_noise: dict) -> None:
        """One scheduler step of latent rows ``top:bottom`` on the device, with that band's scheduler; a
        multistep scheduler's history of the band is read from the store (slots ``held``) and put back."""
        x, summed = self._read(store, "x", top, bottom), self._read(store, "sum", top, bottom)
        row_sum, col_sum = weight_sums
        eps = summed.float() / FIXED_POINT / (row_sum[top:bottom, None] * col_sum[None, :])
        if self.latent_range is not None:
            eps = clamp_model_output(eps, x, *signal_and_noise(scheduler, t), self.latent_range,
                                     scheduler.config.prediction_type)
        if held:
            scheduler.model_outputs = [self._read(store, f"history{index}", top, bottom) if full else None
                                       for index, full in enumerate(held)]
        after = scheduler.step(eps, t, x, **step_noise).prev_sample
        with store.rows("x", top, bottom) as rows:
            rows.copy_(after[0].permute(1, 0, 2))
        for index, output in enumerate(scheduler.model_outputs if held else []):
            held[index] = output is not None
            if output is not None:
                with store.rows(f"history{index}", top, bottom) as rows:
                    rows.copy_(output[0].permute(1, 0, 2))
        if held:
            scheduler.model_outputs = [None] * len(held)  # the band's history lives in the store

    def _read(self, store: SlideStore, name: str, top: int, bottom: int) -> torch.Tensor:
        """Rows ``top:bottom`` of a store's array as (1, C, rows, w) on the device."""
        with store.rows(name, top, bottom) as rows:
            return rows.to(self.device, copy=True).permute(1, 0, 2)[None]


def to_fixed_point(values: torch.Tensor) -> torch.Tensor:
    """float32 values as int64 multiples of 1 / :data:`FIXED_POINT` (exactly: the scaling is by a power of two)."""
    return torch.round(values * FIXED_POINT).long()


def window_index(grid: WindowGrid, corners: Sequence[tuple[int, int]], top: int, channels: int) -> torch.Tensor:
    """(n, channels, rows, columns) positions of the windows at ``corners`` in a flattened band of a store's
    rows (rows, channels, width) that starts at latent row ``top``."""
    win_h, win_w = grid.window_size
    row = torch.arange(win_h)[None, :, None]
    channel = torch.arange(channels)[:, None, None]
    column = torch.arange(win_w)[None, None, :]
    inside = (row * channels + channel) * grid.width + column
    offsets = torch.tensor([(y - top) * channels * grid.width + x for y, x in corners])
    return offsets[:, None, None, None] + inside[None]


def draw_start_noise(store: SlideStore, generator: torch.Generator, channels: int, bands: list[tuple[int, int]],
                     sigma: float) -> None:
    """Standard normal start noise x ``sigma`` into the store's ``x``, drawn from ``generator`` channel by
    channel, a band of rows at a time (the same numbers whatever the store)."""
    for channel in range(channels):
        for top, bottom in bands:
            with store.rows("x", top, bottom) as rows:
                width = rows.shape[-1]
                noise = torch.randn((bottom - top, width), generator=generator) * sigma
                rows[:, channel, :] = noise.to(rows.device)


def _sum_over_processes(store: SlideStore, name: str, top: int, bottom: int) -> None:
    """Rows ``top:bottom`` of array ``name`` summed over the job's processes, in every process (gloo, on the CPU)."""
    with store.rows(name, top, bottom) as rows:
        on_cpu = rows if rows.device.type == "cpu" else rows.cpu()
        torch.distributed.all_reduce(on_cpu)
        if on_cpu is not rows:
            rows.copy_(on_cpu)


def latent_rows(store: SlideStore, name: str = "x") -> Callable[[int, int], torch.Tensor]:
    """Reads rows ``top:bottom`` of the store's latent as (1, C, rows, w), a copy on the store's device."""
    def read(top: int, bottom: int) -> torch.Tensor:
        with store.rows(name, top, bottom) as rows:
            return rows.permute(1, 0, 2)[None].clone()
    return read

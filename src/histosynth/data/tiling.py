"""Slides (with a label-mask slide, polygon annotations, or neither) -> a patch dataset.

Each slide is cut into a grid of non-overlapping square patches at the target resolution; a
patch is kept when its tissue fraction reaches the threshold. With labels (a mask slide or
annotations) the tissue fraction is the share of the patch's pixels whose class is named in
captions (not background); without, it comes from tissue detection on a thumbnail and the patch
masks are all id 0 — enough to train an autoencoder, which needs no captions.

Slides are written through :class:`PatchDatasetWriter`, each into files of its own; a re-run skips
the slides already finished and redoes those a killed run left unfinished. Every input and option
is checked before anything is written, and a run that fails before finishing a slide leaves nothing
that stops a retry with corrected options. Within a slide, threads read regions while others
compress and write patches; several slides are tiled at once on threads (`workers`), and a
:class:`Shard` tiles part of the slide list, so machines sharing a file system write one dataset.
Whatever the workers and shards, the files are those one process writes.

A slide is named in the dataset by its file name up to the first '.' (``a.ome.tif`` -> ``a``). A
file name that starts with '.' (``.s1.tif``) is refused rather than guessed at: stripping the dots
could silently merge it with a slide ``s1`` already in the dataset.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import pandas as pd
from rich.progress import Progress

from .. import validation
from ..errors import ConfigError, DataError
from ..parallel import Shard, available_cpus, ordered_map
from ..schema import RENAL, ClassSchema
from ..terminal import progress_bar
from .annotations import Annotation, rasterize, read_annotations
from .dataset import Patch, PatchDataset, PatchDatasetWriter, finished_slides, slide_name_problem
from .slides import LevelChoice, Slide, TissueMap, detect_tissue, open_mask_slide, open_slide

SPLITS = ("train", "val", "test")
#: Patch sides accepted by :class:`TilingOptions` (a 8192 px RGB patch is 200 MB in memory).
MIN_PATCH_SIZE, MAX_PATCH_SIZE = 16, 8192


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SlideInput:
    """A slide to tile and, optionally, its labels: a label-mask slide or an annotation file."""

    slide: Path
    mask: Path | None = None
    annotations: Path | None = None
    mpp_override: float | None = None

    @property
    def name(self) -> str:
        """The slide's name in the dataset (see :func:`slide_name`)."""
        return slide_name(self.slide)


def slide_name(path: str | Path) -> str:
    """A slide's name in the dataset: its file name without extensions (a.ome.tif -> a).

    A name that cannot be a folder name is a DataError; so is a file name starting with '.'.
    """
    file_name = Path(path).name
    if file_name.startswith("."):
        suggestion = file_name.lstrip(".") or "slide.tif"
        raise DataError(
            f"slide file {path} starts with '.', so it has no name in the dataset (a slide is named by its "
            f"file name up to the first '.'); rename the file, e.g. to {suggestion}"
        )
    name = file_name.split(".")[0]
    problem = slide_name_problem(name)
    if problem:
        raise DataError(f"slide file {str(path)!r} would be named {name!r} in the dataset, which cannot be a folder "
                        f"name ({problem}); rename the file")
    return name


@dataclass(frozen=True)
class TilingOptions:
    """How to cut patches: resolution (µm/px), side (px), minimum tissue share, and splits."""

    mpp: float = 0.5
    size: int = 256
    min_tissue: float = 0.5
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0

    def __post_init__(self) -> None:
        validation.positive_float(self.mpp, "--mpp")
        if not _is_int(self.size) or not MIN_PATCH_SIZE <= self.size <= MAX_PATCH_SIZE:
            raise ConfigError(f"--size must be a whole number of pixels from {MIN_PATCH_SIZE} to {MAX_PATCH_SIZE}, "
                              f"got {self.size}")
        validation.share(self.min_tissue, "--min-tissue")
        fractions = tuple(self.split_fractions) if isinstance(self.split_fractions, (tuple, list)) else ()
        if (len(fractions) != 3 or not all(_is_number(f) and math.isfinite(f) and f >= 0 for f in fractions)
                or sum(fractions) <= 0):
            raise ConfigError(f"split fractions must be three finite shares (train, val, test) >= 0 with a "
                              f"positive sum, got {self.split_fractions}")
        if not _is_int(self.split_seed):
            raise ConfigError(f"the split seed must be a whole number, got {self.split_seed}")

    def as_info(self) -> dict:
        return {"mpp": self.mpp, "size": self.size, "min_tissue": self.min_tissue}


class TilingStopped(Exception):
    """A slide left unfinished because the run was interrupted; a re-run redoes it."""


@dataclass(frozen=True)
class TilingResult:
    """Patches kept per slide tiled now, slides finished earlier, and the dataset once every slide is finished.

    `dataset` is None while slides of other shards (`waiting`) are not finished: the shard that
    finishes last writes manifest.csv.
    """

    dataset: PatchDataset | None
    tiled: dict[str, int]
    skipped: list[str]
    waiting: list[str] = field(default_factory=list)


def slides_of_shard(shard: Shard, inputs: list[SlideInput]) -> list[SlideInput]:
    """The slides `shard` tiles, in the order given: those whose place in name order it takes. Every shard
    must be given the same slides (in any order); the shards together then tile each slide once."""
    in_name_order = sorted(item.name for item in inputs)
    mine = {name for place, name in enumerate(in_name_order) if shard.takes(place)}
    return [item for item in inputs if item.name in mine]


def one_per_slide(values: list | None, slides: list, option: str, allow_one: bool = False) -> list:
    """``values`` given once per slide, in order (``allow_one``: or once for all); None for each slide if none
    were given. Another count is a DataError naming ``option``."""
    if not values:
        return [None] * len(slides)
    if allow_one and len(values) == 1:
        return list(values) * len(slides)
    if len(values) != len(slides):
        raise DataError(f"{option} was given {len(values)} times for {len(slides)} slides; give it once per slide")
    return list(values)


def tile_slides(inputs: list[SlideInput], out: str | Path, schema: ClassSchema = RENAL,
                options: TilingOptions = TilingOptions(), splits: dict[str, str] | None = None,
                progress: bool = True, workers: int | None = None, shard: Shard = Shard()) -> TilingResult:
    """Tile every slide (of this `shard`) into the patch dataset at `out`; returns per-slide counts and the dataset.

    `splits` maps slide names to train/val/test; without it a slide's split is drawn from a hash
    of its name, so it never changes between runs. `workers` slides are tiled at once (default: one
    per CPU), each by threads sharing the CPUs; the dataset is the same for any number. Every shard
    checks the whole slide list before tiling its part; the one that finds every slide finished
    writes manifest.csv.
    """
    _check_inputs(inputs, options, splits)
    workers = available_cpus() if workers is None else validation.positive_int(workers, "--workers")
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file, not a dataset folder; choose a folder")
    _check_same_settings(Path(out), options)
    writer = PatchDatasetWriter(out, schema, options.size, extra_info={"tiling": options.as_info()},
                                shared=shard.count > 1)
    mine = slides_of_shard(shard, inputs)
    skipped = [item.name for item in mine if writer.slide_done(item.name)]
    todo = [item for item in mine if not writer.slide_done(item.name)]
    with progress_bar(progress) as bar:
        slides_task = bar.add_task("slides", total=len(mine), completed=len(skipped))
        tiled = _tile_at_once(writer, todo, schema, options, splits, min(workers, max(1, len(todo))), bar,
                              lambda: bar.advance(slides_task))
    waiting = [item.name for item in inputs if not writer.slide_done(item.name)]
    return TilingResult(None if waiting else writer.finalize(), tiled, skipped, waiting)


def _tile_at_once(writer: PatchDatasetWriter, items: list[SlideInput], schema: ClassSchema,
                  options: TilingOptions, splits: dict[str, str] | None, workers: int, bar: Progress,
                  slide_done: Callable[[], None]) -> dict[str, int]:
    """Tile `items` on `workers` threads; patches kept per slide, in the order of `items`.

    Each slide reads and writes on its share of the CPUs. Threads beat processes here: reading and
    compressing run outside the GIL, and a process would first import the readers (see
    benchmarks/phantom_tiling.py). After a slide fails no further slide is started; those being
    tiled are finished, and the error of the first failed slide in `items` is raised. An interrupt
    (Ctrl-C) stops the slides being tiled at their next region, unfinished: a re-run redoes them.
    """
    threads = max(1, available_cpus() // workers)
    stop = threading.Event()

    def tile(item: SlideInput) -> int:
        split = splits_for(item.name, splits, options)
        return tile_slide(writer, item, schema, options, split, bar, threads, stop)

    counts: dict[str, int] = {}
    failures: dict[str, Exception] = {}
    queue = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="slide") as pool:
        running: dict[Future[int], SlideInput] = {}

        def start_next() -> None:
            item = next(queue, None)
            if item is not None and not failures:
                running[pool.submit(tile, item)] = item

        try:
            for _ in range(workers):
                start_next()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    item = running.pop(future)
                    try:
                        counts[item.name] = future.result()
                        slide_done()
                    except Exception as exc:  # raised below, once the slides being tiled are finished
                        failures[item.name] = exc
                    start_next()
        except BaseException:
            stop.set()
            raise
    for item in items:
        if item.name in failures:
            raise failures[item.name]
    return {item.name: counts[item.name] for item in items}


def tile_slide(writer: PatchDatasetWriter, item: SlideInput, schema: ClassSchema, options: TilingOptions,
               split: str, bar: Progress | None = None, threads: int | None = None,
               stop: threading.Event | None = None) -> int:
    """Tile one slide through `writer`; returns the number of patches kept.

    `threads` threads (default: one per CPU) read regions, each through slide handles of its own,
    while as many of the writer's compress and write the patches already read. Once `stop` is set
    the slide is left unfinished (:class:`TilingStopped`).
    """
    threads = threads or available_cpus()
    writer.remove_unfinished(item.name)
    with ExitStack() as stack:
        slide = stack.enter_context(open_slide(item.slide, item.mpp_override))
        slide_mpp = slide.require_mpp()
        choice = slide.choose_level(options.mpp)
        labels = _labels_for(item, slide, schema, options.mpp, stack)
        grid = patch_grid(slide, choice, options.size)
        if not grid:
            _refuse_slide_smaller_than_a_patch(item, slide, options)
        box = _box_side(choice, options.size)
        candidates = [(x, y) for x, y in grid if labels.may_hold_tissue(x, y, box)]
        task = bar.add_task(item.name, total=len(candidates)) if bar else None
        readers = stack.enter_context(_ReadersPerThread(slide, labels))
        patches = _kept_patches(readers, candidates, choice, box, options, threads, stop or threading.Event(),
                                lambda: bar.advance(task) if bar is not None and task is not None else None)
        summary = {
            "source": str(item.slide), "reader": slide.backend, "dimensions": list(slide.dimensions),
            "slide_mpp": slide_mpp, "mpp_source": slide.mpp_source, "level": choice.level,
            "level_mpp": slide_mpp * choice.downsample, "patch_mpp": choice.mpp, "resize": choice.scale,
            "labels": labels.description, "grid_patches": len(grid), "candidates": len(candidates),
            **options.as_info(),
        }
        count = writer.write_slide(item.name, patches, split=split, summary=summary, threads=threads)
        if bar is not None and task is not None:
            bar.remove_task(task)
        return count


def _refuse_slide_smaller_than_a_patch(item: SlideInput, slide: Slide, options: TilingOptions) -> None:
    width, height = (side * slide.require_mpp() for side in slide.dimensions)
    patch = options.size * options.mpp
    raise DataError(
        f"slide {item.slide} is {width:.0f} x {height:.0f} µm, smaller than one patch ({options.size} px at "
        f"{options.mpp:g} µm/px = {patch:.0f} µm); use a finer --mpp or a smaller --size"
    )


def patch_grid(slide: Slide, choice: LevelChoice, size: int) -> list[tuple[int, int]]:
    """Level-0 corners of the non-overlapping patches that fit inside the slide, row by row."""
    width, height = slide.level_dimensions[choice.level]
    side = choice.region_size(size)
    step = size * choice.scale  # level pixels between patches; `side` rounds it

    def starts(extent: int) -> list[int]:
        count = int((extent - side) // step) + 1 if extent >= side else 0
        return [round(k * step) for k in range(count) if round(k * step) + side <= extent]

    return [(round(x * choice.downsample), round(y * choice.downsample))
            for y in starts(height) for x in starts(width)]


def splits_for(name: str, splits: dict[str, str] | None, options: TilingOptions) -> str:
    """A slide's split: from the user's table, else from a hash of its name (stable across runs)."""
    if splits is not None:
        if name not in splits:
            raise DataError(f"slide {name} is not in the split file; add a row '{name},train|val|test'")
        return splits[name]
    digest = hashlib.sha256(f"{options.split_seed}/{name}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    edges = np.cumsum(options.split_fractions) / sum(options.split_fractions)
    return SPLITS[int(np.searchsorted(edges, draw, side="right"))]


def read_split_file(path: str | Path) -> dict[str, str]:
    """A CSV with columns slide,split (split one of train, val, test)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a CSV ({exc}); write it with the columns slide,split") from None
    if not {"slide", "split"} <= set(table.columns):
        raise DataError(f"{path}: needs the columns slide,split; found {list(table.columns)}")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown splits {bad}; use train, val or test")
    return dict(zip(table["slide"], table["split"], strict=True))


# --- labels ---------------------------------------------------------------------------------

class _Labels(Protocol):
    description: str

    def may_hold_tissue(self, x: int, y: int, box: float) -> bool: ...

    def patch(self, x: int, y: int, size: int, box: float) -> np.ndarray: ...

    def tissue_fraction(self, x: int, y: int, box: float, mask: np.ndarray) -> float: ...

    def reopened(self, keep: Callable[[Slide], Slide]) -> "_Labels":
        """These labels for another thread: reading through handles of its own, each passed to `keep`."""
        ...


class _DetectedTissue:
    """No labels: tissue from detection, masks all id 0."""

    def __init__(self, tissue: TissueMap):
        self.tissue = tissue
        self.description = "none (tissue detection)"

    def may_hold_tissue(self, x: int, y: int, box: float) -> bool:
        return self.tissue.touches(x, y, box, box)

    def patch(self, x: int, y: int, size: int, box: float) -> np.ndarray:
        return np.zeros((size, size), dtype=np.uint8)

    def reopened(self, keep: Callable[[Slide], Slide]) -> "_DetectedTissue":
        return self  # the tissue map is in memory

    def tissue_fraction(self, x: int, y: int, box: float, mask: np.ndarray) -> float:
        return self.tissue.fraction(x, y, box, box)


class _LabelledTissue:
    """Labels from a mask slide or annotations: tissue is what captions may name."""

    def __init__(self, schema: ClassSchema):
        self.tissue_ids = np.array(schema.captioned_ids)
        self.is_tissue = np.isin(np.arange(256), self.tissue_ids)  # looked up by id: masks are uint8

    def tissue_fraction(self, x: int, y: int, box: float, mask: np.ndarray) -> float:
        return np.count_nonzero(self.is_tissue[mask]) / mask.size

    def reopened(self, keep: Callable[[Slide], Slide]) -> "_LabelledTissue":
        return self  # annotations are shared: rasterizing reads nothing


class _MaskSlideLabels(_LabelledTissue):
    def __init__(self, mask: Slide, slide_mpp: float, target_mpp: float, schema: ClassSchema):
        super().__init__(schema)
        self.mask = mask
        self.choice = mask.choose_level(target_mpp, mpp=slide_mpp)
        # The thumbnail also checks, before any patch is written, that the ids fit the schema.
        labels, downsample = mask.thumbnail(slide_mpp=slide_mpp)
        self.overview = TissueMap(np.isin(labels, self.tissue_ids), downsample)
        self.description = f"mask slide {mask.path}"

    def may_hold_tissue(self, x: int, y: int, box: float) -> bool:
        return self.overview.touches(x, y, box, box)

    def patch(self, x: int, y: int, size: int, box: float) -> np.ndarray:
        return self.mask.read_patch(x, y, size, self.choice)

    def reopened(self, keep: Callable[[Slide], Slide]) -> "_MaskSlideLabels":
        labels = copy.copy(self)
        labels.mask = keep(self.mask.reopen())
        return labels


class _AnnotationLabels(_LabelledTissue):
    def __init__(self, path: Path, schema: ClassSchema):
        super().__init__(schema)
        self.annotations: list[Annotation] = read_annotations(path, schema)
        self.bounds = np.array([a.bounds for a in self.annotations])
        self.description = f"annotations {path}"

    def may_hold_tissue(self, x: int, y: int, box: float) -> bool:
        b = self.bounds
        return bool(np.any((b[:, 2] >= x) & (b[:, 0] <= x + box) & (b[:, 3] >= y) & (b[:, 1] <= y + box)))

    def patch(self, x: int, y: int, size: int, box: float) -> np.ndarray:
        return rasterize(self.annotations, x, y, size, size, downsample=box / size)


def _labels_for(item: SlideInput, slide: Slide, schema: ClassSchema, target_mpp: float,
                stack: ExitStack) -> _Labels:
    if item.mask is not None:
        mask = stack.enter_context(open_mask_slide(item.mask, schema, like=slide))
        return _MaskSlideLabels(mask, slide.require_mpp(), target_mpp, schema)
    if item.annotations is not None:
        return _AnnotationLabels(Path(item.annotations), schema)
    return _DetectedTissue(detect_tissue(slide))


# --- helpers --------------------------------------------------------------------------------

def _box_side(choice: LevelChoice, size: int) -> float:
    """Side of a patch in level-0 pixels."""
    return choice.region_size(size) * choice.downsample


def _kept_patches(readers: _ReadersPerThread, candidates: list[tuple[int, int]], choice: LevelChoice, box: float,
                  options: TilingOptions, threads: int, stop: threading.Event,
                  advance: Callable[[], None]) -> Iterator[Patch]:
    """The candidates whose tissue share reaches the threshold, read on `threads` threads, in grid order."""

    def examine(corner: tuple[int, int]) -> Patch | None:
        x, y = corner
        slide, labels = readers.get()
        mask = labels.patch(x, y, options.size, box)
        fraction = labels.tissue_fraction(x, y, box, mask)
        if fraction < options.min_tissue:
            return None
        image = slide.read_patch(x, y, options.size, choice)
        return Patch(image=image, mask=mask, x=x, y=y, level=choice.level, mpp=round(choice.mpp, 6),
                     tissue_fraction=fraction)

    for patch in ordered_map(examine, candidates, threads, name="region-reader"):
        if stop.is_set():
            raise TilingStopped("tiling was stopped before the slide was finished")
        advance()
        if patch is not None:
            yield patch


class _ReadersPerThread:
    """The slide and labels each reading thread reads through, with handles of its own.

    One openslide handle reads one region at a time, so threads sharing it would wait for each
    other; the handles opened here are closed on leaving the ``with`` block.
    """

    def __init__(self, slide: Slide, labels: _Labels):
        self.slide, self.labels = slide, labels
        self.local = threading.local()
        self.opened: list[Slide] = []
        self.lock = threading.Lock()

    def get(self) -> tuple[Slide, _Labels]:
        readers = getattr(self.local, "readers", None)
        if readers is None:
            slide = self._keep(self.slide.reopen())
            labels = self.labels.reopened(self._keep)
            readers = self.local.readers = (slide, labels)
        return readers

    def _keep(self, slide: Slide) -> Slide:
        with self.lock:
            self.opened.append(slide)
        return slide

    def __enter__(self) -> "_ReadersPerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        for slide in self.opened:
            slide.close()


def _check_inputs(inputs: list[SlideInput], options: TilingOptions, splits: dict[str, str] | None) -> None:
    """Everything that can be checked before a file is written: names, files, options, splits."""
    if not inputs:
        raise DataError("no slides given; pass one or more slide files")
    names = [item.name for item in inputs]  # refuses names that cannot be folder names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"several slides are named {repeated} (file name without extensions); rename them apart")
    for item in inputs:
        if item.mask is not None and item.annotations is not None:
            raise DataError(f"slide {item.slide}: give a mask slide or annotations, not both")
        for kind, path in (("slide file", item.slide), ("mask slide", item.mask),
                           ("annotation file", item.annotations)):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{kind} {path} does not exist; check the path")
        override = item.mpp_override
        if override is not None and not (_is_number(override) and 0 < override < 1000):
            raise DataError(f"{item.slide}: --mpp-override must be a positive number of microns per pixel, "
                            f"got {override}")
    for name in names:
        splits_for(name, splits, options)  # a slide missing from the split file fails before any is tiled


def _check_same_settings(root: Path, options: TilingOptions) -> None:
    """A dataset is tiled with one resolution and threshold; mixing runs would mix them.

    Only finished slides bind: settings a failed or killed run wrote before finishing one do not.
    """
    info_path = root / "dataset.json"
    if not info_path.is_file() or not finished_slides(root):
        return
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path} is corrupt ({exc}); choose another --out") from None
    earlier = info.get("tiling") if isinstance(info, dict) else None
    if earlier is not None and earlier != options.as_info():
        raise DataError(
            f"{root} was tiled with {earlier}, not {options.as_info()}; use the same options or another --out"
        )

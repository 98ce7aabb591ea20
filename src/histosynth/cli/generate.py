"""`histosynth generate` (patches on command, from captions and/or label masks) and `histosynth synth-slide`
(whole synthetic slides, optionally following a label-mask slide)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from ..captions import UNCONDITIONAL_CAPTION
from ..errors import ConfigError
from ..terminal import progress_bar
from .common import DeviceOption, OptionBlock, expand_blocks, seed_option


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("synth-slide")(synth_slide_command)


ModelOption = typer.Option(None, "--model", help="model folder (default: the toolkit's embedded model; "
                           "from masks: its embedded text+mask model)",
                           show_default=False)
CaptionOption = typer.Option(None, "--caption", help="caption in the schema's templates ('\\n' between sentences)")
LevelsOption = typer.Option(None, "--levels", help="class levels, e.g. 'Glomeruli=high,Tubuli=medium'")
SeedOption = seed_option("job seed; each image's seed is derived from it and its index")
CompileOption = typer.Option(False, "--compile", help="torch.compile the UNet (needs a C++ compiler; the first "
                             "batch waits for the compilation, and rounding may move a few pixel levels)")


def given_sampling(
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="denoising steps (default: the model's)"),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", show_default=False,
        help="classifier-free guidance scale of the text (1 = none, 0 = unconditional) (default: the model's)"),
    mask_guidance: Optional[float] = typer.Option(
        None, "--mask-guidance", show_default=False,
        help="guidance scale of the mask (1 = none): eps = e(u,0) + m*(e(u,M) - e(u,0)) + g*(e(c,M) - e(u,M)) "
             "with m = mask guidance, g = --guidance, c/u = caption/empty caption, M/0 = mask/null mask "
             "(default: the model's)"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", show_default=False,
                                            help="ddim (CompVis DDIM) or dpm++ (DPM-Solver++) (default: the model's)"),
    eta: Optional[float] = typer.Option(
        None, "--eta", show_default=False,
        help="DDIM eta: 0 = deterministic, up to 1 = as much step noise as DDPM, drawn from each image's seed "
             "(default: the model's, 0)"),
    precision: Optional[str] = typer.Option(
        None, "--precision", show_default=False,
        help="fp32, bf16 or fp16: the format the UNet and decoder run in (the latents and scheduler stay fp32); "
             "part of a job (default: bf16 on CUDA GPUs that support it, else fp32; fp16 is refused on the CPU)"),
) -> dict[str, Any]:
    """The sampling options the user gave, for :func:`model_settings` (None: the model's own; for the
    precision: the device's default)."""
    return dict(steps=steps, guidance=guidance, mask_guidance=mask_guidance, scheduler=scheduler, eta=eta,
                precision=precision)


#: The sampling options of `generate` and `synth-slide`. They default to the model folder's own (its preset's:
#: 50 steps, guidance 1.5, ddim for the shipped models; mask guidance 2.5); the ones given replace them.
Sampling = OptionBlock(given_sampling)


@expand_blocks
def generate_command(
    model: Optional[Path] = ModelOption,
    caption: Optional[str] = CaptionOption,
    levels: Optional[str] = LevelsOption,
    captions_file: Optional[Path] = typer.Option(None, "--captions-file", help="text file, one caption per line"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="label mask PNG, or a folder of them: one image per "
                                        "mask, of its size (a mask-conditioned model)"),
    masks_from: Optional[Path] = typer.Option(
        None, "--masks-from", help="generate from the masks of this patch dataset"),
    split: Optional[str] = typer.Option(None, "--split", help="with --masks-from: only this split (default: all)"),
    mask_captions: bool = typer.Option(False, "--mask-captions", help="caption each image from its own mask "
                                       "(with masks, for a model that reads text and masks)"),
    n: Optional[int] = typer.Option(None, "--n", "--count", help="number of images (default: one per caption; "
                                    "captions cycle); with masks: that many of the masks, drawn with --seed "
                                    "(default: all); --count is the same option, for torchrun, which takes --n "
                                    "for its own"),
    out: Path = typer.Option(
        ..., "--out", help="output folder: job.json, records/ and the PNGs, 1000 to a sub-folder (from masks: "
        "under images/ and masks/)"),
    seed: int = SeedOption,
    sampling: dict = Sampling,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", show_default=False,
                                             help="images per UNet call, part of the job (default: 8, or the "
                                             "job's when resuming)"),
    size: Optional[int] = typer.Option(None, "--size", help="image side in px (default: the model's patch size; "
                                       "from masks: the masks' size)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: make the batches with index = i mod n "
                                        "(default: torchrun's RANK/WORLD_SIZE, else all); on GPU i (mod the GPUs) "
                                        "unless torchrun's LOCAL_RANK says otherwise"),
    check_files: bool = typer.Option(False, "--check-files", help="also make again finished images whose file "
                                     "is gone (lists every image folder: slow for millions of images)"),
    device: str = DeviceOption,
    compile: bool = CompileOption,
) -> None:
    """Generate images from a caption, class levels, a captions file and/or label masks; re-running resumes the job."""
    from ..devices import pick_device
    from ..sample.generate import check_seeds
    from ..sample.jobs import Shard, new_job, run_job

    check_seeds([seed])
    folder = _model_folder(model, from_masks=mask is not None or masks_from is not None)
    schema, options = model_settings(folder, **sampling)
    masks = masks_from_options(schema, mask, masks_from, split, n, seed)
    captions = job_captions(schema, caption, levels, captions_file, masks, mask_captions)
    chosen = Shard.parse(shard) if shard else Shard.from_environment()
    bundle, options = _load(folder, pick_device(device, chosen.index), options, compile)
    count = None if masks is not None else (len(captions) if n is None else n)
    job = new_job(out, bundle, captions, count, seed, options, size, batch_size, masks=masks)
    state = job.state(chosen, check_files)
    started = time.perf_counter()
    with progress_bar(rate=True, stderr=True) as progress:
        task = progress.add_task(f"shard {chosen}" if chosen.count > 1 else "generating", total=state.missing,
                                 unit="images")
        run = run_job(bundle, job, chosen, lambda k: progress.advance(task, k), state=state)
    seconds = time.perf_counter() - started
    rate = f", {run.written / seconds:.2f} images/s" if run.written else ""
    typer.echo(f"shard {chosen}: wrote {run.written} images in {seconds:.1f} s{rate} "
               f"({run.existing} of {run.items} were already there) to {out}")


def masks_from_options(schema, mask: Optional[Path], masks_from: Optional[Path], split: Optional[str],
                        n: Optional[int], seed: int):
    """The masks to generate from (--mask or --masks-from, --n of them drawn with the seed), or None."""
    from ..sample.masks import choose_masks, dataset_masks, read_masks

    if mask is not None and masks_from is not None:
        raise ConfigError("give either --mask or --masks-from, not both")
    if split is not None and masks_from is None:
        raise ConfigError("--split chooses the patches of --masks-from DATASET; give --masks-from")
    if mask is None and masks_from is None:
        return None
    found = read_masks(mask, schema) if mask is not None else dataset_masks(masks_from, split)
    return choose_masks(found, n, seed)


def job_captions(schema, caption: Optional[str], levels: Optional[str], captions_file: Optional[Path],
                  masks, mask_captions: bool) -> list[str]:
    """The job's captions: as given; with masks optional (default: the empty, unconditional caption)."""
    if masks is None:
        if mask_captions:
            raise ConfigError("--mask-captions needs masks: give --mask or --masks-from")
        return _captions(schema, caption, levels, captions_file)
    given = sum(x is not None for x in (caption, levels, captions_file))
    if mask_captions:
        if given:
            raise ConfigError("--mask-captions captions each image from its mask; leave out --caption, --levels "
                              "and --captions-file")
        from ..captions import caption_for_mask

        return [caption_for_mask(m.mask, schema) for m in masks]
    return _captions(schema, caption, levels, captions_file) if given else [UNCONDITIONAL_CAPTION]


@expand_blocks
def synth_slide_command(
    model: Optional[Path] = ModelOption,
    caption: Optional[str] = CaptionOption,
    levels: Optional[str] = LevelsOption,
    size: Optional[str] = typer.Option(None, "--size", help="slide size in px: one side (square) or WIDTHxHEIGHT "
                                       "(default with --mask-slide: the mask's size)"),
    mask_slide: Optional[Path] = typer.Option(None, "--mask-slide", help="label-mask slide (TIFF of class ids) the "
                                              "slide follows (a mask-conditioned model; written beside it as "
                                              "NAME-mask.tif)"),
    out: Path = typer.Option(..., "--out", help="pyramidal TIFF to write (its record goes beside it as .json)"),
    mode: str = typer.Option("seamless", "--mode", help="seamless (blended windows) or stitched (thesis grid)"),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="microns per pixel written in the TIFF (default: the "
                                        "mask slide's, else 0.5)"),
    seed: int = SeedOption,
    sampling: dict = Sampling,
    batch_size: int = typer.Option(8, "--batch-size", help="patches per UNet call (stitched mode)"),
    window_batch: int = typer.Option(8, "--window-batch", help="latent windows per UNet call, each with its "
                                      "guidance predictions (seamless mode): what sets the device's memory"),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", help="latent px shared by windows (default: a quarter window)"),
    latent_store: str = typer.Option("auto", "--latent-store", help="where a seamless slide's latent is kept: "
                                     "device, host (memory), disk (a scratch file beside --out), or auto: host "
                                     "up to 2 GiB (about 30000 px square), disk beyond; the slide is the same"),
    device: str = DeviceOption,
    compile: bool = CompileOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
) -> None:
    """Generate a synthetic slide of one caption (or following a label-mask slide), streamed to a pyramidal TIFF.

    Under torchrun the processes share each step's windows of a seamless slide; rank 0 writes it."""
    from ..devices import pick_device
    from ..sample.generate import check_seeds
    from ..sample.seamless import choose_store
    from ..sample.slides import check_mpp, check_slide_mode, synth_slide
    from ..train.ranks import process_group, ranks_from_environment

    check_seeds([seed])
    if mpp is not None:
        check_mpp(mpp)
    folder = _model_folder(model, from_masks=mask_slide is not None)
    schema, options = model_settings(folder, **sampling)
    if caption is not None and levels is not None:
        raise ConfigError("give one of --caption or --levels, not both")
    if caption is None and levels is None:
        if mask_slide is None:
            raise ConfigError("give exactly one of --caption or --levels")
        text = UNCONDITIONAL_CAPTION  # a slide from a mask alone
    else:
        (text,) = _captions(schema, caption, levels, None)
    if size is None and mask_slide is None:
        raise ConfigError("give --size (or --mask-slide to take the size from)")
    check_slide_mode(mode)
    choose_store(latent_store, 0)  # an unknown store is refused before the weights load
    slide_size = parse_slide_size(size) if size is not None else None
    with process_group(ranks_from_environment()) as ranks:
        bundle, options = _load(folder, ranks.device(pick_device(device)), options, compile)
        tasks: dict[str, int] = {}
        with progress_bar(ranks.main, rate=True, stderr=True) as progress:
            def advance(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(phase, total=total, unit=phase.split()[-1])
                progress.update(tasks[phase], completed=done)

            report = synth_slide(bundle, text, slide_size, out, mode, mpp, seed, options, batch_size=batch_size,
                                 window_batch=window_batch, overlap=overlap, overwrite=overwrite, progress=advance,
                                 mask_slide=mask_slide, latent_store=latent_store, ranks=ranks)
    if report is not None:
        processes = f" by {ranks.world_size} processes" if ranks.distributed else ""
        typer.echo(report.summary() + processes)


def parse_slide_size(text: str) -> tuple[int, int]:
    """(height, width) from ``"20480"`` or ``"WIDTHxHEIGHT"``."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise ConfigError(f"--size expects a side in px (20480) or WIDTHxHEIGHT (4096x2048), got {text!r}")
    width, height = sides if len(sides) == 2 else sides * 2
    return height, width


# --- shared steps -------------------------------------------------------------------------------------
def _model_folder(model: Optional[Path], from_masks: bool = False) -> Path:
    """The model the user chose, else the embedded one: the text+mask model to generate from masks."""
    from ..defaults import default_bundle_path, default_mask_bundle_path

    if model is not None:
        return model
    return default_mask_bundle_path() if from_masks else default_bundle_path()


def model_settings(folder: Path, **given):
    """A model folder's class schema and its sampling options with those the user gave (not None) replacing
    them, checked: read from its ``histosynth.json`` once, before any weights load."""
    from ..models.bundle import CONFIG_FILE, read_bundle_config
    from ..schema import ClassSchema

    config = read_bundle_config(folder)
    schema = ClassSchema.from_dict(config.class_schema, source=f"{folder / CONFIG_FILE}: schema")
    return schema, config.sampling.overridden(**given)


def _captions(schema, caption: Optional[str], levels: Optional[str], captions_file: Optional[Path]) -> list[str]:
    from ..captions import canonical_caption, caption_for_levels, read_captions_file

    given = [x is not None for x in (caption, levels, captions_file)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --caption, --levels or --captions-file")
    if caption is not None:
        return [canonical_caption(caption, schema)]
    if levels is not None:
        return [caption_for_levels(levels, schema)]
    return read_captions_file(captions_file, schema)


def _load(folder: Path, target, options, compile: bool = False):
    """The model folder's bundle on the ``target`` device, its UNet prepared for sampling (compiled with
    ``compile``), and the sampling ``options`` with their precision settled for that device: an impossible
    precision, or --compile without a compiler, is refused before the weights load."""
    from ..models.bundle import load_bundle
    from ..models.precision import check_compiler
    from ..sample.generate import prepare_for_sampling

    options = options.on_device(target)
    if compile:
        check_compiler()
    with Console(stderr=True).status(f"loading {folder} on {target}"):
        bundle = load_bundle(folder, target)
        prepare_for_sampling(bundle, compile)
    return bundle, options


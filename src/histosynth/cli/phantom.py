"""`histosynth phantom`: procedural renal phantom data — slides, patch datasets and label masks.

A phantom is a test bed and a demo, never real tissue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import OptionBlock, ProgressOption, expand_blocks, seed_option

phantom_app = typer.Typer(
    name="phantom",
    help="Procedural H&E-like renal phantom data with exact label masks (a test bed, not real tissue).",
    no_args_is_help=True,
)

MixOption = typer.Option(
    "default", "--mix",
    help="class mix: default (the thesis data's shares), glomeruli-rich, sclerotic-rich, arteries-rich, "
         "dilated-rich, tubuli-rich, atrophic-rich or generating")
SeedOption = seed_option("random seed; the same seed gives the same output")


def phantom_options(
    seed: int = SeedOption,
    mix: str = MixOption,
    mpp: float = typer.Option(0.5, "--mpp", help="microns per pixel"),
    progress: bool = ProgressOption,
) -> dict[str, Any]:
    """The options of every phantom writer, as its keyword arguments."""
    return dict(seed=seed, mix=mix, mpp=mpp, progress=progress)


#: Seed, class mix, resolution and progress bars of `phantom slide`, `phantom patches` and `phantom masks`.
Phantom = OptionBlock(phantom_options)


def phantom_set(item: str, items: str, out: str) -> OptionBlock:
    """--out, --n and --size of a set of phantom ``items`` (each an ``item``) and the :data:`Phantom` options, as
    the keyword arguments of its writer; ``out`` says what goes in the folder."""

    def options(
        out: Path = typer.Option(..., "--out", help=out),
        n: int = typer.Option(200, "--n", help=f"number of {items}"),
        size: int = typer.Option(256, "--size", help=f"{item} side in pixels"),
        phantom: dict = Phantom,
    ) -> dict[str, Any]:
        return dict(out=out, n=n, size=size, **phantom)

    return OptionBlock(options)


PatchSet = phantom_set("patch", "patches", "patch dataset folder (created, or resumed)")
MaskSet = phantom_set("mask", "masks", "folder for mask_NNNNNN.png and masks.csv")


def register(app: typer.Typer) -> None:
    app.add_typer(phantom_app, name="phantom")


@phantom_app.command("slide")
@expand_blocks
def slide(
    out: Path = typer.Option(..., "--out", help="folder for <name>.tif, <name>-mask.tif and <name>.json"),
    size: int = typer.Option(8192, "--size", help="width (and height, unless --height) in pixels"),
    height: Optional[int] = typer.Option(None, "--height", help="height in pixels (default: --size)"),
    phantom: dict = Phantom,
    name: Optional[str] = typer.Option(None, "--name", help="file name stem (default: phantom-<seed>)"),
) -> None:
    """Write a phantom slide and its label-mask slide as pyramidal TIFFs."""
    from ..data.phantom.export import write_phantom_slide

    files = write_phantom_slide(out, width=size, height=height, name=name, **phantom)
    typer.echo(f"wrote {files.image}, {files.mask} and {files.info}")


@phantom_app.command("patches")
@expand_blocks
def patches(
    patch_set: dict = PatchSet,
    slides: Optional[int] = typer.Option(
        None, "--slides",
        help="pseudo-slides to group the patches in (splits are by slide); default n/25, within 5-10"),
    val: float = typer.Option(0.1, "--val", help="share of pseudo-slides for validation"),
    test: float = typer.Option(0.1, "--test", help="share of pseudo-slides for testing"),
) -> None:
    """Write a captioned patch dataset of phantom patches, split by pseudo-slide."""
    from ..data.phantom.export import write_phantom_patches

    dataset = write_phantom_patches(**patch_set, slides=slides, val=val, test=test)
    counts = dataset.manifest["split"].value_counts()
    described = ", ".join(f"{split} {counts.get(split, 0)}" for split in ("train", "val", "test"))
    typer.echo(f"{len(dataset)} patches in {patch_set['out']} ({described})")


@phantom_app.command("masks")
@expand_blocks
def masks(mask_set: dict = MaskSet) -> None:
    """Write phantom label masks (PNG of class ids) with their captions, without images."""
    from ..data.phantom.export import write_phantom_masks

    table = write_phantom_masks(**mask_set)
    typer.echo(f"wrote {mask_set['n']} masks and {table}")


@phantom_app.command("stamp")
def stamp(
    masks: Optional[Path] = typer.Argument(None, help="a label mask PNG or a folder of them"),
    masks_from: Optional[Path] = typer.Option(None, "--masks-from", help="instead: the masks of this patch dataset"),
    split: Optional[str] = typer.Option(None, "--split", help="with --masks-from: only this split (default: all)"),
    n: Optional[int] = typer.Option(
        None, "--n", help="edit this many of the masks, drawn with the seed (default: all)"),
    add: str = typer.Option(..., "--add", help="structures to add to each mask, CLASS=COUNT,...: Glomeruli, "
                            "Sclerotic Glomeruli, Arteries or Dilated Tubuli (e.g. Glomeruli=2)"),
    out: Path = typer.Option(..., "--out", help="folder for the edited masks (the source's file stem or patch "
                             "id .png) and masks.csv"),
    seed: int = SeedOption,
    mpp: float = typer.Option(0.5, "--mpp", help="microns per pixel of the masks (sets the structures' size)"),
) -> None:
    """Edit label masks: draw phantom-sized structures onto their tissue (e.g. add glomeruli to a real layout)."""
    from .. import validation
    from ..data.phantom.stamp import parse_additions, write_stamped_masks
    from ..errors import ConfigError
    from ..schema import RENAL
    from .generate import masks_from_options

    if (masks is None) == (masks_from is None):
        raise ConfigError("give the masks to edit: a file or folder (MASKS), or --masks-from DATASET")
    validation.positive_float(mpp, "--mpp")
    validation.seed(seed)
    additions = parse_additions(add, RENAL)
    chosen = masks_from_options(RENAL, masks, masks_from, split, n, seed)
    table, placed, asked = write_stamped_masks([(m.name, m.source, m.mask) for m in chosen], additions, out,
                                                mpp, seed)
    typer.echo(f"edited {len(chosen)} masks: {placed} of {asked} structures placed "
               f"({asked - placed} found no free tissue); wrote {out} and {table}")

"""`histosynth tile`: whole-slide images (with their label masks or annotations) -> a patch dataset."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import ProgressOption, SchemaOption, schema_from_option


def register(app: typer.Typer) -> None:
    app.command("tile")(tile)


def tile(
    slides: List[Path] = typer.Argument(..., help="slide files (SVS, TIFF, NDPI, MRXS, ...)"),
    out: Path = typer.Option(..., "--out", help="patch dataset folder (created, or resumed)"),
    masks: Optional[List[Path]] = typer.Option(
        None, "--masks", help="label-mask slide of each slide, in order (repeat the option)"),
    annotations: Optional[List[Path]] = typer.Option(
        None, "--annotations", help="QuPath GeoJSON or ASAP XML of each slide, in order (repeat the option)"),
    mpp: float = typer.Option(0.5, "--mpp", help="patch resolution in microns per pixel"),
    size: int = typer.Option(256, "--size", help="patch side in pixels"),
    mpp_override: Optional[List[float]] = typer.Option(
        None, "--mpp-override",
        help="microns per pixel of level 0, replacing the slides' metadata: once for all slides or once per slide"),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="keep patches with at least this tissue share"),
    split_file: Optional[Path] = typer.Option(
        None, "--split-file", help="CSV with columns slide,split (train/val/test); default: a hash of the name"),
    schema: Optional[str] = SchemaOption,
    progress: bool = ProgressOption,
    workers: Optional[int] = typer.Option(
        None, "--workers", help="slides tiled at once, on threads (default: one per CPU, at most one per slide)",
        show_default=False),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="i/n (0 <= i < n, as for generate): tile only part i of n of the slides (in name "
                              "order), e.g. one per machine writing into one --out; give every shard the same slides"),
) -> None:
    """Cut slides into a patch dataset of image/mask PNG pairs with captions; re-runs skip finished slides."""
    from ..data.tiling import SlideInput, TilingOptions, one_per_slide, read_split_file, tile_slides
    from ..parallel import Shard

    part = Shard.parse(shard) if shard is not None else Shard()
    masks_per_slide = one_per_slide(masks, slides, "--masks")
    annotations_per_slide = one_per_slide(annotations, slides, "--annotations")
    overrides = one_per_slide(mpp_override, slides, "--mpp-override", allow_one=True)
    inputs = [SlideInput(slide, mask=m, annotations=a, mpp_override=o)
              for slide, m, a, o in zip(slides, masks_per_slide, annotations_per_slide, overrides, strict=True)]
    result = tile_slides(
        inputs, out, schema_from_option(schema),
        TilingOptions(mpp=mpp, size=size, min_tissue=min_tissue),
        splits=read_split_file(split_file) if split_file else None,
        progress=progress, workers=workers, shard=part,
    )
    for name, count in result.tiled.items():
        typer.echo(f"{name}: {count} patches")
    if result.skipped:
        typer.echo(f"already finished, skipped: {', '.join(result.skipped)}")
    if result.dataset is None:
        typer.echo(f"shard {part} done; other shards have {len(result.waiting)} of {len(inputs)} slides to finish: "
                   f"the shard that finishes last writes {out / 'manifest.csv'} (or re-run without --shard then)")
    else:
        typer.echo(f"{len(result.dataset)} patches in {out}")


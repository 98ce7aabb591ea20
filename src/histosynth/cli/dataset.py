"""`histosynth dataset`: build patch datasets from images that were not cut from slides."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import ProgressOption, SchemaOption, schema_from_option


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Patch datasets from folders of images and masks.", no_args_is_help=True)
    group.command("pair")(pair)
    app.add_typer(group, name="dataset")


def pair(
    images: Path = typer.Argument(..., help="folder of images (e.g. a generation job's images/)"),
    masks: Path = typer.Argument(..., help="folder of label masks in class ids, one per image, same file stem"),
    out: Path = typer.Option(..., "--out", help="patch dataset to write"),
    slide: Optional[str] = typer.Option(None, "--slide", help="pseudo-slide name; default: the image folder's"),
    split: str = typer.Option("train", "--split", help="split of the pairs: train, val or test"),
    schema: Optional[str] = SchemaOption,
    progress: bool = ProgressOption,
) -> None:
    """Pair images with their masks into a patch dataset (captions written from the masks)."""
    from ..data.pairing import pair_dataset
    from ..data.tiling import SPLITS
    from ..errors import ConfigError

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    dataset = pair_dataset(images, masks, out, schema_from_option(schema), slide=slide, split=split,
                           progress=progress)
    typer.echo(f"wrote {len(dataset)} image/mask pairs of {dataset.patch_size} px to {out}")

"""`histosynth caption`: captions of masks and datasets, and levels read from a caption."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..captions import caption_for_mask, parse_caption
from ..errors import HistosynthError
from .common import SchemaOption, schema_from_option


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)


def caption(
    mask: Optional[Path] = typer.Argument(None, help="a label-mask PNG to caption"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="(re)write the captions of a patch dataset"),
    parse: Optional[str] = typer.Option(None, "--parse", help="print the per-class levels a caption states"),
    schema: Optional[str] = SchemaOption,
) -> None:
    """Caption a mask, (re)caption a patch dataset, or parse a caption into levels."""
    chosen = [x is not None for x in (mask, dataset, parse)]
    if sum(chosen) != 1:
        raise HistosynthError("give exactly one of MASK, --dataset DIR or --parse TEXT")
    class_schema = schema_from_option(schema)
    if mask is not None:
        from ..data.masks import read_mask

        typer.echo(caption_for_mask(read_mask(mask, class_schema), class_schema))
    elif dataset is not None:
        from ..data.dataset import recaption_dataset

        changed, total = recaption_dataset(dataset, class_schema)
        typer.echo(f"captioned {total} patches in {dataset} ({changed} changed)")
    else:
        table = Table("class", "level")
        for name, level in parse_caption(parse.replace("\\n", "\n"), class_schema).items():
            table.add_row(name, level.value)
        Console().print(table)

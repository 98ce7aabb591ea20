"""Options and helpers shared by several command groups."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..schema import ClassSchema, load_schema

SchemaOption = typer.Option(
    None, "--schema", help="class schema: 'renal' (default) or a YAML file", show_default=False
)


def schema_from_option(value: Optional[Path | str]) -> ClassSchema:
    return load_schema(value)

"""Evaluation reports: one folder with report.md, a CSV per table and a PNG per plot.

Every table in the Markdown is also written as CSV (full precision), so numbers can be re-used
without parsing Markdown; figures are written next to it and linked from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path, write_text_atomic  # noqa: E402


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN/None shown as an em-dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (index not shown)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(format_value(v, digits) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def mean_sd(values: list[float] | pd.Series, digits: int = 3) -> str:
    """'mean ± sd' of some values (sample sd; a single value is shown alone)."""
    series = pd.Series(values, dtype=float).dropna()
    if series.empty:
        return "—"
    if len(series) == 1:
        return f"{series.iloc[0]:.{digits}f}"
    return f"{series.mean():.{digits}f} ± {series.std(ddof=1):.{digits}f}"


@dataclass
class Report:
    """Builds a report folder section by section; `write` puts report.md in place last."""

    out: Path
    title: str
    blocks: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append("#" * level + " " + text)

    def text(self, text: str) -> None:
        self.blocks.append(text.strip())

    def bullets(self, items: list[str]) -> None:
        self.blocks.append("\n".join(f"- {item}" for item in items))

    def table(self, name: str, frame: pd.DataFrame, caption: str | None = None, digits: int = 3,
              csv_frame: pd.DataFrame | None = None) -> Path:
        """Show `frame` in the Markdown and save `csv_frame` (default: the same) as NAME.csv."""
        path = self.out / f"{name}.csv"
        with atomic_path(path) as tmp:
            (frame if csv_frame is None else csv_frame).to_csv(tmp, index=False)
        self.files.append(path)
        if caption:
            self.blocks.append(f"*{caption}* ([{path.name}]({path.name}))")
        self.blocks.append(markdown_table(frame, digits))
        return path

    def figure(self, name: str, fig: plt.Figure, caption: str) -> Path:
        path = self.out / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
        plt.close(fig)
        self.files.append(path)
        self.blocks.append(f"![{caption}]({path.name})\n\n*{caption}*")
        return path

    def write(self) -> Path:
        path = self.out / "report.md"
        write_text_atomic(path, f"# {self.title}\n\n" + "\n\n".join(self.blocks) + "\n")
        self.files.append(path)
        return path

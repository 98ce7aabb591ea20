"""Pictures people look at: contact sheets of patches with their masks and captions."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path  # noqa: E402
from .schema import RENAL, ClassSchema  # noqa: E402


def short_caption(caption: str, intro: str) -> str:
    """The caption without its intro sentence, one class sentence per line."""
    lines = [line for line in caption.splitlines() if line.strip() and line.strip() != intro]
    return "\n".join(lines) if lines else "(intro only: no captioned class)"


def contact_sheet(images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
                  captions: Sequence[str], path: str | Path, schema: ClassSchema = RENAL,
                  title: str | None = None, columns: int = 4) -> Path:
    """A PNG grid: each cell shows a patch, its colourised mask (if given) and its caption."""
    n = len(images)
    if n == 0:
        raise ValueError("a contact sheet needs at least one image")
    rows = -(-n // columns)
    width = 2.0 if masks is not None else 1.0
    fig, axes = plt.subplots(rows * 2, columns, figsize=(2.6 * width * columns, 3.3 * rows),
                             gridspec_kw={"height_ratios": [2.3, 1.0] * rows}, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, columns)
        panel = images[i] if masks is None else _side_by_side(images[i], schema.colorize(masks[i]))
        axes[2 * r, c].imshow(panel, interpolation="nearest")
        text_ax = axes[2 * r + 1, c]
        wrapped = "\n".join(textwrap.fill(line, int(34 * width))
                            for line in short_caption(captions[i], schema.captions.intro).splitlines())
        text_ax.text(0.0, 1.0, wrapped, va="top", ha="left", fontsize=7.5, transform=text_ax.transAxes)
    if masks is not None:
        _legend(fig, schema)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95 if title else 0.99,
                        bottom=0.04 if masks is not None else 0.01, wspace=0.06, hspace=0.02)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _side_by_side(image: np.ndarray, mask_rgb: np.ndarray, gap: int = 6) -> np.ndarray:
    spacer = np.full((image.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([image, spacer, mask_rgb], axis=1)


def _legend(fig, schema: ClassSchema) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="0.5", label=c.name)
               for c in sorted(schema.classes, key=lambda c: c.id)]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=7, frameon=False)

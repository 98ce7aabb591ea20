"""A segmentation model and its folder on disk.

A segmenter predicts, per pixel, either a class id of its schema (*multi-class*) or whether a pixel
belongs to one target class (*binary*, e.g. Glomeruli: 1 inside, 0 elsewhere). Its folder holds::

    segmenter.json       format, mode, target class, schema, architecture, geometry, training record
    model.safetensors    the network's weights
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelError
from ..io import atomic_path, read_format_json, write_json_atomic
from ..schema import ClassSchema
from .geometry import DEPTH, context_pixels, lost_pixels, size_step
from .unet import ValidUNet

FORMAT = "histosynth.segmenter/1"
CONFIG_FILE = "segmenter.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Architecture:
    """What builds the network; stored in the folder so it can be rebuilt before loading weights."""

    base_channels: int = 64
    depth: int = DEPTH
    batch_norm: bool = True
    in_channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return {"base_channels": self.base_channels, "depth": self.depth,
                "batch_norm": self.batch_norm, "in_channels": self.in_channels}


@dataclass
class Segmenter:
    """A valid-padding U-Net with the meaning of its outputs.

    `target_class` is None for a multi-class segmenter (one logit per id up to the schema's largest)
    and the class id for a binary one (one logit: "is this pixel of the class?").
    """

    schema: ClassSchema
    target_class: int | None = None
    architecture: Architecture = Architecture()
    net: ValidUNet | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_class is not None:
            self.schema.by_id(self.target_class)
        if self.net is None:
            a = self.architecture
            self.net = ValidUNet(a.in_channels, self.out_channels, a.base_channels, a.depth, a.batch_norm)

    @classmethod
    def for_class(cls, schema: ClassSchema, class_name: str | None, **architecture: Any) -> "Segmenter":
        """A new (untrained) segmenter: multi-class for None, binary for a class name."""
        target = None if class_name is None else schema.id_of(class_name)
        return cls(schema=schema, target_class=target, architecture=Architecture(**architecture))

    # --- meaning of the outputs -------------------------------------------------------------
    @property
    def binary(self) -> bool:
        return self.target_class is not None

    @property
    def mode(self) -> str:
        return "binary" if self.binary else "multiclass"

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.schema.num_classes

    @property
    def output_ids(self) -> list[int]:
        """The values a predicted mask can hold."""
        return [0, 1] if self.binary else self.schema.ids

    @property
    def metric_classes(self) -> int:
        """Number of label values the metrics count (2 for binary, the logits axis otherwise)."""
        return 2 if self.binary else self.schema.num_classes

    def describe(self) -> str:
        what = f"binary {self.schema.name_of(self.target_class)!r}" if self.binary else "multi-class"
        return f"{what} segmenter on schema '{self.schema.name}'"

    def labels(self, mask: np.ndarray) -> np.ndarray:
        """A mask in schema ids turned into this segmenter's labels (0/1 for binary)."""
        if self.binary:
            return (np.asarray(mask) == self.target_class).astype(np.uint8)
        return np.asarray(mask, dtype=np.uint8)

    def ids_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits -> (B, H, W) labels; ids outside the schema are never chosen."""
        if self.binary:
            return (logits[:, 0] > 0).to(torch.uint8)
        allowed = torch.full((logits.shape[1],), float("-inf"), device=logits.device, dtype=logits.dtype)
        allowed[self.schema.ids] = 0
        return (logits + allowed[None, :, None, None]).argmax(dim=1).to(torch.uint8)

    def check_schema(self, schema: ClassSchema, what: str) -> None:
        """Refuse a segmenter whose classes differ from those of `what` (a model or a dataset)."""
        check_same_classes(self.schema, schema, what)

    # --- folder ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        depth = self.architecture.depth
        return {
            "format": FORMAT,
            "mode": self.mode,
            "target_class": None if not self.binary else {
                "id": self.target_class, "name": self.schema.name_of(self.target_class)},
            "output_ids": self.output_ids,
            "schema": self.schema.to_dict(),
            "architecture": self.architecture.to_dict(),
            "geometry": {"lost_pixels": lost_pixels(depth), "context_pixels": context_pixels(depth),
                         "valid_size_step": size_step(depth), "padding": "valid"},
            "normalisation": "RGB uint8 / 127.5 - 1 (range [-1, 1])",
            "training": self.training,
        }

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        write_json_atomic(folder / CONFIG_FILE, self.config())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Segmenter":
        folder = Path(folder)
        config = _read_config(folder)
        schema = ClassSchema.from_dict(config["schema"], source=str(folder / CONFIG_FILE))
        target = config["target_class"]["id"] if config.get("mode") == "binary" else None
        try:
            architecture = Architecture(**config["architecture"])
        except TypeError as exc:
            raise ModelError(f"{folder / CONFIG_FILE}: bad 'architecture' ({exc})") from None
        segmenter = cls(schema=schema, target_class=target, architecture=architecture,
                        training=config.get("training", {}))
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelError(f"{folder} has no {WEIGHTS_FILE}; the segmenter folder is incomplete")
        try:
            segmenter.net.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise ModelError(f"{weights} does not fit the architecture in {CONFIG_FILE}: {exc}") from None
        segmenter.net.eval()
        return segmenter


def check_same_classes(segmenter: ClassSchema, schema: ClassSchema, what: str) -> None:
    """Refuse a segmenter's schema whose classes differ from those of `what` (a model or a dataset)."""
    mine = {c.id: c.name for c in segmenter.classes}
    theirs = {c.id: c.name for c in schema.classes}
    if mine != theirs:
        raise ModelError(
            f"the segmenter's classes {mine} differ from those of {what} {theirs}; "
            "use a segmenter trained on the same class schema"
        )


def _read_config(folder: Path) -> dict[str, Any]:
    return read_format_json(
        folder / CONFIG_FILE, FORMAT, ModelError, what="segmenter",
        missing=f"{folder} is not a segmenter folder (no {CONFIG_FILE}); train one with "
                "'histosynth segment train DATASET --out FOLDER'",
    )

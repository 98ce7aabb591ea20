"""Class schemas: which integer ids a label mask holds and what captions call them.

The renal default (:data:`RENAL`) is the eight-class schema of the rat-kidney masks. A user brings
their own as YAML: names, ids, display colours, ids that captions never name, and a remapping of
raw mask ids (for example 15 annotation ids folded onto 8 classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, DataError, describe_validation_error
from .validation import one_line

RGB = tuple[int, int, int]

#: Largest raw id a label mask can hold (16-bit masks); 'remap' sources must lie in 0..MAX_RAW_ID.
MAX_RAW_ID = 65535


class ClassInfo(BaseModel):
    """One class of a schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, le=255, description="integer id of the class in a label mask")
    name: str = Field(min_length=1, description="the name captions use for the class")
    color: RGB = Field(description="display colour (R, G, B), 0-255 each")

    @field_validator("color")
    @classmethod
    def _color_in_range(cls, value: RGB) -> RGB:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must be 0-255, got {value}")
        return value


class CaptionRules(BaseModel):
    """The caption template's free parts: the intro sentence and the level thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    intro: str = "This image showcases various types of tissue structures found in renal tissue."
    medium_from: float = Field(0.2, gt=0, lt=1, description="prevalence at which 'low' becomes 'medium'")
    high_from: float = Field(0.4, gt=0, le=1, description="prevalence at which 'medium' becomes 'high'")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "CaptionRules":
        if not self.medium_from < self.high_from:
            raise ValueError(
                f"medium_from ({self.medium_from}) must be below high_from ({self.high_from})"
            )
        return self


class ClassSchema(BaseModel):
    """Ids, names, colours and caption rules of the classes a label mask can hold."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "custom"
    classes: tuple[ClassInfo, ...] = Field(min_length=1)
    uncaptioned_ids: tuple[int, ...] = Field(
        (0,), description="ids never named in a caption (background, glass)"
    )
    remap: dict[int, int] = Field(
        default_factory=dict, description="raw mask id -> class id, applied when masks are read"
    )
    captions: CaptionRules = CaptionRules()

    @model_validator(mode="after")
    def _consistent(self) -> "ClassSchema":
        ids = [c.id for c in self.classes]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"class ids must be unique; repeated: {duplicated}")
        names = [c.name.lower() for c in self.classes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"class names must be unique (ignoring case); repeated: {repeated}")
        unknown = sorted(set(self.uncaptioned_ids) - set(ids))
        if unknown:
            raise ValueError(f"uncaptioned_ids {unknown} are not ids of any class")
        bad_sources = sorted(s for s in self.remap if not 0 <= s <= MAX_RAW_ID)
        if bad_sources:
            raise ValueError(f"remap sources {bad_sources} cannot occur in a mask: raw ids are 0-{MAX_RAW_ID}")
        bad_targets = sorted({t for t in self.remap.values() if t not in ids})
        if bad_targets:
            raise ValueError(f"remap targets {bad_targets} are not ids of any class")
        return self

    # --- lookups -------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        return sorted(c.id for c in self.classes)

    @property
    def captioned_ids(self) -> list[int]:
        """Ids a caption may name, in the ascending order captions list them."""
        return [i for i in self.ids if i not in self.uncaptioned_ids]

    @property
    def num_classes(self) -> int:
        """Size of a one-hot / logits axis: the largest id plus one."""
        return max(self.ids) + 1

    def by_id(self, class_id: int) -> ClassInfo:
        for c in self.classes:
            if c.id == class_id:
                return c
        raise ConfigError(f"class id {class_id} is not in schema '{self.name}' (ids: {self.ids})")

    def name_of(self, class_id: int) -> str:
        return self.by_id(class_id).name

    def id_of(self, name: str) -> int:
        """The id of a class given its caption name (case-insensitive)."""
        wanted = name.strip().lower()
        for c in self.classes:
            if c.name.lower() == wanted:
                return c.id
        known = ", ".join(repr(c.name) for c in sorted(self.classes, key=lambda c: c.id))
        raise ConfigError(f"unknown class name {name!r}; schema '{self.name}' has {known}")

    # --- masks ---------------------------------------------------------------------------
    def apply_remap(self, raw: np.ndarray, source: str = "mask") -> np.ndarray:
        """Map raw mask ids onto class ids and check that every id belongs to the schema."""
        raw = np.asarray(raw)
        if raw.ndim != 2:
            raise DataError(f"{source}: a label mask must be 2-D (H, W), got shape {raw.shape}")
        if raw.dtype == bool:  # a 1-bit image
            raw = raw.astype(np.uint8)
        if raw.dtype.kind not in "ui" or (raw.dtype.kind == "i" and raw.size and raw.min() < 0):
            raise DataError(f"{source}: a label mask holds whole class ids from 0, got {raw.dtype} values; "
                            "save it as an 8- or 16-bit greyscale PNG of ids")
        if self.remap and raw.size:
            lut = np.arange(max(256, int(raw.max()) + 1), dtype=np.int64)
            for src, dst in self.remap.items():
                if src < lut.size:
                    lut[src] = dst
            raw = lut[raw]
        self.check_mask(raw, source)
        return raw.astype(np.uint8)

    def check_mask(self, mask: np.ndarray, source: str = "mask") -> None:
        self._refuse_unknown(_present_ids(np.asarray(mask)), source)

    def class_counts(self, mask: np.ndarray, source: str = "mask") -> np.ndarray:
        """Pixels of each id 0 .. num_classes - 1 in `mask`, once every id in it is checked to be the schema's."""
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            self.check_mask(mask, source)
            return np.bincount(mask.ravel().astype(np.int64), minlength=self.num_classes)[:self.num_classes]
        counts = np.bincount(mask.ravel(), minlength=max(256, self.num_classes))  # one pass: ids and counts
        self._refuse_unknown(np.flatnonzero(counts), source)
        return counts[:self.num_classes]

    def _refuse_unknown(self, present: np.ndarray, source: str) -> None:
        unknown = sorted(set(present.tolist()) - set(self.ids))
        if unknown:
            raise DataError(
                f"{source}: mask ids {unknown} are not in schema '{self.name}' (ids {self.ids}); "
                "add them to the schema's classes or map them with 'remap'"
            )

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """An RGB picture of a label mask in the schema's display colours."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        for c in self.classes:
            lut[c.id] = c.color
        return lut[np.asarray(mask, dtype=np.uint8)]

    # --- files ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "schema") -> "ClassSchema":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClassSchema":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"schema file {path} does not exist; write one or use the default 'renal'")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {one_line(exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with a 'classes' list at the top level")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["remap"] = {int(k): v for k, v in data["remap"].items()}
        return data


RENAL = ClassSchema(
    name="renal",
    classes=(
        ClassInfo(id=0, name="white background", color=(255, 255, 255)),
        ClassInfo(id=1, name="Arteries", color=(220, 20, 60)),
        ClassInfo(id=2, name="Atrophic Tubuli", color=(255, 165, 0)),
        ClassInfo(id=3, name="Tubuli", color=(30, 144, 255)),
        ClassInfo(id=4, name="Glomeruli", color=(50, 205, 50)),
        ClassInfo(id=5, name="Sclerotic Glomeruli", color=(148, 0, 211)),
        ClassInfo(id=6, name="other kidney tissue", color=(240, 200, 210)),
        ClassInfo(id=7, name="Dilated Tubuli", color=(0, 206, 209)),
    ),
    uncaptioned_ids=(0,),
)

#: Mean pixel share of each renal class in the thesis' rat-kidney data (thesis §4.1.3).
RENAL_PIXEL_SHARES: dict[int, float] = {
    0: 0.0037, 1: 0.0001, 2: 0.0271, 3: 0.4418, 4: 0.0121, 5: 0.0219, 6: 0.3760, 7: 0.1172,
}


def load_schema(spec: str | Path | ClassSchema | None) -> ClassSchema:
    """A schema from a name ('renal'), a YAML path, or a schema; None gives the renal default."""
    if spec is None or isinstance(spec, ClassSchema):
        return spec or RENAL
    if str(spec).lower() == "renal":
        return RENAL
    return ClassSchema.from_yaml(spec)


def _present_ids(mask: np.ndarray) -> np.ndarray:
    """The distinct values of a mask, sorted; 8-bit masks by a histogram, ~20x faster than ``np.unique``."""
    if mask.dtype == np.uint8:
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    return np.unique(mask)

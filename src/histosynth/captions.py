"""Captions from label masks, and the levels read back from a caption.

prevalence(c) = pixels of class c / all pixels of the mask (background included in the
denominator). A prevalence p > 0 is *low* below 0.2, *medium* from 0.2 and *high* from 0.4. A
caption is the schema's intro sentence followed by one sentence per present, captioned class in
ascending id order, one sentence per line. A caption a user writes (or a captions file holds) is
parsed and rewritten in that canonical form, the form a model was trained on. Pure functions over
numpy.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CaptionError, ConfigError, DataError
from .schema import RENAL, ClassSchema


class Level(str, Enum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return list(Level).index(self)


TEMPLATES: dict[Level, str] = {
    Level.LOW: "The image shows a low amount of {name}.",
    Level.MEDIUM: "The prevalence of {name} is medium.",
    Level.HIGH: "There is a lot of {name} visible in the image.",
}

_SENTENCE_PATTERNS: list[tuple[Level, re.Pattern[str]]] = [
    (level, re.compile("^" + re.escape(t).replace(re.escape("{name}"), "(?P<name>.+?)") + "$"))
    for level, t in TEMPLATES.items()
]

#: The caption every evaluation of the thesis generated from.
GENERATING_CAPTION = (
    "This image showcases various types of tissue structures found in renal tissue.\n"
    "The prevalence of Tubuli is medium.\n"
    "There is a lot of Glomeruli visible in the image."
)

#: Classifier-free guidance's unconditional caption.
UNCONDITIONAL_CAPTION = ""


def prevalences(mask: np.ndarray, schema: ClassSchema = RENAL) -> dict[int, float]:
    """Share of the mask's pixels held by each class id of the schema (all ids, zeros included)."""
    mask = np.asarray(mask)
    if mask.size == 0:
        raise CaptionError("cannot caption an empty mask")
    counts = schema.class_counts(mask)
    return {i: float(counts[i]) / mask.size for i in schema.ids}


def level_of(prevalence: float, schema: ClassSchema = RENAL) -> Level:
    rules = schema.captions
    if prevalence <= 0:
        return Level.NONE
    if prevalence < rules.medium_from:
        return Level.LOW
    if prevalence < rules.high_from:
        return Level.MEDIUM
    return Level.HIGH


def prevalence_levels(mask: np.ndarray, schema: ClassSchema = RENAL) -> dict[str, Level]:
    """Level of every captioned class (by name), none for absent ones."""
    return levels_of_shares(prevalences(mask, schema), schema)


def levels_of_shares(shares: Mapping[int, float], schema: ClassSchema = RENAL) -> dict[str, Level]:
    """Level of every captioned class (by name) from its pixel share (as :func:`prevalences` gives them)."""
    return {schema.name_of(i): level_of(shares[i], schema) for i in schema.captioned_ids}


def caption_from_levels(levels: Mapping[str, Level | str], schema: ClassSchema = RENAL) -> str:
    """The caption that states the given per-class levels (classes not given are absent)."""
    by_id: dict[int, Level] = {}
    for name, level in levels.items():
        class_id = _captioned_id(name, schema)
        by_id[class_id] = _as_level(level, name)
    lines = [schema.captions.intro]
    for class_id in schema.captioned_ids:
        level = by_id.get(class_id, Level.NONE)
        if level is not Level.NONE:
            lines.append(TEMPLATES[level].format(name=schema.name_of(class_id)))
    return "\n".join(lines)


def caption_for_mask(mask: np.ndarray, schema: ClassSchema = RENAL) -> str:
    """The caption of a label mask under the schema's rules."""
    return caption_from_levels(prevalence_levels(mask, schema), schema)


def caption_for_shares(shares: Mapping[int, float], schema: ClassSchema = RENAL) -> str:
    """The caption of a label mask with these pixel shares (:func:`prevalences`), without counting them again."""
    return caption_from_levels(levels_of_shares(shares, schema), schema)


def parse_caption(caption: str, schema: ClassSchema = RENAL) -> dict[str, Level]:
    """Per-class levels stated by a caption; every captioned class not mentioned is none.

    Sentences may be separated by newlines or spaces. The empty (unconditional) caption states
    nothing. An unknown sentence, an unknown class or a class named twice is an error quoting it.
    """
    levels = {schema.name_of(i): Level.NONE for i in schema.captioned_ids}
    seen: set[str] = set()
    for sentence in _sentences(caption):
        if sentence == schema.captions.intro:
            continue
        level, name = _match_sentence(sentence)
        canonical = schema.name_of(_captioned_id(name, schema, sentence))
        if canonical in seen:
            raise CaptionError(f"the caption names {canonical!r} twice (again in {sentence!r})")
        seen.add(canonical)
        levels[canonical] = level
    return levels


def parse_levels_option(text: str, schema: ClassSchema = RENAL) -> dict[str, Level]:
    """Levels from the command-line form ``Glomeruli=high,Tubuli=medium``."""
    levels: dict[str, Level] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise CaptionError(f"expected NAME=LEVEL in {item!r} (e.g. 'Glomeruli=high')")
        name, level = (s.strip() for s in item.split("=", 1))
        levels[schema.name_of(_captioned_id(name, schema))] = _as_level(level, name)
    return levels


def canonical_caption(text: str, schema: ClassSchema) -> str:
    """The caption in the form the model was trained on; the empty caption stays empty."""
    text = text.replace("\\n", "\n").strip()
    if not text:
        return UNCONDITIONAL_CAPTION
    return caption_from_levels(parse_caption(text, schema), schema)


def caption_for_levels(levels: str | Mapping[str, Level | str], schema: ClassSchema) -> str:
    """The caption (thesis §4.1.4) of levels given as ``Glomeruli=high,Tubuli=medium`` or a mapping."""
    if isinstance(levels, str):
        levels = parse_levels_option(levels, schema)
    return caption_from_levels(levels, schema)


def read_captions_file(path: str | Path, schema: ClassSchema) -> list[str]:
    """Captions from a text file, one per line (sentences separated by spaces or a literal ``\\n``).

    Blank lines are skipped. A line that does not parse is an error naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read captions file {path}: {exc.__class__.__name__}: {exc}") from None
    captions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            captions.append(canonical_caption(line, schema))
        except CaptionError as exc:
            raise CaptionError(f"{path}, line {number}: {exc}") from None
    if not captions:
        raise DataError(f"captions file {path} holds no caption; write one caption per line")
    return captions


def _sentences(caption: str) -> list[str]:
    parts = re.split(r"(?<=\.)\s+|\n+", caption.strip())
    return [p.strip() for p in parts if p.strip()]


def _match_sentence(sentence: str) -> tuple[Level, str]:
    for level, pattern in _SENTENCE_PATTERNS:
        match = pattern.match(sentence)
        if match:
            return level, match.group("name")
    raise CaptionError(
        f"unknown sentence {sentence!r}: a caption holds the intro sentence and sentences of the "
        f"forms {', '.join(repr(t) for t in TEMPLATES.values())}"
    )


def _captioned_id(name: str, schema: ClassSchema, context: str | None = None) -> int:
    try:
        class_id = schema.id_of(name)
    except ConfigError as exc:
        where = f" in {context!r}" if context else ""
        raise CaptionError(f"{exc}{where}") from None
    if class_id in schema.uncaptioned_ids:
        raise CaptionError(f"class {name!r} is never named in captions (uncaptioned id {class_id})")
    return class_id


def _as_level(level: Level | str, name: str) -> Level:
    if isinstance(level, Level):
        return level
    try:
        return Level(str(level).strip().lower())
    except ValueError:
        raise CaptionError(
            f"unknown level {level!r} for {name!r}; use one of none, low, medium, high"
        ) from None

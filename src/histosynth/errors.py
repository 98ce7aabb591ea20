"""User-facing errors.

Every mistake a user can make (a missing file, an unknown class, a wrong mask size, a bad config
field) raises a subclass of :class:`HistosynthError` whose message says what was wrong and what to
do. The CLI prints the message without a traceback and exits non-zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class HistosynthError(Exception):
    """Base class of every error caused by input the user can fix."""

    exit_code = 2


class ConfigError(HistosynthError):
    """A schema, preset or option has a bad value; the message names the field."""


class DataError(HistosynthError):
    """A slide, mask, image, annotation file or dataset cannot be used as given."""


class CaptionError(HistosynthError):
    """A caption cannot be parsed, or names a class or level that does not exist."""


class ModelError(HistosynthError):
    """A model folder or checkpoint is missing a part or does not fit its configuration."""


class JobError(HistosynthError):
    """A generation or training job conflicts with what is already on disk."""


def describe_validation_error(exc: ValidationError) -> str:
    """A pydantic error on one line, naming each bad field: ``field 'unet.lr': message; ...`` (an error of the
    fields together, such as two that do not fit each other, is its message alone)."""
    parts = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in err["loc"])
        parts.append(f"field '{field}': {message}" if field else message)
    return "; ".join(parts)

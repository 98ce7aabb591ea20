"""Checks of single numbers given by a user (options, config fields), each failing with one line.

A NaN slips past every check written as "refuse if x < low" (each comparison with it is false),
and an infinity passes "x > 0"; either then travels far before something breaks, often after hours
of work. These helpers refuse them where the number enters, naming the option or field.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Optional, Sequence

from .errors import ConfigError, HistosynthError

#: Largest seed a user may give: the range that every generator here accepts (numpy's, torch's,
#: scikit-learn's random_state) is [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
#: Largest seed of one generated image: a job derives each image's seed from the job seed and the
#: image's index as a 63-bit hash (:func:`histosynth.sample.jobs.item_seed`), which torch's and
#: numpy's generators take whole.
MAX_IMAGE_SEED = 2**63 - 1


def finite_float(value: float, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False,
                 error: type[HistosynthError] = ConfigError) -> float:
    """``value`` as a float when it is finite and within [low, high] (open ends where asked)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{name} must be a finite number, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise error(f"{name} must be {'above' if low_open else 'at least'} {low:g}, got {value!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise error(f"{name} must be {'below' if high_open else 'at most'} {high:g}, got {value!r}")
    return number


def positive_float(value: float, name: str, error: type[HistosynthError] = ConfigError) -> float:
    """A finite number above 0."""
    return finite_float(value, name, low=0, low_open=True, error=error)


def share(value: float, name: str, error: type[HistosynthError] = ConfigError) -> float:
    """A finite number in [0, 1] (a probability or a share)."""
    return finite_float(value, name, low=0, high=1, error=error)


def int_at_least(value: int, name: str, low: int, high: Optional[int] = None,
                 error: type[HistosynthError] = ConfigError) -> int:
    """An integer (not a bool; numpy's integers too) in [low, high], as an int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low:
        raise error(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise error(f"{name} must be at most {high}, got {value}")
    return value


def positive_int(value: int, name: str, error: type[HistosynthError] = ConfigError) -> int:
    """An integer of at least 1."""
    return int_at_least(value, name, 1, error=error)


def seed(value: int, name: str = "--seed", error: type[HistosynthError] = ConfigError, *,
         high: int = MAX_SEED) -> int:
    """A seed: a whole number in [0, ``high``]; by default one every random generator takes, [0, 2**32 - 1]."""
    return int_at_least(value, name, 0, high, error=error)


def one_of(value: str, choices: Sequence[str], name: str, error: type[HistosynthError] = ConfigError) -> str:
    """One of ``choices`` (a word from a fixed list)."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def one_line(message: object) -> str:
    """A library's message (YAML's, JSON's) with its line breaks and indentation folded into spaces."""
    return " ".join(str(message).split())

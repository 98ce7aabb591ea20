"""Finding image files given as files and/or folders."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def with_numbered_subfolders(folder: str | Path) -> list[Path]:
    """A folder and its numbered sub-folders (00000/, 00001/, ...: how a generation job stores its images and
    masks), in order."""
    folder = Path(folder)
    numbered = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    return [folder, *numbered]


def list_images_of_job_folder(folder: str | Path) -> list[Path]:
    """The images of a folder and of its numbered sub-folders, sorted; an error if there are none."""
    return list_images(with_numbered_subfolders(folder))


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (sorted, not recursively) in the given folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if is_image_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return found

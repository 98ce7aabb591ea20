"""Build a real-vs-synthetic survey folder from two folders of images.

A survey folder holds::

    survey.json        what participants may see: title, image size and format, the questions in
                       their (shuffled) order, each with an opaque image id
    answer_key.json    the truth and the source file of every question — read by the server and by
                       `analyze`, never sent to a participant
    images/<id>.png    every image re-encoded the same way (or <id>.jpg with --format jpeg)
    responses.sqlite   the answers, created by `histosynth survey serve`

Nothing in what a participant receives may reveal whether an image is real: every image is decoded,
stripped of all metadata (EXIF, ICC profiles, text chunks), converted to 8-bit RGB, cropped to a
centred square, resized to one size and written by one encoder with one setting. Ids are random,
and the question order is a seeded shuffle of both groups together.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import track

from ..data.images import is_image_file
from ..errors import ConfigError, DataError, JobError

FORMAT = "histosynth.survey/1"
SURVEY_FILE = "survey.json"
KEY_FILE = "answer_key.json"
IMAGES_DIR = "images"
RESPONSES_FILE = "responses.sqlite"

REAL = "real"
SYNTHETIC = "synthetic"
LABELS = (REAL, SYNTHETIC)

ImageFormat = Literal["png", "jpeg"]
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
FILE_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}


@dataclass(frozen=True)
class Question:
    """One survey question: its 1-based number in the shown order and its opaque image id."""

    number: int
    image_id: str


@dataclass(frozen=True)
class Survey:
    """The participant-safe part of a survey folder (no truth in here)."""

    root: Path
    title: str
    image_size: int
    image_format: ImageFormat
    questions: tuple[Question, ...]

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_format]

    def image_path(self, question: Question) -> Path:
        return self.root / IMAGES_DIR / f"{question.image_id}{FILE_SUFFIXES[self.image_format]}"

    @property
    def responses_path(self) -> Path:
        return self.root / RESPONSES_FILE


@dataclass(frozen=True)
class SourceImage:
    path: Path
    truth: str


def build_survey(
    real: str | Path,
    synthetic: str | Path,
    out: str | Path,
    n_real: int = 20,
    n_synthetic: int = 20,
    seed: int = 0,
    size: int = 256,
    image_format: ImageFormat = "png",
    jpeg_quality: int = 90,
    title: str = "Real or synthetic?",
    progress: bool = True,
) -> tuple[Survey, list[str]]:
    """Pick, re-encode and shuffle the images into a new survey folder `out`.

    `real` and `synthetic` are folders of images (searched recursively) or patch datasets. Returns the
    survey and a list of warnings about differences between the groups that re-encoding cannot hide
    (different source sizes or formats). The folder appears only once complete.
    """
    _check_options(n_real, n_synthetic, size, image_format, jpeg_quality, title)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(f"{out} already exists; choose another --out or delete it")
    rng = np.random.default_rng(seed)
    chosen = _pick(list_images(real), n_real, REAL, "--real", rng) + _pick(
        list_images(synthetic), n_synthetic, SYNTHETIC, "--synthetic", rng
    )
    order = rng.permutation(len(chosen))
    ids = _opaque_ids(len(chosen), rng)
    sources = [chosen[i] for i in order]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        (staging / IMAGES_DIR).mkdir()
        key_rows = []
        steps = zip(range(1, len(sources) + 1), ids, sources)
        for number, image_id, source in track(steps, total=len(sources), description="re-encoding",
                                               disable=not progress, transient=True):
            encoded, original = reencode(source.path, size, image_format, jpeg_quality)
            (staging / IMAGES_DIR / f"{image_id}{FILE_SUFFIXES[image_format]}").write_bytes(encoded)
            key_rows.append({"number": number, "id": image_id, "truth": source.truth,
                             "source": str(source.path.resolve()), **original})
        public = {
            "format": FORMAT, "title": title, "image_size": size, "image_format": image_format,
            "questions": [{"number": row["number"], "id": row["id"]} for row in key_rows],
        }
        key = {"format": FORMAT, "seed": seed, "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
               "questions": key_rows}
        (staging / SURVEY_FILE).write_text(json.dumps(public, indent=2) + "\n")
        (staging / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return open_survey(out), group_differences(key_rows)


def _check_options(n_real: int, n_synthetic: int, size: int, image_format: str, jpeg_quality: int,
                   title: str) -> None:
    if n_real < 1 or n_synthetic < 1:
        raise ConfigError("--n-real and --n-synthetic must each be at least 1")
    if not 16 <= size <= 4096:
        raise ConfigError(f"--size {size} is out of range; give 16 to 4096 pixels")
    if image_format not in MEDIA_TYPES:
        raise ConfigError(f"--format {image_format!r} is unknown; use 'png' or 'jpeg'")
    if not 1 <= jpeg_quality <= 95:
        raise ConfigError(f"--jpeg-quality {jpeg_quality} is out of range; give 1 to 95")
    if not title.strip() or len(title) > 200:
        raise ConfigError("--title must be 1 to 200 characters")


def list_images(folder: str | Path) -> list[Path]:
    """The images of a folder (recursively, sorted), or the images of a patch dataset (not its masks)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    if (folder / "dataset.json").is_file():
        from ..data.dataset import open_dataset

        return [folder / rel for rel in open_dataset(folder).manifest["image"]]
    return sorted(
        p for p in folder.rglob("*")
        if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _pick(paths: list[Path], n: int, truth: str, option: str, rng: np.random.Generator) -> list[SourceImage]:
    if len(paths) < n:
        raise DataError(
            f"the {option} folder has {len(paths)} images but {option.replace('--', '--n-')} asks for {n}; "
            "add images or ask for fewer"
        )
    picked = sorted(rng.choice(len(paths), size=n, replace=False))
    return [SourceImage(paths[i], truth) for i in picked]


def _opaque_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct random 128-bit hex ids; they say nothing about the image behind them."""
    ids: list[str] = []
    while len(ids) < n:
        candidate = rng.bytes(16).hex()
        if candidate not in ids:
            ids.append(candidate)
    return ids


def reencode(path: Path, size: int, image_format: ImageFormat, jpeg_quality: int = 90) -> tuple[bytes, dict]:
    """Decode an image and encode it anew: RGB, centred square, `size` px, no metadata at all.

    Returns the encoded bytes and a record of the original (format, width, height) for the key.
    """
    try:
        with Image.open(path) as img:
            original = {"source_format": img.format or "unknown", "source_width": img.width,
                        "source_height": img.height}
            pixels = _to_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path} cannot be read as an image ({exc}); remove it or replace it") from None
    pixels = ImageOps.fit(pixels, (size, size), method=Image.Resampling.LANCZOS) \
        if pixels.size != (size, size) else pixels
    # A fresh image holding only the pixels: nothing of the source's info dict can travel along.
    clean = Image.frombytes("RGB", pixels.size, pixels.tobytes())
    buffer = io.BytesIO()
    if image_format == "png":
        clean.save(buffer, format="PNG", compress_level=6)
    else:
        clean.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
    return buffer.getvalue(), original


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited onto white, as a viewer would show it."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        scaled = np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return img.convert("RGB")


def group_differences(key_rows: list[dict]) -> list[str]:
    """Warnings about source properties that differ between the real and the synthetic group.

    Re-encoding gives every image the same format and size, but resizing or recompressing one group
    more than the other leaves traces in the pixels that a careful rater may learn to see.
    """
    warnings = []
    for field, what in (("source_format", "file formats"), ("size", "sizes")):
        seen = {truth: sorted({_describe(row, field) for row in key_rows if row["truth"] == truth})
                for truth in LABELS}
        if seen[REAL] != seen[SYNTHETIC]:
            warnings.append(
                f"real and synthetic source images differ in {what} (real: {', '.join(seen[REAL])}; "
                f"synthetic: {', '.join(seen[SYNTHETIC])}); re-encoding treats the groups differently, "
                "which can leave visible traces — give both groups alike sources if you can"
            )
    return warnings


def _describe(row: dict, field: str) -> str:
    if field == "size":
        return f"{row['source_width']}x{row['source_height']}"
    return str(row[field])


def open_survey(root: str | Path) -> Survey:
    """Read a survey folder's public description; errors say what is missing."""
    root = Path(root)
    data = _read_json(root, SURVEY_FILE)
    try:
        questions = tuple(Question(int(q["number"]), str(q["id"])) for q in data["questions"])
        survey = Survey(root=root, title=str(data["title"]), image_size=int(data["image_size"]),
                        image_format=data["image_format"], questions=questions)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{root / SURVEY_FILE} is malformed ({exc!r}); rebuild the survey") from None
    if [q.number for q in questions] != list(range(1, len(questions) + 1)) or survey.image_format not in MEDIA_TYPES:
        raise DataError(f"{root / SURVEY_FILE} is malformed (question numbers or image format); rebuild the survey")
    return survey


def read_answer_key(root: str | Path) -> list[str]:
    """The truth of every question, in question order (index 0 is question 1)."""
    root = Path(root)
    rows = _read_json(root, KEY_FILE).get("questions", [])
    truths = [row.get("truth") for row in sorted(rows, key=lambda row: row.get("number", 0))]
    if not truths or any(t not in LABELS for t in truths):
        raise DataError(f"{root / KEY_FILE} is malformed; rebuild the survey")
    return truths


def _read_json(root: Path, name: str) -> dict:
    path = root / name
    if not path.is_file():
        raise DataError(f"{root} is not a survey folder (no {name}); create one with 'histosynth survey build'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); rebuild the survey") from None

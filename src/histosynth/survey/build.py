"""Build a real-vs-synthetic survey folder from two folders of images.

A survey folder holds::

    survey.json        what participants may see: title, image size and format, the questions in
                       their (shuffled) order, each with an opaque image id, whether every
                       participant gets their own order, and which 1-5 rating each answer asks for
    answer_key.json    the truth and the source file of every question — read by the server and by
                       `analyze`, never sent to a participant
    images/<id>.png    every image re-encoded the same way (or <id>.jpg with --format jpeg)
    responses.sqlite   the answers (and invitations), created by `build --participants` or `serve`

Nothing in what a participant receives may reveal whether an image is real: every image is decoded,
stripped of all metadata (EXIF, ICC profiles, text chunks), converted to 8-bit RGB, cropped to a
centred square, resized to one size and written by one encoder with one setting, then padded with
random bytes to the size of the survey's largest file, so that no file's length says how well its
content compressed. The seed decides only which images are picked and their order; ids come from the
system's secure random source, so replaying the seed does not map ids to the answer key.

By default every participant is shown the questions in their own order, drawn from the secure random
source when they start (:func:`participant_order`) and stored with their answers, so that learning,
fatigue and image-to-image contrast effects average out over readers; a fixed-order survey shows
everyone the seeded order, as the thesis' form did. A survey may ask, with each answer, for a 1-5
rating: how confident the reader is, or where the image lies between "definitely real" and
"definitely synthetic" (its midpoint, "unsure", is no real/synthetic answer). Ratings give every
reader an ROC curve rather than one hit rate.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import track

from ..data.images import is_image_file
from ..errors import ConfigError, DataError, JobError
from ..io import remove_partial_files

FORMAT = "histosynth.survey/1"
SURVEY_FILE = "survey.json"
KEY_FILE = "answer_key.json"
IMAGES_DIR = "images"
RESPONSES_FILE = "responses.sqlite"

REAL = "real"
SYNTHETIC = "synthetic"
LABELS = (REAL, SYNTHETIC)

ImageFormat = Literal["png", "jpeg"]
OrderMode = Literal["per-participant", "fixed"]
RatingMode = Literal["confidence", "scale"]
RATINGS = range(1, 6)
# The words of each rating scale (shown on the question page and in the report).
RATING_WORDS = {
    "confidence": {1: "Guessing", 2: "Unsure", 3: "Fairly sure", 4: "Sure", 5: "Certain"},
    "scale": {1: "Definitely real", 2: "Probably real", 3: "Unsure", 4: "Probably synthetic",
              5: "Definitely synthetic"},
}
SCALE_MIDPOINT = 3
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
FILE_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}

# Seeds are non-negative (numpy refuses others) and fit a signed 64-bit integer, so the answer key's
# JSON reads back the same in any tool; invitations get a generous cap.
MAX_SEED = 2**63 - 1
MAX_PARTICIPANTS = 100_000
# A private, ancillary, safe-to-copy PNG chunk type: every decoder skips it.
PADDING_CHUNK = b"paDd"
_PNG_END = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


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
    order: OrderMode = "fixed"
    rating: RatingMode | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_format]

    def image_path(self, question: Question) -> Path:
        return self.root / IMAGES_DIR / f"{question.image_id}{FILE_SUFFIXES[self.image_format]}"

    @property
    def responses_path(self) -> Path:
        return self.root / RESPONSES_FILE


def participant_order(survey: Survey) -> list[int] | None:
    """A new participant's question order from the secure random source (None: the survey's order)."""
    if survey.order == "fixed":
        return None
    numbers = [q.number for q in survey.questions]
    secrets.SystemRandom().shuffle(numbers)
    return numbers


def scale_answer(rating: int) -> str | None:
    """The answer a real-to-synthetic scale rating gives: 1-2 real, 4-5 synthetic, 3 none ("unsure")."""
    if rating == SCALE_MIDPOINT:
        return None
    return REAL if rating < SCALE_MIDPOINT else SYNTHETIC


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
    seed: int | None = None,
    size: int = 256,
    image_format: ImageFormat = "png",
    jpeg_quality: int = 90,
    title: str = "Real or synthetic?",
    participants: int = 0,
    progress: bool = True,
    fixed_order: bool = False,
    rating: RatingMode | None = None,
) -> tuple[Survey, list[str]]:
    """Pick, re-encode and shuffle the images into a new survey folder `out`.

    `real` and `synthetic` are folders of images (searched recursively) or patch datasets. `seed`
    decides which images are picked and their order (None: a random seed, recorded in the answer key;
    whoever knows the seed can rebuild the key, so keep it as private as the key). `participants`
    invitations are minted into the responses database (see :mod:`.store`). `fixed_order`: everyone
    sees the seeded order (default: each participant their own). `rating`: ask with each answer for a
    1-5 "confidence" or a "scale" from definitely real to definitely synthetic. Returns the survey and a
    list of warnings about differences between the groups that re-encoding cannot hide (different
    source sizes or formats). The folder appears only once complete.
    """
    _check_options(n_real, n_synthetic, seed, size, image_format, jpeg_quality, title, participants, rating)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(f"{out} already exists; choose another --out or delete it")
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    rng = np.random.default_rng(seed)
    chosen = _pick(list_images(real), n_real, REAL, "--real", rng) + _pick(
        list_images(synthetic), n_synthetic, SYNTHETIC, "--synthetic", rng
    )
    order = rng.permutation(len(chosen))
    ids = _opaque_ids(len(chosen))
    sources = [chosen[i] for i in order]

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out)  # the staging folder of a build that was killed
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        (staging / IMAGES_DIR).mkdir()
        key_rows, encoded = [], []
        steps = zip(range(1, len(sources) + 1), ids, sources, strict=True)
        for number, image_id, source in track(steps, total=len(sources), description="re-encoding",
                                               disable=not progress, transient=True):
            data, original = reencode(source.path, size, image_format, jpeg_quality)
            encoded.append(data)
            key_rows.append({"number": number, "id": image_id, "truth": source.truth,
                             "source": str(source.path.resolve()), **original})
        for image_id, data in zip(ids, equal_sizes(encoded, image_format), strict=True):
            (staging / IMAGES_DIR / f"{image_id}{FILE_SUFFIXES[image_format]}").write_bytes(data)
        public = {
            "format": FORMAT, "title": title, "image_size": size, "image_format": image_format,
            "questions": [{"number": row["number"], "id": row["id"]} for row in key_rows],
            "order": "fixed" if fixed_order else "per-participant", "rating": rating,
        }
        key = {"format": FORMAT, "seed": seed, "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
               "questions": key_rows}
        (staging / SURVEY_FILE).write_text(json.dumps(public, indent=2) + "\n")
        (staging / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
        if participants:
            from .store import SurveyStore

            SurveyStore(staging / RESPONSES_FILE).mint_invites(participants)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return open_survey(out), group_differences(key_rows)


def _check_options(n_real: int, n_synthetic: int, seed: int | None, size: int, image_format: str,
                   jpeg_quality: int, title: str, participants: int, rating: str | None) -> None:
    if n_real < 1 or n_synthetic < 1:
        raise ConfigError("--n-real and --n-synthetic must each be at least 1")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed} is out of range; give 0 to {MAX_SEED}, or leave it out for a random one")
    if not 0 <= participants <= MAX_PARTICIPANTS:
        raise ConfigError(f"--participants {participants} is out of range; give 0 to {MAX_PARTICIPANTS}")
    if not 16 <= size <= 4096:
        raise ConfigError(f"--size {size} is out of range; give 16 to 4096 pixels")
    if image_format not in MEDIA_TYPES:
        raise ConfigError(f"--format {image_format!r} is unknown; use 'png' or 'jpeg'")
    if not 1 <= jpeg_quality <= 95:
        raise ConfigError(f"--jpeg-quality {jpeg_quality} is out of range; give 1 to 95")
    if not title.strip() or len(title) > 200:
        raise ConfigError("--title must be 1 to 200 characters")
    if rating is not None and rating not in RATING_WORDS:
        raise ConfigError(f"--rating {rating!r} is unknown; use 'none', 'confidence' or 'scale'")


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


def _opaque_ids(n: int) -> list[str]:
    """n distinct random 128-bit hex ids; they say nothing about the image behind them.

    They come from the secure random source, not the seed: with seeded ids, a participant who
    guessed the seed could replay the build and read each id's truth.
    """
    ids: list[str] = []
    while len(ids) < n:
        candidate = secrets.token_hex(16)
        if candidate not in ids:
            ids.append(candidate)
    return ids


def equal_sizes(images: list[bytes], image_format: ImageFormat) -> list[bytes]:
    """The encoded images padded with random bytes to one common length (unchanged if already equal).

    An encoded file's length follows how well its content compresses, which differs between real
    and synthetic images; one length for all leaves the size of a download saying nothing. The
    padding is random so that a compressing proxy cannot shrink it back to the content's size.
    A PNG gets one private ancillary chunk before IEND (every PNG the same layout); a JPEG gets the
    bytes after its end-of-image marker, where decoders stop reading.
    """
    if len({len(data) for data in images}) <= 1:
        return list(images)
    if image_format == "png":
        target = max(len(data) for data in images) + 12
        return [_pad_png(data, target) for data in images]
    target = max(len(data) for data in images)
    return [data + secrets.token_bytes(target - len(data)) for data in images]


def _pad_png(data: bytes, target: int) -> bytes:
    if not data.endswith(_PNG_END):
        raise DataError("a survey image is not a complete PNG; rebuild the survey")
    body = secrets.token_bytes(target - len(data) - 12)
    chunk = struct.pack(">I", len(body)) + PADDING_CHUNK + body + struct.pack(">I", zlib.crc32(PADDING_CHUNK + body))
    return data[:-len(_PNG_END)] + chunk + _PNG_END


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
        # A survey built before per-participant orders and ratings showed one order and asked no rating.
        survey = Survey(root=root, title=str(data["title"]), image_size=int(data["image_size"]),
                        image_format=data["image_format"], questions=questions,
                        order=data.get("order", "fixed"), rating=data.get("rating"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{root / SURVEY_FILE} is malformed ({exc!r}); rebuild the survey") from None
    if ([q.number for q in questions] != list(range(1, len(questions) + 1)) or survey.image_format not in MEDIA_TYPES
            or survey.order not in ("fixed", "per-participant") or survey.rating not in (None, *RATING_WORDS)):
        raise DataError(f"{root / SURVEY_FILE} is malformed (question numbers, image format, order or rating); "
                        "rebuild the survey")
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

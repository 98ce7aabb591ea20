"""A generation job: a manifest of items in an output folder, shared out over processes, resumable.

Layout of the output folder::

    manifest.json    the job (model id, captions, number of images, job seed, sampling options and
                     precision, size, batch size) and one record per image: index, file, caption, seed, steps,
                     guidance, scheduler (and eta when not 0), model id, size
    00000.png ...    the images: plain RGB PNGs with no metadata (the record is in the manifest,
                     not in the image, which may be shown to survey raters)

Everything an image depends on is fixed by the manifest. Item i has caption ``captions[i % k]`` and
the seed :func:`item_seed` (job seed, i), so its noise and its text context are the same wherever it
is made. What remains is float32 rounding in batched network kernels, which depends on the batch's
shape and on an item's place in it (at most a level on a few pixels in ten thousand). A job
therefore also fixes its batches: batch b holds items b*B ... b*B + B - 1 (B = the job's batch size;
the last batch is filled up with copies of its last item), and every run computes a batch whole.

* sharding: shard i of n (``--shard i/n``, or torchrun's RANK / WORLD_SIZE) makes the batches whose
  index is i modulo n - with batch size 1, the items whose index is i modulo n. One command scales
  from a laptop to many GPUs and nodes, and the images are the bytes a single process writes (on
  the same kind of device and thread count);
* resuming: images are written atomically (temporary name, then rename), so an image file exists
  only once complete; running the same job again recomputes only the batches with a missing image
  and writes only the missing images. Temporary files left by a killed process are removed by the
  next run of the same shard.

A job generated from label masks (a mask-conditioned model) keeps them as training pairs::

    manifest.json    as above; the job lists each mask's source and digest, and each item records
                     its ``mask`` file, ``mask_source`` and ``mask_guidance``
    images/00000.png ...   the images
    masks/00000.png ...    the masks that conditioned them (uint8 class ids), same stems

Image i is made from mask i (one image per mask, of the mask's size). The masks are written into
the folder when the job is created, and every run reads them from there (checked against their
digests), so a job resumes and shards from its folder alone.

A folder that holds another job's manifest (other captions, masks, seeds, options, size or batch
size), or image files without a manifest, is refused, and nothing in it is touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import validation
from ..data.dataset import read_image
from ..errors import ConfigError, JobError
from ..io import write_json_atomic, write_png_atomic
from ..models.bundle import Bundle
from .generate import (
    DEFAULT_BATCH_SIZE,
    CaptionEmbeddings,
    ImagesDone,
    SamplingOptions,
    check_caption_conditioning,
    check_fits_in_memory,
    generate_batches,
    generation_record,
    image_latent_size,
    sampling_options,
)
from .large import Size, as_size
from .masks import ConditioningMask, check_masks_fit

MANIFEST_FILE = "manifest.json"
#: sub-folders of a job generated from masks: images and the masks that made them, same file names
IMAGES_DIR, MASKS_DIR = "images", "masks"
FORMAT = "histosynth.generation-job"
FORMAT_VERSION = 1


def item_seed(job_seed: int, index: int) -> int:
    """The seed of item ``index`` of a job: a 63-bit hash of (job seed, index).

    Hashing (numpy's SeedSequence) rather than ``job_seed + index`` keeps jobs with nearby seeds
    from sharing images.
    """
    high, low = np.random.SeedSequence([int(job_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) | (int(low) >> 1)


@dataclass(frozen=True)
class Shard:
    """Which batches this process makes: those whose index is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count} does not exist; use i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """A shard from ``"i/n"``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard expects i/n such as 0/4, got {text!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls, environ: Optional[dict[str, str]] = None) -> "Shard":
        """torchrun's RANK / WORLD_SIZE when set, else the whole job."""
        environ = os.environ if environ is None else environ
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        return cls()

    def takes(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides a job's images, down to the bytes."""

    model_id: str
    captions: tuple[str, ...]
    n: int
    seed: int
    options: SamplingOptions
    size: Size
    batch_size: int = DEFAULT_BATCH_SIZE
    masks: tuple[str, ...] = ()  # digest of the mask of each image (a job from masks)
    mask_sources: tuple[str, ...] = field(default=(), compare=False)  # where each came from, for the record

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"the number of images must be at least 1, got {self.n}")
        validation.seed(self.seed, "the job seed")
        if not self.captions:
            raise ConfigError("a job needs at least one caption")
        if self.masks and len(self.masks) != self.n:
            raise ConfigError(f"a job from masks makes one image per mask: {len(self.masks)} masks, n = {self.n}")
        if not self.masks:  # without masks the mask guidance plays no part in the images
            object.__setattr__(self, "options", replace(self.options, mask_guidance=SamplingOptions.mask_guidance))
        if self.batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, got {self.batch_size}")
        # A batch larger than the job would only compute copies.
        object.__setattr__(self, "batch_size", min(self.batch_size, self.n))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "n": self.n,
            "seed": self.seed,
            "steps": self.options.steps,
            "guidance": self.options.guidance,
            "scheduler": self.options.scheduler,
            **({"eta": self.options.eta} if self.options.eta else {}),
            "precision": self.options.precision,
            "height": self.size[0],
            "width": self.size[1],
            "batch_size": self.batch_size,
            "captions": list(self.captions),
            **({"mask_guidance": self.options.mask_guidance,
                "masks": [{"source": source, "digest": digest}
                          for source, digest in zip(self.mask_sources, self.masks, strict=True)]}
               if self.masks else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        options = SamplingOptions.from_dict({"precision": "fp32", **data})  # jobs that record none ran in fp32
        masks = data.get("masks", [])
        return cls(data["model_id"], tuple(data["captions"]), data["n"], data["seed"], options,
                   (data["height"], data["width"]), data["batch_size"], tuple(m["digest"] for m in masks),
                   tuple(m["source"] for m in masks))

    def items(self) -> list[dict[str, Any]]:
        """One record per image, with its index and file name (and its mask's, from masks)."""
        digits = max(5, len(str(self.n - 1)))
        items = []
        for index in range(self.n):
            caption = self.captions[index % len(self.captions)]
            record = generation_record(caption, item_seed(self.seed, index), self.options, self.model_id, self.size,
                                       masked=bool(self.masks))
            name = f"{index:0{digits}d}.png"
            if self.masks:
                items.append({"index": index, "file": f"{IMAGES_DIR}/{name}", "mask": f"{MASKS_DIR}/{name}",
                              "mask_source": self.mask_sources[index], **record})
            else:
                items.append({"index": index, "file": name, **record})
        return items


@dataclass
class Job:
    """A job's folder and manifest."""

    folder: Path
    spec: JobSpec
    items: list[dict[str, Any]]

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_FILE

    @classmethod
    def create_or_resume(cls, folder: str | Path, spec: JobSpec) -> "Job":
        """The job in ``folder``: written there if new, checked against the manifest if present."""
        folder = Path(folder)
        job = cls(folder, spec, spec.items())
        if not job.manifest_path.exists():
            clashes = [item["file"] for item in job.items if (folder / item["file"]).exists()]
            # (re-checked: a shard starting at the same moment may have just written the manifest)
            if clashes and not job.manifest_path.exists():
                raise JobError(
                    f"{folder} holds image files but no {MANIFEST_FILE} (e.g. {clashes[0]}); "
                    "choose an empty output folder"
                )
            if not clashes:
                # Shards starting together all write the same manifest; the last rename wins harmlessly.
                write_json_atomic(job.manifest_path, {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "job": spec.to_dict(),
                    "items": job.items,
                })
                return job
        existing = cls.read(folder)
        if existing.spec != spec:
            raise JobError(
                f"{folder} holds another job's manifest (it differs in {_differences(existing.spec, spec)}); "
                f"choose another output folder, or delete {job.manifest_path} to start over"
            )
        return existing

    @classmethod
    def read(cls, folder: str | Path) -> "Job":
        """The job whose manifest is in ``folder``."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise JobError(f"{folder} holds no generation job ({MANIFEST_FILE} not found)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"{path} cannot be read ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise JobError(f"{path} is not a histosynth generation manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise JobError(
                f"{path} has manifest version {manifest.get('format_version')}; this histosynth "
                f"reads version {FORMAT_VERSION}"
            )
        return cls(folder, JobSpec.from_dict(manifest["job"]), manifest["items"])

    def batch_of(self, item_index: int) -> int:
        return item_index // self.spec.batch_size

    @property
    def image_folders(self) -> list[Path]:
        """The folders the images go to (the job folder, or its images/ for a job from masks)."""
        return sorted({(self.folder / item["file"]).parent for item in self.items})

    def finished(self) -> list[dict[str, Any]]:
        """Records of the images that exist."""
        present = self._present()
        return [item for item in self.items if item["file"] in present]

    def missing(self, shard: Shard = Shard()) -> list[dict[str, Any]]:
        """The shard's items whose image does not exist yet."""
        present = self._present()
        return [item for item in self.items
                if shard.takes(self.batch_of(item["index"])) and item["file"] not in present]

    def _present(self) -> set[str]:
        """Names of the files in the image folders, relative to the job folder (as items name them)."""
        return {(folder / name).relative_to(self.folder).as_posix()
                for folder in self.image_folders for name in _file_names(folder)}

    def write_masks(self, masks: Sequence[ConditioningMask]) -> None:
        """Store the conditioning masks in the folder (those not there yet), one per item."""
        if not masks:  # a job without masks
            return
        for item, mask in zip(self.items, masks, strict=True):
            path = self.folder / item["mask"]
            if not path.exists():
                write_png_atomic(path, mask.mask.astype(np.uint8))

    def read_masks(self, items: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """The stored masks of ``items``, checked against the digests the job was made with."""
        masks = []
        for item in items:
            path = self.folder / item["mask"]
            if not path.is_file():
                raise JobError(f"{path} is missing; run the job again with its masks (--mask / --masks-from)")
            mask = ConditioningMask(str(path), read_image(path, mode=None))
            if mask.digest != self.spec.masks[item["index"]]:
                raise JobError(f"{path} is not the mask the job was made with "
                               f"({self.spec.mask_sources[item['index']]}); restore it or start another job")
            masks.append(mask.mask)
        return masks

    def shard_size(self, shard: Shard) -> int:
        """How many items the shard makes in all."""
        return sum(shard.takes(self.batch_of(item["index"])) for item in self.items)

    def batches_to_run(self, shard: Shard) -> list[list[dict[str, Any]]]:
        """The shard's batches that lack an image, each whole, in order."""
        wanted = sorted({self.batch_of(item["index"]) for item in self.missing(shard)})
        size = self.spec.batch_size
        return [self.items[b * size:(b + 1) * size] for b in wanted]

    def remove_partial_files(self, shard: Shard) -> int:
        """Delete temporary image files a killed run of this shard left behind; returns how many."""
        removed = 0
        for folder in self.image_folders:
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                file = _partial_target(path.name)
                if file is not None and file[:-4].isdigit() and shard.takes(self.batch_of(int(file[:-4]))):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _partial_target(name: str) -> Optional[str]:
    """The image a temporary file of ``write_png_atomic`` was meant to become (``.00012.png.x.part.png``)."""
    if not (name.startswith(".") and name.endswith(".part.png") and ".png." in name):
        return None
    return name[1:].split(".png.")[0] + ".png"


def _file_names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()


def _differences(old: JobSpec, new: JobSpec) -> str:
    before, after = old.to_dict(), new.to_dict()
    changed = []
    for key in dict.fromkeys([*before, *after]):
        if before.get(key) != after.get(key):
            changed.append(key if key in ("captions", "masks") else
                           f"{key}: {before.get(key)} there, {after.get(key)} here")
    return "; ".join(changed)


@dataclass(frozen=True)
class JobRun:
    """What one run of one shard did."""

    shard: Shard
    items: int     # items of the shard
    existing: int  # already there when the run started
    written: int


def run_job(
    bundle: Bundle,
    job: Job,
    shard: Shard = Shard(),
    progress: Optional[ImagesDone] = None,
) -> JobRun:
    """Make the shard's missing images of ``job`` with ``bundle``; ``progress(k)`` after each batch.

    Images larger than the model's patches use the default windows (see :mod:`.large`), so that the
    manifest alone decides every image.
    """
    if bundle.id != job.spec.model_id:
        raise JobError(
            f"{job.folder} is a job of model {job.spec.model_id}, not of {bundle.id} ({bundle.path}); "
            "use that model or another output folder"
        )
    job.remove_partial_files(shard)
    missing = {item["file"] for item in job.missing(shard)}
    batches = job.batches_to_run(shard)
    if batches:
        spec = job.spec
        todo = [item for batch in batches for item in batch]
        made = generate_batches(
            bundle, [item["caption"] for item in todo], [item["seed"] for item in todo], spec.options,
            batch_size=spec.batch_size, size=spec.size,
            embeddings=CaptionEmbeddings.for_bundle(bundle, spec.captions),
            masks=job.read_masks(todo) if spec.masks else None,
        )
        for items, result in zip(batches, made, strict=True):
            wanted = [(item, image) for item, image in zip(items, result.images, strict=True)
                      if item["file"] in missing]
            for item, image in wanted:
                write_png_atomic(job.folder / item["file"], image)
            if progress is not None:
                progress(len(wanted))
    total = job.shard_size(shard)
    return JobRun(shard, total, total - len(missing), len(missing))


def new_job(folder: str | Path, bundle: Bundle, captions: Sequence[str], n: Optional[int], seed: int,
            options: Optional[SamplingOptions] = None, size: Optional[int | Size] = None,
            batch_size: Optional[int] = None, masks: Optional[Sequence[ConditioningMask]] = None) -> Job:
    """Create (or resume) the job of ``n`` images of ``captions`` (cycled) from ``bundle`` in ``folder``.

    With ``masks``, one image per mask, of the masks' size (``n`` and ``size`` must be None or agree)
    and the masks are stored in the folder. ``options`` default to the model's own.
    ``batch_size`` defaults to the batch size of the job already in ``folder``, else 8.
    """
    options = sampling_options(bundle, options)
    if masks is not None:
        mask_size = check_masks_fit(bundle, masks)
        if size is not None and as_size(size) != mask_size:
            raise ConfigError(f"images from masks have the masks' size ({mask_size[1]}x{mask_size[0]} px); "
                              "leave out the size")
        if n is not None and n != len(masks):
            raise ConfigError(f"one image is made per mask: {len(masks)} masks, but {n} images were asked for")
        size, n = mask_size, len(masks)
    check_caption_conditioning(bundle, captions)
    size = as_size(bundle.image_size if size is None else size)
    image_latent_size(bundle, size)  # an impossible size is refused before the folder is touched
    if batch_size is None:
        batch_size = _existing_batch_size(Path(folder)) or DEFAULT_BATCH_SIZE
    masks = list(masks or [])
    spec = JobSpec(bundle.id, tuple(captions), n if n is not None else len(captions), seed, options, size,
                   batch_size, tuple(m.digest for m in masks), tuple(m.source for m in masks))
    check_fits_in_memory(bundle, size, spec.batch_size)
    job = Job.create_or_resume(folder, spec)
    job.write_masks(masks)
    return job


def is_job_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a generation job (its manifest)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def _existing_batch_size(folder: Path) -> Optional[int]:
    if not is_job_folder(folder):
        return None
    return Job.read(folder).spec.batch_size

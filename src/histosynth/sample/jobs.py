"""A generation job: a small description in an output folder, its items derived from it, shared out over
processes, resumable, of any size up to millions of images.

Layout of the output folder::

    job.json           the job (model id, captions, number of images, job seed, sampling options and
                       precision, size, batch size) and where its images go: a few hundred bytes,
                       whatever the number of images (a job from masks also lists its masks)
    records/shard-0-of-2.jsonl ...
                       what each shard finished: one line per batch, appended once its images are on
                       disk (see :mod:`.writing`)
    00000/00000.png ...  the images, 1000 to a folder (item i in folder i // 1000): plain RGB PNGs with
                       no metadata (the record is in the job, not in the image, which may be shown to
                       survey raters)
    manifest.jsonl     written by ``histosynth jobs merge``: one record per finished image - index,
                       file, caption, seed, steps, guidance, scheduler (and eta when not 0), model
                       id, size

No list of items is stored: item i has caption ``captions[i % k]`` and the seed :func:`item_seed`
(job seed, i), so its noise and its text context are the same wherever it is made, and its record
(:meth:`Job.item`) is derived when asked for. What remains is float32 rounding in batched network
kernels, which depends on the batch's shape and on an item's place in it (at most a level on a few
pixels in ten thousand). A job therefore also fixes its batches: batch b holds items b*B ... b*B +
B - 1 (B = the job's batch size; the last batch is filled up with copies of its last item), and
every run computes a batch whole.

* sharding: shard i of n (``--shard i/n``, or torchrun's RANK / WORLD_SIZE) makes the batches whose
  index is i modulo n - with batch size 1, the items whose index is i modulo n. One command scales
  from a laptop to many GPUs and nodes, and the images are the bytes a single process writes (on
  the same kind of device and thread count);
* resuming: the records say what is finished, so starting or resuming a shard reads its job
  description and the records, never lists the images: its cost does not grow with the number of
  images still to make or the folders they fill. Running the same job again recomputes only the
  batches with an unrecorded image and writes only those images. Temporary files a killed process
  left are removed when its shard writes into their folder again. An image deleted after it was
  recorded is made again by a run with ``check_files`` (``--check-files``), which lists the folders.

A job generated from label masks (a mask-conditioned model) keeps them as training pairs::

    job.json, records/  as above; the job lists each mask's source and digest, and each item records
                     its ``mask`` file, ``mask_source`` and ``mask_guidance``
    images/00000/00000.png ...   the images
    masks/00000/00000.png ...    the masks that conditioned them (uint8 class ids), same names

Image i is made from mask i (one image per mask, of the mask's size). The masks are written into
the folder when the job is created, and every run reads them from there (checked against their
digests), so a job resumes and shards from its folder alone.

A job made by histosynth before job.json (``manifest.json``: the job and one record per image, the
images in one flat folder) resumes as it is: its manifest is read, its layout kept, and the image
files present count as finished besides the records.

A folder that holds another job (other captions, masks, seeds, options, size or batch size), or image
files without a job, is refused, and nothing in it is touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .. import validation
from ..data.dataset import read_image
from ..errors import ConfigError, JobError
from ..io import atomic_path, partial_target, write_json_atomic, write_png_atomic
from ..models.bundle import Bundle
from ..parallel import Shard  # noqa: F401  (the shard of a job; imported from here by the commands)
from .generate import (
    DEFAULT_BATCH_SIZE,
    CaptionEmbeddings,
    Generated,
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
from .writing import DEFAULT_WRITERS, ImageWriter, RecordFile, read_records

JOB_FILE = "job.json"
#: the job and every item's record, in one file: jobs of histosynth's first job format
LEGACY_MANIFEST = "manifest.json"
#: what ``histosynth jobs merge`` writes: one JSON line per finished image
MERGED_MANIFEST = "manifest.jsonl"
RECORDS_DIR = "records"
#: sub-folders of a job generated from masks: images and the masks that made them, same file names
IMAGES_DIR, MASKS_DIR = "images", "masks"
FORMAT = "histosynth.generation-job"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
#: images per sub-folder of a new job
IMAGES_PER_FOLDER = 1000


def item_seed(job_seed: int, index: int) -> int:
    """The seed of item ``index`` of a job: a 63-bit hash of (job seed, index).

    Hashing (numpy's SeedSequence) rather than ``job_seed + index`` keeps jobs with nearby seeds
    from sharing images.
    """
    high, low = np.random.SeedSequence([int(job_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) | (int(low) >> 1)


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


@dataclass(frozen=True)
class Layout:
    """Where a job's item files go: sub-folders of ``per_folder`` images, or one flat folder (None: jobs of
    the first format). File names are the item index, zero-padded to the width of the largest."""

    n: int
    per_folder: Optional[int] = IMAGES_PER_FOLDER

    @property
    def flat(self) -> bool:
        return self.per_folder is None

    def file(self, index: int, kind: str = "") -> str:
        """Item ``index``'s file relative to the job folder (under ``kind``: images/ or masks/)."""
        name = f"{index:0{_digits(self.n)}d}.png"
        if self.per_folder is not None:
            name = f"{index // self.per_folder:0{_digits(self.n // self.per_folder + 1)}d}/{name}"
        return f"{kind}/{name}" if kind else name

    def index_of(self, relative: str, kind: str = "") -> Optional[int]:
        """The item whose file is ``relative`` (as :meth:`file` names it), else None."""
        stem = relative.rsplit("/", 1)[-1].removesuffix(".png")
        if not stem.isdigit() or int(stem) >= self.n:
            return None
        return int(stem) if self.file(int(stem), kind) == relative else None

    def to_dict(self) -> dict[str, Any]:
        return {"images_per_folder": self.per_folder}


def _digits(count: int) -> int:
    return max(5, len(str(max(count - 1, 0))))


@dataclass(frozen=True)
class ShardState:
    """Where a shard of a job stands: its items, those finished, and the batches still to make."""

    shard: Shard
    items: int            # the shard's items
    existing: int         # of those, finished
    todo: np.ndarray      # numbers of the shard's batches with an unfinished item, ascending
    finished: np.ndarray  # n booleans: which items of the job are finished

    @property
    def missing(self) -> int:
        return self.items - self.existing


class JobItems(SequenceABC):
    """A job's item records, derived on demand (a job of millions lists none of them)."""

    def __init__(self, job: "Job"):
        self._job = job

    def __len__(self) -> int:
        return self._job.spec.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self._job.item(i) for i in range(*key.indices(len(self)))]
        index = range(len(self))[key]
        return self._job.item(index)


@dataclass
class Job:
    """A job's folder, description and layout."""

    folder: Path
    spec: JobSpec
    layout: Layout

    @property
    def description_path(self) -> Path:
        return self.folder / (LEGACY_MANIFEST if self.layout.flat else JOB_FILE)

    @classmethod
    def create_or_resume(cls, folder: str | Path, spec: JobSpec) -> "Job":
        """The job in ``folder``: written there if new, checked against its description if present."""
        folder = Path(folder)
        if not is_job_folder(folder):
            clash = _first_clash(folder)
            if clash is None:
                job = cls(folder, spec, Layout(spec.n))
                # Shards starting together all write the same description; the last rename wins harmlessly.
                write_json_atomic(job.description_path, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                         "job": spec.to_dict(), "layout": job.layout.to_dict()})
                return job
            # (re-checked: a shard starting at the same moment may have just written the description)
            if not is_job_folder(folder):
                raise JobError(f"{folder} holds image files but no {JOB_FILE} (e.g. {clash}); "
                               "choose an empty output folder")
        existing = cls.read(folder)
        if existing.spec != spec:
            raise JobError(
                f"{folder} holds another job (its {existing.description_path.name} differs in "
                f"{_differences(existing.spec, spec)}); choose another output folder, or delete "
                f"{existing.description_path} to start over"
            )
        return existing

    @classmethod
    def read(cls, folder: str | Path) -> "Job":
        """The job in ``folder`` (a job.json, or the manifest.json of the first job format)."""
        folder = Path(folder)
        if (folder / JOB_FILE).is_file():
            path, version = folder / JOB_FILE, FORMAT_VERSION
        elif (folder / LEGACY_MANIFEST).is_file():
            path, version = folder / LEGACY_MANIFEST, LEGACY_FORMAT_VERSION
        else:
            raise JobError(f"{folder} holds no generation job ({JOB_FILE} not found)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"{path} cannot be read ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise JobError(f"{path} is not a histosynth generation job")
        if data.get("format_version") != version:
            raise JobError(f"{path} has job format version {data.get('format_version')}; this histosynth reads "
                           f"version {version} in {path.name}: upgrade histosynth to read it")
        spec = JobSpec.from_dict(data["job"])
        per_folder = data["layout"]["images_per_folder"] if version == FORMAT_VERSION else None
        return cls(folder, spec, Layout(spec.n, per_folder))

    # --- items ---------------------------------------------------------------------------------------
    def item(self, index: int) -> dict[str, Any]:
        """Item ``index``'s record: its index, file name (and its mask's, from masks) and generation record."""
        spec = self.spec
        caption = spec.captions[index % len(spec.captions)]
        record = generation_record(caption, item_seed(spec.seed, index), spec.options, spec.model_id, spec.size,
                                   masked=bool(spec.masks))
        if spec.masks:
            return {"index": index, "file": self.layout.file(index, IMAGES_DIR),
                    "mask": self.layout.file(index, MASKS_DIR), "mask_source": spec.mask_sources[index], **record}
        return {"index": index, "file": self.layout.file(index), **record}

    @property
    def items(self) -> JobItems:
        """Every item's record, derived on demand: ``job.items[i]``, ``len(job.items)``, iteration."""
        return JobItems(self)

    @property
    def image_kind(self) -> str:
        """The sub-folder of the images: images/ in a job from masks, else none."""
        return IMAGES_DIR if self.spec.masks else ""

    # --- what is finished ------------------------------------------------------------------------------
    def finished_mask(self, check_files: bool = False) -> np.ndarray:
        """Which items are finished, as n booleans: those recorded (``check_files``: whose image is also on
        disk). In a job of the first format an image file present counts as finished too, as it did then."""
        spec = self.spec
        whole, items = read_records(self.folder / RECORDS_DIR)
        batches = np.zeros(self.batch_count, dtype=bool)
        batches[whole[(whole >= 0) & (whole < self.batch_count)]] = True
        finished = np.repeat(batches, spec.batch_size)[:spec.n]
        finished[items[(items >= 0) & (items < spec.n)]] = True
        if check_files or self.layout.flat:
            present = np.zeros(spec.n, dtype=bool)
            present[self.present_indices()] = True
            if not self.layout.flat:
                return finished & present
            return present if check_files else finished | present
        return finished

    def finished_indices(self, check_files: bool = False) -> np.ndarray:
        """Sorted indices of the finished items (see :meth:`finished_mask`)."""
        return np.flatnonzero(self.finished_mask(check_files))

    def present_indices(self) -> np.ndarray:
        """Sorted indices of the items whose image file exists (lists every image folder)."""
        root = self.folder / self.image_kind
        folders = [root] if self.layout.flat else [root / name for name in sorted(_file_names(root))
                                                   if name.isdigit()]
        found = []
        for folder in folders:
            prefix = folder.relative_to(self.folder).as_posix()
            for name in _file_names(folder):
                index = self.layout.index_of(f"{prefix}/{name}" if prefix != "." else name, self.image_kind)
                if index is not None:
                    found.append(index)
        return np.unique(np.asarray(found, dtype=np.int64))

    def finished(self, check_files: bool = False) -> list[dict[str, Any]]:
        """Records of the finished images, in index order (``check_files``: see :meth:`finished_mask`)."""
        return [self.item(int(i)) for i in self.finished_indices(check_files)]

    def missing(self, shard: Shard = Shard()) -> list[dict[str, Any]]:
        """Records of the shard's items not finished yet, in index order."""
        state = self.state(shard)
        return [self.item(i) for b in state.todo for i in self.batch_items(int(b)) if not state.finished[i]]

    # --- batches and shards ----------------------------------------------------------------------------
    @property
    def batch_count(self) -> int:
        return -(-self.spec.n // self.spec.batch_size)

    def batch_items(self, batch: int) -> range:
        """The indices of the items of batch ``batch``."""
        size = self.spec.batch_size
        return range(batch * size, min((batch + 1) * size, self.spec.n))

    def state(self, shard: Shard = Shard(), check_files: bool = False,
              finished: Optional[np.ndarray] = None) -> ShardState:
        """Where ``shard`` stands, from the records (``check_files``: and the image files on disk), or from
        ``finished`` (:meth:`finished_mask`) when the caller has read them."""
        finished = self.finished_mask(check_files) if finished is None else finished
        size, count = self.spec.batch_size, self.batch_count
        padded = np.zeros(count * size, dtype=bool)
        padded[:self.spec.n] = finished
        done = padded.reshape(count, size).sum(axis=1)
        batches = np.arange(count)
        sizes = np.minimum(size, self.spec.n - batches * size)
        mine = batches % shard.count == shard.index
        todo = batches[mine & (done < sizes)]
        return ShardState(shard, int(sizes[mine].sum()), int(done[mine].sum()), todo, finished)

    def record_path(self, shard: Shard) -> Path:
        """The record ``shard`` appends to."""
        return self.folder / RECORDS_DIR / f"shard-{shard.index}-of-{shard.count}.jsonl"

    def record_shard_counts(self) -> list[int]:
        """The shard counts (n of i/n) that runs of this job have used, from the names of their records."""
        counts = set()
        for name in _file_names(self.folder / RECORDS_DIR):
            parts = name.removesuffix(".jsonl").split("-")
            if len(parts) == 4 and parts[0] == "shard" and parts[3].isdigit():
                counts.add(int(parts[3]))
        return sorted(counts)

    def remove_partial_files(self, folder: Path, shard: Shard) -> int:
        """Delete the temporary image files in ``folder`` that a killed run of ``shard`` left; returns how many."""
        removed = 0
        prefix = folder.relative_to(self.folder).as_posix()
        for name in _file_names(folder):
            target = partial_target(name)
            index = None if target is None else self.layout.index_of(
                f"{prefix}/{target}" if prefix != "." else target, self.image_kind)
            if index is not None and shard.takes(index // self.spec.batch_size):
                (folder / name).unlink(missing_ok=True)
                removed += 1
        return removed

    # --- masks -------------------------------------------------------------------------------------------
    def write_masks(self, masks: Sequence[ConditioningMask]) -> None:
        """Store the conditioning masks in the folder (those not there yet), one per item."""
        for index, mask in enumerate(masks):
            path = self.folder / self.layout.file(index, MASKS_DIR)
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

    # --- the single manifest -------------------------------------------------------------------------------
    def merge(self) -> tuple[Path, int]:
        """Write manifest.jsonl, one record per finished image in index order; returns it and the count."""
        path = self.folder / MERGED_MANIFEST
        finished = self.finished_indices()
        with atomic_path(path) as tmp, open(tmp, "w") as out:
            for index in finished:
                out.write(json.dumps(self.item(int(index))) + "\n")
        return path, len(finished)


def _first_clash(folder: Path) -> Optional[str]:
    """A name in ``folder`` that a new job's files would collide with: an image, or a folder a job writes."""
    for name in sorted(_file_names(folder)):
        if name.lower().endswith(".png") or name in (IMAGES_DIR, MASKS_DIR, RECORDS_DIR) or name.isdigit():
            return name
    return None


def _file_names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()


#: The ``generate`` option that sets each setting of a job's description (``--size`` sets both sides).
_OPTION_OF_SETTING = {"seed": "--seed", "steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler",
                      "eta": "--eta", "precision": "--precision", "batch_size": "--batch-size",
                      "mask_guidance": "--mask-guidance", "n": "--n"}


def _differences(old: JobSpec, new: JobSpec) -> str:
    """What differs, each setting with the option that continues the job in the folder (``--precision fp32``):
    a job started on one device and continued on another differs in its precision unless it is named."""
    before, after = old.to_dict(), new.to_dict()
    changed = []
    for key in dict.fromkeys([*before, *after]):
        if before.get(key) != after.get(key):
            option = _OPTION_OF_SETTING.get(key)
            hint = f" ({option} {before[key]} continues it)" if option and key in before else ""
            changed.append(key if key in ("captions", "masks") else
                           f"{key}: {before.get(key)} there, {after.get(key)} here{hint}")
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
    *,
    state: Optional[ShardState] = None,
    check_files: bool = False,
    writers: int = DEFAULT_WRITERS,
) -> JobRun:
    """Make the shard's missing images of ``job`` with ``bundle``; ``progress(k)`` as images are recorded.

    ``state`` is where the shard stands if the caller already asked (:meth:`Job.state`).
    ``check_files`` also makes again recorded images whose file is gone (it lists every image folder).
    ``writers`` threads encode and write the PNGs while the next batch is sampled (see :mod:`.writing`).
    Images larger than the model's patches use the default windows (see :mod:`.large`), so that the
    job alone decides every image.
    """
    if bundle.id != job.spec.model_id:
        raise JobError(
            f"{job.folder} is a job of model {job.spec.model_id}, not of {bundle.id} ({bundle.path}); "
            "use that model or another output folder"
        )
    state = state or job.state(shard, check_files)
    written = 0
    if len(state.todo):
        with RecordFile(job.record_path(shard)) as record, ImageWriter(record, writers, done=progress) as writer:
            for batch, files in _sampled_batches(bundle, job, state):
                writer.submit(batch, files, whole=len(files) == len(job.batch_items(batch)))
        written = writer.written
    return JobRun(shard, state.items, state.existing, written)


def _sampled_batches(bundle: Bundle, job: Job, state: ShardState) -> Iterator[tuple[int, list]]:
    """(batch number, [(index, path, image) of its unfinished items]) for each batch to make, in order.

    Each batch is sampled whole, whatever of it is finished, so that its images are the bytes of one
    uninterrupted run. Before the first write into a folder, the temporaries a killed run of the shard
    left there are removed.
    """
    cleaned: set[Path] = set()
    batches = state.todo.tolist()
    for batch, (items, made) in zip(batches, sample_job_batches(bundle, job, batches), strict=True):
        files = [(item["index"], job.folder / item["file"], image)
                 for item, image in zip(items, made.images, strict=True) if not state.finished[item["index"]]]
        for folder in {path.parent for _, path, _ in files} - cleaned:
            job.remove_partial_files(folder, state.shard)
            cleaned.add(folder)
        yield batch, files


def sample_job_batches(
    bundle: Bundle, job: Job, batches: Sequence[int], masks: Optional[Sequence[np.ndarray]] = None,
) -> Iterator[tuple[list[dict[str, Any]], Generated]]:
    """(item records, their images) of each of the job's ``batches``, in order, each batch sampled whole.

    A job from masks reads them from its folder (checked against its digests), unless ``masks`` (one per
    item of the job, in item order) are given: a job kept in memory (see :func:`job_spec`).
    """
    spec = job.spec
    embeddings = CaptionEmbeddings.for_bundle(bundle, spec.captions)
    for batch in batches:
        items = [job.item(i) for i in job.batch_items(batch)]
        batch_masks = None
        if spec.masks:
            batch_masks = job.read_masks(items) if masks is None else [masks[item["index"]] for item in items]
        (made,) = generate_batches(
            bundle, [item["caption"] for item in items], [item["seed"] for item in items], spec.options,
            batch_size=spec.batch_size, size=spec.size, embeddings=embeddings, masks=batch_masks,
        )
        yield items, made


def job_in_memory(bundle: Bundle, captions: Sequence[str], n: Optional[int], seed: int,
                  options: Optional[SamplingOptions] = None, size: Optional[int | Size] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, masks: Optional[Sequence[ConditioningMask]] = None
                  ) -> Iterator[tuple[list[dict[str, Any]], Generated]]:
    """(item records, their images) of each batch of the job :func:`new_job` would describe, kept in memory:
    the images ``histosynth generate`` writes with the same settings, and nothing is written."""
    spec = job_spec(bundle, captions, n, seed, options, size, batch_size, masks)
    job = Job(Path(), spec, Layout(spec.n))
    return sample_job_batches(bundle, job, range(job.batch_count), None if masks is None else [m.mask for m in masks])


def new_job(folder: str | Path, bundle: Bundle, captions: Sequence[str], n: Optional[int], seed: int,
            options: Optional[SamplingOptions] = None, size: Optional[int | Size] = None,
            batch_size: Optional[int] = None, masks: Optional[Sequence[ConditioningMask]] = None) -> Job:
    """Create (or resume) the job of ``n`` images of ``captions`` (cycled) from ``bundle`` in ``folder``.

    With ``masks``, one image per mask, of the masks' size (``n`` and ``size`` must be None or agree)
    and the masks are stored in the folder. ``options`` default to the model's own.
    ``batch_size`` defaults to the batch size of the job already in ``folder``, else 8.
    """
    if batch_size is None:
        batch_size = _existing_batch_size(Path(folder)) or DEFAULT_BATCH_SIZE
    spec = job_spec(bundle, captions, n, seed, options, size, batch_size, masks)
    job = Job.create_or_resume(folder, spec)
    job.write_masks(masks or [])
    return job


def job_spec(bundle: Bundle, captions: Sequence[str], n: Optional[int], seed: int,
             options: Optional[SamplingOptions] = None, size: Optional[int | Size] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, masks: Optional[Sequence[ConditioningMask]] = None) -> JobSpec:
    """The job of :func:`new_job`, checked against ``bundle`` (and refused if it cannot fit in memory), without
    touching any folder."""
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
    masks = list(masks or [])
    spec = JobSpec(bundle.id, tuple(captions), n if n is not None else len(captions), seed, options, size,
                   batch_size, tuple(m.digest for m in masks), tuple(m.source for m in masks))
    check_fits_in_memory(bundle, size, spec.batch_size)
    return spec


def is_job_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a generation job (its job.json, or the manifest.json of the first format)."""
    folder = Path(folder)
    return (folder / JOB_FILE).is_file() or (folder / LEGACY_MANIFEST).is_file()


def _existing_batch_size(folder: Path) -> Optional[int]:
    if not is_job_folder(folder):
        return None
    return Job.read(folder).spec.batch_size

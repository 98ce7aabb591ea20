"""Keep, for each label mask, the best of several images generated from it.

An image generated from a mask is a training pair only where it shows the mask. A small model
draws some images in a texture or stain its training set does not have, and a segmenter then reads
them as other classes; which images fail depends on the noise seed, not on the mask. (The shipped
text+mask model on 100 held-out phantom masks, seeds 0-2, ``make evaluate-default`` stage pairs,
counted in its ``selection.csv``: 4 seed-0 images have less than half their pixels read as their
mask's class, 12 masks have such an image under some seed and none under all three.)

So make the same masks several times, one generation job per seed (``histosynth generate --mask
... --seed S`` or ``evaluate masks --model ... --seed S``), and keep for each mask the candidate a
segmenter reads closest to it: the highest *agreement*, the share of the image's pixels that the
segmenter reads as the class the mask gives them. (This rule was chosen over the per-image mean of
per-class Dice, which lets a few pixels of a small class weigh as much as the rest of the image:
before sampling clamped into the latent range, a second segmenter scored the kept images 0.668
against 0.641.) The output folder holds ``images/`` and ``masks/`` with the same file names (ready
for ``histosynth dataset pair`` and ``evaluate masks --images``) and ``selection.csv``, every
candidate's agreement and which one was kept.

The segmenter that chooses must not be the one that judges the chosen set: the kept images score
well with it by construction. Judge the set with a segmenter trained apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from rich.progress import track

from ..data.dataset import read_image
from ..errors import ConfigError, DataError
from ..io import copy_file_atomic, write_json_atomic, write_text_atomic
from ..schema import ClassSchema
from ..segment.predict import read_rgb
from .caption_accuracy import SegmentFn
from .label_fidelity import evaluate_label_fidelity

SELECTION_FILE = "selection.csv"
RECORD_FILE = "selection.json"


@dataclass(frozen=True)
class Candidates:
    """The images generated from one mask, one per job (in the order of the jobs)."""

    name: str            # the file name of the mask's images in every job
    mask: Path
    mask_source: str
    images: tuple[Path, ...]
    seeds: tuple[int, ...]


def read_candidates(jobs: Sequence[str | Path]) -> list[Candidates]:
    """The finished images of generation jobs made from the same masks, grouped by mask.

    Every job must have been made from the same masks in the same order (each job's manifest lists
    their digests) and be finished; the jobs differ in their seed.
    """
    from ..sample.jobs import Job

    if len(jobs) < 2:
        raise ConfigError("give at least two generation jobs of the same masks (made with different --seed) "
                          "to choose between")
    read = [Job.read(folder) for folder in jobs]
    first = read[0]
    for job in read:
        if not job.spec.masks:
            raise DataError(f"{job.folder} is a job generated from captions; choosing needs jobs generated from masks")
        if job.spec.masks != first.spec.masks:
            raise DataError(f"{job.folder} was made from other masks than {first.folder}; make every job from the "
                            "same masks (same --mask / --masks-from), each with its own --seed")
        missing = len(job.items) - len(job.finished_indices(check_files=True))
        if missing:
            raise DataError(f"{job.folder} lacks {missing} of its {len(job.items)} images; run its generate "
                            "command again (it resumes)")
    seeds = [job.spec.seed for job in read]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"the jobs share a seed ({seeds}), so they hold the same images; give each its own --seed")
    return [Candidates(Path(item["file"]).name, first.folder / item["mask"], item["mask_source"],
                       tuple(job.folder / job.items[index]["file"] for job in read),
                       tuple(int(job.items[index]["seed"]) for job in read))
            for index, item in enumerate(first.items)]


def agreement(counts: np.ndarray) -> float:
    """How closely one image's segmentation follows its mask: the share of the mask's pixels read
    as their class, from (K, 3) pixel counts (see :func:`.label_fidelity.pixel_counts`)."""
    in_mask = counts[:, 1].sum()
    return float(counts[:, 0].sum() / in_mask) if in_mask else 0.0


@dataclass
class Selection:
    """Every candidate's agreement with its mask, and the one kept per mask."""

    candidates: list[Candidates]
    scores: np.ndarray  # (masks, jobs)

    @property
    def chosen(self) -> np.ndarray:
        """Index of the kept job per mask: the highest agreement (the first job on a tie)."""
        return self.scores.argmax(axis=1)

    def kept_per_job(self) -> list[int]:
        """How many kept images each job gave."""
        return np.bincount(self.chosen, minlength=self.scores.shape[1]).tolist()

    def table(self) -> pd.DataFrame:
        rows = []
        for candidates, scores, kept in zip(self.candidates, self.scores, self.chosen, strict=True):
            rows.append({"name": candidates.name, "mask_source": candidates.mask_source,
                         "kept_image": str(candidates.images[kept]), "kept_seed": candidates.seeds[kept],
                         "kept_agreement": float(scores[kept]),
                         **{f"agreement_{k}": float(s) for k, s in enumerate(scores)}})
        return pd.DataFrame(rows)


def select_best(candidates: Sequence[Candidates], segment: SegmentFn, schema: ClassSchema,
                progress: bool = False) -> Selection:
    """Segment every candidate and score it against its mask (as label fidelity counts pixels)."""
    scores = np.zeros((len(candidates), len(candidates[0].images)) if candidates else (0, 0))
    for row, group in enumerate(track(candidates, description="choosing", disable=not progress)):
        mask = read_image(group.mask, mode=None)
        schema.check_mask(mask, str(group.mask))
        fidelity, _ = evaluate_label_fidelity([read_rgb(path) for path in group.images], [mask] * len(group.images),
                                              segment, schema, [str(path) for path in group.images])
        scores[row] = [agreement(counts) for counts in fidelity.counts]
    return Selection(list(candidates), scores)


def check_output_folder(out: str | Path) -> Path:
    """The folder for the kept pairs, which must not be a generation job (its images would be replaced)."""
    from ..sample.jobs import is_job_folder

    if is_job_folder(out):
        raise ConfigError(f"{out} holds a generation job, whose images the kept ones would replace; "
                          "write the kept pairs to another folder")
    return Path(out)


def write_selection(selection: Selection, out: str | Path, jobs: Sequence[str | Path], segmenter: str) -> Path:
    """Copy each mask's kept image and the mask into ``out/images`` and ``out/masks`` (same names),
    with ``selection.csv`` and a record of the jobs and the segmenter that chose."""
    out = check_output_folder(out)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for group, kept in zip(selection.candidates, selection.chosen, strict=True):
        copy_file_atomic(group.images[kept], out / "images" / group.name)
        copy_file_atomic(group.mask, out / "masks" / group.name)
    table = selection.table()
    write_text_atomic(out / SELECTION_FILE, table.to_csv(index=False))
    write_json_atomic(out / RECORD_FILE, {
        "jobs": [str(job) for job in jobs], "segmenter": segmenter,
        "rule": "per mask, the candidate with the largest share of pixels read as the mask's class",
        "mean_kept_agreement": float(table["kept_agreement"].mean()) if len(table) else None,
        "kept_per_job": selection.kept_per_job(),
    })
    return out


def summary(selection: Selection) -> str:
    """One line: how much choosing raised the mean agreement over the first job's images."""
    if not len(selection.candidates):
        return "no masks"
    first, kept = selection.scores[:, 0].mean(), selection.scores.max(axis=1).mean()
    return (f"{len(selection.candidates)} masks, {selection.scores.shape[1]} candidates each: mean agreement "
            f"{first:.3f} (first job) -> {kept:.3f} (kept); kept per job {selection.kept_per_job()}")

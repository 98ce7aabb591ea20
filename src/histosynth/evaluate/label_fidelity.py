"""Label fidelity: does an image generated from a label mask show that mask?

Every image of a generation job made from masks (``images/`` beside ``masks/``, see
:mod:`histosynth.sample.jobs`) is segmented, and the prediction is compared pixel by pixel with the
mask that conditioned the image. Any folder of images can be scored the same way against the masks
of the same name (:func:`pair_by_name`): e.g. the real patches, or their autoencoder
reconstructions, which show how far a segmenter reads a mask back at best. Per class:

* **Dice** = 2 |P ∩ M| / (|P| + |M|) over the pixels of all images together (P: pixels predicted as
  the class, M: pixels of the class in the masks); undefined (—) for a class in neither;
* **mean image Dice**: the Dice of each image where the class is in its mask or its prediction,
  averaged over those images;
* the class's share of all mask pixels.

The headline number is the mean Dice over the classes with enough pixels (a share of at least
``min_share`` of all mask pixels): rare classes give noisy Dice values from a few pixels. With the
thesis' coverage the segmenter sees only the centre of an image, and the masks are cropped alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch as LegendPatch

from ..captions import UNCONDITIONAL_CAPTION
from ..data.dataset import read_image
from ..errors import DataError
from ..sample.generate import SamplingOptions
from ..sample.masks import ConditioningMask
from ..schema import ClassSchema
from ..segment.predict import read_rgb
from .caption_accuracy import SegmentFn
from .images import choose, image_paths
from .report import Report

if TYPE_CHECKING:
    from ..sample.jobs import Shard

#: classes with less than this share of all mask pixels are left out of the headline mean
DEFAULT_MIN_SHARE = 0.01
#: the issue's target on the phantom: mean Dice over classes with enough pixels
TARGET_MEAN_DICE = 0.8
#: examples shown as mask / image / prediction triptychs
EXAMPLES = 4


@dataclass(frozen=True)
class GeneratedPair:
    """A generated image and the mask it was generated from."""

    name: str
    image: Path
    mask: Path


def read_mask_job(folder: str | Path, n: Optional[int] = None, seed: int = 0) -> tuple[list[GeneratedPair], str]:
    """The finished images of a generation job made from masks (``n`` of them, drawn with ``seed``)."""
    from ..sample.jobs import Job

    job = Job.read(folder)
    if not job.spec.masks:
        raise DataError(f"{folder} is a job generated from captions, not from masks; label fidelity needs images "
                        "generated with --mask or --masks-from")
    finished = job.finished(check_files=True)
    if not finished:
        raise DataError(f"{folder} holds no finished images yet; run its generate command (it resumes)")
    pairs = [GeneratedPair(Path(item["file"]).stem, job.folder / item["file"], job.folder / item["mask"])
             for item in finished]
    source = f"generation job {folder} ({len(finished)} of {len(job.items)} images finished)"
    return choose(pairs, n, seed, str(folder)), source


def pair_by_name(images: str | Path, masks: str | Path, n: Optional[int] = None,
                 seed: int = 0) -> tuple[list[GeneratedPair], str]:
    """The images of a folder (or of a patch dataset) with the masks of the same name: the files of a mask
    folder with the same stem, or the patches of a patch dataset whose id is the image's stem."""
    from ..data.pairing import match_pairs

    images, masks = Path(images), Path(masks)
    if (masks / "manifest.csv").is_file():
        pairs = _pair_with_dataset(images, masks)
    else:
        pairs = [GeneratedPair(p.image.stem, p.image, p.mask) for p in match_pairs(images, masks)]
    return choose(pairs, n, seed, str(images)), f"{images}, with the masks of the same name in {masks}"


def _pair_with_dataset(images: Path, dataset_root: Path) -> list[GeneratedPair]:
    from ..data.dataset import open_dataset

    dataset = open_dataset(dataset_root)
    rows = dataset.rows()
    mask_of = dict(zip(rows["patch_id"], rows["mask"], strict=True))
    paths = image_paths(images)
    missing = [p.name for p in paths if p.stem not in mask_of]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images in {images} are not named after a patch of "
                        f"{dataset_root} (e.g. {missing[0]}); name each image <patch_id>.png")
    return [GeneratedPair(p.stem, p, dataset.root / mask_of[p.stem]) for p in paths]


def generate_mask_job(model: str | Path, masks: Sequence[ConditioningMask], folder: str | Path,
                      options: SamplingOptions, seed: int = 0, captions: Sequence[str] = (UNCONDITIONAL_CAPTION,),
                      device: str = "auto",
                      batch_size: Optional[int] = None, progress: bool = False, shard: Optional[Shard] = None) -> Path:
    """Generate one image per mask with a model into the job folder ``folder`` (resuming a job there).

    ``captions`` cycle over the images (default: the unconditional caption, the mask alone); ``shard``
    makes only its batches (default: all).
    """
    from rich.progress import Progress

    from ..devices import pick_device
    from ..models.bundle import load_bundle
    from ..sample.jobs import Shard, new_job, run_job

    bundle = load_bundle(model, pick_device(device))
    job = new_job(folder, bundle, list(captions), None, seed, options, batch_size=batch_size, masks=masks)
    shard = shard or Shard()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(job.missing(shard)))
        run_job(bundle, job, shard, progress=lambda k: bar.advance(task, k))
    return Path(folder)


def pixel_counts(mask: np.ndarray, prediction: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """(K, 3) pixels per class: both, in the mask, in the prediction."""
    if mask.shape != prediction.shape:
        raise ValueError(f"mask {mask.shape} and prediction {prediction.shape} differ in size")
    size = 256
    joint = np.bincount(mask.astype(np.int64).ravel() * size + prediction.astype(np.int64).ravel(),
                        minlength=size * size).reshape(size, size)
    ids = np.asarray(class_ids)
    return np.stack([joint[ids, ids], joint[ids].sum(axis=1), joint[:, ids].sum(axis=0)], axis=1)


def dice(counts: np.ndarray) -> np.ndarray:
    """Dice per row of (both, mask, prediction) counts; NaN where the class is in neither."""
    both, in_mask, in_prediction = (counts[..., i].astype(float) for i in range(3))
    total = in_mask + in_prediction
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * both / total, np.nan)


def centre_crop(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The centre of a mask at a (smaller) prediction's size: what the thesis' coverage segments."""
    top, left = (mask.shape[0] - shape[0]) // 2, (mask.shape[1] - shape[1]) // 2
    return mask[top:top + shape[0], left:left + shape[1]]


@dataclass
class LabelFidelity:
    """Pixel counts of every image and class, and the tables made from them."""

    schema: ClassSchema
    names: list[str]
    counts: np.ndarray  # (N, K, 3): both, mask, prediction
    min_share: float = DEFAULT_MIN_SHARE

    @property
    def class_ids(self) -> list[int]:
        return self.schema.ids

    def __len__(self) -> int:
        return len(self.names)

    def mask_shares(self) -> np.ndarray:
        in_mask = self.counts[:, :, 1].sum(axis=0).astype(float)
        return in_mask / in_mask.sum()

    def per_class(self) -> pd.DataFrame:
        pooled = dice(self.counts.sum(axis=0))
        per_image = dice(self.counts)
        rows = []
        for k, class_id in enumerate(self.class_ids):
            seen = ~np.isnan(per_image[:, k])
            rows.append({
                "class": self.schema.name_of(class_id),
                "id": class_id,
                "mask pixel share": float(self.mask_shares()[k]),
                "Dice": float(pooled[k]),
                "mean image Dice": float(per_image[seen, k].mean()) if seen.any() else float("nan"),
                "images with the class": int(seen.sum()),
                "counted": bool(self.mask_shares()[k] >= self.min_share),
            })
        return pd.DataFrame(rows)

    def mean_dice(self) -> float:
        """Mean Dice over the classes with at least ``min_share`` of the mask pixels."""
        table = self.per_class()
        return float(table.loc[table["counted"], "Dice"].mean())

    def per_image(self) -> pd.DataFrame:
        scores = dice(self.counts)
        frame = pd.DataFrame(scores, columns=[f"{self.schema.name_of(i)} Dice" for i in self.class_ids])
        frame.insert(0, "image", self.names)
        return frame


def evaluate_label_fidelity(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], segment: SegmentFn,
                            schema: ClassSchema, names: Sequence[str],
                            min_share: float = DEFAULT_MIN_SHARE) -> tuple[LabelFidelity, list[np.ndarray]]:
    """Segment the images and count agreement with their masks; also returns the predictions."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    predictions = segment(images)
    counts = np.stack([pixel_counts(centre_crop(mask, pred.shape), pred, schema.ids)
                       for mask, pred in zip(masks, predictions, strict=True)])
    return LabelFidelity(schema, list(names), counts, min_share), predictions


def evaluate_mask_job(pairs: Sequence[GeneratedPair], segment: SegmentFn, schema: ClassSchema,
                      min_share: float = DEFAULT_MIN_SHARE
                      ) -> tuple[LabelFidelity, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """:func:`evaluate_label_fidelity` on generated pairs; returns the result, images, masks and predictions."""
    images = [read_rgb(p.image) for p in pairs]
    masks = [read_image(p.mask, mode=None) for p in pairs]
    for pair, mask in zip(pairs, masks, strict=True):
        schema.check_mask(mask, str(pair.mask))
    result, predictions = evaluate_label_fidelity(images, masks, segment, schema, [p.name for p in pairs], min_share)
    return result, images, masks, predictions


# --- the report ---------------------------------------------------------------------------------
def write_label_fidelity_report(result: LabelFidelity, out: str | Path, examples: Sequence[tuple[np.ndarray, ...]],
                                *, source: str, segmenter: str, coverage: str) -> Path:
    """report.md with Dice per class, a per-image CSV, and mask / image / prediction triptychs.

    ``examples`` are (mask, image, prediction) triples (a few are shown).
    """
    report = Report(Path(out), "Label fidelity")
    mean = result.mean_dice()
    counted = result.per_class().query("counted")["class"].tolist()
    report.bullets([
        f"images: {len(result)}, from {source}",
        f"segmenter: {segmenter}; coverage: {coverage}",
        f"**mean Dice {mean:.3f}** over the classes with at least {result.min_share:.1%} of the mask pixels "
        f"({', '.join(counted) or 'none'}); target {TARGET_MEAN_DICE}",
        "Dice: 2|P∩M| / (|P|+|M|) over all images' pixels; mean image Dice: averaged over the images whose "
        "mask or prediction holds the class",
    ])
    report.heading("Dice per class")
    report.table("per_class", result.per_class(), "prediction of each generated image against its mask")
    report.table("per_image", result.per_image().head(20), "first 20 images (all in per_image.csv)",
                 csv_frame=result.per_image())
    if examples:
        report.heading("Examples")
        report.figure("examples", _triptychs(examples[:EXAMPLES], result.schema),
                      "conditioning mask / generated image / segmentation of the image")
    return report.write()


def _triptychs(examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], schema: ClassSchema) -> plt.Figure:
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.6 * len(examples)), squeeze=False)
    present: set[int] = set()
    for row, (mask, image, prediction) in zip(axes, examples, strict=True):
        present |= set(np.unique(mask).tolist()) | set(np.unique(prediction).tolist())
        for ax, picture, title in zip(row, (schema.colorize(mask), image, schema.colorize(prediction)),
                                      ("mask", "generated", "segmented"), strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [LegendPatch(color=np.asarray(schema.by_id(i).color) / 255, label=schema.name_of(i))
               for i in sorted(present) if i in schema.ids]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig

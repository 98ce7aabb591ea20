"""Caption accuracy: does a generated image show what its caption asked for? (thesis §5.1)

Each image is segmented, re-captioned with the thesis' caption rules (§4.1.4: the same prevalence thresholds that
captioned the training data) and the levels found are compared with those the requested caption
states. The thesis segmented 256 px samples with 86 px mirror padding (428 px in, 244 px out), so a
6 px border on each side was never segmented and prevalences are shares of the 244 px centre;
``coverage="thesis"`` reproduces that, ``coverage="full"`` segments every pixel.

Table 5.1 counts, for Glomeruli, Sclerotic Glomeruli and both combined (the sum of their
prevalences), how often each level was found, and how many images mention glomeruli at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..captions import Level, caption_from_levels, level_of, parse_caption, prevalences
from ..errors import CaptionError, ConfigError, ModelError
from ..schema import ClassSchema
from ..segment.external import TorchSegmenter
from ..segment.predict import Coverage, predict_images
from ..segment.segmenter import Segmenter
from .images import GeneratedImage
from .report import Report

if TYPE_CHECKING:  # the sampling stack is imported where it is used, so that the command line starts fast
    from ..models.sampling import SamplingOptions
    from ..sample.jobs import Shard

#: Table 5.1 of the thesis: % of 400 samples per found level (generating caption, 256 px).
THESIS_TABLE_5_1: dict[str, dict[Level, float]] = {
    "Glomeruli": {Level.NONE: 12.34, Level.LOW: 77.38, Level.MEDIUM: 9.77, Level.HIGH: 0.50},
    "Sclerotic Glomeruli": {Level.NONE: 12.60, Level.LOW: 78.92, Level.MEDIUM: 7.46, Level.HIGH: 1.03},
    "combined": {Level.NONE: 8.74, Level.LOW: 58.35, Level.MEDIUM: 28.02, Level.HIGH: 4.88},
}
#: % of the thesis' samples whose re-caption mentions glomeruli (healthy or sclerotic).
THESIS_MENTION_SHARE = 91.3
GLOMERULUS_CLASSES = ("Glomeruli", "Sclerotic Glomeruli")
COMBINED = "combined"

#: Turns images into label masks in the schema's ids (e.g. a segmenter with its padding).
SegmentFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class ImageVerdict:
    """Requested and found levels of one image (by class name)."""

    name: str
    size: tuple[int, int]
    requested: dict[str, Level]
    found: dict[str, Level]
    shares: dict[str, float]

    def caption_found(self, schema: ClassSchema) -> str:
        return caption_from_levels(self.found, schema)


@dataclass
class CaptionAccuracy:
    """Verdicts on a set of images, and the tables made from them."""

    schema: ClassSchema
    verdicts: list[ImageVerdict]
    group: tuple[str, ...] = field(default=GLOMERULUS_CLASSES)

    def __post_init__(self) -> None:
        self.group = tuple(name for name in self.group if _has_class(self.schema, name))

    def __len__(self) -> int:
        return len(self.verdicts)

    def combined_level(self, verdict: ImageVerdict) -> Level:
        return level_of(sum(verdict.shares[name] for name in self.group), self.schema)

    def columns(self) -> list[str]:
        """Table 5.1's columns present for this schema: each group class, then the combination."""
        return list(self.group) + ([COMBINED] if len(self.group) > 1 else [])

    def found_levels(self, column: str) -> list[Level]:
        if column == COMBINED:
            return [self.combined_level(v) for v in self.verdicts]
        return [v.found[column] for v in self.verdicts]

    def level_shares(self) -> pd.DataFrame:
        """Table 5.1: % of images per found level, ours beside the thesis'."""
        rows = []
        for level in Level:
            row: dict[str, object] = {"level": level.value.capitalize()}
            for column in self.columns():
                found = self.found_levels(column)
                row[f"{column} %"] = 100.0 * found.count(level) / len(found)
                row[f"{column} % (thesis)"] = THESIS_TABLE_5_1.get(column, {}).get(level)
            rows.append(row)
        return pd.DataFrame(rows)

    def mention_share(self) -> float:
        """% of images whose re-caption mentions any class of the group (e.g. glomeruli)."""
        if not self.group:
            return float("nan")
        mentioned = [any(v.found[name] is not Level.NONE for name in self.group) for v in self.verdicts]
        return 100.0 * sum(mentioned) / len(mentioned)

    def confusion(self, name: str) -> pd.DataFrame:
        """Counts of requested (rows) against found (columns) levels of one class."""
        counts = Counter((v.requested[name], v.found[name]) for v in self.verdicts)
        rows = [{"requested": req.value, **{found.value: counts[(req, found)] for found in Level}}
                for req in Level]
        return pd.DataFrame(rows)

    def agreement(self) -> pd.DataFrame:
        """Per class: what was requested, and % of images whose found level equals it."""
        rows = []
        for name in (self.schema.name_of(i) for i in self.schema.captioned_ids):
            requested = Counter(v.requested[name].value for v in self.verdicts)
            same = sum(v.requested[name] is v.found[name] for v in self.verdicts)
            rows.append({
                "class": name,
                "requested": ", ".join(f"{lvl} ({n})" for lvl, n in sorted(requested.items())),
                "found = requested %": 100.0 * same / len(self.verdicts),
                "mean prevalence found": float(np.mean([v.shares[name] for v in self.verdicts])),
            })
        return pd.DataFrame(rows)

    def exact_match_share(self) -> float:
        """% of images whose re-caption states every class at its requested level."""
        return 100.0 * sum(v.found == v.requested for v in self.verdicts) / len(self.verdicts)

    def per_image(self) -> pd.DataFrame:
        rows = []
        for v in self.verdicts:
            row: dict[str, object] = {"image": v.name, "height": v.size[0], "width": v.size[1]}
            for name in v.requested:
                row[f"{name} requested"] = v.requested[name].value
                row[f"{name} found"] = v.found[name].value
                row[f"{name} prevalence"] = round(v.shares[name], 6)
            if len(self.group) > 1:
                row["combined found"] = self.combined_level(v).value
            row["caption found"] = v.caption_found(self.schema)
            rows.append(row)
        return pd.DataFrame(rows)


def _has_class(schema: ClassSchema, name: str) -> bool:
    try:
        schema.id_of(name)
    except ConfigError:
        return False
    return True


def judge(masks: Sequence[np.ndarray], captions: Sequence[str], schema: ClassSchema,
          names: Sequence[str] | None = None, group: tuple[str, ...] = GLOMERULUS_CLASSES) -> CaptionAccuracy:
    """Compare the levels found in segmented masks with those their requested captions state."""
    if len(masks) != len(captions):
        raise ValueError(f"{len(masks)} masks but {len(captions)} captions")
    names = list(names) if names is not None else [f"image_{i:05d}" for i in range(len(masks))]
    requested_by_caption: dict[str, dict[str, Level]] = {}
    verdicts = []
    for name, mask, caption in zip(names, masks, captions, strict=True):
        if caption not in requested_by_caption:
            try:
                requested_by_caption[caption] = parse_caption(caption, schema)
            except CaptionError as exc:
                raise CaptionError(f"the requested caption of {name}: {exc}") from None
        shares = prevalences(mask, schema)
        named = {schema.name_of(i): shares[i] for i in schema.captioned_ids}
        verdicts.append(ImageVerdict(
            name=name, size=tuple(mask.shape), requested=requested_by_caption[caption],
            found={n: level_of(p, schema) for n, p in named.items()}, shares=named,
        ))
    return CaptionAccuracy(schema=schema, verdicts=verdicts, group=group)


def segmenter_function(segmenter: Segmenter | TorchSegmenter, coverage: Coverage = "thesis", device: str = "auto",
                       batch_size: int = 8, progress: bool = False) -> SegmentFn:
    """A multi-class segmenter as a SegmentFn (binary ones cannot re-caption an image).

    An exported network (:class:`~histosynth.segment.external.TorchSegmenter`) segments whole images; with the
    thesis' coverage the centre the thesis segmented is kept.
    """
    if segmenter.binary:
        raise ModelError(
            f"caption accuracy needs a multi-class segmenter; this is a {segmenter.describe()}"
        )

    def segment(images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(segmenter, TorchSegmenter):
            return segmenter.predict(images, coverage, batch_size=batch_size, device=device, progress=progress)
        return predict_images(segmenter, images, coverage=coverage, batch_size=batch_size,
                              device=device, progress=progress, total=len(images))

    return segment


def evaluate_caption_accuracy(images: Sequence[np.ndarray], captions: Sequence[str], segment: SegmentFn,
                              schema: ClassSchema, names: Sequence[str] | None = None) -> CaptionAccuracy:
    """Segment the images, re-caption them and compare with the captions they were generated from."""
    return judge(segment(images), captions, schema, names)


def generate_caption_job(model: str | Path, caption: str, n: int, seed: int, folder: str | Path,
                         options: Optional[SamplingOptions] = None, device: str = "auto",
                         shard: Optional[Shard] = None, progress: bool = False) -> list[GeneratedImage]:
    """Generate ``n`` images of one caption from a model folder as a generation job in ``folder``.

    The job is ``histosynth generate``'s (:mod:`histosynth.sample.jobs`): the same seeds and
    job.json, resumed where a run stopped, shared out with ``shard``. ``options`` default to the
    model's own. Returns the job's finished images with the caption they were asked for (all of them
    once every shard has run).
    """
    from rich.progress import Progress

    from ..captions import canonical_caption
    from ..devices import pick_device
    from ..models.bundle import load_bundle
    from ..sample.jobs import Shard, new_job, run_job

    bundle = load_bundle(model, pick_device(device))
    wanted = canonical_caption(caption, bundle.schema)
    job = new_job(folder, bundle, [wanted], n, seed, options)
    shard = shard or Shard()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(job.missing(shard)))
        run_job(bundle, job, shard, progress=lambda k: bar.advance(task, k))
    return [GeneratedImage(job.folder / item["file"], item["caption"]) for item in job.finished(check_files=True)]


# --- the report ---------------------------------------------------------------------------------
def write_caption_accuracy_report(result: CaptionAccuracy, out: str | Path, *, coverage: str,
                                  caption_source: str, segmenter: str) -> Path:
    """report.md with Table 5.1 beside the thesis, per-class confusions, per-image CSV and a plot."""
    report = Report(Path(out), "Caption accuracy")
    sizes = Counter(v.size for v in result.verdicts)
    report.bullets([
        f"images: {len(result)}; segmented area per image: "
        + ", ".join(f"{h}x{w} px ({n} images)" for (h, w), n in sizes.most_common()),
        f"requested captions from: {caption_source}",
        f"segmenter: {segmenter}",
        f"coverage: {_coverage_note(coverage)}",
        "re-captioned with the training captions' rules: low < 0.2 <= medium < 0.4 <= high "
        "(share of the segmented pixels)",
    ])
    if result.group:
        report.heading("Levels found (thesis Table 5.1)")
        shares = result.level_shares()
        report.table("table_5_1", shares, "% of images per level found; the thesis' numbers beside ours", digits=2)
        report.text(
            f"Images that mention {' or '.join(result.group)}: **{result.mention_share():.1f} %** "
            f"(thesis: {THESIS_MENTION_SHARE} %). Exact caption match: {result.exact_match_share():.1f} %."
        )
        report.figure("table_5_1", _levels_figure(result, shares), "Levels found, ours and the thesis'")
    report.heading("Requested against found, per class")
    report.table("agreement", result.agreement(), "share of images whose found level equals the requested one")
    for name in (result.schema.name_of(i) for i in result.schema.captioned_ids):
        slug = name.lower().replace(" ", "_")
        report.heading(name, level=3)
        report.table(f"confusion_{slug}", result.confusion(name), "rows: requested level; columns: found level")
    report.table("per_image", result.per_image().head(20), "first 20 images (all in per_image.csv)",
                 csv_frame=result.per_image())
    return report.write()


def _coverage_note(coverage: str) -> str:
    if coverage == "thesis":
        return ("as in the thesis: largest mirror padding <= 92 px (86 px for 256 px images: 428 px in, "
                "244 px out); a 12 px border (6 px per side) is not segmented and prevalences are shares "
                "of the segmented centre")
    return "full: mirror padding to the next valid size, every pixel segmented"


def _levels_figure(result: CaptionAccuracy, shares: pd.DataFrame) -> plt.Figure:
    columns = result.columns()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.2), squeeze=False)
    x = np.arange(len(Level))
    for ax, column in zip(axes[0], columns, strict=True):
        ours = shares[f"{column} %"].to_numpy(dtype=float)
        thesis = pd.to_numeric(shares[f"{column} % (thesis)"], errors="coerce").to_numpy(dtype=float)
        ax.bar(x - 0.2, ours, 0.4, label="ours")
        if not np.isnan(thesis).all():
            ax.bar(x + 0.2, thesis, 0.4, label="thesis")
        ax.set_xticks(x, [lvl.value for lvl in Level])
        ax.set_title(column if column != COMBINED else " + ".join(result.group), fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of images")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig

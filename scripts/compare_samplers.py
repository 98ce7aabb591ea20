#!/usr/bin/env python
"""Is the faster sampler as good? DDIM-50 against DPM-Solver++ at fewer steps, with the shipped models.

    python scripts/compare_samplers.py                                  # 100 items, DDIM-50, DPM++-20, spread
    python scripts/compare_samplers.py --n 20 --samplers ddim50,dpm20,ddim50@1,dpm10,dpm30
    python scripts/compare_samplers.py --n 100 --measure-only           # the items finished so far
    python scripts/compare_samplers.py --shard 0/2 & python scripts/compare_samplers.py --shard 1/2   # 2 processes

Every sampler makes the same items, each from the same noise (a generation job per model and sampler,
with the same job seed, so item i has the same seed in every job):

- caption accuracy (thesis Table 5.1): the text model makes ``--n`` images of the thesis' generating
  caption ("Tubuli medium, a lot of Glomeruli"); the shipped segmenter re-captions them (thesis
  coverage, as ``histosynth evaluate captions``);
- label fidelity: the text+mask model makes one image per phantom layout (``--n`` layouts of the
  default class mix, each captioned from its mask, as ``histosynth evaluate masks --mask-captions``);
  the shipped segmenter reads them back (full coverage): Dice per class, and their mean over the
  classes with at least 1 % of the mask pixels.

The seed spread: every number comes with a 95 % bootstrap interval over the items (each item has its own
noise), and each sampler's difference from the first one (the reference, DDIM-50) with a paired
bootstrap interval (the same resampled items for both: does the sampler differ at all?). The *seed
spread* of a metric is how far two runs of the reference with independent noise for the same items lie
apart 95 % of the time (1.96 * sqrt(2) * the bootstrap standard deviation of the reference); a sampler is
*within the seed spread* where every difference is no larger. ``ddim50@1`` is DDIM-50 again with job
seed 1, other noise for the same captions and masks: a measured difference of two such runs.

Output goes to ``runs/compare-samplers/n<N>/`` (the jobs, ``comparison.md``, ``comparison.csv``,
``per_class_dice.csv``, ``table_5_1.csv``, ``timings*.json``). The jobs are made a batch (8 items) at a
time, each batch by every sampler before the next, so a run stopped early holds the same items from
every sampler; ``--measure-only`` measures the items that all jobs have finished (while a run goes on
in another process, or after one was stopped). The jobs resume where they stopped; a run with another
``--n`` makes new jobs (item i is the same in all of them). The time per item of each job is measured
as the CPU and wall seconds of this process (loading the models for each batch included); with
``OMP_NUM_THREADS=1`` the CPU seconds are what an item costs, the wall seconds follow the machine's
other load.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import pandas as pd

from histosynth.errors import ConfigError
from histosynth.evaluate.caption_accuracy import CaptionAccuracy
from histosynth.evaluate.label_fidelity import LabelFidelity
from histosynth.parallel import Shard

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "compare-samplers"
SCHEDULERS = {"ddim": "ddim", "dpm": "dpm++"}
#: the phantom layouts' seed (as the layouts of scripts/evaluate_default.py) and their class mix
PHANTOM_SEED = 5
LAYOUTS_MIX = "default"
BOOTSTRAP = 2000
#: the two-sided level of every interval
LEVEL = 0.95

Result = TypeVar("Result", CaptionAccuracy, LabelFidelity)


@dataclass(frozen=True)
class Sampler:
    """A scheduler, its number of steps and the job seed (another seed: other noise for the same items)."""

    scheduler: str
    steps: int
    seed: int = 0

    @property
    def name(self) -> str:
        short = next(k for k, v in SCHEDULERS.items() if v == self.scheduler)
        return f"{short}{self.steps}" + (f"@{self.seed}" if self.seed else "")

    @classmethod
    def parse(cls, text: str) -> "Sampler":
        """``ddim50``, ``dpm20`` or with a job seed ``ddim50@1``."""
        found = re.fullmatch(r"(ddim|dpm)(\d+)(?:@(\d+))?", text.strip())
        if not found or int(found[2]) < 1:
            raise ConfigError(f"unknown sampler {text!r}; write ddim50, dpm20 or with a job seed ddim50@1")
        return cls(SCHEDULERS[found[1]], int(found[2]), int(found[3] or 0))


def parse_samplers(text: str) -> list[Sampler]:
    samplers = [Sampler.parse(part) for part in text.split(",") if part.strip()]
    if len(samplers) < 2 or len({s.name for s in samplers}) != len(samplers):
        raise ConfigError(f"--samplers needs two or more different samplers (the first is the reference), got {text!r}")
    return samplers


@dataclass(frozen=True)
class Models:
    """The models compared and the segmenter that judges their images."""

    text: Path
    mask: Path
    segmenter: Path

    @classmethod
    def shipped(cls) -> "Models":
        from histosynth.defaults import default_bundle_path, default_mask_bundle_path, default_segmenter_path

        return cls(default_bundle_path(), default_mask_bundle_path(), default_segmenter_path())


class Timings:
    """Wall and CPU seconds and the items generated per job, kept in JSON files across resumed runs.

    Each process of ``--shard i/n`` keeps its own file (``timings.json``, or ``timings-i-of-n.json``);
    the seconds per item are those of all files together. On a machine shared with other work the wall
    time grows with their load; the CPU time of the process (one thread: ``OMP_NUM_THREADS=1``) is what
    the items cost.
    """

    def __init__(self, folder: Path, part: Shard = Shard()):
        self.folder = folder
        self.path = folder / ("timings.json" if part.count == 1 else f"timings-{part.index}-of-{part.count}.json")
        self.data: dict[str, dict[str, float]] = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, float]]:
        import json

        return json.loads(path.read_text()) if path.is_file() else {}

    def add(self, job: str, seconds: float, cpu_seconds: float, items: int) -> None:
        from histosynth.io import write_json_atomic

        if items:
            entry = self.data.setdefault(job, {"seconds": 0.0, "cpu_seconds": 0.0, "items": 0})
            for key, value in (("seconds", seconds), ("cpu_seconds", cpu_seconds), ("items", items)):
                entry[key] += value
            write_json_atomic(self.path, self.data)

    def per_item(self, job: str, clock: str = "cpu_seconds") -> float:
        """Seconds per item of a job over the files of every process."""
        entries = [data[job] for path in sorted(self.folder.glob("timings*.json")) if job in (data := self._read(path))]
        items = sum(entry["items"] for entry in entries)
        return sum(entry[clock] for entry in entries) / items if items else float("nan")


def finished_files(folder: Path) -> set[str]:
    """The image files (relative to the job folder) of a job's finished items; none where no job is yet."""
    from histosynth.sample.jobs import Job, is_job_folder

    return {item["file"] for item in Job.read(folder).finished(check_files=True)} if is_job_folder(folder) else set()


def finished_in_shard(folder: Path, shard: Shard) -> int:
    """How many items of ``shard`` the job in ``folder`` has finished (0 where no job is yet): the items that
    other processes finish meanwhile do not count."""
    from histosynth.sample.jobs import Job, is_job_folder

    if not is_job_folder(folder):
        return 0
    job = Job.read(folder)
    return sum(shard.takes(int(index) // job.spec.batch_size) for index in job.finished_indices(check_files=True))


def timed_job(folder: Path, shard: Shard, timings: Timings, make: Callable[[], object]) -> None:
    """Run ``make`` (the batch ``shard`` of a generation job into ``folder``) and note its time per new item."""
    before = finished_in_shard(folder, shard)
    started, cpu_started = time.perf_counter(), time.process_time()
    make()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    timings.add(folder.name, seconds, cpu_seconds, finished_in_shard(folder, shard) - before)


def sampling_options(model: Path, sampler: Sampler):
    from histosynth.models.bundle import read_bundle_config

    return read_bundle_config(model).sampling.overridden(scheduler=sampler.scheduler, steps=sampler.steps)


def text_job(out: Path, sampler: Sampler) -> Path:
    return out / f"text-{sampler.name}"


def mask_job(out: Path, sampler: Sampler) -> Path:
    return out / f"mask-{sampler.name}"


def generate_batch(models: Models, sampler: Sampler, n: int, masks: Sequence, captions: Sequence[str], out: Path,
                   shard, timings: Timings, device: str) -> None:
    """One batch (``shard``) of both jobs of a sampler: ``n`` images of the generating caption from the text
    model; from the text+mask model, one image per mask with its caption."""
    from histosynth.captions import GENERATING_CAPTION
    from histosynth.evaluate.caption_accuracy import generate_caption_job
    from histosynth.evaluate.label_fidelity import generate_mask_job

    timed_job(text_job(out, sampler), shard, timings, lambda: generate_caption_job(
        models.text, GENERATING_CAPTION, n, sampler.seed, text_job(out, sampler),
        sampling_options(models.text, sampler), device, shard=shard))
    timed_job(mask_job(out, sampler), shard, timings, lambda: generate_mask_job(
        models.mask, masks, mask_job(out, sampler), sampling_options(models.mask, sampler), sampler.seed, captions,
        device, shard=shard))


def common_files(folders: Sequence[Path]) -> set[str]:
    """The items that every one of these jobs has finished (by file name: item i has the same one in each)."""
    return set.intersection(*(finished_files(folder) for folder in folders))


def caption_accuracy(folder: Path, files: set[str], segment, schema) -> CaptionAccuracy:
    """A job's images of ``files`` re-captioned and compared with their caption (thesis Table 5.1)."""
    from histosynth.evaluate.caption_accuracy import evaluate_caption_accuracy
    from histosynth.sample.jobs import Job
    from histosynth.segment.predict import read_rgb

    job = Job.read(folder)
    items = sorted((item for item in job.finished() if item["file"] in files), key=lambda item: item["file"])
    return evaluate_caption_accuracy([read_rgb(job.folder / i["file"]) for i in items], [i["caption"] for i in items],
                                     segment, schema, names=[i["file"] for i in items])


def label_fidelity(folder: Path, files: set[str], segment, schema) -> LabelFidelity:
    """A mask job's images of ``files`` read back by the segmenter and compared with their masks."""
    from histosynth.evaluate.label_fidelity import evaluate_mask_job, read_mask_job

    pairs, _ = read_mask_job(folder)
    chosen = sorted((p for p in pairs if p.image.relative_to(folder).as_posix() in files), key=lambda p: p.name)
    return evaluate_mask_job(chosen, segment, schema)[0]


def phantom_layouts(folder: Path, n: int, size: int, schema):
    """``n`` phantom layouts of the default class mix in ``folder`` (mask i is the same for every ``n``)."""
    from histosynth.data.phantom.export import write_phantom_masks
    from histosynth.sample.masks import read_masks

    write_phantom_masks(folder, n, size=size, seed=PHANTOM_SEED, mix=LAYOUTS_MIX, progress=False)
    return read_masks(folder, schema)[:n]


# --- metrics and their spread -------------------------------------------------------------------------
def caption_subset(result: CaptionAccuracy, items: np.ndarray) -> CaptionAccuracy:
    return CaptionAccuracy(result.schema, [result.verdicts[i] for i in items], result.group)


def fidelity_subset(result: LabelFidelity, items: np.ndarray) -> LabelFidelity:
    return LabelFidelity(result.schema, [result.names[i] for i in items], result.counts[items], result.min_share)


def level_share(column: str, level: str) -> Callable[[CaptionAccuracy], float]:
    """% of images whose found level of ``column`` (a class or 'combined') is ``level`` (thesis Table 5.1)."""
    return lambda r: float(r.level_shares().set_index("level").loc[level, f"{column} %"])


def glomerular_share(result: CaptionAccuracy) -> float:
    """The mean share of the segmented pixels that the glomerulus classes take, in %."""
    return 100 * float(np.mean([sum(v.shares[name] for name in result.group) for v in result.verdicts]))


CAPTION_METRICS: dict[str, Callable[[CaptionAccuracy], float]] = {
    "mention glomeruli %": CaptionAccuracy.mention_share,
    "Glomeruli high (requested) %": level_share("Glomeruli", "High"),
    "combined none %": level_share("combined", "None"),
    "exact caption %": CaptionAccuracy.exact_match_share,
    "glomerular pixels %": glomerular_share,
}
FIDELITY_METRICS: dict[str, Callable[[LabelFidelity], float]] = {"mean Dice": LabelFidelity.mean_dice}


def resampled_items(n: int, resamples: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement: the same draws for every sampler (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def seed_spread(reference: np.ndarray) -> float:
    """How far the metric of two runs of the reference with independent noise lie apart (95 % of the time):
    z * sqrt(2) * the bootstrap standard deviation of the reference's metric."""
    return NormalDist().inv_cdf((1 + LEVEL) / 2) * math.sqrt(2) * float(np.nanstd(reference))


def compare(results: dict[str, Result], metrics: dict[str, Callable[[Result], float]],
            subset: Callable[[Result, np.ndarray], Result], draws: np.ndarray) -> pd.DataFrame:
    """Per metric and sampler: the value with its bootstrap interval, and the difference from the first
    sampler (the reference) with its paired bootstrap interval and the seed spread (:func:`seed_spread`);
    ``within spread`` where the difference is no larger than the spread."""
    names = list(results)
    reference = names[0]
    rows = []
    for metric, measure in metrics.items():
        full = {name: measure(results[name]) for name in names}
        boot = {name: np.array([measure(subset(results[name], items)) for items in draws]) for name in names}
        spread = seed_spread(boot[reference])
        for name in names:
            row = {"metric": metric, "sampler": name, "value": full[name], "low": interval(boot[name])[0],
                   "high": interval(boot[name])[1], "seed spread": spread}
            if name != reference:
                difference = full[name] - full[reference]
                low, high = interval(boot[name] - boot[reference])
                row.update({"difference": difference, "difference low": low, "difference high": high,
                            "within spread": bool(abs(difference) <= spread)})
            rows.append(row)
    return pd.DataFrame(rows)


def outside_spread(table: pd.DataFrame) -> dict[str, list[str]]:
    """Per sampler but the reference: the metrics whose difference exceeds the seed spread (none: within)."""
    others = table.dropna(subset=["difference"])
    return {name: [f"{model} {metric}" for model, metric, within in
                   group[["model", "metric", "within spread"]].itertuples(index=False) if not within]
            for name, group in others.groupby("sampler", sort=False)}


# --- running it ----------------------------------------------------------------------------------------
def run_comparison(models: Models, samplers: Sequence[Sampler], n: int, out: Path, device: str = "auto",
                   resamples: int = BOOTSTRAP, generate: bool = True, part: Optional[Shard] = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Timings]:
    """Generate the items with every sampler and measure them: the comparison table (see :func:`compare`),
    Dice per class and Table 5.1 per sampler, and the seconds per item of each job.

    The jobs are made batch by batch, each batch by every sampler before the next, so that a run stopped
    early holds the same items from every sampler; without ``generate`` the items that every job has
    finished so far are measured (e.g. while a run goes on in another process). With ``part`` (i/n) this
    process makes only the batches whose number is i modulo n: n processes share the generation.
    """
    from histosynth.captions import caption_for_mask
    from histosynth.devices import pick_device
    from histosynth.evaluate.caption_accuracy import segmenter_function
    from histosynth.models.bundle import read_bundle_config
    from histosynth.sample.generate import DEFAULT_BATCH_SIZE
    from histosynth.segment.external import load_segmenter

    out.mkdir(parents=True, exist_ok=True)
    part = part or Shard()
    timings = Timings(out, part)
    device = str(pick_device(device))
    segmenter = load_segmenter(models.segmenter)
    schema = segmenter.schema
    if generate:
        masks = phantom_layouts(out / "layouts", n, read_bundle_config(models.mask).image_size, schema)
        captions = [caption_for_mask(m.mask, schema) for m in masks]
        batches = math.ceil(n / DEFAULT_BATCH_SIZE)
        for batch in filter(part.takes, range(batches)):
            for sampler in samplers:
                generate_batch(models, sampler, n, masks, captions, out, Shard(batch, batches), timings, device)
    # as the evaluate commands: the thesis' coverage for captions, full for masks
    by_caption, by_mask = segmenter_function(segmenter, "thesis", device), segmenter_function(segmenter, "full", device)
    text_files = common_files([text_job(out, s) for s in samplers])
    mask_files = common_files([mask_job(out, s) for s in samplers])
    if len(text_files) < 2 or len(mask_files) < 2:
        raise ConfigError(f"{out}: the jobs of every sampler have {len(text_files)} text and {len(mask_files)} mask "
                          "items in common; two or more of each are needed (let the generation run on)")
    captions = {s.name: caption_accuracy(text_job(out, s), text_files, by_caption, schema) for s in samplers}
    fidelity = {s.name: label_fidelity(mask_job(out, s), mask_files, by_mask, schema) for s in samplers}
    table = pd.concat([
        compare(captions, CAPTION_METRICS, caption_subset, resampled_items(len(text_files), resamples))
        .assign(model="text", items=len(text_files)),
        compare(fidelity, FIDELITY_METRICS, fidelity_subset, resampled_items(len(mask_files), resamples))
        .assign(model="text+mask", items=len(mask_files))])
    jobs = [(text_job if m == "text" else mask_job)(out, Sampler.parse(s)).name
            for m, s in zip(table["model"], table["sampler"], strict=True)]
    table["CPU s/item"] = [timings.per_item(job) for job in jobs]
    table["wall s/item"] = [timings.per_item(job, "seconds") for job in jobs]
    per_class = pd.concat([r.per_class().assign(sampler=name) for name, r in fidelity.items()])
    levels = pd.concat([r.level_shares().assign(sampler=name) for name, r in captions.items()])
    return table, per_class, levels, timings


def markdown_comparison(table: pd.DataFrame) -> str:
    """The comparison as one Markdown table: value [interval], difference [interval], within the spread."""
    from histosynth.evaluate.report import markdown_table

    def ranged(value: float, low: float, high: float) -> str:
        return "" if pd.isna(value) else f"{value:.3g} [{low:.3g}, {high:.3g}]"

    shown = pd.DataFrame({
        "model": table["model"], "metric": table["metric"], "sampler": table["sampler"],
        "value [95 % CI]": [ranged(*row) for row in table[["value", "low", "high"]].itertuples(index=False)],
        "difference from the first [paired 95 % CI]": [
            ranged(*row) for row in table[["difference", "difference low", "difference high"]].itertuples(index=False)],
        "seed spread": [f"± {v:.3g}" for v in table["seed spread"]],
        "within spread": ["" if pd.isna(w) else "yes" if w else "no" for w in table["within spread"]],
        "CPU s/item": table["CPU s/item"],
    })
    return markdown_table(shown, digits=2)


def write_outputs(out: Path, command: str, table: pd.DataFrame, per_class: pd.DataFrame,
                  levels: pd.DataFrame) -> str:
    from histosynth.io import write_text_atomic

    for name, frame in (("comparison", table), ("per_class_dice", per_class), ("table_5_1", levels)):
        write_text_atomic(out / f"{name}.csv", frame.to_csv(index=False))
    reference = table["sampler"].iloc[0]
    items = ", ".join(f"{count} for the {model} model" for model, count in
                      table.groupby("model", sort=False)["items"].first().items())
    lines = [f"# Samplers compared on the same items ({items}; {time.strftime('%Y-%m-%d')})", "",
             f"    {command}", "",
             markdown_comparison(table), ""]
    for name, outside in outside_spread(table).items():
        lines.append(f"- {name}: " + (f"outside the seed spread of {reference} in {', '.join(outside)}" if outside
                                      else f"within the seed spread of {reference} in every metric"))
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "comparison.md", text)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="items per model (images of the caption; masks)")
    parser.add_argument("--samplers", default="ddim50,dpm20,ddim50@1",
                        help="comma-separated: ddim<steps> or dpm<steps>, @<job seed> for other noise; the first "
                             "is the reference")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare-samplers/n<N>)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="make only the batches whose number is I modulo N (0 <= I < N), so N processes "
                             "share the generation; then measure with --measure-only")
    parser.add_argument("--measure-only", action="store_true",
                        help="generate nothing: measure the items every sampler's jobs have finished so far")
    args = parser.parse_args(argv)
    try:
        samplers = parse_samplers(args.samplers)
        part = Shard.parse(args.shard)
        if args.n < 2:
            raise ConfigError(f"--n must be at least 2 (the spread needs items to resample), got {args.n}")
        out = args.out or OUT / f"n{args.n}"
        table, per_class, levels, _ = run_comparison(Models.shipped(), samplers, args.n, out, args.device,
                                                     args.resamples, generate=not args.measure_only,
                                                     part=part)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python scripts/compare_samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_outputs(out, command.strip(), table, per_class, levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())

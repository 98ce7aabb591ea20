#!/usr/bin/env python
"""Does synthetic data help a segmenter? `histosynth experiment mix` on the phantom with the shipped models.

    python scripts/evaluate_downstream.py                  # every stage (make evaluate-downstream)
    python scripts/evaluate_downstream.py --stage core     # one stage (its inputs must exist)
    python scripts/evaluate_downstream.py --quick          # a smoke run with a few patches, in runs/downstream-quick
    python scripts/evaluate_downstream.py --small --stage core   # the core comparison sized for a busy 2-core CPU

It uses the models shipped in ``src/histosynth/weights/`` and makes its own real data. Stages, each
skipped when its output exists; outputs go to ``runs/downstream/``, every command's output to
``runs/logs/downstream-<stage>.log``; ``--width N`` trains the segmenters N channels wide (reports in
``reports-widthN/``, the data and synthetic sets shared). Every experiment is binary Glomeruli unless
said otherwise, with the same seeds, the same fixed real validation set and the experiment's own
training loop (warm-up and cosine rate, balanced class weights, the weights of the best validation
Dice); each compares its arms with real only, paired by seed.

The real patches are those of the tissue the synthetic set is asked for, as in the thesis, whose real
training set was annotated glomerulus regions matched to the synthetic one: fresh phantom patches of
the generating caption's mix ("Tubuli medium, a lot of Glomeruli"; every patch holds glomeruli), from
seeds no model trained on. (Patches of the default mix hold glomeruli in 5 % of cases, so 48 of them
carry two or three and every real-only run collapsed.)

1. data        the real training patches and a fixed real validation set of the generating mix, each
               with a seed of its own, the validation set larger than any training set
2. caption     images of the generating caption ("Tubuli medium, a lot of Glomeruli") from the shipped
               text model, their masks from the shipped segmenter (no annotation): the caption set
3. thesis-loop the real-only arm of stage core trained with the thesis' loop (constant rate, unweighted
               loss, stopping on the loss, final weights): how often that loop collapses
   core        48 real patches alone, with 48 of the caption set added (1x), and 48 synthetic alone
   core-steps  the same with every arm trained the optimiser steps of the largest (``--equal-steps``)
4. masks       phantom layouts turned into images by the shipped text+mask model (masks = the layouts)
               and, per layout, the best of 3 seeds kept by `select-pairs`: the core comparison with each
   masks-steps the same with every arm trained the optimiser steps of the largest (``--equal-steps``)
5. curve       the scarcity curve: 12 / 24 / 48 / 96 real patches, each alone and with 1x and 4x of
               the caption set added, and each count of synthetic patches alone
   curve-steps the same with every arm trained the optimiser steps of the largest (``--equal-steps``)
6. multiclass  the core comparison as a multi-class segmentation, at equal steps
7. summary     runs/downstream/reports/summary.md: every experiment's paired differences and collapsed runs

A run that an experiment begun earlier already trained alike (the same real rows, validation rows, loop and
seed: the real-only arm of the core comparisons, say) is copied from it rather than trained again
(``experiment mix --reuse-runs-from``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import pandas as pd
from default_models import RUNS, environment, finished, histosynth, relative, run_logged, say
from evaluate_default import (
    GENERATING_LEVELS,
    THESIS_LOOP,
    run_sharded,
    run_stages,
    select_pairs,
    shipped_mask_model,
    shipped_segmenter,
)

from histosynth.evaluate.report import markdown_table


@dataclass(frozen=True)
class Sizes:
    """How much each experiment trains (the defaults are the full run; the README says what was measured)."""

    seeds: int = 5
    core_real: int = 48
    core_splits: str = "100_0,100_100,0_100"
    real_counts: tuple[int, ...] = (12, 24, 48, 96)
    multiples: tuple[int, ...] = (0, 1, 4)
    real_patches: int = 200
    val_patches: int = 160
    base_channels: int = 8
    input_size: int = 316
    epochs: int = 40
    val_every: int = 2
    patience: int = 8
    pair_candidates: int = 3
    processes: int = 2
    steps: Optional[int] = None  # generation: the model's steps, scheduler and image size unless given
    scheduler: Optional[str] = None
    synthetic_size: Optional[int] = None

    @property
    def caption_images(self) -> int:
        """Enough for the largest arm: the largest real count times the largest multiple."""
        return max(self.core_real, max(self.real_counts) * max(self.multiples))


#: Sized for a few CPU minutes per run: a narrow U-Net, 6 epochs validated after the 3rd and 6th on 64 patches
#: (more than the 48 real training patches of the core), 128 px synthetic images by DPM-Solver++ in 20 steps
#: (a quarter of the pixels of a real patch).
SMALL = Sizes(real_counts=(12, 24, 48), multiples=(0, 1), real_patches=96, val_patches=64,
              base_channels=4, input_size=236, epochs=6, val_every=3, patience=2, steps=20, scheduler="dpm++",
              synthetic_size=128)
QUICK = Sizes(seeds=2, core_real=4, real_counts=(2, 4), multiples=(0, 1), real_patches=8, val_patches=8,
              base_channels=2, input_size=236, epochs=2, val_every=1, patience=2, pair_candidates=2, steps=2)


class Folders:
    """Where each stage writes, under one root folder."""

    def __init__(self, root: Path, reports: str = "reports"):
        self.root = root
        self.reports = root / reports
        self.real = root / "train-real"
        self.val = root / "val-real"
        self.caption_images = root / "generated-caption"
        self.caption_masks = root / "generated-caption-masks"
        self.caption = root / "synthetic-caption"
        self.layouts = root / "layouts"
        self.from_layouts = root / "generated-from-layouts"
        self.layout_candidates = root / "candidates-layouts"
        self.kept_layouts = root / "selected-layout-pairs"
        self.masks = root / "synthetic-masks"
        self.masks_kept = root / "synthetic-masks-kept"

    def report(self, name: str) -> Path:
        return self.reports / name


# --- helpers -------------------------------------------------------------------------------------
def generation_options(sizes: Sizes, from_masks: bool = False) -> list[str]:
    """Steps, scheduler and (without masks: images from masks have the masks' size) the image size."""
    options = ["--steps", str(sizes.steps)] if sizes.steps else []
    options += ["--size", str(sizes.synthetic_size)] if sizes.synthetic_size and not from_masks else []
    return options + (["--scheduler", sizes.scheduler] if sizes.scheduler else [])


def pair(images: Path, masks: Path, out: Path, log: str) -> None:
    """A patch dataset of generated images and their masks."""
    if not finished(out):
        run_logged(log, histosynth("dataset", "pair", relative(images), relative(masks), "--out", relative(out),
                                   "--slide", "synthetic", "--no-progress"))


def experiment(folders: Folders, sizes: Sizes, name: str, synthetic: Path, design: list[str],
               binary: bool = True, loop: tuple[str, ...] = ()) -> None:
    """`experiment mix` in `sizes.processes` shards, then once more to write the report."""
    report = folders.report(name)
    if (report / "report.md").is_file():
        return
    args = ["experiment", "mix", "--real", relative(folders.real), "--synthetic", relative(synthetic),
            "--val", relative(folders.val), "--out", relative(report), *design, "--seeds", str(sizes.seeds),
            *(["--class", "Glomeruli"] if binary else []), "--base-channels", str(sizes.base_channels),
            "--input-size", str(sizes.input_size), "--batch-size", "4", "--epochs", str(sizes.epochs),
            "--val-every", str(sizes.val_every), "--patience", str(sizes.patience), *loop, "--device", "cpu",
            "--no-progress", *reused_experiments(folders, report)]
    run_sharded(f"downstream-{name}", args, sizes.processes)
    run_logged(f"downstream-{name}", histosynth(*args))


def reused_experiments(folders: Folders, report: Path) -> list[str]:
    """``--reuse-runs-from`` each other experiment already begun: a run trained alike there (the real-only arm
    of the core comparisons on the same real data, say) is copied, not trained again."""
    others = sorted(f for f in folders.reports.glob("*") if (f / "experiment.json").is_file() and f != report)
    return [arg for folder in others for arg in ("--reuse-runs-from", relative(folder))]


def core_design(sizes: Sizes) -> list[str]:
    return ["--splits", sizes.core_splits, "--n", str(sizes.core_real)]


# --- stages ----------------------------------------------------------------------------------------
#: The phantom mix of the real patches: the tissue of the generating caption (the synthetic set's).
REAL_MIX = "generating"


def stage_data(folders: Folders, sizes: Sizes) -> None:
    for folder, count, seed in ((folders.real, sizes.real_patches, 11), (folders.val, sizes.val_patches, 7)):
        if not finished(folder):
            run_logged("downstream-data", histosynth(
                "phantom", "patches", "--out", relative(folder), "--n", str(count), "--mix", REAL_MIX,
                "--seed", str(seed), "--val", "0", "--test", "0", "--no-progress"))


def stage_caption(folders: Folders, sizes: Sizes) -> None:
    run_sharded("downstream-caption", ["generate", "--levels", GENERATING_LEVELS, "--n", str(sizes.caption_images),
                                       "--out", relative(folders.caption_images), "--seed", "0",
                                       *generation_options(sizes)], sizes.processes)
    if not any(folders.caption_masks.rglob("*.png")):
        run_logged("downstream-caption", histosynth(
            "segment", "predict", relative(folders.caption_images), "--segmenter", shipped_segmenter(),
            "--out", relative(folders.caption_masks), "--no-progress"))
    pair(folders.caption_images, folders.caption_masks, folders.caption, "downstream-caption")


def stage_thesis_loop(folders: Folders, sizes: Sizes) -> None:
    """Real only (the real set stands in as the unused synthetic set) with the thesis' training loop."""
    experiment(folders, sizes, "core-thesis-loop", folders.real, ["--splits", "100_0", "--n", str(sizes.core_real)],
               loop=tuple(THESIS_LOOP))


def stage_core(folders: Folders, sizes: Sizes) -> None:
    experiment(folders, sizes, "core-caption", folders.caption, core_design(sizes))


def stage_core_steps(folders: Folders, sizes: Sizes) -> None:
    """The core comparison at equal optimiser steps (``--equal-steps``): real only trains twice the epochs of
    real + 1x synthetic, the same compute."""
    experiment(folders, sizes, "core-caption-steps", folders.caption, [*core_design(sizes), "--equal-steps"])


def make_mask_pairs(folders: Folders, sizes: Sizes) -> None:
    """Images the text+mask model draws from phantom layouts, paired with the layouts: one seed per layout, and
    per layout the best of ``sizes.pair_candidates`` seeds (``select-pairs``). Finished jobs are kept."""
    if not (folders.layouts / "masks.csv").is_file():
        run_logged("downstream-masks", histosynth(
            "phantom", "masks", "--out", relative(folders.layouts), "--n", str(sizes.core_real), "--mix", "generating",
            "--seed", "5", *(["--size", str(sizes.synthetic_size)] if sizes.synthetic_size else []), "--no-progress"))
    jobs = []
    for seed in range(sizes.pair_candidates):
        jobs.append(folders.from_layouts if seed == 0 else folders.layout_candidates / f"seed{seed}")
        run_sharded("downstream-masks", ["generate", "--model", shipped_mask_model(), "--mask",
                                         relative(folders.layouts), "--mask-captions", "--out", relative(jobs[-1]),
                                         "--seed", str(seed), *generation_options(sizes, from_masks=True)],
                    sizes.processes)
    pair(folders.from_layouts / "images", folders.from_layouts / "masks", folders.masks, "downstream-masks")
    select_pairs(jobs, folders.kept_layouts)
    pair(folders.kept_layouts / "images", folders.kept_layouts / "masks", folders.masks_kept, "downstream-masks")


def stage_masks(folders: Folders, sizes: Sizes) -> None:
    make_mask_pairs(folders, sizes)
    experiment(folders, sizes, "core-masks", folders.masks, core_design(sizes))
    experiment(folders, sizes, "core-masks-kept", folders.masks_kept, core_design(sizes))


def stage_masks_steps(folders: Folders, sizes: Sizes) -> None:
    """The mask pairs' core comparison at equal optimiser steps (``--equal-steps``)."""
    make_mask_pairs(folders, sizes)
    experiment(folders, sizes, "core-masks-steps", folders.masks, [*core_design(sizes), "--equal-steps"])
    experiment(folders, sizes, "core-masks-kept-steps", folders.masks_kept, [*core_design(sizes), "--equal-steps"])


def stage_multiclass(folders: Folders, sizes: Sizes) -> None:
    """The core comparison as a multi-class segmentation, at equal optimiser steps (the fair comparison:
    at equal epochs 100_100 trains twice the steps of 100_0)."""
    experiment(folders, sizes, "core-caption-multiclass", folders.caption, [*core_design(sizes), "--equal-steps"],
               binary=False)


def curve_design(sizes: Sizes) -> list[str]:
    return ["--design", "curve", "--real-counts", ",".join(map(str, sizes.real_counts)),
            "--synthetic-multiples", ",".join(map(str, sizes.multiples))]


def stage_curve(folders: Folders, sizes: Sizes) -> None:
    experiment(folders, sizes, "curve-caption", folders.caption, curve_design(sizes))


def stage_curve_steps(folders: Folders, sizes: Sizes) -> None:
    """The curve again with every arm trained as many optimiser steps as the largest (--equal-steps): at equal
    epochs a 12-patch run makes an eighth of the steps of a 96-patch one."""
    experiment(folders, sizes, "curve-caption-steps", folders.caption, [*curve_design(sizes), "--equal-steps"])


#: The experiments of the summary: report folder and what its synthetic set is.
EXPERIMENTS = {
    "core-thesis-loop": "binary Glomeruli, real only, trained with the thesis' loop",
    "core-caption": "binary Glomeruli; synthetic = generating-caption images, masks from the shipped segmenter",
    "core-caption-steps": "the core comparison with every arm trained the optimiser steps of the largest",
    "core-masks": "binary Glomeruli; synthetic = images generated from phantom layouts, masks = the layouts",
    "core-masks-kept": "binary Glomeruli; synthetic = per layout the best of the seeds' images (select-pairs)",
    "core-masks-steps": "the mask pairs' core comparison with every arm trained the optimiser steps of the largest",
    "core-masks-kept-steps": "the kept mask pairs' core comparison with every arm trained the optimiser steps of "
                             "the largest",
    "core-caption-multiclass": "multi-class, equal steps; synthetic = generating-caption images, masks from the "
                               "shipped segmenter",
    "curve-caption": "binary Glomeruli, scarcity curve; synthetic = generating-caption images",
    "curve-caption-steps": "the scarcity curve with every arm trained the optimiser steps of the largest",
}


def stage_summary(folders: Folders, sizes: Sizes) -> None:
    from histosynth.io import write_text_atomic

    lines = ["# Does synthetic data help a segmenter? (the phantom, the shipped models)", "",
             "Made by `python scripts/evaluate_downstream.py`; the reports beside this file hold every table and "
             "plot. Differences are Dice(arm) - Dice(real only) per seed; an arm helps or hurts only where its 95 % "
             "interval excludes 0.", ""]
    for name, what in EXPERIMENTS.items():
        lines += experiment_summary(folders.report(name), what)
    summary = folders.reports / "summary.md"
    write_text_atomic(summary, "\n".join(lines) + "\n")
    say(f"[summary] wrote {relative(summary)}")
    print("\n".join(lines))


def experiment_summary(report: Path, what: str) -> list[str]:
    import json

    if not (report / "mix.json").is_file():
        return []
    summary = json.loads((report / "mix.json").read_text())
    collapse = summary["collapse"]
    table = pd.DataFrame(summary["table"])[["experiment", "real", "synthetic", "Dice mean", "Dice sd", "collapsed"]]
    lines = [f"## {report.name}: {what}", "", f"- collapsed runs: {collapse['collapsed']} of {collapse['runs']}",
             "", markdown_table(table), ""]
    if summary["paired"]:  # none where the experiment has only its baseline
        paired = pd.DataFrame(summary["paired"])[["experiment", "baseline", "pairs", "mean", "ci_low", "ci_high",
                                                  "t_p", "wilcoxon_p", "verdict"]]
        lines += [markdown_table(paired), ""]
    return lines


STAGES = {"data": stage_data, "caption": stage_caption, "thesis-loop": stage_thesis_loop, "core": stage_core,
          "core-steps": stage_core_steps, "masks": stage_masks, "masks-steps": stage_masks_steps,
          "curve": stage_curve, "curve-steps": stage_curve_steps, "multiclass": stage_multiclass,
          "summary": stage_summary}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="a few patches only, in runs/downstream-quick")
    parser.add_argument("--small", action="store_true", help="sized for a busy 2-core CPU (see SMALL), in "
                                                             "runs/downstream-small")
    parser.add_argument("--processes", type=int, default=Sizes.processes, help="processes per generation / experiment")
    parser.add_argument("--width", type=int, help="the segmenters' base width instead of the preset's; the same data "
                                                  "and synthetic sets, reports in reports-width<N>/")
    args = parser.parse_args(argv)
    os.environ.update(environment())
    preset = "quick" if args.quick else "small" if args.small else None
    sizes = replace({"quick": QUICK, "small": SMALL}.get(preset, Sizes()), processes=args.processes)
    if args.width:
        sizes = replace(sizes, base_channels=args.width)
    folders = Folders(RUNS / ("downstream" + (f"-{preset}" if preset else "")),
                      f"reports-width{args.width}" if args.width else "reports")
    folders.root.mkdir(parents=True, exist_ok=True)
    run_stages(STAGES, args.stage, folders, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The thesis' three evaluations, reproduced on the phantom with the shipped models.

    python scripts/evaluate_default.py                 # every stage (make evaluate-default)
    python scripts/evaluate_default.py --stage mix     # one stage (its inputs must exist)
    python scripts/evaluate_default.py --quick         # a smoke run with a few images, in runs/evaluate-quick

It needs the data of ``scripts/default_models.py`` (stage data) and evaluates the models shipped in
``src/histosynth/weights/``. Stages, each skipped when its output exists; outputs go to
``runs/evaluate/``, every command's output to ``runs/logs/evaluate-<stage>.log``:

1. data      held-out real phantom: the patches of the LDM's phantom slides that it never saw
2. captions  N images of the generating caption (two processes, one shard each), segmented with the
             shipped segmenter and re-captioned (thesis Table 5.1); beside them N images of the empty
             caption, what the model draws unasked: the caption's share of glomerular pixels against
             the empty caption's tells a caption followed from the model's habit
3. realism   images generated from the captions of held-out real patches, against those real
             patches: classifier two-sample AUC; memorisation against the LDM's training patches
4. mix       the six-split experiment (binary Glomeruli, 3 seeds): real = held-out 'train' slides,
             validation = held-out 'val' slides, synthetic = the generating-caption images of stage captions
             with masks from the shipped segmenter (no hand annotation)
5. masks     label fidelity of the text+mask model on held-out masks, its ceiling (the segmenter on
             autoencoder reconstructions of held-out patches), and the six-split experiment with
             images generated from phantom layouts (masks = the layouts)
6. pairs     the held-out masks of stage masks made with more seeds, per mask the image the shipped
             segmenter reads closest to its mask kept (histosynth select-pairs), and both the
             first seed's images and the kept ones judged by a second segmenter trained apart
             (another seed on the same data), which did not choose; and the six-split experiment
             of stage masks again with the pairs kept from the layouts' images
7. summary   runs/evaluate/summary.md: our numbers beside the thesis' and the targets
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import pandas as pd
from default_models import (
    DATA,
    DONE_MARK,
    LOGS,
    ROOT,
    RUNS,
    environment,
    finished,
    histosynth,
    merge_datasets,
    relative,
    run_logged,
    say,
    train_segmenter,
)
from default_models import Sizes as TrainingSizes

from histosynth.evaluate.report import markdown_table

#: The thesis' generating caption ("Tubuli medium, a lot of Glomeruli") as class levels.
GENERATING_LEVELS = "Tubuli=medium,Glomeruli=high"
#: The thesis' training loop in `experiment mix` (constant rate, unweighted loss, stopping on the loss, final
#: weights), as the numbers of this script were measured with; scripts/evaluate_downstream.py uses the
#: experiment's own loop, built for small data.
THESIS_LOOP = ["--monitor", "val_loss", "--warmup-epochs", "0", "--schedule", "constant", "--foreground-crops", "0",
               "--class-weights", "none", "--weights", "final"]
#: The generation seed of the images made from phantom layouts (stage masks); stage pairs adds the next ones.
LAYOUTS_SEED = 2


@dataclass(frozen=True)
class Sizes:
    """How many images each evaluation uses (the defaults are what the README reports)."""

    caption_images: int = 400
    realism_images: int = 200
    mix_patches: int = 48
    mix_seeds: int = 3
    mix_epochs: int = 12
    mix_input_size: int = 316
    fidelity_images: int = 100
    pair_candidates: int = 3
    judge_training: TrainingSizes = TrainingSizes()
    processes: int = 2


QUICK = Sizes(caption_images=8, realism_images=8, mix_patches=4, mix_seeds=1, mix_epochs=1, mix_input_size=236,
              fidelity_images=4, pair_candidates=2,
              judge_training=TrainingSizes(segmenter_epochs=1, segmenter_tune_epochs=1))


class Paths:
    """Where each stage writes, under one root folder."""

    def __init__(self, root: Path):
        self.root = root
        self.heldout = root / "heldout"
        self.generating = root / "generated-generating"
        self.empty_caption = root / "generated-empty-caption"
        self.matched = root / "generated-matched"
        self.reconstructed = root / "reconstructed"
        self.pseudo_masks = root / "pseudo-masks"
        self.synthetic = root / "synthetic-glomeruli"
        self.layouts = root / "layouts"
        self.from_layouts = root / "generated-from-layouts"
        self.synthetic_from_masks = root / "synthetic-from-masks"
        self.judge = root / "judge"
        self.candidates = root / "candidates"
        self.selected = root / "selected-pairs"
        self.layout_candidates = root / "candidates-layouts"
        self.selected_layouts = root / "selected-layout-pairs"
        self.synthetic_kept = root / "synthetic-from-masks-kept"

    def report(self, name: str) -> Path:
        return self.root / "reports" / name


def shipped_segmenter() -> str:
    from histosynth.defaults import default_segmenter_path

    return str(default_segmenter_path())


def shipped_mask_model() -> str:
    from histosynth.defaults import default_mask_bundle_path

    return str(default_mask_bundle_path())


# --- running several shards of one job at once -------------------------------------------------------
def generate_sharded(name: str, args: list[str], processes: int) -> None:
    """One `histosynth generate` job made by `processes` processes (one shard each), logged."""
    run_sharded(name, ["generate", *args], processes)


def run_sharded(name: str, args: list[str], processes: int) -> None:
    """One histosynth command that takes --shard (generate, experiment mix) run by `processes` processes, logged."""
    LOGS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    commands = [histosynth(*args, "--shard", f"{i}/{processes}") for i in range(processes)]
    logs = [(LOGS / f"{name}.shard{i}.log").open("a") for i in range(processes)]
    say(f"[{name}] {shlex.join(commands[0][1:])} ... in {processes} processes")
    running = [subprocess.Popen(c, cwd=ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT)
               for c, log in zip(commands, logs, strict=True)]
    codes = [p.wait() for p in running]
    for log in logs:
        log.close()
    seconds = time.perf_counter() - started
    with (LOGS / f"{name}.log").open("a") as log:
        for command in commands:
            log.write(f"\n$ {shlex.join(command)}\n")
        log.write(f"{DONE_MARK} exit codes {codes} after {seconds:.0f} s\n")
    if any(codes):
        raise SystemExit(f"[{name}] a shard failed ({codes}); see {LOGS}/{name}.shard*.log")
    say(f"[{name}] done in {seconds:.0f} s")


# --- stages ----------------------------------------------------------------------------------------
def stage_data(paths: Paths, sizes: Sizes) -> None:
    """The phantom slides' patches after the ones the LDM trained on (scripts/default_models.py)."""
    if not finished(paths.heldout):
        seen = TrainingSizes().ldm_patches_per_slide
        merge_datasets(paths.heldout, [(DATA / "phantom", slice(seen, None))])


def stage_captions(paths: Paths, sizes: Sizes) -> None:
    for images, report, caption in ((paths.generating, "captions", ["--levels", GENERATING_LEVELS]),
                                    (paths.empty_caption, "empty-caption", ["--caption", ""])):
        generate_sharded(f"evaluate-{report}", [*caption, "--n", str(sizes.caption_images),
                                                 "--out", relative(images), "--seed", "0"], sizes.processes)
        if not (paths.report(report) / "report.md").is_file():
            run_logged(f"evaluate-{report}", histosynth(
                "evaluate", "captions", "--images", relative(images), "--segmenter", shipped_segmenter(),
                "--out", relative(paths.report(report)), "--no-progress"))


def heldout_sample(paths: Paths, sizes: Sizes):
    """The held-out patches that the realism test compares with (and the autoencoder reconstructs)."""
    from histosynth.data.dataset import open_dataset

    heldout = open_dataset(paths.heldout)
    return heldout, heldout.rows().sample(sizes.realism_images, random_state=0)


def stage_realism(paths: Paths, sizes: Sizes) -> None:
    captions = paths.root / "matched-captions.txt"
    heldout, rows = heldout_sample(paths, sizes)
    if not captions.is_file():
        write_captions_file(rows["caption"], captions)
    generate_sharded("evaluate-realism", ["--captions-file", relative(captions), "--n", str(sizes.realism_images),
                                          "--out", relative(paths.matched), "--seed", "1"], sizes.processes)
    report = paths.report("realism")
    if not (report / "report.md").is_file():
        run_logged("evaluate-realism", histosynth(
            "evaluate", "realism", "--real", relative(paths.heldout), "--synthetic", relative(paths.matched),
            "--train", relative(DATA / "ldm"), "--out", relative(report), "--seed", "0"))
    reconstruct(heldout, rows, paths.reconstructed)  # the autoencoder's share of the gap
    report = paths.report("realism-autoencoder")
    if not (report / "report.md").is_file():
        run_logged("evaluate-realism", histosynth(
            "evaluate", "realism", "--real", relative(paths.heldout), "--synthetic", relative(paths.reconstructed),
            "--out", relative(report), "--seed", "0"))


def write_captions_file(captions, path: Path) -> None:
    """A captions file for `generate --captions-file`: one caption a line, its sentences joined by '\\n'."""
    path.write_text("".join(c.replace("\n", "\\n") + "\n" for c in captions))


def reconstruct(dataset, rows: pd.DataFrame, out: Path, batch: int = 8) -> None:
    """The shipped autoencoder's reconstructions of some patches, as PNGs."""
    import torch

    from histosynth.data.torchdata import to_model_range, to_uint8
    from histosynth.defaults import default_bundle_path
    from histosynth.io import write_png_atomic
    from histosynth.models.autoencoder import decode_latents, encode_latents
    from histosynth.models.bundle import load_autoencoder_folder

    if len(list(out.glob("*.png"))) == len(rows):
        return
    autoencoder = load_autoencoder_folder(default_bundle_path() / "autoencoder").eval()
    for start in range(0, len(rows), batch):
        part = rows.iloc[start:start + batch]
        images = torch.stack([to_model_range(dataset.image(row)) for _, row in part.iterrows()])
        with torch.no_grad():
            decoded = decode_latents(autoencoder, encode_latents(autoencoder, images))
        for patch_id, image in zip(part["patch_id"], to_uint8(decoded), strict=True):
            write_png_atomic(out / f"{patch_id}.png", image)
    say(f"[realism] {len(rows)} autoencoder reconstructions in {relative(out)}")

def stage_mix(paths: Paths, sizes: Sizes) -> None:
    if not any(paths.pseudo_masks.glob("*.png")):
        run_logged("evaluate-mix", histosynth(
            "segment", "predict", relative(paths.generating), "--segmenter", shipped_segmenter(),
            "--out", relative(paths.pseudo_masks), "--no-progress"))
    pair_and_mix(paths, paths.generating, paths.pseudo_masks, paths.synthetic, paths.report("mix"), sizes)


def pair_and_mix(paths: Paths, images: Path, masks: Path, synthetic: Path, report: Path, sizes: Sizes) -> None:
    """The six-split experiment with generated images and their masks as the synthetic set."""
    if not finished(synthetic):
        run_logged("evaluate-mix", histosynth("dataset", "pair", relative(images), relative(masks), "--out",
                                              relative(synthetic), "--slide", "synthetic", "--no-progress"))
    if not (report / "report.md").is_file():
        run_logged("evaluate-mix", histosynth(
            "experiment", "mix", "--real", relative(paths.heldout), "--synthetic",
            relative(synthetic), "--out", relative(report), "--class", "Glomeruli", "--seeds", str(sizes.mix_seeds),
            "--n", str(sizes.mix_patches), "--base-channels", "8", "--input-size", str(sizes.mix_input_size),
            "--batch-size", "4", "--epochs", str(sizes.mix_epochs), "--patience", "3", *THESIS_LOOP, "--device", "cpu",
            "--no-progress"))


def stage_masks(paths: Paths, sizes: Sizes) -> None:
    report = paths.report("label-fidelity")
    if not (report / "report.md").is_file():
        run_logged("evaluate-masks", histosynth(
            "evaluate", "masks", "--model", shipped_mask_model(), "--masks-from", relative(paths.heldout),
            "--n", str(sizes.fidelity_images), "--segmenter", shipped_segmenter(), "--out", relative(report),
            "--mask-captions", "--no-progress"))
    # the ceiling: the same segmenter on the autoencoder's reconstructions of held-out real patches
    # (stage realism) against their masks; no model on these latents can do better than this
    ceiling = paths.report("label-fidelity-reconstructed")
    if not (ceiling / "report.md").is_file():
        reconstruct(*heldout_sample(paths, sizes), paths.reconstructed)
        run_logged("evaluate-masks", histosynth(
            "evaluate", "masks", "--images", relative(paths.reconstructed), "--masks-from", relative(paths.heldout),
            "--segmenter", shipped_segmenter(), "--out", relative(ceiling), "--no-progress"))
    # layouts with the generating caption's class mix, like the synthetic set of stage mix
    if not (paths.layouts / "masks.csv").is_file():
        run_logged("evaluate-masks", histosynth(
            "phantom", "masks", "--out", relative(paths.layouts), "--n", str(2 * sizes.mix_patches),
            "--mix", "generating", "--seed", "5", "--no-progress"))
    generate_sharded("evaluate-masks", ["--model", shipped_mask_model(), "--mask", relative(paths.layouts),
                                        "--mask-captions", "--out", relative(paths.from_layouts),
                                        "--seed", str(LAYOUTS_SEED)],
                     sizes.processes)
    pair_and_mix(paths, paths.from_layouts / "images", paths.from_layouts / "masks", paths.synthetic_from_masks,
                 paths.report("mix-masks"), sizes)


def stage_pairs(paths: Paths, sizes: Sizes) -> None:
    first = paths.report("label-fidelity") / "job"
    jobs = with_more_seeds(first, range(1, sizes.pair_candidates), paths.candidates, sizes)
    select_pairs(jobs, paths.selected)
    # the judge: trained as the shipped segmenter (scripts/default_models.py), with another seed
    train_segmenter(paths.judge.with_name("judge-base"), paths.judge, sizes.judge_training, seed=1,
                    log="evaluate-pairs")
    judged = (("pairs-first-seed", first / "images", ["--mask", relative(first / "masks")]),
              ("pairs-kept", paths.selected / "images", ["--mask", relative(paths.selected / "masks")]),
              ("pairs-judge-ceiling", paths.reconstructed, ["--masks-from", relative(paths.heldout)]))
    for name, images, masks in judged:
        report = paths.report(name)
        if not (report / "report.md").is_file():
            run_logged("evaluate-pairs", histosynth("evaluate", "masks", "--images", relative(images), *masks,
                                                    "--segmenter", relative(paths.judge), "--out", relative(report),
                                                    "--no-progress"))
    # the annotation-free experiment of stage masks again, with the pairs kept from the layouts' jobs
    layout_jobs = with_more_seeds(paths.from_layouts, range(LAYOUTS_SEED + 1, LAYOUTS_SEED + sizes.pair_candidates),
                                  paths.layout_candidates, sizes)
    select_pairs(layout_jobs, paths.selected_layouts)
    pair_and_mix(paths, paths.selected_layouts / "images", paths.selected_layouts / "masks",
                 paths.synthetic_kept, paths.report("mix-masks-kept"), sizes)


def with_more_seeds(first: Path, seeds: range, folder: Path, sizes: Sizes) -> list[Path]:
    """A job made from masks, and one more job of the same masks per seed (in ``folder/seed<S>``)."""
    jobs = [first]
    for seed in seeds:
        jobs.append(folder / f"seed{seed}")
        generate_sharded("evaluate-pairs", ["--model", shipped_mask_model(), "--mask", relative(first / "masks"),
                                            "--mask-captions", "--out", relative(jobs[-1]), "--seed", str(seed)],
                         sizes.processes)
    return jobs


def select_pairs(jobs: list[Path], out: Path) -> None:
    """Per mask, the image of ``jobs`` that the shipped segmenter reads closest to it."""
    if not (out / "selection.csv").is_file():
        run_logged("evaluate-pairs", histosynth("select-pairs", *map(relative, jobs), "--segmenter",
                                                shipped_segmenter(), "--out", relative(out), "--no-progress"))


def stage_summary(paths: Paths, sizes: Sizes) -> None:
    from histosynth.io import write_text_atomic

    lines = ["# The thesis' evaluations on the phantom, with the shipped models", "",
             f"Made by `python scripts/evaluate_default.py` ({time.strftime('%Y-%m-%d')}); "
             "the reports under `reports/` hold every table.", ""]
    lines += caption_summary(paths.report("captions"), paths.report("empty-caption"))
    lines += realism_summary(paths.report("realism"))
    lines += mix_summary(paths.report("mix"), "synthetic images of the generating caption, masks from the segmenter")
    lines += fidelity_summary(paths.report("label-fidelity"), paths.report("label-fidelity-reconstructed"))
    lines += mix_summary(paths.report("mix-masks"), "synthetic images generated from phantom layouts, "
                                                    "masks = the layouts")
    lines += pairs_summary(paths, sizes)
    lines += mix_summary(paths.report("mix-masks-kept"), f"images generated from phantom layouts, per layout the "
                                                         f"best of {sizes.pair_candidates} seeds (select-pairs)")
    write_text_atomic(paths.root / "summary.md", "\n".join(lines) + "\n")
    say(f"[summary] wrote {relative(paths.root / 'summary.md')}")
    print("\n".join(lines))


def caption_shares(report: Path) -> dict[str, float]:
    """The numbers of a caption-accuracy report of the generating caption: its images, the % that mention
    glomeruli, the % found at 'Glomeruli high' and the % found at 'Tubuli medium'."""
    per_image = pd.read_csv(report / "per_image.csv", keep_default_na=False)
    levels = pd.read_csv(report / "table_5_1.csv").set_index("level")
    return {"images": len(per_image), "mention": 100 * float((per_image["combined found"] != "none").mean()),
            "glomeruli_high": float(levels.loc["High", "Glomeruli %"]),
            "tubuli_medium": 100 * float((per_image["Tubuli found"] == "medium").mean())}


def glomerular_pixels(report: Path) -> float:
    """The mean share of glomerular pixels (%) the segmenter finds in a caption-accuracy report's images."""
    found = pd.read_csv(report / "agreement.csv").set_index("class")["mean prevalence found"]
    return 100 * float(found["Glomeruli"])


def caption_summary(report: Path, empty_caption: Path) -> list[str]:
    shares = caption_shares(report)
    levels = pd.read_csv(report / "table_5_1.csv").set_index("level")
    mention, high = shares["mention"], shares["glomeruli_high"]
    lines = ["## Caption accuracy (generating caption)", "",
             f"- images: {shares['images']}",
             f"- images that mention glomeruli: **{mention:.1f} %** (thesis 91.3 %; target >= 95 %)",
             f"- 'Glomeruli high' found: **{high:.1f} %** of images (thesis 0.5 %: {high / 0.5:.0f}x)",
             f"- Tubuli found at the requested 'medium': {shares['tubuli_medium']:.1f} % (target >= 50 %)"]
    if (empty_caption / "agreement.csv").is_file():
        unasked = caption_shares(empty_caption)
        lines.append(f"- glomerular pixels: **{glomerular_pixels(report):.1f} %** of the generating caption's images "
                     f"against {glomerular_pixels(empty_caption):.1f} % of {unasked['images']} images of the empty "
                     f"caption (what the model draws unasked; there {unasked['mention']:.1f} % mention glomeruli, "
                     f"{unasked['glomeruli_high']:.1f} % at 'Glomeruli high')")
    return lines + ["", markdown_table(levels.reset_index()), ""]


def realism_summary(report: Path) -> list[str]:
    lines = ["## Realism (target: two-sample AUC <= 0.75)", ""]
    for name, title in (("realism", "held-out real against generated from their captions"),
                        ("realism-autoencoder", "held-out real against their autoencoder reconstructions")):
        folder = report.parent / name
        for table in ("two_sample", "memorisation"):
            if (folder / f"{table}.csv").is_file():
                lines += [f"{title}, {table.replace('_', '-')}:", "",
                          markdown_table(pd.read_csv(folder / f"{table}.csv")), ""]
    return lines


def counted_classes(report: Path) -> pd.DataFrame:
    """The rows of a label-fidelity report's classes that count towards its mean Dice."""
    table = pd.read_csv(report / "per_class.csv")
    return table[table["counted"]]


def fidelity_summary(report: Path, ceiling: Path) -> list[str]:
    if not (report / "per_class.csv").is_file():
        return []
    counted = counted_classes(report)
    lines = ["## Label fidelity of the text+mask model (target: mean Dice >= 0.8)", "",
             f"- mean Dice over the {len(counted)} classes with enough pixels: **{counted['Dice'].mean():.3f}**"]
    if (ceiling / "per_class.csv").is_file():
        lines.append("- the ceiling, the same segmenter on autoencoder reconstructions of held-out real patches "
                     f"against their masks: {counted_classes(ceiling)['Dice'].mean():.3f}")
    return lines + ["", markdown_table(pd.read_csv(report / "per_class.csv")), ""]


def pairs_summary(paths: Paths, sizes: Sizes) -> list[str]:
    reports = [paths.report(name) for name in ("pairs-first-seed", "pairs-kept", "pairs-judge-ceiling")]
    if not all((report / "per_class.csv").is_file() for report in reports):
        return []
    first, kept, ceiling = (counted_classes(report)["Dice"].mean() for report in reports)
    return [f"## Pairs kept from {sizes.pair_candidates} seeds per mask (select-pairs), judged by a second "
            "segmenter", "",
            f"- the first seed's images (those of label fidelity above): mean Dice {first:.3f}",
            f"- per mask the image the shipped segmenter reads closest to its mask: **{kept:.3f}**",
            f"- the second segmenter on autoencoder reconstructions of held-out real patches: {ceiling:.3f}", "",
            markdown_table(pd.read_csv(reports[1] / "per_class.csv")), ""]


def mix_summary(report: Path, synthetic: str) -> list[str]:
    if not (report / "table_5_2.csv").is_file():
        return []
    table = pd.read_csv(report / "table_5_2.csv")
    dice = table.set_index("experiment")["Dice mean"]
    lines = [f"## Real and synthetic data in training (binary Glomeruli; {synthetic})", ""]
    if {"100_0", "100_100"} <= set(dice.index):
        verdict = "beats" if dice["100_100"] > dice["100_0"] else "does not beat"
        lines += [f"- 100_100 {verdict} 100_0 in mean Dice: {dice['100_100']:.3f} against {dice['100_0']:.3f} "
                  "(target: beats)", ""]
    return lines + [markdown_table(table), ""]


STAGES = {"data": stage_data, "captions": stage_captions, "realism": stage_realism, "mix": stage_mix,
          "masks": stage_masks, "pairs": stage_pairs, "summary": stage_summary}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="a few images only, in runs/evaluate-quick")
    parser.add_argument("--processes", type=int, default=Sizes.processes, help="generation processes")
    args = parser.parse_args(argv)
    os.environ.update(environment())
    sizes = replace(QUICK if args.quick else Sizes(), processes=args.processes)
    paths = Paths(RUNS / ("evaluate-quick" if args.quick else "evaluate"))
    paths.root.mkdir(parents=True, exist_ok=True)
    run_stages(STAGES, args.stage, paths, sizes)
    return 0


def run_stages(stages: dict, chosen: str, paths, sizes) -> None:
    """Every stage in order ('all') or the one chosen, each given the script's folders and sizes."""
    for name in (stages if chosen == "all" else [chosen]):
        say(f"== stage {name}")
        stages[name](paths, sizes)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Which training recipe converges fastest per step? The recipe's options side by side at one step budget.

    python scripts/compare_recipes.py                         # every recipe, 150 steps each, in runs/recipes/
    python scripts/compare_recipes.py --recipes baseline,v-pred   # some of them (e.g. two processes side by side)
    python scripts/compare_recipes.py --steps 3000 --seed 1 --accelerator auto   # another seed, on a GPU
    python scripts/compare_recipes.py --condition text --recipes baseline,flow   # text-only models
    python scripts/compare_recipes.py --steps 600 --caption-images 48   # 48 images of the caption, not 12

Every recipe trains the tiny preset's text+mask LDM from scratch, on the same phantom patches (``histosynth
phantom patches``) encoded once by the shipped autoencoder, with the same steps, batch, learning rate, seed
and mask dropout; only the objective (or, for ``repeat-rare``, the epoch's patches) differs:

- ``baseline``        CompVis' recipe: noise prediction, plain MSE (today's default)
- ``min-snr``         noise prediction, min-SNR-5 loss weights (Hang et al. 2023)
- ``v-pred``          velocity prediction (Salimans & Ho 2022), plain MSE
- ``v-pred+min-snr``  velocity prediction, min-SNR-5 loss weights
- ``flow``            flow matching on the straight path (rectified flow; Liu et al. 2022, Lipman et al.
                      2023), the objective of Stable Diffusion 3, SiT and the newest histopathology generators
- ``repeat-rare``     CompVis' objective, with the patches of rare classes repeated in each epoch
                      (repeat-factor sampling, Gupta et al. 2019; ``--repeat-rare 0.3``)
- ``dit``             flow matching with the transformer denoiser instead of the UNet (``--denoiser dit``:
                      PixArt-alpha's layout, as PixCell and SiT; the tiny preset's 5.2 M parameters against
                      the UNet's 4.4 M, about its cost per step)

With ``--condition text`` every recipe trains a text-only LDM instead (as the shipped text model): what
a recipe does to the caption alone, with no mask to lean on.

Each model is then measured as ``scripts/evaluate_default.py`` measures the shipped ones, on phantom
patches of other pseudo-slides (another phantom seed) than it trained on, with the shipped segmenter:

- caption accuracy: images of the thesis' generating caption ("Tubuli medium, a lot of Glomeruli"),
  segmented and re-captioned (``histosynth evaluate captions``); beside them, the glomerular pixel share of
  as many images of the empty caption, what the model draws unasked: a caption the model follows moves
  its images away from that
- label fidelity (text+mask models): images of held-out masks with their masks' captions, mean Dice of the
  segmenter's reading against the mask (``histosynth evaluate masks``)
- realism: those same images (text models: images of the held-out patches' captions) against the held-out
  real patches, classifier two-sample ROC AUC (``histosynth evaluate realism``; 0.5 = indistinguishable)

Folders: ``runs/recipes/{data,models,reports}`` (a recipe's model and reports are named ``<recipe>-<steps>``,
``<recipe>-text-<steps>`` for a text-only model, with ``-seed<S>`` for a training seed other than 0; the data
and the evaluation's seeds are the same for every training seed); logs ``runs/logs/recipes-<recipe>[-text].log``; the
table ``runs/recipes/summary-<steps>.md``. Every step is skipped when its output exists (an interrupted
training resumes from its last checkpoint).

A longer budget continues the recipe's longest shorter run of the same seed, batch and warm-up where one
left its checkpoint (``--steps 1500`` after ``--steps 600`` trains 900 more steps): the learning rate is
constant after the warm-up, so the continued run is the longer run's first steps, and its training time
(the model's ``training_time_s``) counts every step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import pandas as pd
from default_models import RECIPES, RUNS, environment, histosynth, phantom_dataset, relative, resumed, run_logged, say
from evaluate_default import GENERATING_LEVELS, caption_shares, counted_classes, glomerular_pixels, write_captions_file

from histosynth.evaluate.report import markdown_table, mean_sd

ROOT = RUNS / "recipes"
DATA = ROOT / "data"


@dataclass(frozen=True)
class Sizes:
    """The data, the step budget and the evaluation's image counts (the defaults are the README's)."""

    train_patches: int = 240
    heldout_patches: int = 64
    steps: int = 150
    warmup_steps: int = 25
    batch_size: int = 8
    caption_images: int = 12
    mask_images: int = 12
    sampling_steps: int = 20
    condition: str = "text+mask"


#: a smoke run of the whole comparison (every command, a few images; its numbers mean nothing)
QUICK = Sizes(steps=2, warmup_steps=0, caption_images=4, mask_images=6, sampling_steps=4)


def shipped(name: str) -> str:
    from histosynth import defaults

    return str({"autoencoder": defaults.default_bundle_path, "segmenter": defaults.default_segmenter_path}[name]())


def stage_data(sizes: Sizes) -> None:
    """Training patches and held-out patches (other pseudo-slides, another seed), and the training cache
    (encoded here once, so that recipes trained side by side do not each encode it)."""
    phantom_dataset(DATA / "train", sizes.train_patches, "default", seed=10)
    phantom_dataset(DATA / "heldout", sizes.heldout_patches, "default", seed=11)
    done = DATA / "train" / "cache.done"
    if not done.is_file():
        run_logged("recipes-data", histosynth("cache", relative(DATA / "train"), "--preset", "tiny", "--autoencoder",
                                              shipped("autoencoder"), "--device", "cpu", "--seed", "0",
                                              "--label-maps"))
        done.touch()


#: what --condition may be: the two model kinds the toolkit ships
CONDITIONS = ("text+mask", "text")


def run_label(recipe: str, sizes: Sizes) -> str:
    """The recipe's name, with ``-text`` for a text-only model (its runs and logs are kept apart)."""
    return recipe + ("-text" if sizes.condition == "text" else "")


def run_name(recipe: str, sizes: Sizes, seed: int) -> str:
    return f"{run_label(recipe, sizes)}-{sizes.steps}" + (f"-seed{seed}" if seed else "")


def model_folder(recipe: str, sizes: Sizes, seed: int) -> Path:
    return ROOT / "models" / run_name(recipe, sizes, seed)


def report_folder(recipe: str, sizes: Sizes, seed: int, what: str) -> Path:
    return ROOT / "reports" / run_name(recipe, sizes, seed) / what


def train(recipe: str, sizes: Sizes, seed: int, accelerator: str) -> None:
    out = model_folder(recipe, sizes, seed)
    if (out / "histosynth.json").is_file():
        return
    continue_shorter_run(recipe, sizes, seed)
    run_logged(f"recipes-{run_label(recipe, sizes)}", histosynth(
        "train", relative(DATA / "train"), "--out", relative(out), "--preset", "tiny",
        "--autoencoder", shipped("autoencoder"), "--condition", sizes.condition, "--steps", str(sizes.steps),
        "--batch-size", str(sizes.batch_size), "--warmup-steps", str(sizes.warmup_steps),
        "--checkpoint-every", "25",
        "--log-every", "10", "--accelerator", accelerator, "--seed", str(seed), *RECIPES[recipe],
        *resumed(run_folder(out))))


def continue_shorter_run(recipe: str, sizes: Sizes, seed: int) -> None:
    """Copy the recipe's longest shorter run with a checkpoint (same seed, batch and warm-up) to this budget's
    run folder, which then resumes from it; nothing when this budget's run folder exists or none fits."""
    run = run_folder(model_folder(recipe, sizes, seed))
    if run.exists():
        return
    name = re.compile(re.escape(run_label(recipe, sizes)) + r"-(\d+)" + (f"-seed{seed}" if seed else "") + r"\.run")
    shorter = []
    for folder in (ROOT / "models").glob("*.run"):
        match = name.fullmatch(folder.name)
        if match and int(match.group(1)) < sizes.steps and (folder / "checkpoints" / "last.ckpt").is_file():
            settings = run_settings(folder)
            if (settings.get("batch_size"), settings.get("warmup_steps")) == (sizes.batch_size, sizes.warmup_steps):
                shorter.append((int(match.group(1)), folder))
    if shorter:
        steps, folder = max(shorter)
        say(f"[{recipe}] continuing {folder.name} ({steps} steps) to {sizes.steps} steps")
        staging = run.with_name(run.name + ".partial")  # a copy cut short is never taken for the run
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        staging.rename(run)


def run_settings(run: Path) -> dict:
    """A run folder's settings (run.json); empty, with a word, where the file is missing or damaged, so that the
    run is not continued."""
    try:
        settings = json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as error:
        say(f"not continuing {run.name}: its run.json cannot be read ({error})")
        return {}
    if not isinstance(settings, dict):
        say(f"not continuing {run.name}: its run.json holds no settings")
        return {}
    return settings


def run_folder(model: Path) -> Path:
    return model.with_name(model.name + ".run")


def evaluate(recipe: str, sizes: Sizes, seed: int) -> None:
    """Caption accuracy, label fidelity (a text+mask model) and realism of one recipe's model (each skipped
    when its report exists)."""
    model, log = relative(model_folder(recipe, sizes, seed)), f"recipes-{run_label(recipe, sizes)}"
    masks, realism = (report_folder(recipe, sizes, seed, w) for w in ("label-fidelity", "realism"))
    steps = ["--steps", str(sizes.sampling_steps)]
    for kind, caption in (("captions", ["--levels", GENERATING_LEVELS]), ("empty-caption", ["--caption", ""])):
        report = captions_report(recipe, sizes, seed, kind)
        if not (report / "per_image.csv").is_file():
            images = report.with_name(report.name.replace(kind, CAPTION_IMAGES[kind]))
            run_logged(log, histosynth("generate", "--model", model, *caption, "--n", str(sizes.caption_images),
                                       "--seed", "0", *steps, "--out", relative(images)))
            run_logged(log, histosynth("evaluate", "captions", "--images", relative(images), "--segmenter",
                                       shipped("segmenter"), "--out", relative(report), "--no-progress"))
    if sizes.condition == "text+mask":
        if not (masks / "per_class.csv").is_file():
            run_logged(log, histosynth("evaluate", "masks", "--model", model, "--masks-from",
                                       relative(DATA / "heldout"), "--n", str(sizes.mask_images), "--mask-captions",
                                       "--seed", "0", *steps, "--segmenter", shipped("segmenter"),
                                       "--out", relative(masks), "--no-progress"))
    if not (realism / "two_sample.csv").is_file():
        if sizes.condition == "text+mask":
            synthetic = masks / "job" / "images"
        else:
            synthetic = realism.with_name("heldout-captions")
            run_logged(log, histosynth("generate", "--model", model, "--captions-file",
                                       relative(heldout_captions(sizes)), "--n", str(sizes.mask_images), "--seed",
                                       "0", *steps, "--out", relative(synthetic)))
        run_logged(log, histosynth("evaluate", "realism", "--real", relative(DATA / "heldout"), "--synthetic",
                                   relative(synthetic), "--train", relative(DATA / "train"),
                                   "--out", relative(realism), "--seed", "0"))


#: the images beside each caption report: of the generating caption, and of the empty caption (what the model
#: draws unasked, to tell a caption followed from the model's habit)
CAPTION_IMAGES = {"captions": "generating-caption", "empty-caption": "empty-caption-images"}


def captions_report(recipe: str, sizes: Sizes, seed: int, kind: str = "captions") -> Path:
    """The caption accuracy report of the generating caption (``captions``) or of the empty caption
    (``empty-caption``), with ``-<N>`` for N images other than the default's (beside it, its images:
    :data:`CAPTION_IMAGES`)."""
    count = "" if sizes.caption_images == Sizes.caption_images else f"-{sizes.caption_images}"
    return report_folder(recipe, sizes, seed, kind + count)


def heldout_captions(sizes: Sizes) -> Path:
    """A captions file of held-out patches (drawn with seed 0), for a text model's images to compare with them."""
    from histosynth.data.dataset import open_dataset

    path = DATA / f"heldout-captions-{sizes.mask_images}.txt"
    if not path.is_file():
        rows = open_dataset(DATA / "heldout").rows().sample(sizes.mask_images, random_state=0)
        write_captions_file(rows["caption"], path)
    return path


def summary_row(recipe: str, sizes: Sizes, seed: int) -> dict:
    from histosynth.models.bundle import read_bundle_config

    provenance = read_bundle_config(model_folder(recipe, sizes, seed)).provenance
    captions = captions_report(recipe, sizes, seed)
    shares = caption_shares(captions)
    found, unasked = (glomerular_pixels(captions_report(recipe, sizes, seed, kind)) for kind in CAPTION_IMAGES)
    two_sample = pd.read_csv(report_folder(recipe, sizes, seed, "realism") / "two_sample.csv").iloc[0]
    interval = next(column for column in two_sample.index if column.endswith("CI"))
    row = {
        "recipe": recipe,
        "options": " ".join(RECIPES[recipe]) or "(none)",
        "glomeruli mentioned %": round(shares["mention"], 1),
        "Glomeruli high %": round(shares["glomeruli_high"], 1),
        "glomerular pixels %": round(found, 1),
        "glomerular pixels, empty caption %": round(unasked, 1),
        "Tubuli medium %": round(shares["tubuli_medium"], 1),
    }
    if sizes.condition == "text+mask":
        fidelity = counted_classes(report_folder(recipe, sizes, seed, "label-fidelity"))
        row["label fidelity (mean Dice)"] = round(float(fidelity["Dice"].mean()), 3)
    return row | {
        "two-sample AUC": round(float(two_sample["ROC AUC"]), 3),
        f"AUC {interval}": two_sample[interval],
        "training s": provenance.get("training_time_s"),
    }


def seeds_row(rows: list[dict]) -> dict:
    """One recipe's rows of several training seeds as one: each measure's mean ± sd over the seeds (the
    confidence interval of one seed's AUC is left out)."""
    first = rows[0]
    merged = {key: first[key] for key in ("recipe", "options")}
    for key in first:
        if key not in merged and not key.startswith("AUC "):
            digits = 1 if key.endswith("%") else 0 if key == "training s" else 3
            merged[key] = mean_sd([row[key] for row in rows], digits=digits)
    return merged


def summary(rows: list[dict], sizes: Sizes, seeds: list[int], command: str) -> list[str]:
    compared = ("label fidelity and the two-sample AUC on {n} images of held-out phantom masks"
                if sizes.condition == "text+mask" else
                "the two-sample AUC on {n} images of held-out phantom patches' captions")
    trained = (f"training seed {seeds[0]}" if len(seeds) == 1 else
               f"training seeds {', '.join(map(str, seeds))} (mean ± sd over the seeds)")
    text = (f"`{command}`: the tiny preset's {sizes.condition} LDM from scratch, {sizes.steps} steps of batch "
            f"{sizes.batch_size} ({sizes.warmup_steps} warm-up steps) on the training split of "
            f"{sizes.train_patches} phantom patches (latents of the shipped autoencoder), {trained}; "
            f"DDIM {sizes.sampling_steps} steps, guidance 1.5; caption accuracy on {sizes.caption_images} images "
            f"of the generating caption (and as many of the empty caption), "
            f"{compared.format(n=sizes.mask_images)} against {sizes.heldout_patches} held-out real phantom patches. "
            "Training "
            "seconds depend on the machine's other load.")
    return ["# Training recipes compared", "", text, "", markdown_table(pd.DataFrame(rows)), ""]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=Sizes.steps, help="training steps of every recipe")
    parser.add_argument("--seed", default="0", help="the training seed of every recipe; several, comma-separated "
                        "(0,1): each trained and measured, and the table gives their mean ± sd")
    parser.add_argument("--accelerator", default="cpu", help="what the trainings run on (cpu, gpu, auto)")
    parser.add_argument("--condition", default=Sizes.condition, choices=CONDITIONS,
                        help="what every recipe's model reads: text and masks, or text only")
    parser.add_argument("--caption-images", type=int, default=None,
                        help=f"images of the generating caption per recipe (default {Sizes.caption_images})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, a few images")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}")
    if args.steps < 1 or (args.caption_images is not None and args.caption_images < 1):
        parser.error("--steps and --caption-images must be at least 1")
    try:
        seeds = [int(s) for s in args.seed.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seed takes whole numbers, comma-separated; got {args.seed!r}")
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        parser.error(f"--seed takes whole numbers from 0, each once; got {args.seed!r}")
    os.environ.update(environment())
    sizes = replace(QUICK if args.quick else Sizes(steps=args.steps), condition=args.condition)
    if args.caption_images is not None:
        sizes = replace(sizes, caption_images=args.caption_images)
    started = time.perf_counter()
    stage_data(sizes)
    for seed in seeds:
        for recipe in recipes:
            say(f"== {recipe}" + (f", seed {seed}" if seed else ""))
            train(recipe, sizes, seed, args.accelerator)
            evaluate(recipe, sizes, seed)
    rows = [seeds_row([summary_row(recipe, sizes, seed) for seed in seeds]) if len(seeds) > 1
            else summary_row(recipe, sizes, seeds[0]) for recipe in recipes]
    command = "python scripts/compare_recipes.py" + (" --quick" if args.quick else
                                                     f" --steps {args.steps}" if args.steps != Sizes.steps else "") \
        + (f" --seed {','.join(map(str, seeds))}" if seeds != [0] else "") \
        + (f" --condition {args.condition}" if args.condition != Sizes.condition else "") \
        + (f" --caption-images {args.caption_images}" if args.caption_images is not None else "")
    lines = summary(rows, sizes, seeds, command)
    name = f"summary-{sizes.steps}" + ("-text" if args.condition == "text" else "") \
        + (f"-captions{args.caption_images}" if args.caption_images is not None else "") \
        + (f"-seed{'-'.join(map(str, seeds))}" if seeds != [0] else "") \
        + ("" if recipes == list(RECIPES) else "-" + "-".join(recipes))
    (ROOT / f"{name}.md").write_text("\n".join(lines))
    (ROOT / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
    print("\n".join(lines))
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

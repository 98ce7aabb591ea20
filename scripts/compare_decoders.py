#!/usr/bin/env python
"""Decoders side by side on the same generated latents: does a decoder fine-tuned alone
(``histosynth train-autoencoder --init MODEL --decoder-only``) make the shipped models' images more real
and easier to read, with the denoiser untouched?

    python scripts/compare_decoders.py --decoders runs/compare-autoencoders/decoder-600,\
        runs/compare-autoencoders/decoder-gan-600     # (one argument, no space)

The latents are sampled once per model and cached (``runs/compare-decoders/latents-<model>-<id>-*.pt``): the
shipped text model from the captions of N held-out phantom patches (``phantom patches --mix default
--seed 5``, 256 px, tissue no model trained on), the shipped text+mask model from their masks (with
their captions). Each decoder (the shipped one first) then decodes both sets, and is measured by

- the classifier two-sample AUC of the text model's images against the held-out patches (colour /
  texture features, 5 folds; ``evaluate realism``'s test; 0.5 = indistinguishable);
- the label fidelity of the text+mask model's images: the shipped segmenter's Dice against the masks
  they were made from (mean over classes with >= 1 % of the pixels, and Glomeruli);
- its reconstructions of the held-out patches: PSNR, SSIM and their two-sample AUC against them.

The sampler is DPM-Solver++ with ``--steps`` steps (default 20) and each model's guidance: the
comparison is of decoders on equal latents, not of samplers. Results: ``runs/compare-decoders/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from default_models import ROOT, RUNS, environment, finished, histosynth, relative, run_logged, say

from histosynth.evaluate.report import markdown_table

OUT = RUNS / "compare-decoders"
HELD_OUT = OUT / "heldout"
WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "histosynth" / "weights"
MODELS = {"text": WEIGHTS / "ldm", "text+mask": WEIGHTS / "ldm-mask"}
#: the first image seed of each model's items (item i gets seed + i)
SEEDS = {"text": 1000, "text+mask": 2000}
BATCH = 4


def held_out_patches(n: int) -> None:
    if not finished(HELD_OUT):
        run_logged("compare-decoders", histosynth("phantom", "patches", "--out", relative(HELD_OUT), "--n", str(n),
                                                  "--mix", "default", "--seed", "5", "--no-progress"))


def held_out_items(n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Images, masks and captions of the first ``n`` held-out patches."""
    from histosynth.data.dataset import open_dataset

    dataset = open_dataset(HELD_OUT)
    rows = [row for _, row in dataset.rows().iterrows()][:n]
    return [dataset.image(row) for row in rows], [dataset.mask(row) for row in rows], [row["caption"] for row in rows]


def latents_name(name: str, n: int, steps: int) -> str:
    """What names one set of sampled latents: the model, its id (another shipped model samples its own), the
    number of items and the sampler's steps."""
    from histosynth.models.bundle import read_bundle_config

    return f"{name.replace('+', '-')}-{read_bundle_config(MODELS[name]).id}-{n}-dpm{steps}"


def sampled_latents(name: str, captions: list[str], masks: Optional[list[np.ndarray]], steps: int) -> torch.Tensor:
    """The final latents of one item per caption (and mask), cached in OUT/latents-<latents_name>.pt."""
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import CaptionEmbeddings, batch_label_maps, sample_latents, sampling_options

    cached = OUT / f"latents-{latents_name(name, len(captions), steps)}.pt"
    if cached.is_file():
        return torch.load(cached)
    bundle = load_bundle(MODELS[name])
    options = replace(sampling_options(bundle), scheduler="dpm++", steps=steps)
    embeddings = CaptionEmbeddings.for_bundle(bundle, captions)
    size = (bundle.image_size, bundle.image_size)
    parts = []
    for start in range(0, len(captions), BATCH):
        batch = captions[start:start + BATCH]
        seeds = [SEEDS[name] + start + i for i in range(len(batch))]
        maps = None if masks is None else batch_label_maps(bundle, masks[start:start + BATCH], len(batch), size)
        with torch.no_grad():
            parts.append(sample_latents(bundle, batch, seeds, options, embeddings, size, label_maps=maps))
        say(f"[latents {name}] {start + len(batch)} of {len(captions)}")
    latents = torch.cat(parts)
    torch.save(latents, cached)
    return latents


def decoded(decoder, latents: torch.Tensor) -> list[np.ndarray]:
    from histosynth.data.torchdata import to_uint8
    from histosynth.models.autoencoder import decode_latents

    with torch.no_grad():
        return list(to_uint8(torch.cat([decode_latents(decoder, latents[i:i + BATCH])
                                        for i in range(0, len(latents), BATCH)])))


def measure(label: str, decoder, latents: dict[str, torch.Tensor], images: list[np.ndarray],
            masks: list[np.ndarray], segment, steps: int) -> dict:
    """One decoder's row (see the module docstring), kept for the next call in OUT/row-<decoder digest>-<the
    latents' names>.json (other latents, from other models, items or steps, are measured again); ``segment``
    is the shipped segmenter as a function of images."""
    from histosynth.data.torchdata import to_model_range
    from histosynth.evaluate.label_fidelity import evaluate_label_fidelity
    from histosynth.evaluate.realism import classifier_two_sample_test, colour_texture_features
    from histosynth.evaluate.reconstruction import reconstruction_quality
    from histosynth.models.autoencoder import decoder_digest
    from histosynth.schema import load_schema

    sets = "-".join(latents_name(name, len(images), steps) for name in latents)
    cached = OUT / f"row-{decoder_digest(decoder)}-{sets}.json"
    if cached.is_file():
        return {**json.loads(cached.read_text()), "decoder": label}
    generated = decoded(decoder, latents["text"])
    realism = classifier_two_sample_test(colour_texture_features(images), colour_texture_features(generated))
    fidelity, _ = evaluate_label_fidelity(decoded(decoder, latents["text+mask"]), masks, segment,
                                          load_schema(None), [str(i) for i in range(len(masks))])
    per_class = fidelity.per_class().set_index("class")
    quality = reconstruction_quality(decoder, torch.stack([to_model_range(image) for image in images]))
    row = {"decoder": label,
           "generated vs real AUC": round(realism.auc, 3),
           "AUC 95 % CI": f"{realism.ci_low:.3f}-{realism.ci_high:.3f}",
           "label fidelity mean Dice": round(fidelity.mean_dice(), 3),
           "Glomeruli Dice": round(float(per_class.loc["Glomeruli", "Dice"]), 3),
           "reconstruction PSNR (dB)": round(quality.psnr_db, 2), "reconstruction SSIM": round(quality.ssim, 3),
           "reconstruction AUC": round(quality.two_sample_auc, 3)}
    say(f"[compare-decoders] {row}")
    cached.write_text(json.dumps(row, indent=2))
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoders", default="", help="comma-separated autoencoder folders to compare with the "
                                                       "shipped decoder (each fine-tuned with --decoder-only)")
    parser.add_argument("--n", type=int, default=64, help="held-out patches: captions and masks to generate from")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--latents-only", action="store_true", help="sample and cache the latents, measure nothing")
    args = parser.parse_args(argv)
    os.environ.update(environment())
    os.chdir(ROOT)  # --decoders are relative to the repository, as the commands above write them
    held_out_patches(args.n)
    images, masks, captions = held_out_items(args.n)
    latents = {"text": sampled_latents("text", captions, None, args.steps),
               "text+mask": sampled_latents("text+mask", captions, masks, args.steps)}
    if args.latents_only:
        return 0
    from histosynth.defaults import default_segmenter_path
    from histosynth.evaluate.caption_accuracy import segmenter_function
    from histosynth.models.autoencoder import latents_differ, load_checked_autoencoder
    from histosynth.segment.external import load_segmenter

    segment = segmenter_function(load_segmenter(default_segmenter_path()), coverage="full")
    shipped = load_checked_autoencoder(MODELS["text"]).eval()
    rows = [measure("shipped", shipped, latents, images, masks, segment, args.steps)]
    for folder in filter(None, args.decoders.split(",")):
        decoder = load_checked_autoencoder(folder).eval()
        problem = latents_differ(shipped, decoder)
        if problem:
            raise SystemExit(f"{folder} does not encode the shipped latents ({problem}); fine-tune with --decoder-only")
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        rows.append(measure(f"{Path(folder).name} (+{metrics['steps']} steps)", decoder, latents, images, masks,
                            segment, args.steps))
    command = f"python scripts/compare_decoders.py --decoders {args.decoders} --n {args.n} --steps {args.steps}"
    lines = [f"`{command}` ({args.n} held-out phantom patches, {relative(HELD_OUT)}; DPM-Solver++ {args.steps} steps)",
             "", markdown_table(pd.DataFrame(rows)), ""]
    (OUT / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Which way should a label mask enter the denoiser? Both mask branches, measured side by side.

    python scripts/compare_mask_branches.py              # train both (2500 steps each), evaluate, summarise
    python scripts/compare_mask_branches.py --steps 500  # a shorter comparison (its own folders)

Both start from the same text LDM (``runs/models/ldm`` of ``scripts/default_models.py``) and train
on the same cached latents and label maps with the same seed, steps and mask dropout:

- ``concat``      the label map as extra UNet input channels (zero-initialised), the whole UNet trained
- ``controlnet``  the text UNet frozen, a ControlNet branch (a copy of its encoder) trained

Each is then asked for images of held-out phantom masks (with the masks' captions) at two mask
guidance scales, and the shipped segmenter measures label fidelity (``histosynth evaluate masks``).
Models go to ``runs/models/ldm-<branch>-<steps>``, reports to ``runs/compare-mask-branches/``, logs to
``runs/logs/compare-<branch>.log``; every step is skipped when its output exists. It needs the data
stages of ``scripts/default_models.py`` (ldm) and ``scripts/evaluate_default.py`` (data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
from default_models import DATA, MODELS, RUNS, Sizes, environment, histosynth, relative, run_logged, say
from evaluate_default import counted_classes

from histosynth.evaluate.report import markdown_table

BRANCHES = ("concat", "controlnet")
GUIDANCE = (1.0, 1.5, 2.0)
HELDOUT = RUNS / "evaluate" / "heldout"
OUT = RUNS / "compare-mask-branches"


def model_folder(branch: str, steps: int) -> Path:
    return MODELS / f"ldm-{branch}-{steps}"


def train(branch: str, steps: int) -> None:
    out = model_folder(branch, steps)
    if (out / "histosynth.json").is_file():
        return
    sizes = Sizes()
    run_logged(f"compare-{branch}", histosynth(
        "train", relative(DATA / "ldm"), "--out", relative(out), "--init", relative(MODELS / "ldm"),
        "--preset", "tiny", "--condition", "text+mask", "--mask-branch", branch, "--mask-dropout",
        str(sizes.ldm_mask_dropout), "--steps", str(steps), "--precision", sizes.precision(sizes.ldm_precision),
        "--checkpoint-every", "100", "--log-every", "25", "--accelerator", "cpu", "--seed", "0"))


def evaluate(branch: str, steps: int, guidance: float, n: int) -> Path:
    from histosynth.defaults import default_segmenter_path

    report = OUT / f"{branch}-{steps}-mg{guidance}"
    if not (report / "per_class.csv").is_file():
        run_logged(f"compare-{branch}", histosynth(
            "evaluate", "masks", "--model", relative(model_folder(branch, steps)), "--masks-from", relative(HELDOUT),
            "--n", str(n), "--segmenter", str(default_segmenter_path()), "--out", relative(report),
            "--mask-captions", "--mask-guidance", str(guidance), "--no-progress"))
    return report


def summary_row(branch: str, steps: int, reports: dict[float, Path]) -> dict:
    from histosynth.models.bundle import load_bundle

    bundle = load_bundle(model_folder(branch, steps))
    trained = bundle.unet.controlnet if branch == "controlnet" else bundle.unet
    # (no training speed here: the two runs may not have shared the machine alike)
    row = {"branch": branch, "steps": steps,
           "trained parameters (M)": round(sum(p.numel() for p in trained.parameters()) / 1e6, 2)}
    for guidance, report in reports.items():
        row[f"mean Dice, mask guidance {guidance}"] = round(float(counted_classes(report)["Dice"].mean()), 3)
    return row


def per_class(branch: str, report: Path) -> pd.DataFrame:
    return counted_classes(report).set_index("class")["Dice"].rename(branch).round(3)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2500, help="training steps of each branch")
    parser.add_argument("--n", type=int, default=24, help="held-out masks to generate from")
    args = parser.parse_args(argv)
    os.environ.update(environment())
    if not (HELDOUT / "manifest.csv").is_file():
        raise SystemExit(f"{relative(HELDOUT)} is missing: run python scripts/evaluate_default.py --stage data")
    rows, classes = [], []
    for branch in BRANCHES:
        say(f"== {branch}")
        train(branch, args.steps)
        reports = {g: evaluate(branch, args.steps, g, args.n) for g in GUIDANCE}
        rows.append(summary_row(branch, args.steps, reports))
        classes.append(per_class(branch, reports[max(GUIDANCE)]))
    lines = ["# Mask branches compared", "",
             f"`python scripts/compare_mask_branches.py --steps {args.steps} --n {args.n}`: both fine-tuned from "
             f"the text LDM for {args.steps} steps; label fidelity on {args.n} held-out phantom masks.", "",
             markdown_table(pd.DataFrame(rows)), "",
             f"Dice per class (mask guidance {max(GUIDANCE)}):", "",
             markdown_table(pd.concat(classes, axis=1).reset_index()), ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"summary-{args.steps}.md").write_text("\n".join(lines))
    (OUT / f"summary-{args.steps}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does synthetic data help a segmentation model? The six-split experiment of the thesis (§4.2.3, §5.3).

For a patch count N (by default the smaller of the real training set and the synthetic set), five
splits train on N patches mixed in the shares 100/0, 75/25, 50/50, 25/75 and 0/100 (real/synthetic)
and one trains on all 2N (100_100). Every split runs the same training loop with the same seed;
validation uses real patches only; flips and random crops are the only augmentations and
EarlyStopping watches the validation loss. With several seeds the table shows mean ± sd (the thesis
ran one seed). Binary (``class_name``, as in the thesis: glomeruli) or multi-class.

Each finished run is saved under ``runs/`` as soon as it ends, so an interrupted experiment resumes
with the runs it had not finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from .. import validation
from ..data.dataset import PatchDataset
from ..errors import ConfigError, DataError, JobError, describe_validation_error
from ..io import atomic_path, write_json_atomic
from ..segment.data import PatchRows
from ..segment.training import SegmentTrainConfig, train_segmenter
from .report import Report, mean_sd


@dataclass(frozen=True)
class MixSplit:
    name: str
    real_share: float
    synthetic_share: float

    def counts(self, n: int) -> tuple[int, int]:
        """(real, synthetic) patch counts for N: the shares of N, or N of each for 100_100."""
        real = round(self.real_share * n)
        if self.real_share + self.synthetic_share > 1:
            return real, round(self.synthetic_share * n)
        return real, n - real


SPLITS: tuple[MixSplit, ...] = (
    MixSplit("100_0", 1.0, 0.0),
    MixSplit("75_25", 0.75, 0.25),
    MixSplit("50_50", 0.5, 0.5),
    MixSplit("25_75", 0.25, 0.75),
    MixSplit("0_100", 0.0, 1.0),
    MixSplit("100_100", 1.0, 1.0),
)
SPLIT_NAMES = tuple(s.name for s in SPLITS)

#: Table 5.2 of the thesis (binary glomerulus segmentation, 512 px patches, N = 198, one seed):
#: final validation loss (BCE) and final Dice.
THESIS_TABLE_5_2: dict[str, tuple[float, float]] = {
    "100_0": (0.094, 0.956), "75_25": (0.064, 0.970), "50_50": (0.060, 0.972),
    "25_75": (0.068, 0.965), "0_100": (0.137, 0.927), "100_100": (0.055, 0.971),
}


class MixConfig(BaseModel):
    """What the experiment runs: which splits, which seeds, N, and the one training loop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    splits: tuple[str, ...] = SPLIT_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int | None = Field(None, ge=1, description="patches per split (default: min of real and synthetic)")
    train: SegmentTrainConfig = SegmentTrainConfig()

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in value if s not in SPLIT_NAMES]
        if unknown or not value:
            raise ValueError(f"unknown splits {unknown}; choose from {', '.join(SPLIT_NAMES)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("give at least one seed")
        return value


def _subset(rows: pd.DataFrame, count: int, seed: int, stream: int) -> pd.DataFrame:
    """The first `count` rows of a seeded shuffle: smaller shares are subsets of larger ones."""
    order = np.random.default_rng((seed, stream)).permutation(len(rows))
    return rows.iloc[np.sort(order[:count])].reset_index(drop=True)


def split_rows(split: MixSplit, real: pd.DataFrame, synthetic: pd.DataFrame, n: int,
               seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_real, n_synthetic = split.counts(n)
    if n_real > len(real) or n_synthetic > len(synthetic):
        raise DataError(
            f"split {split.name} needs {n_real} real and {n_synthetic} synthetic patches; "
            f"there are {len(real)} and {len(synthetic)} — lower --n"
        )
    return _subset(real, n_real, seed, 0), _subset(synthetic, n_synthetic, seed, 1)


@dataclass
class MixSources:
    """Where the patches come from: real training rows, synthetic rows, real validation rows."""

    real: PatchRows
    synthetic: PatchRows
    val: PatchRows

    @classmethod
    def from_datasets(cls, real: PatchDataset, synthetic: PatchDataset,
                      val: PatchDataset | None = None) -> "MixSources":
        """Real 'train' rows; all synthetic rows (generated data has no held-out split); the
        validation dataset's rows, or the real dataset's 'val' rows when none is given."""
        val_rows = PatchRows(val, val.rows()) if val is not None else PatchRows(real, real.rows("val"))
        sources = cls(PatchRows(real, real.rows("train")), PatchRows(synthetic, synthetic.rows()), val_rows)
        sources.check()
        return sources

    def check(self) -> None:
        schemas = {str(p.dataset.root): p.dataset.schema for p in (self.real, self.synthetic, self.val)}
        if len({s.model_dump_json() for s in schemas.values()}) > 1:
            raise DataError("the real, synthetic and validation datasets use different class schemas: "
                            f"{sorted(schemas)}")
        for what, part in (("real training ('train' split)", self.real), ("synthetic", self.synthetic),
                           ("validation", self.val)):
            if not len(part):
                raise DataError(f"the {what} rows of {part.dataset.root} are empty")

    def describe(self) -> dict[str, Any]:
        return {name: {"dataset": str(p.dataset.root), "patches": len(p), "patch_size": p.dataset.patch_size}
                for name, p in (("real", self.real), ("synthetic", self.synthetic), ("val", self.val))}


@dataclass
class MixResult:
    """All runs of an experiment: one record per (split, seed) with its validation history."""

    runs: list[dict[str, Any]]
    n: int
    config: MixConfig

    def final_table(self) -> pd.DataFrame:
        rows = []
        for split in (s for s in SPLITS if s.name in self.config.splits):
            runs = [r for r in self.runs if r["split"] == split.name]
            rows.append({
                "experiment": split.name, "real share": split.real_share, "synthetic share": split.synthetic_share,
                "patches": runs[0]["patches"],
                "epochs": mean_sd([r["epochs"] for r in runs], 1),
                "val loss mean": np.mean([r["final"]["val_loss"] for r in runs]),
                "val loss sd": _sd([r["final"]["val_loss"] for r in runs]),
                "Dice mean": np.mean([r["final"]["val_dice"] for r in runs]),
                "Dice sd": _sd([r["final"]["val_dice"] for r in runs]),
                "seeds": len(runs),
            })
        return pd.DataFrame(rows)

    def history(self) -> pd.DataFrame:
        return pd.DataFrame([{"split": r["split"], "seed": r["seed"], **h} for r in self.runs for h in r["history"]])


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def run_mix_experiment(sources: MixSources, config: MixConfig, out: str | Path,
                       progress: bool = False) -> MixResult:
    """Train every (split, seed) run not yet on disk under `out`, then return all runs."""
    out = Path(out)
    sources.check()
    n = config.n or min(len(sources.real), len(sources.synthetic))
    if config.train.class_name is not None:
        sources.real.dataset.schema.id_of(config.train.class_name)
    _claim_folder(out, {"config": config.model_dump(mode="json"), "n": n, "sources": sources.describe()})
    jobs = [(seed, split) for seed in config.seeds for split in SPLITS if split.name in config.splits]
    console = Console(quiet=not progress)
    runs = []
    for number, (seed, split) in enumerate(jobs, 1):
        path = out / "runs" / f"{split.name}_seed{seed}.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
            continue
        console.print(f"run {number}/{len(jobs)}: {split.name}, seed {seed}")
        record = _run_split(sources, split, n, seed, config.train, out / "logs" / path.stem, progress)
        write_json_atomic(path, record)
        runs.append(record)
    return MixResult(runs=runs, n=n, config=config)


def _run_split(sources: MixSources, split: MixSplit, n: int, seed: int, train: SegmentTrainConfig,
               log_dir: Path, progress: bool) -> dict[str, Any]:
    """One training run of the experiment; its final weights are judged, as in the thesis."""
    real, synthetic = split_rows(split, sources.real.rows, sources.synthetic.rows, n, seed)
    run = train_segmenter(
        [PatchRows(sources.real.dataset, real), PatchRows(sources.synthetic.dataset, synthetic)],
        sources.val, train.model_copy(update={"seed": seed}), sources.real.dataset.schema,
        log_dir=log_dir, keep_best=False, progress=progress,
    )
    return {"split": split.name, "seed": seed, "real": len(real), "synthetic": len(synthetic),
            "patches": len(real) + len(synthetic), "epochs": len(run.history),
            "stopped_early": run.stopped_early, "seconds": round(run.seconds, 2),
            "final": run.final, "history": run.history}


def _claim_folder(out: Path, description: dict[str, Any]) -> None:
    """Write experiment.json, or check that the folder holds this same experiment (to resume it)."""
    path = out / "experiment.json"
    if path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(description)):
            raise JobError(f"{out} holds another experiment (see {path}); choose another --out")
        return
    write_json_atomic(path, description)


# --- the report ---------------------------------------------------------------------------------
def write_mix_report(result: MixResult, out: str | Path) -> Path:
    out = Path(out)
    train = result.config.train
    binary = train.class_name is not None
    report = Report(out, "Real and synthetic data in segmentation training")
    report.bullets([
        f"task: {'binary ' + repr(train.class_name) if binary else 'multi-class'} segmentation, "
        f"valid-padding U-Net (base width {train.base_channels}, depth {train.depth})",
        f"N = {result.n} patches per split (100_100: {2 * result.n}); seeds {list(result.config.seeds)}; "
        "validation on real patches only; flips + random crops; EarlyStopping on validation loss "
        f"(patience {train.patience}, at most {train.max_epochs} epochs)",
        f"validation loss = {'BCE' if binary else 'cross-entropy'} + {train.dice_weight} x soft-Dice loss "
        f"(the thesis reported BCE alone); Dice = pooled Dice of "
        f"{'the class' if binary else 'each class present, averaged'} over whole validation patches, "
        "at the end of training",
    ])
    table = result.final_table()
    shown = table[["experiment", "real share", "synthetic share", "patches", "epochs"]].copy()
    shown["final val loss"] = [mean_sd([r["final"]["val_loss"] for r in result.runs if r["split"] == s])
                               for s in table["experiment"]]
    shown["final Dice"] = [mean_sd([r["final"]["val_dice"] for r in result.runs if r["split"] == s])
                           for s in table["experiment"]]
    if binary:
        shown["thesis val loss"] = [THESIS_TABLE_5_2[s][0] for s in table["experiment"]]
        shown["thesis Dice"] = [THESIS_TABLE_5_2[s][1] for s in table["experiment"]]
    report.heading("Final validation loss and Dice (thesis Table 5.2)")
    report.table("table_5_2", shown, "mean ± sd over seeds" + ("; thesis: one seed, 512 px, N = 198" if binary else ""),
                 csv_frame=table)
    report.figure("curves", _curves_figure(result), "Validation loss and Dice per epoch (mean over seeds)")
    report.figure("final", _final_figure(table), "Final validation loss and Dice (mean ± sd over seeds)")
    if not binary:
        report.heading("Dice per class")
        report.table("dice_per_class", _per_class(result), "final Dice per class, mean over seeds")
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("history", "final")} | r["final"]
                         for r in result.runs])
    report.table("runs", runs, "every run")
    history = result.history()
    with atomic_path(out / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    report.text("Per-epoch validation history of every run: [history.csv](history.csv).")
    return report.write()


def _per_class(result: MixResult) -> pd.DataFrame:
    rows = []
    for split in result.final_table()["experiment"]:
        finals = [r["final"] for r in result.runs if r["split"] == split]
        keys = [k for k in finals[0] if k.startswith("val_dice_")]
        rows.append({"experiment": split,
                     **{f"class {k.rsplit('_', 1)[1]}": pd.Series([f[k] for f in finals], dtype=float).mean()
                        for k in keys}})
    return pd.DataFrame(rows)


def _curves_figure(result: MixResult) -> plt.Figure:
    history = result.history()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in result.final_table()["experiment"]:
        mean = history[history["split"] == split].groupby("epoch")[["val_loss", "val_dice"]].mean()
        loss_ax.plot(mean.index, mean["val_loss"], marker=".", label=split)
        dice_ax.plot(mean.index, mean["val_dice"], marker=".", label=split)
    for ax, label in ((loss_ax, "validation loss"), (dice_ax, "Dice")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    dice_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _final_figure(table: pd.DataFrame) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = np.arange(len(table))
    for ax, column, label in ((axes[0], "val loss", "final validation loss"), (axes[1], "Dice", "final Dice")):
        errors = table[f"{column} sd"].fillna(0).to_numpy()
        ax.bar(x, table[f"{column} mean"], yerr=errors, capsize=3, color="tab:blue")
        ax.set_xticks(x, table["experiment"], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


#: Most seeds an experiment may run per split.
MAX_SEED_COUNT = 1000


def mix_config(splits: str | None, seeds: int | str, n: int | None, train: SegmentTrainConfig) -> MixConfig:
    """A MixConfig from command-line text: splits '100_0,50_50' (default all), seeds '3' (0, 1, 2)
    or '0,5,7'."""
    seed_text = str(seeds)
    try:
        if "," in seed_text:
            seed_list = tuple(int(s) for s in seed_text.split(","))
        else:
            count = int(seed_text)
            if count > MAX_SEED_COUNT:  # (a typo such as 30000000 would otherwise fill the memory)
                raise ConfigError(f"--seeds {count} asks for more than {MAX_SEED_COUNT} runs per split; "
                                  "give a count or a list of seeds (0,5,7)")
            seed_list = tuple(range(count))
    except ValueError:
        raise ConfigError(f"--seeds takes a count (3) or a list (0,5,7), got {seed_text!r}") from None
    for seed in seed_list:
        validation.seed(seed, "each of --seeds")
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"--seeds {seed_text!r} repeats a seed; a repeated seed repeats its runs exactly")
    split_list = tuple(s.strip() for s in splits.split(",")) if splits else SPLIT_NAMES
    try:
        return MixConfig(splits=split_list, seeds=seed_list, n=n, train=train)
    except ValidationError as exc:
        raise ConfigError(f"bad experiment option ({describe_validation_error(exc)})") from None

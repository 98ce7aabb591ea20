"""Does synthetic data help a segmentation model? The six-split experiment of the thesis (§4.2.3, §5.3),
and the questions that follow it: how the help depends on how scarce real data is, and whether
synthetic data alone comes close to real data.

Two designs share one machinery. **splits** (the thesis): for a patch count N (by default the smaller
of the real training set and the synthetic set), five splits train on N patches mixed in the shares
100/0, 75/25, 50/50, 25/75 and 0/100 (real/synthetic) and one trains on all 2N (100_100). **curve**
(the scarcity curve): for each real count R (12, 24, 48, 96) one arm trains on R real patches alone,
one per synthetic multiple m (1x, 4x) on R real plus m·R synthetic, and one on R synthetic alone.

Within a seed every arm starts from the same initial weights and draws its real patches as the first
ones of one seeded shuffle (smaller sets are subsets of larger ones), so arms are compared *paired*
by seed: per arm against its baseline (100_0, or R real alone) the mean of the per-seed Dice
differences, a percentile-bootstrap 95 % interval of that mean, a paired t-test and a Wilcoxon
signed-rank test. Validation uses real patches only (best a fixed set larger than any training set);
flips and random crops are the only augmentations. The training loop is built for small data: a
learning-rate warm-up and cosine decay, cross-entropy with balanced class weights plus soft Dice,
EarlyStopping on the validation Dice and the weights of the best validation Dice kept. A run whose
kept weights score Dice below 0.1 on a class present in the validation labels counts as collapsed;
the share of collapsed runs is part of the output. Binary (``class_name``, as in the thesis:
glomeruli) or multi-class.

Each finished run is saved under ``runs/`` as soon as it ends, so an interrupted experiment resumes
with the runs it had not finished. A run records a key of everything its training depends on (the datasets
and the rows of each part, the training loop with its seed, the weights judged); a run of another
experiment with the same key (``reuse``: the real-only arm of two experiments on the same real data, say)
is copied instead of trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from rich.console import Console
from scipy import stats

from .. import validation
from ..data.dataset import PatchDataset, fraction_column
from ..errors import ConfigError, DataError, JobError, describe_validation_error
from ..io import atomic_path, write_json_atomic
from ..sample.jobs import Shard
from ..segment.data import PatchRows
from ..segment.training import SegmentTrainConfig, train_segmenter
from .report import Report, format_value, mean_sd


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
#: The split every other split of the six is compared with.
REAL_ONLY = "100_0"

#: Table 5.2 of the thesis (binary glomerulus segmentation, 512 px patches, N = 198, one seed):
#: final validation loss (BCE) and final Dice.
THESIS_TABLE_5_2: dict[str, tuple[float, float]] = {
    "100_0": (0.094, 0.956), "75_25": (0.064, 0.970), "50_50": (0.060, 0.972),
    "25_75": (0.068, 0.965), "0_100": (0.137, 0.927), "100_100": (0.055, 0.971),
}

#: A run collapsed when its kept weights score a validation Dice below this on a class that is present (it
#: predicts almost none of it) ...
COLLAPSE_DICE = 0.1
#: ... or no more than this above the Dice of predicting the class on every pixel (a constant prediction,
#: which scores 2p / (1 + p) for a class on a share p of the pixels: 0.65 where glomeruli fill half a patch).
CONSTANT_MARGIN = 0.01

#: The training set-up of the experiment where `experiment mix` differs from `segment train`: built for a
#: few dozen patches, where a constant rate, unweighted loss and stopping on the loss left most runs at Dice 0.
TRAINING_DEFAULTS: dict[str, Any] = dict(monitor="val_dice", warmup_epochs=2.0, schedule="cosine",
                                         foreground_crops=0.33, class_weights="balanced", patience=15)


@dataclass(frozen=True)
class Arm:
    """One training set of the experiment: its real and synthetic patch counts, and the arm it is
    compared with (paired by seed; None for a baseline)."""

    name: str
    real: int
    synthetic: int
    baseline: str | None = None

    @property
    def patches(self) -> int:
        return self.real + self.synthetic


def six_split_arms(names: Sequence[str], n: int) -> list[Arm]:
    """The thesis' splits for N patches, each compared with 100_0 when 100_0 is among them."""
    baseline = REAL_ONLY if REAL_ONLY in names else None
    return [Arm(s.name, *s.counts(n), baseline=None if s.name == REAL_ONLY else baseline)
            for s in SPLITS if s.name in names]


def curve_arm_name(real: int, synthetic: int) -> str:
    return f"r{real}_s{synthetic}"


def scarcity_arms(real_counts: Sequence[int], multiples: Sequence[int], synthetic_only: bool) -> list[Arm]:
    """Per real count R: R real alone (the baseline), R real + m·R synthetic for each multiple m > 0,
    and (with `synthetic_only`) R synthetic alone."""
    arms = []
    for real in sorted(set(real_counts)):
        baseline = curve_arm_name(real, 0)
        arms.append(Arm(baseline, real, 0))
        arms += [Arm(curve_arm_name(real, m * real), real, m * real, baseline) for m in sorted(set(multiples) - {0})]
        if synthetic_only:
            arms.append(Arm(curve_arm_name(0, real), 0, real, baseline))
    return arms


class MixConfig(BaseModel):
    """What the experiment runs: the design and its arms, which seeds, and the one training loop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    design: Literal["splits", "curve"] = "splits"
    splits: tuple[str, ...] = SPLIT_NAMES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n: int | None = Field(None, ge=1, description="patches per split (default: min of real and synthetic)")
    real_counts: tuple[int, ...] = Field((12, 24, 48, 96), description="curve: real patch counts")
    synthetic_multiples: tuple[int, ...] = Field((0, 1, 4), description="curve: synthetic patches per real one")
    synthetic_only: bool = Field(True, description="curve: also R synthetic patches alone per real count R")
    weights: Literal["best", "final"] = Field(
        "best", description="the weights judged: best validation score (train.monitor) or the final ones (thesis)")
    equal_steps: bool = Field(False, description="every arm trains the optimiser steps of the largest arm's "
                                                 "epochs (its epochs, warm-up and validation interval scaled)")
    train: SegmentTrainConfig = SegmentTrainConfig(**TRAINING_DEFAULTS)

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

    @field_validator("real_counts", "synthetic_multiples")
    @classmethod
    def _counts(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        least = 1 if info.field_name == "real_counts" else 0
        if not value or min(value) < least:
            raise ValueError(f"{info.field_name.replace('_', ' ')} must be at least {least}, got {list(value)}")
        return value

    def arms(self, n: int) -> list[Arm]:
        if self.design == "curve":
            return scarcity_arms(self.real_counts, self.synthetic_multiples, self.synthetic_only)
        return six_split_arms(self.splits, n)


def _subset(rows: pd.DataFrame, count: int, seed: int, stream: int) -> pd.DataFrame:
    """The first `count` rows of a seeded shuffle: smaller shares are subsets of larger ones."""
    order = np.random.default_rng((seed, stream)).permutation(len(rows))
    return rows.iloc[np.sort(order[:count])].reset_index(drop=True)


def split_rows(arm: Arm, real: pd.DataFrame, synthetic: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real and synthetic rows an arm trains on under a seed."""
    if arm.real > len(real) or arm.synthetic > len(synthetic):
        raise DataError(
            f"{arm.name} needs {arm.real} real and {arm.synthetic} synthetic patches; "
            f"there are {len(real)} and {len(synthetic)} — lower --n (or --real-counts / --synthetic-multiples)"
        )
    return _subset(real, arm.real, seed, 0), _subset(synthetic, arm.synthetic, seed, 1)


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
                for name, p in self.parts()}

    def parts(self) -> tuple[tuple[str, PatchRows], ...]:
        return ("real", self.real), ("synthetic", self.synthetic), ("val", self.val)

    def everywhere_dice(self, class_name: str | None) -> dict[int, float]:
        """For a binary class (label 1), the validation Dice of predicting it on every pixel: 2p / (1 + p) for
        the share p of the validation pixels it holds (the manifest's fractions; the patches are of one
        size). Empty for multi-class, where a constant prediction scores near 0 on every other class."""
        column = fraction_column(self.val.dataset.schema.id_of(class_name)) if class_name is not None else None
        if column is None or column not in self.val.rows or not len(self.val):
            return {}
        share = float(self.val.rows[column].mean())
        return {1: 2 * share / (1 + share)}

    def presence(self, class_name: str | None) -> dict[str, dict[str, float]]:
        """Per source, the share of its patches whose mask holds each class segmented (the binary class, or
        every captioned class): a class that few real patches hold is seen too seldom by small arms."""
        schema = self.real.dataset.schema
        ids = [schema.id_of(class_name)] if class_name is not None else schema.captioned_ids
        return {name: {schema.name_of(i): patches_holding(part, i) for i in ids} for name, part in self.parts()}


#: A binary class that fewer real training patches hold than this share leaves small arms with a handful of
#: examples: runs tend to collapse (predict nothing), and the comparison says little.
SCARCE_SHARE = 0.25


def patches_holding(rows: PatchRows, class_id: int) -> float:
    """The share of the rows' patches whose mask holds the class (the manifest's fraction column; NaN when the
    manifest has none)."""
    column = fraction_column(class_id)
    if column not in rows.rows or not len(rows):
        return math.nan
    return float((rows.rows[column] > 0).mean())


def scarce_class_warning(presence: dict[str, dict[str, float]], class_name: str | None) -> str | None:
    """A warning when the binary class is held by fewer than SCARCE_SHARE of the real training patches."""
    share = presence["real"].get(class_name, math.nan) if class_name is not None else math.nan
    if not share < SCARCE_SHARE:
        return None
    return (f"only {100 * share:.0f} % of the real training patches hold {class_name}, so an arm of a few dozen "
            "patches sees a handful of them and its runs tend to collapse (Dice near 0); train on patches that "
            f"hold {class_name} (as the thesis' real training set of annotated glomeruli), e.g. tiles of "
            "annotated regions or `phantom patches --mix generating`")


# --- paired statistics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences (arm - baseline) with a bootstrap interval and two paired tests."""

    pairs: int
    mean: float
    ci_low: float
    ci_high: float
    t_p: float
    wilcoxon_p: float
    confidence: float = 0.95

    def verdict(self) -> str:
        """Whether the interval excludes 0, and on which side."""
        if self.ci_low > 0:
            return "higher (interval above 0)"
        if self.ci_high < 0:
            return "lower (interval below 0)"
        return "not shown (interval contains 0)"


def paired_difference(differences: Sequence[float], rounds: int = 10_000, confidence: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Mean paired difference, its percentile-bootstrap interval (resampling seeds with replacement),
    and the two-sided p-values of a paired t-test and of a Wilcoxon signed-rank test (exact for a few
    pairs; NaN where a test is undefined: one pair, or all differences equal / zero)."""
    values = np.asarray([d for d in differences if not math.isnan(d)], dtype=np.float64)
    if not len(values):
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(rounds, len(values)))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values[draws].mean(axis=1), [alpha, 1 - alpha])
    return PairedDifference(len(values), float(values.mean()), float(low), float(high), _t_test_p(values),
                            _wilcoxon_p(values), confidence)


def _t_test_p(values: np.ndarray) -> float:
    if len(values) < 2 or np.ptp(values) == 0:
        return math.nan
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def _wilcoxon_p(values: np.ndarray) -> float:
    if not np.any(values):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sample size too small for normal approximation" and the like
        return float(stats.wilcoxon(values).pvalue)


def is_collapsed(run: dict[str, Any], everywhere: dict[int, float] | None = None,
                 threshold: float = COLLAPSE_DICE) -> bool:
    """Whether a run's judged weights score Dice below `threshold` on a class present in the validation labels,
    or no more than CONSTANT_MARGIN above the Dice of predicting it everywhere (`everywhere`, per label)."""
    judged = judged_epoch(run)
    everywhere = everywhere or {}
    return any(judged[f"val_dice_{label}"] < threshold
               or judged[f"val_dice_{label}"] <= everywhere.get(int(label), -math.inf) + CONSTANT_MARGIN
               for label in run["present"])


def judged_epoch(run: dict[str, Any]) -> dict[str, float]:
    """The history row of the weights a run is judged by (the kept ones)."""
    return run["kept"]


@dataclass
class MixResult:
    """All runs of an experiment: one record per (arm, seed) with its validation history."""

    runs: list[dict[str, Any]]
    n: int
    config: MixConfig
    missing: int = 0  # runs left to other shards and not on disk yet
    #: per source (real, synthetic, val): the share of its patches holding each class segmented
    presence: dict[str, dict[str, float]] = field(default_factory=dict)
    #: per label: the validation Dice of predicting it on every pixel (see is_collapsed)
    everywhere: dict[int, float] = field(default_factory=dict)
    #: the schema's class names by id (a multi-class run's labels are class ids)
    class_names: dict[int, str] = field(default_factory=dict)

    def collapsed(self, run: dict[str, Any]) -> bool:
        return is_collapsed(run, self.everywhere)

    def class_name(self, label: int) -> str:
        """The schema's name of a multi-class label (its class id); "class 3" where the schema is not known."""
        return self.class_names.get(label, f"class {label}")

    @property
    def arms(self) -> list[Arm]:
        return self.config.arms(self.n)

    def runs_of(self, arm: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.runs if r["split"] == arm), key=lambda r: r["seed"])

    def final_table(self) -> pd.DataFrame:
        rows = []
        for arm in self.arms:
            runs = self.runs_of(arm.name)
            judged = [judged_epoch(r) for r in runs]
            rows.append({
                "experiment": arm.name, "real": arm.real, "synthetic": arm.synthetic, "patches": arm.patches,
                "epochs": mean_sd([r["epochs"] for r in runs], 1),
                "val loss mean": np.mean([j["val_loss"] for j in judged]),
                "val loss sd": _sd([j["val_loss"] for j in judged]),
                "Dice mean": np.mean([j["val_dice"] for j in judged]),
                "Dice sd": _sd([j["val_dice"] for j in judged]),
                "seeds": len(runs), "collapsed": sum(self.collapsed(r) for r in runs),
            })
        return pd.DataFrame(rows)

    def differences(self, arm: Arm) -> pd.Series:
        """Per seed: the arm's judged Dice minus its baseline's (seeds run by both)."""
        dice = {name: {r["seed"]: judged_epoch(r)["val_dice"] for r in self.runs_of(name)}
                for name in (arm.name, arm.baseline)}
        seeds = sorted(set(dice[arm.name]) & set(dice[arm.baseline]))
        return pd.Series([dice[arm.name][s] - dice[arm.baseline][s] for s in seeds], index=seeds, dtype=float)

    def paired_table(self) -> pd.DataFrame:
        """Per arm with a baseline: the paired difference of Dice with its interval and tests."""
        rows = []
        for arm in (a for a in self.arms if a.baseline is not None):
            paired = paired_difference(self.differences(arm).to_list())
            rows.append({"experiment": arm.name, "baseline": arm.baseline, **asdict(paired),
                         "verdict": paired.verdict(), "collapsed_pairs": self.collapsed_pairs(arm)})
        columns = ["experiment", "baseline", *PairedDifference.__dataclass_fields__, "verdict", "collapsed_pairs"]
        return pd.DataFrame(rows, columns=columns)

    def collapsed_pairs(self, arm: Arm) -> int:
        """Seeds whose run of the arm or of its baseline collapsed: their difference compares a broken model."""
        collapsed = {(r["split"], r["seed"]) for r in self.runs if self.collapsed(r)}
        return sum((arm.name, s) in collapsed or (arm.baseline, s) in collapsed for s in self.differences(arm).index)

    def collapse(self) -> dict[str, Any]:
        collapsed = [r for r in self.runs if self.collapsed(r)]
        return {"threshold": COLLAPSE_DICE, "constant_margin": CONSTANT_MARGIN,
                "everywhere_dice": {str(label): dice for label, dice in self.everywhere.items()},
                "runs": len(self.runs), "collapsed": len(collapsed),
                "share": len(collapsed) / len(self.runs) if self.runs else math.nan,
                "collapsed_runs": [f"{r['split']} seed {r['seed']}" for r in collapsed]}

    def history(self) -> pd.DataFrame:
        return pd.DataFrame([{"split": r["split"], "seed": r["seed"], **h} for r in self.runs for h in r["history"]])


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def run_mix_experiment(sources: MixSources, config: MixConfig, out: str | Path,
                       progress: bool = False, shard: Shard | None = None,
                       reuse: Sequence[str | Path] = ()) -> MixResult:
    """Train every (arm, seed) run of `shard` not yet on disk under `out`, then return all runs on disk.

    Shards (run number i mod count) let several processes or machines share one experiment folder;
    the result says how many runs of other shards are still missing. A run that one of the experiment
    folders in `reuse` holds with the same key (see :func:`run_key`) is copied, not trained.
    """
    out = Path(out)
    shard = shard or Shard()
    sources.check()
    n = config.n or min(len(sources.real), len(sources.synthetic))
    if config.train.class_name is not None:
        sources.real.dataset.schema.id_of(config.train.class_name)
    arms = config.arms(n)
    for arm in arms:  # refuse counts that do not fit before anything trains
        split_rows(arm, sources.real.rows, sources.synthetic.rows, config.seeds[0])
    _claim_folder(out, {"config": config.model_dump(mode="json"), "n": n, "sources": sources.describe()})
    jobs = [(seed, arm) for seed in config.seeds for arm in arms]
    largest = max(arm.patches for arm in arms)
    console = Console(quiet=not progress)
    trained_elsewhere = runs_by_key(reuse)
    runs = []
    for number, (seed, arm) in enumerate(jobs):
        path = out / "runs" / f"{arm.name}_seed{seed}.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
        elif shard.takes(number):
            train = arm_training(config, arm, largest).model_copy(update={"seed": seed})
            real, synthetic = split_rows(arm, sources.real.rows, sources.synthetic.rows, seed)
            key = run_key(sources, real, synthetic, train, config.weights)
            if key in trained_elsewhere:
                console.print(f"run {number + 1}/{len(jobs)}: {arm.name}, seed {seed}: the same run as "
                              f"{trained_elsewhere[key]}, copied")
                record = {**json.loads(trained_elsewhere[key].read_text()), "split": arm.name,
                          "copied_from": str(trained_elsewhere[key])}
            else:
                console.print(f"run {number + 1}/{len(jobs)}: {arm.name}, seed {seed}")
                record = _run_arm(sources, arm, (real, synthetic), train, config.weights,
                                  out / "logs" / path.stem, progress) | {"key": key}
            write_json_atomic(path, record)
            runs.append(record)
    runs += [json.loads(p.read_text()) for p in _late_runs(out, jobs, runs)]
    return MixResult(runs=runs, n=n, config=config, missing=len(jobs) - len(runs),
                     presence=sources.presence(config.train.class_name),
                     everywhere=sources.everywhere_dice(config.train.class_name),
                     class_names={c.id: c.name for c in sources.real.dataset.schema.classes})


def _late_runs(out: Path, jobs: list[tuple[int, Arm]], runs: list[dict[str, Any]]) -> list[Path]:
    """Runs of other shards that were written while this shard trained its own."""
    have = {(r["split"], r["seed"]) for r in runs}
    paths = [out / "runs" / f"{arm.name}_seed{seed}.json" for seed, arm in jobs if (arm.name, seed) not in have]
    return [path for path in paths if path.exists()]


def arm_training(config: MixConfig, arm: Arm, largest: int) -> SegmentTrainConfig:
    """The training loop of one arm: the experiment's, or with ``config.equal_steps`` the same schedule
    counted in optimiser steps. Then an arm of fewer patches trains for more epochs, as many as give the
    steps of ``largest`` patches' ``max_epochs``, with its warm-up and validation interval (so also its
    patience, counted in validations) scaled alike."""
    train = config.train
    if not config.equal_steps:
        return train
    factor = math.ceil(largest / train.batch_size) / math.ceil(arm.patches / train.batch_size)
    return train.model_copy(update={"max_epochs": max(1, round(train.max_epochs * factor)),
                                    "warmup_epochs": train.warmup_epochs * factor,
                                    "val_every": max(1, round(train.val_every * factor))})


def _equal_steps_text(config: MixConfig, result: "MixResult") -> str:
    """With equal steps: the steps every arm trains and what its epochs become."""
    if not config.equal_steps or not result.runs:
        return ""
    largest = max(r["patches"] for r in result.runs)
    epochs = sorted({(r["patches"], r.get("max_epochs")) for r in result.runs})
    return (f" of the largest arm ({largest} patches); every arm trains as many optimiser steps, about "
            f"{max(r.get('planned_steps') or 0 for r in result.runs)}: "
            + ", ".join(f"{patches} patches {max_epochs} epochs" for patches, max_epochs in epochs))


def run_key(sources: MixSources, real: pd.DataFrame, synthetic: pd.DataFrame, train: SegmentTrainConfig,
            weights: str) -> str:
    """A digest of everything a run's training depends on: each dataset and the rows it trains and validates
    on, the training loop (with its seed) and the weights judged. Equal keys, equal runs."""
    parts = {"real": (sources.real, real), "synthetic": (sources.synthetic, synthetic),
             "val": (sources.val, sources.val.rows)}
    described = {name: [str(part.dataset.root.resolve()), _fingerprint(rows["patch_id"]) if len(rows) else None]
                 for name, (part, rows) in parts.items()}
    described |= {"train": train.model_dump(mode="json"), "weights": weights}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def runs_by_key(experiments: Sequence[str | Path]) -> dict[str, Path]:
    """The runs of some experiment folders by their key (runs written before keys existed have none)."""
    found: dict[str, Path] = {}
    for folder in map(Path, experiments):
        if not (folder / "experiment.json").is_file():
            raise DataError(f"{folder} is not an experiment folder (no experiment.json); give the --out of an "
                            "`experiment mix` to reuse its runs")
        for path in sorted((folder / "runs").glob("*.json")):
            try:
                key = json.loads(path.read_text()).get("key")
            except (OSError, ValueError, AttributeError) as error:
                raise DataError(f"{path} cannot be read as a run ({error}); remove it or reuse another "
                                "experiment") from None
            if key:
                found.setdefault(key, path)
    return found


def _run_arm(sources: MixSources, arm: Arm, rows: tuple[pd.DataFrame, pd.DataFrame], train: SegmentTrainConfig,
             weights: str, log_dir: Path, progress: bool) -> dict[str, Any]:
    """One training run of the experiment: the arm's (real, synthetic) ``rows``, ``train`` (which holds its
    seed), judged by the weights ``weights`` names."""
    real, synthetic = rows
    run = train_segmenter(
        [PatchRows(sources.real.dataset, real), PatchRows(sources.synthetic.dataset, synthetic)],
        sources.val, train, sources.real.dataset.schema,
        log_dir=log_dir, keep_best=weights == "best", progress=progress,
    )
    return {"split": arm.name, "seed": train.seed, "real": len(real), "synthetic": len(synthetic),
            "patches": len(real) + len(synthetic), "max_epochs": train.max_epochs,
            "planned_steps": train.max_epochs * math.ceil((len(real) + len(synthetic)) / train.batch_size),
            "epochs": int(run.final["epoch"]),  # the last one validated
            "stopped_early": run.stopped_early, "seconds": round(run.seconds, 2), "weights": run.kept,
            "present": run.present, "initial_weights": run.initial_weights,
            "real_patches": _fingerprint(real["patch_id"]) if len(real) else None,
            "kept": run.kept_epoch, "final": run.final, "history": run.history}


def _fingerprint(values: pd.Series) -> str:
    """A short digest of some patch ids: equal for equal sets of rows."""
    return hashlib.sha256("\n".join(sorted(map(str, values))).encode()).hexdigest()[:16]


def _claim_folder(out: Path, description: dict[str, Any]) -> None:
    """Write experiment.json, or check that the folder holds this same experiment (to resume it)."""
    path = out / "experiment.json"
    if path.exists():
        if _with_config_defaults(json.loads(path.read_text())) != json.loads(json.dumps(description)):
            raise JobError(f"{out} holds another experiment (see {path}); choose another --out")
        return
    write_json_atomic(path, description)


def _with_config_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored experiment description with the config fields added since it was written at their defaults
    (an experiment started by an older version resumes as the same experiment)."""
    config = stored.get("config")
    if not isinstance(config, dict):
        return stored
    try:
        return {**stored, "config": MixConfig.model_validate(config).model_dump(mode="json")}
    except ValidationError:
        return stored


# --- the report ---------------------------------------------------------------------------------
def write_mix_report(result: MixResult, out: str | Path) -> Path:
    """report.md with its tables (CSV) and figures, history.csv, and mix.json (every number of the report)."""
    out = Path(out)
    config = result.config
    train = config.train
    binary = train.class_name is not None
    six_splits = config.design == "splits"
    collapse = result.collapse()
    report = Report(out, "Real and synthetic data in segmentation training")
    report.bullets([
        f"task: {'binary ' + repr(train.class_name) if binary else 'multi-class'} segmentation, "
        f"valid-padding U-Net (base width {train.base_channels}, depth {train.depth})",
        (f"design: the thesis' six splits, N = {result.n} patches per split (100_100: {2 * result.n})" if six_splits
         else f"design: scarcity curve, real counts {list(config.real_counts)}, synthetic multiples "
              f"{list(config.synthetic_multiples)}" + ("; synthetic alone at each count" if config.synthetic_only
                                                        else "")),
        f"seeds {list(config.seeds)}; within a seed every arm starts from the same weights and its real patches "
        "are the first of one shuffle; validation on real patches only; flips + random crops",
        f"training: learning rate {train.learning_rate} with a {train.warmup_epochs:g}-epoch warm-up, then "
        f"{train.schedule}; {'BCE' if binary else 'cross-entropy'} (class weights: {train.class_weights}) + "
        f"{train.dice_weight} x soft-Dice loss; EarlyStopping on {train.monitor} (patience {train.patience}, at "
        f"most {train.max_epochs} epochs{_equal_steps_text(config, result)}); judged by the "
        f"{_judged_weights(config)}",
        f"Dice = pooled Dice of {'the class' if binary else 'each class present, averaged'} over whole validation "
        "patches",
        f"collapsed runs (judged Dice < {COLLAPSE_DICE} on a class present in the validation labels, or at most "
        f"{CONSTANT_MARGIN} above the Dice of predicting it on every pixel: {_everywhere_text(result)}): "
        f"**{collapse['collapsed']} of {collapse['runs']}** ({_percent(collapse['share'])})",
        "patches whose mask holds " + _presence_text(result.presence),
    ])
    warning = scarce_class_warning(result.presence, train.class_name)
    if warning:
        report.text(f"**Warning:** {warning}.")
    table = result.final_table()
    paired = result.paired_table()
    if len(paired):
        _paired_section(report, result, paired, six_splits)
    title = "Dice of the judged weights" + (" (thesis Table 5.2)" if six_splits else "")
    report.heading(title)
    report.table("table_5_2" if six_splits else "arms", _shown_table(result, table, binary and six_splits),
                 "mean ± sd over seeds" + ("; thesis: one seed, 512 px, N = 198, final weights"
                                           if binary and six_splits else ""), csv_frame=table)
    if not six_splits:
        report.figure("scarcity", _scarcity_figure(table), "Dice against the number of real patches, per "
                      "synthetic multiple (mean ± sd over seeds)")
    report.figure("curves", _curves_figure(result), "Validation loss and Dice per epoch (mean over seeds)")
    if six_splits:
        report.figure("final", _final_figure(table), "Validation loss and Dice of the judged weights "
                      "(mean ± sd over seeds)")
    if not binary:
        report.heading("Dice per class")
        report.table("dice_per_class", _per_class(result), "Dice per class of the judged weights, mean over seeds")
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("history", "final", "kept", "present", "key")}
                         | {"collapsed": result.collapsed(r)} | judged_epoch(r) for r in result.runs])
    report.table("runs", runs, "every run (the judged epoch's scores)")
    history = result.history()
    with atomic_path(out / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    report.text("Per-epoch validation history of every run: [history.csv](history.csv); every number above: "
                "[mix.json](mix.json).")
    write_json_atomic(out / "mix.json", _summary(result, table, paired, collapse))
    return report.write()


def _paired_section(report: Report, result: MixResult, paired: pd.DataFrame, six_splits: bool) -> None:
    report.heading("Paired differences of Dice" + (" against 100_0" if six_splits else " against real only"))
    report.text(
        "Per seed, the arm's Dice minus its baseline's (same seed: same initial weights, same real patches). "
        f"Mean over seeds with a percentile-bootstrap {paired_confidence(paired)} interval (10000 resamplings "
        "of the seeds), the two-sided p-values of a paired t-test and of a Wilcoxon signed-rank test (exact; with "
        "5 seeds its smallest possible p is 0.0625). An arm helps or hurts only where its interval excludes 0; with "
        "a few seeds the bootstrap interval excludes 0 whenever every difference has the same sign, so read it with "
        "the tests, and a pair with a collapsed run compares a broken model.")
    report.table("paired", _shown_paired(paired), "paired differences of Dice", csv_frame=paired)
    report.figure("differences", _differences_figure(result, paired), "Per-seed Dice differences against the "
                  "baseline (dots), their mean and bootstrap interval (bars)")


def _judged_weights(config: MixConfig) -> str:
    if config.weights == "final":
        return "final weights (as the thesis)"
    return "weights of the best validation " + ("Dice" if config.train.monitor == "val_dice" else "loss")


def _everywhere_text(result: MixResult) -> str:
    """'0.651' for a binary class; multi-class runs are judged by the first rule alone."""
    return f"{result.everywhere[1]:.3f}" if 1 in result.everywhere else "not used for multi-class"


def _presence_text(presence: dict[str, dict[str, float]]) -> str:
    """'Glomeruli: real 5 %, synthetic 98 %, val 12 %' per class."""
    classes = list(next(iter(presence.values()), {}))
    return "; ".join(f"{name}: " + ", ".join(f"{source} {_percent(by_class[name])}"
                                             for source, by_class in presence.items())
                     for name in classes) or "—"


def _percent(share: float) -> str:
    return "—" if math.isnan(share) else f"{100 * share:.0f} %"


def paired_confidence(paired: pd.DataFrame) -> str:
    confidence = paired["confidence"].iloc[0] if len(paired) else 0.95
    return f"{100 * confidence:.0f} %"


def _shown_paired(paired: pd.DataFrame) -> pd.DataFrame:
    shown = paired[["experiment", "baseline", "pairs"]].copy()
    shown["mean difference"] = paired["mean"]
    shown["95 % interval"] = [f"{format_value(lo)} to {format_value(hi)}"
                              for lo, hi in zip(paired["ci_low"], paired["ci_high"], strict=True)]
    shown["paired t p"] = paired["t_p"]
    shown["Wilcoxon p"] = paired["wilcoxon_p"]
    shown["the arm's Dice is"] = paired["verdict"]
    shown["pairs with a collapsed run"] = paired["collapsed_pairs"]
    return shown


def _shown_table(result: MixResult, table: pd.DataFrame, thesis: bool) -> pd.DataFrame:
    shown = table[["experiment", "real", "synthetic", "epochs"]].copy()
    for column, key in (("val loss", "val_loss"), ("Dice", "val_dice")):
        shown[column] = [mean_sd([judged_epoch(r)[key] for r in result.runs_of(arm)]) for arm in table["experiment"]]
    shown["collapsed"] = [f"{c} of {s}" for c, s in zip(table["collapsed"], table["seeds"], strict=True)]
    if thesis:
        shown["thesis val loss"] = [THESIS_TABLE_5_2[s][0] for s in table["experiment"]]
        shown["thesis Dice"] = [THESIS_TABLE_5_2[s][1] for s in table["experiment"]]
    return shown


def _summary(result: MixResult, table: pd.DataFrame, paired: pd.DataFrame, collapse: dict) -> dict[str, Any]:
    """mix.json: the experiment's set-up, table, paired differences (with each seed's) and collapse count."""
    differences = {arm.name: {str(seed): d for seed, d in result.differences(arm).items()}
                   for arm in result.arms if arm.baseline is not None}
    return {
        "design": result.config.design, "n": result.n, "config": result.config.model_dump(mode="json"),
        "arms": [asdict(arm) for arm in result.arms],
        "table": _records(table),
        "paired": [record | {"differences": differences[record["experiment"]]} for record in _records(paired)],
        "collapse": collapse,
        "patches_holding": result.presence,
    }


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NaN as null)."""
    return json.loads(frame.to_json(orient="records"))


def _per_class(result: MixResult) -> pd.DataFrame:
    rows = []
    for split in result.final_table()["experiment"]:
        judged = [judged_epoch(r) for r in result.runs_of(split)]
        keys = [k for k in judged[0] if k.startswith("val_dice_")]
        rows.append({"experiment": split,
                     **{result.class_name(int(k.rsplit("_", 1)[1])): pd.Series([j[k] for j in judged],
                                                                                dtype=float).mean()
                        for k in keys}})
    return pd.DataFrame(rows)


def _differences_figure(result: MixResult, paired: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(paired) + 2), 3.6))
    rng = np.random.default_rng(0)
    for x, row in enumerate(paired.itertuples(index=False)):
        arm = next(a for a in result.arms if a.name == row.experiment)
        differences = result.differences(arm)
        ax.scatter(x + rng.uniform(-0.12, 0.12, len(differences)), differences, s=14, color="tab:blue", alpha=0.7)
        if row.pairs:
            ax.errorbar([x + 0.25], [row.mean], yerr=[[row.mean - row.ci_low], [row.ci_high - row.mean]],
                        fmt="D", color="black", capsize=4, markersize=5)
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xlim(-0.6, len(paired) - 0.4)
    ax.set_xticks(range(len(paired)), [f"{e}\n−{b}" for e, b in zip(paired["experiment"], paired["baseline"],
                                                                     strict=True)], fontsize=7)
    ax.set_ylabel("Dice difference (per seed)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _scarcity_figure(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    with_real = table[table["real"] > 0]
    for multiple, rows in with_real.groupby(with_real["synthetic"] // with_real["real"]):
        ax.errorbar(rows["real"], rows["Dice mean"], yerr=rows["Dice sd"].fillna(0), marker="o", capsize=3,
                    label="real only" if multiple == 0 else f"real + {multiple}x synthetic")
    alone = table[table["real"] == 0]
    if len(alone):
        ax.errorbar(alone["synthetic"], alone["Dice mean"], yerr=alone["Dice sd"].fillna(0), marker="s",
                    linestyle="--", capsize=3, label="synthetic only (x = synthetic count)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(with_real["real"]) | set(alone["synthetic"])))
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.set_xlabel("real patches")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
    dice_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _final_figure(table: pd.DataFrame) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = np.arange(len(table))
    for ax, column, label in ((axes[0], "val loss", "validation loss"), (axes[1], "Dice", "Dice")):
        errors = table[f"{column} sd"].fillna(0).to_numpy()
        ax.bar(x, table[f"{column} mean"], yerr=errors, capsize=3, color="tab:blue")
        ax.set_xticks(x, table["experiment"], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


#: Most seeds an experiment may run per split.
MAX_SEED_COUNT = 1000


def mix_config(splits: str | None, seeds: int | str, n: int | None, train: SegmentTrainConfig,
               **design: Any) -> MixConfig:
    """A MixConfig from command-line text: splits '100_0,50_50' (default all), seeds '5' (0 … 4)
    or '0,5,7'; `design` holds the other MixConfig fields (design, real_counts, synthetic_multiples,
    synthetic_only, weights), the counts as text '12,24,48'."""
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
    for key, option in (("real_counts", "--real-counts"), ("synthetic_multiples", "--synthetic-multiples")):
        if isinstance(design.get(key), str):
            design[key] = _count_list(design[key], option)
    try:
        return MixConfig(splits=split_list, seeds=seed_list, n=n, train=train, **design)
    except ValidationError as exc:
        raise ConfigError(f"bad experiment option ({describe_validation_error(exc)})") from None


def _count_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes whole numbers separated by commas (12,24,48), got {text!r}") from None

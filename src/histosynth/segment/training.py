"""Training a segmenter with Lightning: cross-entropy (or BCE) + soft Dice, EarlyStopping on the
validation loss (or Dice), an optional warm-up and cosine schedule of the learning rate, fixed seeds,
CSV logs, and per-class Dice on whole validation patches.

Dice here is the pooled Dice of each class over a whole evaluation set (2 TP / (2 TP + FP + FN),
counted with torchmetrics); the reported mean is over the classes present in the set's labels.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import ConcatDataset, DataLoader
from torchmetrics.classification import MulticlassStatScores

from ..data.dataset import open_dataset
from ..devices import pick_device
from ..errors import ConfigError, DataError, JobError, describe_validation_error
from ..schema import ClassSchema
from ..terminal import quiet_lightning
from ..validation import MAX_SEED
from .data import PatchRows, SegmentationPairs
from .predict import predict_images
from .segmenter import CONFIG_FILE, Segmenter


class SegmentTrainConfig(BaseModel):
    """Options of a segmentation training run (also the experiment's identical loop)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    class_name: str | None = Field(None, description="binary segmentation of this class; None = multi-class")
    base_channels: int = Field(64, ge=1, description="width of the first level (64 = classic U-Net)")
    depth: int = Field(4, ge=1, le=6, description="number of poolings (4 = classic U-Net)")
    batch_norm: bool = True
    input_size: int | None = Field(None, ge=1, description="training window; default: largest that fits a patch")
    batch_size: int = Field(8, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1, description="EarlyStopping: validations without a better validation score")
    val_every: int = Field(1, ge=1, description="validate every this many epochs (validation can cost more than "
                                                "training when the validation set is the larger one)")
    monitor: Literal["val_loss", "val_dice"] = Field(
        "val_loss", description="what EarlyStopping and the best weights follow: lowest loss or highest Dice")
    learning_rate: float = Field(1e-3, gt=0)
    warmup_epochs: float = Field(0.0, ge=0, description="learning rate ramped up linearly over this many epochs")
    foreground_crops: float = Field(0.0, ge=0, le=1, description="share of training windows placed on a pixel "
                                                                 "of a rare class (binary: the class)")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after the warm-up: constant, or cosine decay to 0 at max_epochs")
    dice_weight: float = Field(1.0, ge=0, description="weight of the soft-Dice term beside CE/BCE")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weigh CE/BCE by sqrt(median share / class share) of the training labels")
    init: str | None = Field(None, description="segmenter folder to start from (same schema, mode and architecture)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "auto"
    num_workers: int = Field(0, ge=0)

    @classmethod
    def from_options(cls, **options: Any) -> "SegmentTrainConfig":
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ConfigError(f"bad training option ({describe_validation_error(exc)})") from None


# --- losses and metrics ---------------------------------------------------------------------
def segmentation_loss(segmenter: Segmenter, logits: torch.Tensor, labels: torch.Tensor,
                      dice_weight: float = 1.0, smooth: float = 1.0,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """CE (multi-class) or BCE (binary) plus `dice_weight` x (1 - soft Dice).

    The soft Dice is pooled over the batch and averaged over the classes present in the batch's
    labels (absent classes are left to the cross-entropy term, which already drives them to zero).
    `class_weights` (see :func:`balanced_class_weights`) weigh the CE per label, or for a binary
    segmenter the positive pixels of the BCE.
    """
    if segmenter.binary:
        target = labels.float()
        pos_weight = None if class_weights is None else class_weights[1] / class_weights[0]
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], target, pos_weight=pos_weight)
        probs, onehot = torch.sigmoid(logits[:, 0])[:, None], target[:, None]
    else:
        loss = F.cross_entropy(logits, labels, weight=class_weights)
        ids = segmenter.schema.ids
        probs = torch.softmax(logits, dim=1)[:, ids]
        onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()[:, ids]
    if dice_weight == 0:
        return loss
    dims = (0, 2, 3)
    present = onehot.sum(dims) > 0
    if not present.any():
        return loss
    dice = (2 * (probs * onehot).sum(dims) + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return loss + dice_weight * (1 - dice[present].mean())


def label_pixel_counts(segmenter: Segmenter, sources: Sequence[PatchRows]) -> np.ndarray:
    """Pixels of each label (the segmenter's label space) over the masks of some dataset rows."""
    counts = np.zeros(segmenter.metric_classes, dtype=np.int64)
    for source in sources:
        for _, row in source.rows.iterrows():
            labels = segmenter.labels(source.dataset.mask(row))
            counts += np.bincount(labels.ravel(), minlength=len(counts))[:len(counts)]
    return counts


#: Class weights are capped so that a class of a handful of pixels cannot dominate the loss.
MAX_CLASS_WEIGHT = 10.0


def balanced_class_weights(counts: np.ndarray) -> torch.Tensor:
    """Per-label CE weights sqrt(median share / share), capped at MAX_CLASS_WEIGHT.

    The median is over the labels that occur; labels that never occur get weight 1 (they have no
    pixels to weigh). The square root keeps rare classes from being over-predicted, as plain
    inverse frequency does on data this imbalanced (Sclerotic Glomeruli are < 1 % of pixels).
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise DataError("the training masks hold no labelled pixels; class weights cannot be computed")
    shares = counts / counts.sum()
    weights = np.ones_like(shares)
    weights[present] = np.minimum(np.sqrt(np.median(shares[present]) / shares[present]), MAX_CLASS_WEIGHT)
    return torch.tensor(weights, dtype=torch.float32)


def stat_scores(segmenter: Segmenter) -> MulticlassStatScores:
    """Per-class TP/FP/TN/FN counts over all pixels of an evaluation set."""
    return MulticlassStatScores(num_classes=segmenter.metric_classes, average=None, multidim_average="global")


def dice_by_class(segmenter: Segmenter, stats: torch.Tensor) -> dict[int, float]:
    """Pooled Dice per label from stat scores (rows tp, fp, tn, fn, support); NaN for a label
    absent from both labels and predictions. Binary segmenters report their one class."""
    tp, fp, _, fn, _ = stats.double().unbind(-1)
    dice = 2 * tp / (2 * tp + fp + fn)
    labels = [1] if segmenter.binary else segmenter.schema.ids
    return {label: float(dice[label]) for label in labels}


def mean_dice(segmenter: Segmenter, stats: torch.Tensor) -> float:
    """Mean Dice over the labels present in the evaluated labels (support > 0)."""
    support = stats[:, 4]
    scores = [d for label, d in dice_by_class(segmenter, stats).items() if support[label] > 0]
    return float(np.mean(scores)) if scores else math.nan


# --- the Lightning module --------------------------------------------------------------------
class SegmentationTask(L.LightningModule):
    """Trains `segmenter.net`; records one history row per validation epoch."""

    def __init__(self, segmenter: Segmenter, learning_rate: float = 1e-3, dice_weight: float = 1.0,
                 class_weights: torch.Tensor | None = None, warmup_epochs: float = 0.0,
                 schedule: str = "constant"):
        super().__init__()
        self.segmenter = segmenter
        self.net = segmenter.net
        self.learning_rate = learning_rate
        self.warmup_epochs = warmup_epochs
        self.schedule = schedule
        self.present: list[int] = []
        self.dice_weight = dice_weight
        # a buffer, so that it moves to the training device with the module
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.val_stats = stat_scores(segmenter)
        self.history: list[dict[str, float]] = []
        self._sums = {"train": [0.0, 0], "val": [0.0, 0]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        logits = self.net(batch["image"])[..., :labels.shape[-2], :labels.shape[-1]]
        loss = segmentation_loss(self.segmenter, logits, labels, self.dice_weight, class_weights=self.class_weights)
        total = self._sums[stage]
        total[0] += float(loss.detach()) * len(labels)
        total[1] += len(labels)
        return loss, logits

    def on_train_epoch_start(self) -> None:
        _set_epoch(self.trainer.train_dataloader.dataset, self.current_epoch)
        self._sums["train"] = [0.0, 0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train")
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums["val"] = [0.0, 0]
        self.val_stats.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, logits = self._step(batch, "val")
        self.val_stats.update(self.segmenter.ids_from_logits(logits).long(), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        stats = self.val_stats.compute()
        self.present = [label for label in dice_by_class(self.segmenter, stats) if stats[label, 4] > 0]
        val_loss = _mean(self._sums["val"])
        record = {"epoch": self.current_epoch + 1, "train_loss": _mean(self._sums["train"]),
                  "val_loss": val_loss, "val_dice": mean_dice(self.segmenter, stats)}
        record.update({f"val_dice_{label}": d for label, d in dice_by_class(self.segmenter, stats).items()})
        self.log_dict({k: v for k, v in record.items() if k.startswith("val_")})
        self.history.append(record)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.learning_rate)
        steps = int(self.trainer.estimated_stepping_batches)
        warmup = round(self.warmup_epochs * steps / max(self.trainer.max_epochs, 1))
        factor = learning_rate_factor(warmup, steps, self.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def learning_rate_factor(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """The learning rate's multiplier at optimiser step s (0-based): (s + 1) / warmup_steps during
    the warm-up, then 1 (constant) or a cosine from 1 down to 0 at `total_steps` (cosine)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _mean(total: list) -> float:
    return total[0] / total[1] if total[1] else math.nan


def _set_epoch(dataset: Any, epoch: int) -> None:
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_epoch(part, epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


# --- running a training ------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """What a training produced: the segmenter and its per-epoch validation history."""

    segmenter: Segmenter
    history: list[dict[str, float]]
    seconds: float
    stopped_early: bool
    kept: str = "final"
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]

    monitor: str = "val_loss"
    present: list[int] = field(default_factory=list)
    initial_weights: str = ""

    @property
    def best(self) -> dict[str, float]:
        """The epoch with the best monitored score (lowest loss, highest Dice; the first of ties)."""
        return best_epoch(self.history, self.monitor)

    @property
    def kept_epoch(self) -> dict[str, float]:
        """The history row of the weights the segmenter holds."""
        return self.final if self.kept == "final" else self.best


def best_epoch(history: Sequence[dict[str, float]], monitor: str) -> dict[str, float]:
    """The row of `history` with the lowest val_loss or highest val_dice (NaN scores last)."""
    def badness(row: dict[str, float]) -> float:
        value = row[monitor]
        if math.isnan(value):
            return math.inf
        return value if monitor == "val_loss" else -value
    return min(history, key=badness)


def _accelerator(device: str) -> tuple[str, Any]:
    """Lightning's (accelerator, devices) for a device name ('auto' picks CUDA > MPS > CPU)."""
    chosen = pick_device(device)
    if chosen.type == "cuda":
        return "gpu", [chosen.index] if chosen.index is not None else 1
    if chosen.type in ("cpu", "mps"):
        return chosen.type, 1
    raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def train_segmenter(train: Sequence[PatchRows], val: PatchRows, config: SegmentTrainConfig,
                    schema: ClassSchema, log_dir: str | Path | None = None, keep_best: bool = True,
                    progress: bool = False) -> TrainingRun:
    """Train a new segmenter on the rows of one or more datasets, validating on `val`.

    Weights are initialised and batches drawn from `config.seed`, so two runs with the same seed
    differ only in their training data. With `keep_best` the weights of the epoch with the best
    monitored score (`config.monitor`: lowest validation loss or highest validation Dice) are kept
    (they need `log_dir` for the checkpoint); otherwise the final ones, as the thesis' experiment
    reports.
    """
    if not any(len(part) for part in train):
        raise DataError("no training patches: the training rows are empty")
    if not len(val):
        raise DataError("no validation patches: the validation rows are empty")
    L.seed_everything(config.seed, workers=True, verbose=False)
    segmenter = _initial_segmenter(config, schema)
    initial = weights_fingerprint(segmenter)
    train_set = ConcatDataset([
        SegmentationPairs(part, segmenter, config.input_size, augment=True, seed=config.seed,
                          foreground=config.foreground_crops)
        for part in train if len(part)
    ])
    val_set = SegmentationPairs(val, segmenter, augment=False)
    loaders = _loaders(train_set, val_set, config)
    balanced = config.class_weights == "balanced"
    weights = balanced_class_weights(label_pixel_counts(segmenter, train)) if balanced else None
    task = SegmentationTask(segmenter, config.learning_rate, config.dice_weight, weights, config.warmup_epochs,
                            config.schedule)
    mode = "min" if config.monitor == "val_loss" else "max"
    early = EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience, check_finite=False)
    checkpoint = _best_checkpoint(log_dir, config.monitor, mode) if keep_best else None
    callbacks = [c for c in (early, checkpoint, RichProgressBar() if progress else None) if c is not None]
    start = time.perf_counter()
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # small data sets load fast
        _trainer(config, log_dir, callbacks, progress).fit(task, *loaders)
    seconds = time.perf_counter() - start
    kept = "final"
    if checkpoint is not None and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
        Path(checkpoint.best_model_path).unlink()  # the weights live on in the segmenter folder
        kept = "lowest validation loss" if config.monitor == "val_loss" else "highest validation Dice"
    segmenter.net.cpu().eval()
    return TrainingRun(segmenter=segmenter, history=task.history, seconds=seconds,
                       stopped_early=early.stopped_epoch > 0, kept=kept, monitor=config.monitor,
                       present=task.present, initial_weights=initial)


def weights_fingerprint(segmenter: Segmenter) -> str:
    """A short digest of a network's weights: equal for runs that start from the same weights."""
    from ..models.text import weights_digest

    return weights_digest(segmenter.net)


def _initial_segmenter(config: SegmentTrainConfig, schema: ClassSchema) -> Segmenter:
    """A new segmenter, or with `config.init` a copy of a trained one that must match the run."""
    fresh = Segmenter.for_class(schema, config.class_name, base_channels=config.base_channels,
                                depth=config.depth, batch_norm=config.batch_norm)
    if config.init is None:
        return fresh
    start = Segmenter.load(config.init)
    start.check_schema(schema, "the training data")
    if (start.target_class, start.architecture) != (fresh.target_class, fresh.architecture):
        raise ConfigError(
            f"--init {config.init} is a {start.describe()} with {start.architecture}, but this run trains a "
            f"{fresh.describe()} with {fresh.architecture}; pass the --class and --base-channels of the "
            "segmenter you start from"
        )
    start.training = {}
    start.net.train()
    return start


def _best_checkpoint(log_dir: str | Path | None, monitor: str, mode: str) -> ModelCheckpoint:
    if log_dir is None:
        raise ConfigError("keeping the best weights needs a log folder for the checkpoint")
    return ModelCheckpoint(dirpath=Path(log_dir) / "checkpoints", monitor=monitor, mode=mode,
                           save_top_k=1, save_weights_only=True)


def _trainer(config: SegmentTrainConfig, log_dir: str | Path | None, callbacks: list[L.Callback],
             progress: bool) -> L.Trainer:
    accelerator, devices = _accelerator(config.device)
    return L.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=config.max_epochs,
        check_val_every_n_epoch=config.val_every,
        logger=CSVLogger(str(log_dir), name="", version="") if log_dir is not None else False,
        callbacks=callbacks, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        # CPU kernels are deterministic; some CUDA ones (e.g. NLL loss) only warn rather than fail
        deterministic=True if accelerator == "cpu" else "warn",
        log_every_n_steps=1, default_root_dir=str(log_dir) if log_dir is not None else None,
    )


def _loaders(train_set: ConcatDataset, val_set: SegmentationPairs,
             config: SegmentTrainConfig) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(config.seed)
    common = {"num_workers": config.num_workers, "persistent_workers": False}
    return (
        DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator, **common),
        DataLoader(val_set, batch_size=config.batch_size, shuffle=False, **common),
    )


# --- evaluating a trained segmenter --------------------------------------------------------------
def evaluate_segmenter(segmenter: Segmenter, source: PatchRows, device: str = "auto",
                       batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """Dice per class (and mean) of whole-patch predictions on some dataset rows."""
    segmenter.check_schema(source.dataset.schema, f"dataset {source.dataset.root}")
    metric = stat_scores(segmenter)
    rows = [row for _, row in source.rows.iterrows()]
    images = (source.dataset.image(row) for row in rows)
    predictions = predict_images(segmenter, images, batch_size=batch_size, device=device,
                                 progress=progress, total=len(rows))
    for row, predicted in zip(rows, predictions, strict=True):
        labels = segmenter.labels(source.dataset.mask(row))
        metric.update(torch.from_numpy(predicted).long()[None], torch.from_numpy(labels).long()[None])
    stats = metric.compute()
    support = stats[:, 4]
    total = float(support.sum())
    per_class = {
        label: {"dice": d, "pixel_share": float(support[label]) / total if total else 0.0}
        for label, d in dice_by_class(segmenter, stats).items()
    }
    return {"patches": len(rows), "mean_dice": mean_dice(segmenter, stats), "classes": per_class}


def train_segmenter_on_dataset(dataset: str | Path, out: str | Path, config: SegmentTrainConfig,
                               progress: bool = False) -> TrainingRun:
    """`histosynth segment train`: train on a dataset's 'train' rows, stop on its 'val' rows,
    keep the best weights, measure Dice on 'val' (and 'test', if any) and save the folder."""
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise JobError(f"{out} already holds a segmenter; choose another --out or delete it first")
    patches = open_dataset(dataset)
    splits = {name: PatchRows(patches, patches.rows(name)) for name in ("train", "val", "test")}
    if not len(splits["val"]):
        raise DataError(
            f"{patches.root} has no 'val' rows; validation (and EarlyStopping) needs slides assigned "
            "to the 'val' split when the dataset is written"
        )
    run = train_segmenter([splits["train"]], splits["val"], config, patches.schema,
                          log_dir=out / "logs", keep_best=True, progress=progress)
    evaluation = {name: evaluate_segmenter(run.segmenter, splits[name], config.device, progress=progress)
                  for name in ("val", "test") if len(splits[name])}
    run.record = {
        "dataset": str(patches.root), "patches": {k: len(v) for k, v in splits.items()},
        "config": config.model_dump(), "epochs": len(run.history), "stopped_early": run.stopped_early,
        "weights": run.kept, "seconds": round(run.seconds, 2), "best_epoch": run.best,
        "final_epoch": run.final, "evaluation": evaluation,
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }
    run.segmenter.training = run.record
    run.segmenter.save(out)
    return run

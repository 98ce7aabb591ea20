"""What every training command shares: run folders, atomic checkpoints, precision, the Lightning trainer."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import HistosynthError, JobError
from ..io import atomic_path, partial_target, remove_partial_files, write_json_atomic
from ..presets import Preset

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_FILE = "run.json"


class TrainingStopped(HistosynthError):
    """Training stopped on something the user can act on (a non-finite loss, a failed checkpoint)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their destination and renamed into place.

    Lightning's own save goes through a temporary file in the system temp folder and *moves* it;
    across file systems that move is a copy onto the destination, which a full disk leaves truncated.
    Here a failed write leaves the previous checkpoint untouched.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports failed writes as RuntimeError
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            free = shutil.disk_usage(path.parent).free / 1e9
            raise TrainingStopped(
                f"could not write checkpoint {path} ({detail}; {free:.1f} GB free); the previous checkpoint "
                "there is kept. Free disk space and continue with --resume"
            ) from None


@dataclass
class DeviceOptions:
    """Lightning's device flags, passed through (DDP: --devices N / --num-nodes M / torchrun)."""

    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1

    def trainer_kwargs(self) -> dict[str, Any]:
        devices: Any = int(self.devices) if str(self.devices).isdigit() else self.devices
        return {"accelerator": self.accelerator, "devices": devices, "strategy": self.strategy,
                "num_nodes": self.num_nodes}


def lightning_precision(preset: Preset, requested: Optional[str]) -> str:
    """'32' (default) or 'bf16-mixed'; fp16 is refused with the thesis' reason (by the preset check)."""
    if requested is None:
        return preset.training.precision
    value = {"bf16": "bf16-mixed", "fp32": "32", "32-true": "32"}.get(str(requested), str(requested))
    data = preset.to_dict()
    data["training"]["precision"] = value
    return Preset.from_dict(data, source="--precision").training.precision


@dataclass
class RunFolder:
    """A training run's working folder: checkpoints, CSV logs, sample grids and the run settings."""

    root: Path
    settings: dict[str, Any] = field(default_factory=dict)
    resumed_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def last_checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR / LAST_CHECKPOINT

    def start(self, settings: dict[str, Any], resume: bool) -> Optional[Path]:
        """Check the folder against ``resume``; return the checkpoint to resume from (or None)."""
        has_checkpoint = self.last_checkpoint.is_file()
        if resume:
            if not has_checkpoint:
                raise JobError(f"nothing to resume: {self.last_checkpoint} does not exist; start without --resume")
            stored = json.loads((self.root / RUN_FILE).read_text())
            self.resumed_settings = stored
            changed = [k for k in settings if k not in ("steps",) and stored.get(k) != settings[k]]
            if changed:
                raise JobError(
                    f"--resume with other settings than the run in {self.root}: {', '.join(changed)} differ; "
                    "resume with the same options or start a new run"
                )
        elif has_checkpoint:
            raise JobError(
                f"{self.root} holds a training run; pass --resume to continue it, or choose another output"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_partial_files()
        write_json_atomic(self.root / RUN_FILE, settings)
        self.settings = settings
        return self.last_checkpoint if resume else None

    def bind_data_setting(self, key: str, value: Any, how_to_match: str) -> None:
        """Record a setting known only once the data is open (the cache's latent dtype); a resumed run
        must find what it trained on. ``how_to_match`` ends the refusal: what gives the same data again
        (``{before}`` in it names what the run trained with)."""
        before = self.resumed_settings.get(key)
        if before is not None and before != value:
            raise JobError(f"--resume with {key} {value}, but the run in {self.root} trained with {before}; "
                           f"{how_to_match.format(before=before)}, or start a new run")
        self.settings = {**self.settings, key: value}
        write_json_atomic(self.root / RUN_FILE, self.settings)

    def remove_partial_files(self) -> list[Path]:
        """Delete the temporaries of checkpoints that a killed run left in ``checkpoints/``.

        Only names :func:`histosynth.io.atomic_path` gives a ``*.ckpt`` there go; the run's own
        checkpoints, logs and anything else are kept. Safe under DDP, where every process starts the
        run: no checkpoint is written before all of them have started. (run.json's temporaries are
        left alone: every process writes that file as it starts.)
        """
        removed: list[Path] = []
        folder = self.root / CHECKPOINT_DIR
        if folder.is_dir():
            targets = {partial_target(p.name) for p in folder.iterdir()} - {None}
            for target in sorted(t for t in targets if t.endswith(".ckpt")):
                removed += remove_partial_files(folder / target)
        return removed


def build_trainer(run: RunFolder, max_steps: int, precision: str, devices: DeviceOptions,
                  checkpoint_every: int, callbacks: list[Callback] = (), show_progress: bool = True,
                  log_every: int = 10, **extra: Any) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=run.root / CHECKPOINT_DIR, save_top_k=0, save_last=True,
                                  every_n_train_steps=max(1, checkpoint_every), save_on_train_epoch_end=False)
    progress: list[Callback] = [_progress_bar()] if show_progress else []
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        precision=precision,
        logger=CSVLogger(run.root, name="logs"),
        callbacks=[checkpoints, *progress, *callbacks],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(log_every, max_steps)),
        num_sanity_val_steps=0,
        deterministic=False,
        **devices.trainer_kwargs(),
        **extra,
    )


def save_final_checkpoint(trainer: L.Trainer, run: RunFolder, checkpoint_every: int) -> None:
    """The checkpoint of the last step, unless the periodic checkpoint just wrote it."""
    if trainer.global_step % max(1, checkpoint_every) or not run.last_checkpoint.is_file():
        trainer.save_checkpoint(run.last_checkpoint, weights_only=False)


def _progress_bar() -> Callback:
    """Rich's bar in a terminal; a plain one where output is captured (logs, CI)."""
    import sys

    return RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=max(1, 10))


class LinearWarmup:
    """LR factor rising linearly from ``start`` to 1 over ``steps`` optimiser steps (CompVis' LambdaLR)."""

    def __init__(self, steps: int, start: float = 1e-6):
        self.steps = steps
        self.start = start

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * step / self.steps


def finite_or_stop(module: L.LightningModule, loss: torch.Tensor, step: int, batch_description: str,
                   run: Optional[RunFolder]) -> None:
    """Stop training on a NaN / infinite loss, before the optimiser applies it.

    Under DDP every process learns whether any of them saw one, so all stop together rather than
    the others waiting forever for the stopped one's gradients.
    """
    value = float(loss.detach())
    if module.trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
        return
    kept = f"the last good checkpoint is {run.last_checkpoint}" if run and run.last_checkpoint.is_file() else \
        "no checkpoint was written yet"
    what = f"the loss became {value}" if not math.isfinite(value) else "another process's loss became non-finite"
    raise TrainingStopped(
        f"{what} at step {step} (batch: {batch_description}); training stopped and {kept}. "
        "Check those patches, or lower --lr / use --precision 32"
    )

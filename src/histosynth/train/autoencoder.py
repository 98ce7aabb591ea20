"""Training or fine-tuning the f4 autoencoder on a patch dataset (the thesis' future work §6.4).

Losses that need no downloaded network: L1 + (1 - SSIM), plus the VQ commitment or the KL term
(``models.autoencoder.autoencoder_losses``). Reconstruction PSNR and SSIM are measured on held-out
patches: the dataset's ``val`` split, or else a seeded tenth of its training patches kept out of
training. A KL autoencoder gets its latent scale set from its latents' spread, so diffusion sees
roughly unit-variance latents; a VQ one keeps its configured scale (1.0 for PathLDM's VQ-f4).

The result is a diffusers autoencoder folder (usable as ``histosynth train --autoencoder DIR``) with
``metrics.json`` beside the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .. import validation
from ..data.dataset import PatchDataset, open_dataset
from ..data.torchdata import PatchTorchDataset
from ..errors import DataError, JobError
from ..models.autoencoder import (
    Autoencoder,
    autoencoder_losses,
    build_autoencoder,
    decode_latents,
    encode_latents,
    estimate_latent_scale,
    is_vq,
    load_checked_autoencoder,
    psnr,
    ssim,
    write_autoencoder_folder,
)
from ..presets import Preset
from .runtime import (
    DeviceOptions,
    LossWatch,
    RunFolder,
    build_trainer,
    lightning_precision,
    save_final_checkpoint,
)

HELD_OUT_SHARE = 0.1
#: the batch that --lr is meant for (the default --batch-size): --scale-lr scales the rate from it
REFERENCE_BATCH = 8


class FlipsPerEpoch(L.Callback):
    """New flips for every epoch (the dataset draws them from (seed, epoch, index))."""

    def __init__(self, dataset: PatchTorchDataset):
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.dataset.set_epoch(trainer.current_epoch)


class AutoencoderModule(L.LightningModule):
    def __init__(self, autoencoder: Autoencoder, lr: float, seed: int = 0, run: Optional[RunFolder] = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.lr = lr
        self.seed = seed
        self.run = run
        self.losses = LossWatch()

    def configure_optimizers(self):
        # CompVis trains its autoencoders with Adam(betas=(0.5, 0.9)).
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr, betas=(0.5, 0.9))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        generator = torch.Generator(device=images.device).manual_seed(self.seed * 1_000_003 + self.global_step)
        losses = autoencoder_losses(self.autoencoder, images, generator=generator)
        index = batch["index"]
        self.losses.observe(losses.total, self.global_step, lambda: f"dataset items {index.tolist()}",
                            self.trainer.strategy, self.run)
        size = images.shape[0]
        self.log("loss", losses.total, prog_bar=True, batch_size=size)
        self.log("reconstruction", losses.reconstruction, batch_size=size)
        return losses.total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.losses.guard_checkpoint(self, checkpoint, autoencoder=self.autoencoder.parameters())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        reconstruction = decode_latents(self.autoencoder, encode_latents(self.autoencoder, images))
        size = images.shape[0]  # under DDP each process checks a share; sync_dist averages the shares
        self.log("val_psnr", psnr(images, reconstruction), batch_size=size, prog_bar=True, sync_dist=True)
        self.log("val_ssim", ssim(images, reconstruction), batch_size=size, sync_dist=True)


@dataclass
class AutoencoderTrainOptions:
    dataset: Path
    out: Path
    preset: Preset
    steps: int = 5_000
    batch_size: int = REFERENCE_BATCH
    lr: float = 1e-4
    precision: Optional[str] = None
    init: Optional[Path] = None
    resume: bool = False
    scale_lr: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    run_dir: Optional[Path] = None
    devices: DeviceOptions = field(default_factory=DeviceOptions)
    num_workers: int = 0
    show_progress: bool = True
    command: str = ""


@dataclass
class AutoencoderTrainResult:
    folder: Path
    psnr: float
    ssim: float
    held_out: int
    steps: int
    wall_time_s: float
    main_process: bool = True  # False in the other processes of a DDP run


def train_autoencoder(options: AutoencoderTrainOptions) -> AutoencoderTrainResult:
    """Train (``--init``: fine-tune) an autoencoder and write it with its held-out PSNR / SSIM."""
    started = time.perf_counter()
    check_autoencoder_options(options)
    precision = lightning_precision(options.preset, options.precision)
    dataset = open_dataset(options.dataset)
    train_items, held_out = split_for_autoencoder(dataset, options.seed)
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        autoencoder = load_checked_autoencoder(options.init) if options.init else build_autoencoder(options.preset)
    autoencoder.train().requires_grad_(True)

    run = RunFolder(options.run_dir or options.out.with_name(options.out.name + ".run"))
    settings = {"dataset": str(Path(options.dataset).resolve()), "preset": options.preset.to_dict(),
                "init": str(options.init) if options.init else None, "seed": options.seed,
                "batch_size": options.batch_size, "lr": options.lr, "precision": precision, "steps": options.steps}
    if options.scale_lr:  # (runs without it keep the settings they always had, for --resume)
        settings.update(scale_lr=True)
    resume_from = run.start(settings, options.resume)
    loader = DataLoader(train_items, batch_size=options.batch_size, shuffle=True, drop_last=False,
                        num_workers=options.num_workers, generator=torch.Generator().manual_seed(options.seed))
    validation = DataLoader(held_out, batch_size=options.batch_size, num_workers=options.num_workers)
    flipped = train_items.dataset if isinstance(train_items, Subset) else train_items
    trainer = build_trainer(run, options.steps, precision, options.devices, options.checkpoint_every,
                            [FlipsPerEpoch(flipped)], options.show_progress, check_val_every_n_epoch=None,
                            val_check_interval=max(1, min(options.checkpoint_every, options.steps)))
    global_batch = run.bind_world(trainer, options.batch_size)
    lr = run.bind_lr(trainer, options.lr, REFERENCE_BATCH, options.scale_lr)
    module = AutoencoderModule(autoencoder, lr, options.seed, run)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=validation, ckpt_path=resume_from)
    save_final_checkpoint(trainer, run, options.checkpoint_every)
    metrics = trainer.validate(module, validation, verbose=False)[0]

    autoencoder = module.autoencoder.to("cpu").eval()
    if not is_vq(autoencoder):
        autoencoder.register_to_config(scaling_factor=_latent_scale(autoencoder, dataset))
    result = AutoencoderTrainResult(options.out, float(metrics["val_psnr"]), float(metrics["val_ssim"]),
                                    len(held_out), int(trainer.global_step), time.perf_counter() - started,
                                    trainer.is_global_zero)
    if trainer.is_global_zero:
        write_autoencoder_folder(options.out, autoencoder, {"metrics.json": {
            "psnr_db": round(result.psnr, 3), "ssim": round(result.ssim, 4), "held_out_patches": result.held_out,
            "steps": result.steps, "latent_scale": float(autoencoder.config.scaling_factor),
            "dataset": str(options.dataset), "init": settings["init"], "wall_time_s": round(result.wall_time_s, 1),
            "lr": lr, "base_lr": options.lr, "scale_lr": options.scale_lr, "world_size": trainer.world_size,
            "global_batch_size": global_batch,
            "command": options.command,
        }})
    return result


def check_autoencoder_options(options: AutoencoderTrainOptions) -> None:
    """The output folder is free and every number is usable; checked before any work starts."""
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(f"{out} exists and is not an empty folder; choose a new --out folder")
    validation.positive_int(options.steps, "--steps")
    validation.positive_int(options.batch_size, "--batch-size")
    validation.positive_float(options.lr, "--lr")
    validation.seed(options.seed)
    validation.positive_int(options.checkpoint_every, "--checkpoint-every")
    validation.int_at_least(options.num_workers, "--workers", 0)
    validation.positive_int(options.devices.num_nodes, "--num-nodes")


def split_for_autoencoder(dataset: PatchDataset,
                          seed: int = 0) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(training items with flips, held-out items without): the val split, or a seeded tenth of train."""
    train = PatchTorchDataset(dataset, split="train", flips=True, seed=seed)
    if len(train) == 0:
        raise DataError(f"{dataset.root} has no 'train' patches to train an autoencoder on")
    if len(dataset.rows("val")):
        return train, PatchTorchDataset(dataset, split="val", flips=False)
    if len(train) < 2:
        raise DataError(f"{dataset.root} has a single patch; an autoencoder needs some to train and some to test on")
    order = np.random.default_rng(seed).permutation(len(train))
    n_held = max(1, round(HELD_OUT_SHARE * len(train)))
    held, kept = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())
    return Subset(train, kept), Subset(PatchTorchDataset(dataset, split="train", flips=False), held)


@torch.no_grad()
def _latent_scale(autoencoder: Autoencoder, dataset: PatchDataset, count: int = 64) -> float:
    """From the first ``count`` training patches, unflipped."""
    items = PatchTorchDataset(dataset, split="train", flips=False)
    images = torch.stack([items[i]["image"] for i in range(min(count, len(items)))])
    return estimate_latent_scale(autoencoder, images)

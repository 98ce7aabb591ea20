"""Training or fine-tuning the f4 autoencoder on a patch dataset (the thesis' future work §6.4).

The losses are CompVis' first-stage losses with what needs no download in place of LPIPS: L1 +
(1 - SSIM), plus the VQ commitment or the KL term (``models.autoencoder.autoencoder_losses``); a
perceptual distance when the user gives a feature network (``--perceptual``, :mod:`..models.perceptual`);
and from the preset's ``disc_start`` step on a PatchGAN discriminator with a hinge loss and an adaptive
weight (:mod:`..models.discriminator`). The weights are the preset's ``autoencoder_training`` section.
Reconstruction PSNR and SSIM are measured on held-out patches: the dataset's ``val`` split, or else a
seeded tenth of its training patches kept out of training; at the end the two-sample AUC of the
held-out reconstructions against their originals too (:mod:`..evaluate.reconstruction`). A KL
autoencoder gets its latent scale set from its latents' spread, so diffusion sees roughly
unit-variance latents; a VQ one keeps its configured scale (1.0 for PathLDM's VQ-f4).

Checkpoints hold the discriminator and the one Adam optimiser of both networks, so ``--resume``
continues the adversarial training exactly; the perceptual network is frozen and stays out of them.

``decoder_only`` fine-tunes the decoder of an existing autoencoder and freezes everything that makes
its latents (encoder, ``quant_conv``, a VQ codebook) and its latent scale: the latents stay what they
were, bit for bit, so every model trained on them can decode with the new decoder unchanged
(``histosynth replace-decoder``), as Stability's ft-MSE / ft-EMA decoders were made for Stable Diffusion.

The result is a diffusers autoencoder folder (usable as ``histosynth train --autoencoder DIR``) with
``metrics.json`` beside the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import validation
from ..data.dataset import PatchDataset, open_dataset
from ..data.torchdata import PatchTorchDataset
from ..errors import ConfigError, DataError, JobError
from ..models.autoencoder import (
    Autoencoder,
    autoencoder_losses,
    build_autoencoder,
    decode_latents,
    decoder_last_layer,
    encode_latents,
    estimate_latent_scale,
    freeze_all_but_decoder,
    is_vq,
    load_checked_autoencoder,
    psnr,
    ssim,
    write_autoencoder_folder,
)
from ..models.discriminator import AdversarialLoss, build_discriminator
from ..presets import AutoencoderTrainingConfig, Preset
from .data import EpochOrders, StepDataLoader, StepSampler
from .runtime import (
    DeviceOptions,
    LossWatch,
    RunFolder,
    TrainingClock,
    build_trainer,
    lightning_precision,
    save_final_checkpoint,
)

HELD_OUT_SHARE = 0.1
#: the batch that --lr is meant for (the default --batch-size): --scale-lr scales the rate from it
REFERENCE_BATCH = 8


class StepImages(Dataset):
    """Item ``s``: this process's batch of training step ``s`` (images, each with its flips, and dataset
    positions), its slice of the step's global batch cut from seeded epoch orders as the LDM's batches are
    (:class:`~.data.EpochOrders`). A batch follows from the step alone, so a resumed run, at any step and
    with any number of processes it had before, trains on the batches it would have had."""

    def __init__(self, items: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.flipped: PatchTorchDataset = items.dataset if isinstance(items, Subset) else items
        self.rank, self.world_size = rank, world_size
        self.orders = EpochOrders(len(items), seed)

    def __getstate__(self) -> dict:  # a data-loader worker draws its own epoch orders
        return {**self.__dict__, "orders": EpochOrders(len(self.items), self.seed)}

    def __len__(self) -> int:  # steps are unbounded; the trainer stops at max_steps
        return 2**62

    def __getitem__(self, step: int) -> dict:
        global_batch = self.batch_size * self.world_size
        positions = self.orders.global_batch(global_batch, step)
        epochs = (step * global_batch + np.arange(global_batch)) // len(self.items)  # each item's pass over the data
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        drawn = []
        for position, epoch in zip(positions[mine].tolist(), epochs[mine].tolist(), strict=True):
            self.flipped.set_epoch(epoch)  # flips drawn from (seed, epoch, index)
            drawn.append(self.items[position])
        return {"image": torch.stack([item["image"] for item in drawn]),
                "index": torch.tensor([item["index"] for item in drawn])}


class AutoencoderModule(L.LightningModule):
    """One Adam (CompVis' betas (0.5, 0.9)) over the autoencoder and, when the losses have one, the
    discriminator; ``perceptual`` is a frozen feature network kept out of the state dict."""

    def __init__(self, autoencoder: Autoencoder, lr: float, seed: int = 0, run: Optional[RunFolder] = None,
                 losses: Optional[AutoencoderTrainingConfig] = None, discriminator: Optional[torch.nn.Module] = None,
                 perceptual: Optional[torch.nn.Module] = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.lr = lr
        self.seed = seed
        self.run = run
        self.weights = losses or AutoencoderTrainingConfig(disc_weight=0)
        self.adversarial = (AdversarialLoss(discriminator, self.weights.disc_weight, self.weights.disc_start)
                            if discriminator is not None else None)
        self._perceptual = (perceptual,) if perceptual is not None else ()  # a tuple: no submodule, no state
        self.losses = LossWatch()
        self.clock = TrainingClock()

    @property
    def perceptual(self) -> Optional[torch.nn.Module]:
        return self._perceptual[0] if self._perceptual else None

    def on_fit_start(self) -> None:
        self.clock.start()
        if self.perceptual is not None:
            self.perceptual.to(self.device)

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.autoencoder.parameters() if p.requires_grad]}]
        if self.adversarial is not None:
            groups.append({"params": list(self.adversarial.discriminator.parameters())})
        return torch.optim.Adam(groups, lr=self.lr, betas=(0.5, 0.9))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, size, step = batch["image"], batch["image"].shape[0], self.global_step
        generator = torch.Generator(device=images.device).manual_seed(self.seed * 1_000_003 + step)
        weights = self.weights
        losses = autoencoder_losses(self.autoencoder, images, weights.kl_weight, weights.ssim_weight, generator,
                                    self.perceptual, weights.perceptual_weight)
        total = losses.total
        if self.adversarial is not None:
            terms = self.adversarial(images, losses.images, losses.reconstruction,
                                     decoder_last_layer(self.autoencoder), step)
            total = total + terms.total
            self.log_dict({"gan_generator": terms.generator, "gan_weight": terms.weight,
                           "discriminator": terms.discriminator}, batch_size=size)
        index = batch["index"]
        self.losses.observe(total, step, lambda: f"dataset items {index.tolist()}", self.trainer.strategy, self.run)
        self.log("loss", total, prog_bar=True, batch_size=size)
        self.log("reconstruction", losses.reconstruction, batch_size=size)
        return total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        networks = {"autoencoder": self.autoencoder.parameters()}
        if self.adversarial is not None:
            networks["discriminator"] = self.adversarial.discriminator.parameters()
        self.losses.guard_checkpoint(self, checkpoint, **networks)
        self.clock.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.clock.load(checkpoint)

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
    decoder_only: bool = False
    perceptual: Optional[Path] = None
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
    two_sample_auc: Optional[float] = None
    main_process: bool = True  # False in the other processes of a DDP run


def train_autoencoder(options: AutoencoderTrainOptions) -> AutoencoderTrainResult:
    """Train (``--init``: fine-tune) an autoencoder and write it with its held-out PSNR / SSIM."""
    started = time.perf_counter()
    check_autoencoder_options(options)
    precision = lightning_precision(options.preset, options.precision)
    dataset = open_dataset(options.dataset)
    train_items, held_out = split_for_autoencoder(dataset, options.seed)
    losses = options.preset.autoencoder_training
    perceptual = _perceptual_network(options.perceptual)
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        autoencoder = load_checked_autoencoder(options.init) if options.init else build_autoencoder(options.preset)
        discriminator = build_discriminator(losses) if losses.adversarial else None
    autoencoder.train().requires_grad_(True)
    if options.decoder_only:
        freeze_all_but_decoder(autoencoder)

    run = RunFolder(options.run_dir or options.out.with_name(options.out.name + ".run"))
    settings = {"dataset": str(Path(options.dataset).resolve()), "preset": options.preset.to_dict(),
                "init": str(options.init) if options.init else None, "seed": options.seed,
                "batch_size": options.batch_size, "lr": options.lr, "precision": precision, "steps": options.steps}
    optional = {"scale_lr": options.scale_lr or None, "decoder_only": options.decoder_only or None,
                "perceptual": str(Path(options.perceptual).resolve()) if options.perceptual else None}
    resume_from = run.start(settings, options.resume, optional)
    trainer = build_trainer(run, options.steps, precision, options.devices, options.checkpoint_every,
                            [], options.show_progress, check_val_every_n_epoch=None,
                            val_check_interval=max(1, min(options.checkpoint_every, options.steps)),
                            use_distributed_sampler=False)  # each process takes its slice of a step's batch
    batches = StepImages(train_items, options.batch_size, options.seed, trainer.global_rank, trainer.world_size)
    loader = StepDataLoader(batches, batch_size=None, num_workers=options.num_workers, persistent_workers=False,
                            sampler=StepSampler(lambda: trainer.global_step, options.steps))
    validation = DataLoader(held_out, batch_size=options.batch_size, num_workers=options.num_workers)
    global_batch = run.bind_world(trainer, options.batch_size)
    lr = run.bind_lr(trainer, options.lr, REFERENCE_BATCH, options.scale_lr)
    module = AutoencoderModule(autoencoder, lr, options.seed, run, losses, discriminator, perceptual)
    fit_started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=validation, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - fit_started  # this command's training (and periodic checks) alone
    training_seconds = module.clock.seconds()  # ... and summed over the commands of a resumed run
    save_final_checkpoint(trainer, run, options.checkpoint_every)
    metrics = trainer.validate(module, validation, verbose=False)[0]

    autoencoder = module.autoencoder.to("cpu").eval()
    if not is_vq(autoencoder) and not options.decoder_only:  # a decoder fine-tune keeps the init's latents
        autoencoder.register_to_config(scaling_factor=_latent_scale(autoencoder, dataset))
    result = AutoencoderTrainResult(options.out, float(metrics["val_psnr"]), float(metrics["val_ssim"]),
                                    len(held_out), int(trainer.global_step), time.perf_counter() - started,
                                    trainer.is_global_zero)
    if trainer.is_global_zero:
        result.two_sample_auc = _held_out_auc(autoencoder, held_out, options.seed)
        write_autoencoder_folder(options.out, autoencoder, {"metrics.json": {
            "psnr_db": round(result.psnr, 3), "ssim": round(result.ssim, 4), "held_out_patches": result.held_out,
            "two_sample_auc": None if result.two_sample_auc is None else round(result.two_sample_auc, 3),
            "losses": losses.model_dump(), "perceptual": optional["perceptual"],
            "fit_time_s": round(fit_seconds, 1), "training_time_s": round(training_seconds, 1),
            "steps": result.steps, "latent_scale": float(autoencoder.config.scaling_factor),
            "dataset": str(options.dataset), "init": settings["init"],
            "trained": "decoder" if options.decoder_only else "all", "wall_time_s": round(result.wall_time_s, 1),
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
    if options.decoder_only and options.init is None:
        raise ConfigError("--decoder-only fine-tunes the decoder of an existing autoencoder; give it with --init "
                          "(an autoencoder folder or a model folder)")


def with_loss_options(preset: Preset, **overrides: Any) -> Preset:
    """``preset`` with the given fields of its ``autoencoder_training`` section replaced (None: kept); a bad
    value is refused in one line naming its option (``disc_start`` is ``--disc-start``)."""
    given = {name: value for name, value in overrides.items() if value is not None}
    if not given:
        return preset
    data = preset.to_dict()
    data["autoencoder_training"].update(given)
    options = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in given.items())
    return Preset.from_dict(data, source=options)


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


def _perceptual_network(path: Optional[Path]) -> Optional[torch.nn.Module]:
    if path is None:
        return None
    from ..models.perceptual import load_perceptual_network

    return load_perceptual_network(path)


def _held_out_auc(autoencoder: Autoencoder, held_out: torch.utils.data.Dataset, seed: int) -> Optional[float]:
    """The two-sample AUC of the held-out patches' reconstructions against them (None below 2 patches)."""
    from ..evaluate.reconstruction import reconstruction_quality

    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    return reconstruction_quality(autoencoder, images, seed=seed).two_sample_auc


@torch.no_grad()
def _latent_scale(autoencoder: Autoencoder, dataset: PatchDataset, count: int = 64) -> float:
    """From the first ``count`` training patches, unflipped."""
    items = PatchTorchDataset(dataset, split="train", flips=False)
    images = torch.stack([items[i]["image"] for i in range(min(count, len(items)))])
    return estimate_latent_scale(autoencoder, images)

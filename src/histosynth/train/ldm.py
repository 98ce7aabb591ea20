"""Training the latent diffusion model (thesis §4.1.5) with Lightning, from cached latents.

AdamW with a linear learning-rate warm-up (factor 1e-6 -> 1), the MSE of the predicted noise at uniform
timesteps (the recipe's options: a velocity target, ``--prediction-type v_prediction``, and min-SNR-gamma
weights, ``--min-snr-gamma``; both kept in the model's preset, the prediction type also in its
scheduler, which is how sampling follows it), captions dropped to "" with the preset's probability, an
EMA of the weights. Every random draw of a step (batch, flips, dropped captions, noise, timesteps) is
seeded by (seed, step), so a run killed at any point and resumed from its last checkpoint continues
exactly as if it had not stopped.
The finished model is written as a bundle (``models.bundle``) with the EMA weights.

The model reads text (cross-attention), a label mask (a label map of class shares at latent
resolution, concatenated to the noisy latent as extra input channels: :mod:`histosynth.models.label_maps`),
or both, each dropped on its own (:class:`~histosynth.models.conditioning.Conditioning`). Fine-tuning
a text model into a text+mask one widens the UNet's first convolution with zero weights for the
label-map channels, so training starts from exactly the text model. With the ControlNet mask branch
(``mask_branch="controlnet"``) the text model given as ``init`` is frozen and only a branch that
reads the label map is trained (:mod:`histosynth.models.control`); it too starts from exactly the
text model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
from diffusers import UNet2DConditionModel

from .. import validation
from ..data.dataset import PatchDataset, open_dataset
from ..errors import ConfigError, DataError, ModelError
from ..models.autoencoder import Autoencoder, build_autoencoder, downsampling_factor, load_checked_autoencoder
from ..models.bundle import CONFIG_FILE, load_bundle, read_bundle_config, save_bundle, saved_prediction_type
from ..models.conditioning import Conditioning
from ..models.control import MaskControlledUNet, add_mask_branch
from ..models.denoiser import build_denoiser, denoiser_kind, input_weight_name, widen_input
from ..models.diffusion import diffusion_loss, make_ema, noise_scheduler
from ..models.latent_range import PREDICTION_TYPES
from ..models.text import TextEncoder, load_text_encoder
from ..presets import DENOISERS, Preset
from ..terminal import quiet_lightning
from .cache import (
    TrainingData,
    autoencoder_id,
    class_fraction_columns,
    latent_range,
    missing_from_cache,
    prepare_training_data,
)
from .data import NOISE_STREAM, ConditionDropout, LatentBatch, LatentDataModule, step_generator
from .runtime import (
    DeviceOptions,
    LinearWarmup,
    LossWatch,
    RunFolder,
    TrainingClock,
    build_trainer,
    lightning_precision,
    save_final_checkpoint,
)
from .samples import SampleGrids


class LatentDiffusionModule(L.LightningModule):
    """The denoiser, its optimiser and warm-up, the diffusion loss and the EMA of its weights."""

    def __init__(self, unet: UNet2DConditionModel | MaskControlledUNet, preset: Preset, lr: float, warmup_steps: int,
                 seed: int = 0, run: Optional[RunFolder] = None, patch_ids: Optional[list[str]] = None,
                 check_every: int = 10):
        super().__init__()
        self.unet = unet
        self.scheduler = noise_scheduler(preset)
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = preset.training.weight_decay
        self.min_snr_gamma = preset.training.min_snr_gamma
        self.seed = seed
        self.run = run
        self.patch_ids = patch_ids or []
        decay = preset.training.ema_decay
        self.ema = make_ema(unet, decay) if decay else None
        self.losses = LossWatch(check_every)
        self.clock = TrainingClock()

    def configure_optimizers(self):
        trainable = [p for p in self.unet.parameters() if p.requires_grad]  # (not a frozen text UNet)
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def training_step(self, batch: LatentBatch, batch_idx: int) -> torch.Tensor:
        noise_seed = step_generator(self.seed, batch.step, NOISE_STREAM, self.global_rank).integers(2**62)
        generator = torch.Generator(device=batch.latents.device).manual_seed(int(noise_seed))
        condition = batch.condition
        loss = diffusion_loss(self.unet, batch.latents, condition.text, condition.text_mask, generator,
                              scheduler=self.scheduler, label_maps=condition.label_maps,
                              min_snr_gamma=self.min_snr_gamma)
        items = batch.items  # (not the batch: its tensors would be kept until the check)
        self.losses.observe(loss, batch.step, lambda: self._describe(items), self.trainer.strategy, self.run)
        size = batch.latents.shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def _describe(self, items: torch.Tensor) -> str:
        names = [self.patch_ids[i] for i in items.tolist()] if self.patch_ids else items.tolist()
        return ", ".join(map(str, names[:8])) + (" ..." if len(names) > 8 else "")

    def on_fit_start(self) -> None:
        self.clock.start()
        if self.ema is not None:
            self.ema.to(self.device)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Here rather than in on_train_batch_end, which runs after the checkpoint callback: a
        # checkpoint of step k must hold the EMA of k updates for a resume to be exact.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        averaged = {"ema": self.ema.shadow_params} if self.ema is not None else {}
        self.losses.guard_checkpoint(self, checkpoint, unet=self.unet.parameters(), **averaged)
        self.clock.save(checkpoint)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.clock.load(checkpoint)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def averaged_unet(self) -> UNet2DConditionModel:
        """A copy of the denoiser holding the EMA weights (the raw weights if there is no EMA)."""
        import copy

        unet = copy.deepcopy(self.unet).to("cpu")
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return unet


# --- the command ----------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    dataset: Path
    out: Path
    preset: Preset
    steps: int = 10_000
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    precision: Optional[str] = None
    resume: bool = False
    scale_lr: bool = False
    init: Optional[Path] = None
    autoencoder: Optional[Path] = None
    text_encoder: Optional[str] = None
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    condition: str = "text"
    mask_dropout: float = 0.2
    mask_branch: str = "concat"
    prediction_type: Optional[str] = None
    min_snr_gamma: Optional[float] = None
    repeat_rare: Optional[float] = None
    denoiser: Optional[str] = None
    run_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None
    devices: DeviceOptions = field(default_factory=DeviceOptions)
    num_workers: int = 0
    log_every: int = 10
    show_progress: bool = True
    command: str = ""


@dataclass
class TrainResult:
    bundle: Path
    run_dir: Path
    steps: int
    wall_time_s: float
    final_loss: Optional[float]
    main_process: bool = True  # False in the other processes of a DDP run


def train_ldm(options: TrainOptions) -> TrainResult:
    """Train (or continue, or fine-tune) a latent diffusion model on a patch dataset; write its bundle."""
    started = time.perf_counter()
    check_train_options(options)
    check_model_output(options.out)
    preset = options.preset.with_recipe(options.prediction_type, options.min_snr_gamma, options.repeat_rare,
                                        options.denoiser)
    training = preset.training
    precision = lightning_precision(preset, options.precision)
    batch_size = options.batch_size or training.batch_size
    lr = options.lr or training.lr
    warmup = training.warmup_steps if options.warmup_steps is None else options.warmup_steps
    conditioning = Conditioning.parse(options.condition, training.text_dropout, options.mask_dropout,
                                      options.mask_branch)
    if conditioning.controlnet:
        check_controlnet_init(options.init, preset)
    if options.init is not None:
        check_init_recipe(options.init, preset)
    dataset = open_dataset(options.dataset)
    if training.repeat_rare is not None:
        class_fraction_columns(dataset)  # refused before anything is written
    mask_classes = dataset.schema.ids if conditioning.mask else []
    autoencoder = resolve_autoencoder(preset, options.autoencoder or _init_autoencoder(options.init), options.seed)
    text_encoder = load_text_encoder(options.text_encoder or preset.text_encoder)
    _check_sizes(dataset.patch_size, autoencoder, preset)

    run = RunFolder(options.run_dir or options.out.with_name(options.out.name + ".run"))
    settings = {"dataset": str(Path(options.dataset).resolve()), "preset": preset.to_dict(), "seed": options.seed,
                "batch_size": batch_size, "lr": lr, "warmup_steps": warmup, "precision": precision,
                "autoencoder": autoencoder_id(autoencoder), "text_encoder": text_encoder.id,
                "init": str(options.init) if options.init else None, "steps": options.steps}
    masked = conditioning.name != "text"  # (text-only runs keep the settings they always had)
    optional = {"condition": conditioning.name if masked else None,
                "mask_dropout": conditioning.mask_dropout if masked else None,
                "mask_branch": conditioning.mask_branch if conditioning.controlnet else None,
                "scale_lr": options.scale_lr or None}
    needs = dict(text=conditioning.text, label_classes=mask_classes or None)
    encoding_device = cache_encoding_device(options, dataset, autoencoder, text_encoder, needs)
    resume_from = run.start(settings, options.resume, optional)

    with on_device(encoding_device, autoencoder, text_encoder):
        data = prepare_training_data(dataset, autoencoder, text_encoder, options.cache_dir,
                                     show_progress=options.show_progress, repeat_rare=training.repeat_rare, **needs)
    run.bind_data_setting("latent_dtype", data.latents.dtype,
                          f"rebuild the cache with 'histosynth cache {options.dataset} --dtype {{before}}'")
    dropout = ConditionDropout(text=conditioning.text_dropout, label_maps=conditioning.mask_dropout)
    datamodule = LatentDataModule(data, batch_size, options.steps, options.seed, dropout,
                                  (training.hflip, training.vflip), options.num_workers)
    training_range = latent_range(data.latents)
    callbacks = [SampleGrids(run.root / "samples", autoencoder, data, options.sample_every, preset, dataset.schema,
                             latent_range=training_range)] if options.sample_every else []
    trainer = build_trainer(run, options.steps, precision, options.devices, options.checkpoint_every,
                            callbacks, options.show_progress, options.log_every, limit_val_batches=0,
                            use_distributed_sampler=False)  # the step sampler already gives each rank its slice
    global_batch = run.bind_world(trainer, batch_size)
    effective_lr = run.bind_lr(trainer, lr, training.batch_size, options.scale_lr)
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        unet = build_training_denoiser(preset, text_encoder.hidden_size, conditioning, mask_classes,
                                       options.init, load_init=not resume_from)
    module = LatentDiffusionModule(unet, preset, effective_lr, warmup, options.seed, run, data.patch_ids,
                                   options.log_every)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    save_final_checkpoint(trainer, run, options.checkpoint_every)

    loss = trainer.callback_metrics.get("loss")
    final_loss = None if loss is None else float(loss)
    if trainer.is_global_zero:
        provenance = {
            "data": {"dataset": str(options.dataset), "patches": len(data), "patch_size": dataset.patch_size,
                     "latent_dtype": data.latents.dtype, **repeated_patches(data)},
            **{k: settings[k] for k in ("batch_size", "warmup_steps", "seed", "precision", "init")},
            "lr": effective_lr, "base_lr": lr, "scale_lr": options.scale_lr,
            "world_size": trainer.world_size, "global_batch_size": global_batch,
            "condition": conditioning.name,
            "steps": int(trainer.global_step),
            "training_time_s": round(module.clock.seconds(), 1),
            "command": options.command,
            "metrics": {"final_loss": final_loss},
        }
        meta = {
            "image_size": dataset.patch_size,
            "preset": preset.to_dict(),
            "unet_weights": "ema" if module.ema is not None else "raw",
            "conditioning": conditioning.to_config(mask_classes),
            "latent_range": training_range,
            "provenance": provenance,
        }
        if options.out.is_dir() and not any(options.out.iterdir()):
            options.out.rmdir()  # an empty folder made for the model: the model takes its place
        save_bundle(options.out, module.averaged_unet(), autoencoder.to("cpu"), dict(module.scheduler.config),
                    text_encoder, dataset.schema, meta)
    return TrainResult(options.out, run.root, int(trainer.global_step), time.perf_counter() - started, final_loss,
                       trainer.is_global_zero)


def repeated_patches(data: TrainingData) -> dict[str, int]:
    """With repeat-factor sampling: how many patches an epoch repeats and how many visits it makes in all."""
    if data.repeat_factors is None:
        return {}
    return {"patches_repeated": int((data.repeat_factors > 1).sum()),
            "visits_per_epoch": round(float(data.repeat_factors.sum()))}


def cache_encoding_device(options: TrainOptions, dataset: PatchDataset, autoencoder: Autoencoder,
                          text_encoder: TextEncoder, needs: dict[str, Any]) -> torch.device:
    """Where the run encodes what its cache lacks (``needs``: what it reads, as prepare_training_data's
    keywords): a run of one process encodes on the device it trains on (the first GPU it uses), not
    on the CPU. A run of several processes (DDP) refuses a cache that lacks anything, with the
    command that encodes it once: each of its processes would encode all of it."""
    processes, device = training_processes(options.devices)
    if processes > 1:
        missing = missing_from_cache(dataset, autoencoder, text_encoder, options.cache_dir, **needs)
        if missing:
            raise DataError(
                f"the training cache lacks its {_listed(missing)}, which each of the {processes} processes of "
                f"this run would encode in full; encode them once first with '{cache_command_line(options, needs)}' "
                "(prefix 'torchrun --nproc-per-node N -m' for N GPUs), then start the run again")
    return device


def training_processes(devices: DeviceOptions) -> tuple[int, torch.device]:
    """How many processes a run with these device options trains in, and this process's device
    (the first of a run that starts its processes itself), as Lightning chooses them."""
    with quiet_lightning():  # (its banner is the real trainer's to print)
        probe = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, **devices.trainer_kwargs())
    return probe.world_size, probe.strategy.root_device


def _listed(words: list[str]) -> str:
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def cache_command_line(options: TrainOptions, needs: dict[str, Any]) -> str:
    """The `histosynth cache` command that encodes what training with ``options`` reads."""
    import shlex

    words = ["histosynth", "cache", str(options.dataset)]
    autoencoder = options.autoencoder or options.init
    if autoencoder is not None:
        words += ["--autoencoder", str(autoencoder)]
    else:
        words += ["--preset", options.preset.name, "--seed", str(options.seed)]
    words += ["--text-encoder", str(options.text_encoder or options.preset.text_encoder)]
    if options.cache_dir is not None:
        words += ["--cache-dir", str(options.cache_dir)]
    if needs["label_classes"]:
        words.append("--label-maps")
    return shlex.join(words)


@contextmanager
def on_device(device: torch.device, *models: Autoencoder | TextEncoder) -> Iterator[None]:
    """The models on ``device`` while the block runs, back where they were after."""
    before = [next(m.parameters()).device if isinstance(m, torch.nn.Module) else m.device for m in models]
    for model in models:
        model.to(device)
    try:
        yield
    finally:
        for model, where in zip(models, before, strict=True):
            model.to(where)


def check_train_options(options: TrainOptions) -> None:
    """Every number of the options is one training can use; checked before any work starts."""
    validation.positive_int(options.steps, "--steps")
    if options.batch_size is not None:
        validation.positive_int(options.batch_size, "--batch-size")
    if options.lr is not None:
        validation.positive_float(options.lr, "--lr")
    if options.warmup_steps is not None:
        validation.int_at_least(options.warmup_steps, "--warmup-steps", 0)
    validation.seed(options.seed)
    validation.positive_int(options.checkpoint_every, "--checkpoint-every")
    validation.int_at_least(options.sample_every, "--sample-every", 0)
    validation.positive_int(options.log_every, "--log-every")
    validation.share(options.mask_dropout, "--mask-dropout")
    if options.prediction_type is not None:
        validation.one_of(options.prediction_type, PREDICTION_TYPES, "--prediction-type")
    if options.denoiser is not None:
        validation.one_of(options.denoiser, DENOISERS, "--denoiser")
    if options.min_snr_gamma is not None:
        validation.positive_float(options.min_snr_gamma, "--min-snr-gamma")
    if options.repeat_rare is not None:
        validation.share(validation.positive_float(options.repeat_rare, "--repeat-rare"), "--repeat-rare")
    validation.int_at_least(options.num_workers, "--workers", 0)
    validation.positive_int(options.devices.num_nodes, "--num-nodes")


def check_model_output(out: Path) -> None:
    """``out`` can receive a model folder: it does not exist, is an empty folder, or holds a model
    (which the new one replaces). Checked first, so a wrong --out is not found after hours of training."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelError(f"--out {out} is a file, not a model folder; choose another output path")
    if any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ModelError(f"--out {out} exists and is not a model folder (no {CONFIG_FILE}); "
                         "choose a new or empty folder, or an older model folder to replace")


def resolve_autoencoder(preset: Preset, path: Optional[Path], seed: int = 0) -> Autoencoder:
    """The frozen autoencoder: from a bundle / autoencoder folder, else the preset's, seeded-random.

    A randomly initialised autoencoder makes latents that train and sample, but whose images mean
    nothing; it exists for tests and quick trials, and a warning says so.
    """
    validation.seed(seed)
    if path is not None:
        autoencoder = load_checked_autoencoder(path)
    else:
        import warnings

        warnings.warn(
            f"no --autoencoder given: using an untrained {preset.autoencoder.kind.upper()} autoencoder from preset "
            f"'{preset.name}' (seed {seed}); train one with 'histosynth train-autoencoder' for meaningful images",
            stacklevel=2,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            autoencoder = build_autoencoder(preset)
    return autoencoder.eval().requires_grad_(False)


def check_controlnet_init(init: Optional[Path], preset: Preset) -> None:
    """The ControlNet branch steers a frozen text-only UNet model, given as --init."""
    if preset.denoiser != "unet":
        raise ConfigError("--mask-branch controlnet copies a UNet's encoder; a dit model reads the mask with "
                          "--mask-branch concat")
    if init is None:
        raise ConfigError("--mask-branch controlnet trains a branch on a frozen text model: give that model "
                          "with --init TEXT_MODEL")
    if read_bundle_config(init).conditioning.mask_channels:
        raise ModelError(f"--init {init} already reads masks; the ControlNet branch steers a text-only model: "
                         "give the text model (or use --mask-branch concat to fine-tune this one)")


def check_init_recipe(init: Path, preset: Preset) -> None:
    """A fine-tuned model keeps its denoiser and what it predicts: the --init model's must be the run's (a folder
    without its unet or scheduler part is refused when it is loaded, with the part named)."""
    read_bundle_config(init)  # a clear error if --init is not a model folder
    unet = Path(init) / "unet"
    if (unet / "config.json").is_file():
        trained = denoiser_kind(unet)
        if trained != preset.denoiser:
            raise ConfigError(f"--init {init} has a {trained} denoiser but this run would train a {preset.denoiser}; "
                              f"give --denoiser {trained} (or start without --init)")
    trained = saved_prediction_type(init)
    wanted = preset.diffusion.prediction_type
    if trained is not None and trained != wanted:
        raise ConfigError(f"--init {init} predicts {trained} but this run would train it to predict {wanted}; "
                          f"give --prediction-type {trained} (or start without --init)")


def build_training_denoiser(preset: Preset, context_dim: int, conditioning: Conditioning, mask_classes: Sequence[int],
                            init: Optional[Path], load_init: bool) -> UNet2DConditionModel | MaskControlledUNet:
    """The denoiser to train: new, or from the ``init`` model's weights where ``load_init`` (a
    resumed run takes them from its checkpoint); with the ControlNet branch, that frozen model
    (always loaded: it defines the branch) plus a branch for ``mask_classes``."""
    if conditioning.controlnet:
        text_model = build_denoiser(preset, context_dim)
        initialise_from_bundle(text_model, init)
        return add_mask_branch(text_model, len(mask_classes))
    unet = build_denoiser(preset, context_dim, extra_in_channels=len(mask_classes))
    if init and load_init:
        initialise_from_bundle(unet, init, mask_classes)
    return unet


def initialise_from_bundle(unet: UNet2DConditionModel, bundle_path: Path, mask_classes: Sequence[int] = ()) -> None:
    """Copy a bundle's UNet weights into ``unet`` (fine-tuning); every shape must fit.

    A text-only bundle may be fine-tuned into a mask-conditioned model: its first convolution is
    widened with zero weights for the label-map channels (the widened UNet computes what the bundle's
    does). A mask-conditioned bundle must have the same label-map classes.
    """
    bundle = load_bundle(bundle_path)
    source_classes = bundle.mask_classes
    if source_classes and list(source_classes) != list(mask_classes):
        what = "a model without a mask condition" if not mask_classes else f"mask classes {list(mask_classes)}"
        raise ModelError(f"--init {bundle_path} reads label maps of classes {source_classes}; it cannot be "
                         f"fine-tuned into {what} (use --condition text+mask or mask with the same class schema)")
    source = bundle.unet.state_dict()
    if not source_classes and mask_classes:
        source = widen_input(source, unet.config.in_channels, input_weight_name(unet))
    target = unet.state_dict()
    missing = sorted(set(target) - set(source))
    wrong = [(k, tuple(source[k].shape), tuple(v.shape)) for k, v in target.items()
             if k in source and source[k].shape != v.shape]
    if missing or wrong:
        detail = f"{len(missing)} tensors missing, e.g. {missing[0]}" if missing else \
            f"{wrong[0][0]} has shape {wrong[0][1]}, the preset needs {wrong[0][2]}"
        raise ModelError(f"--init {bundle_path}: its denoiser does not fit the preset ({detail}); "
                         "use the preset the bundle was trained with")
    unet.load_state_dict(source)


def _init_autoencoder(init: Optional[Path]) -> Optional[Path]:
    """Fine-tuning keeps the latent space: the --init model's autoencoder, unless one is named."""
    if init is None:
        return None
    read_bundle_config(init)  # a clear error if --init is not a model folder
    return Path(init)


def _check_sizes(patch_size: int, autoencoder: Autoencoder, preset: Preset) -> None:
    factor = downsampling_factor(autoencoder) * preset.denoiser_factor
    if patch_size % factor:
        raise DataError(f"{patch_size} px patches cannot be trained with preset '{preset.name}': the size must be "
                        f"a multiple of {factor} (autoencoder downsampling x {preset.denoiser_name} factor)")

"""`histosynth cache`, `histosynth train`, `histosynth train-autoencoder`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import ConfigError
from ..terminal import plain_output
from .common import DeviceOption, OptionBlock, WorkersOption, expand_blocks, seed_option, training_folders

PresetOption = typer.Option("tiny", "--preset", help="model preset: tiny, small, pathldm, or a preset YAML file")
SeedOption = seed_option("seed of every random choice (initialisation, batches, noise)")
TextEncoderOption = typer.Option(None, "--text-encoder", help="'minilm', a folder or a hub id (default: the preset's)")


def training_run(checkpoints: str, folder: str, reference_batch: str) -> OptionBlock:
    """The run options of `train` and `train-autoencoder` (precision, resuming, learning-rate scaling, seed,
    checkpoints, run folder, Lightning's devices) as keyword arguments of their options classes; the help says
    what a checkpoint step does (``checkpoints``), what the run folder holds (``folder``) and which batch --lr
    is meant for (``reference_batch``)."""

    def run(
        precision: Optional[str] = typer.Option(
            None, "--precision", help="32 (default) or bf16; fp16 is refused (it froze weights in the thesis' runs)"),
        resume: bool = typer.Option(
            False, "--resume", help="continue the run in OUT.run from its last checkpoint (with as many processes: "
            "the same --devices x --num-nodes, which run.json records)"),
        scale_lr: bool = typer.Option(
            False, "--scale-lr", help=f"scale the learning rate linearly with the global batch (CompVis' rule): "
            f"--lr x batch per device x devices x nodes / {reference_batch}; the rate used is in run.json"),
        seed: int = SeedOption,
        checkpoint_every: int = typer.Option(500, "--checkpoint-every", help=f"steps between {checkpoints}"),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help=f"{folder} (default OUT.run)"),
        accelerator: str = typer.Option("auto", "--accelerator", help="Lightning accelerator: auto, cpu, gpu, mps"),
        devices: str = typer.Option(
            "auto", "--devices", help="Lightning devices: auto, a count (DDP when > 1), or a list"),
        strategy: str = typer.Option("auto", "--strategy", help="Lightning strategy, e.g. ddp"),
        num_nodes: int = typer.Option(1, "--num-nodes", help="machines of a multi-node DDP run"),
        workers: int = WorkersOption,
    ) -> dict[str, Any]:
        from ..train.runtime import DeviceOptions

        return dict(precision=precision, resume=resume, scale_lr=scale_lr, seed=seed, checkpoint_every=checkpoint_every,
                    run_dir=run_dir, devices=DeviceOptions(accelerator, devices, strategy, num_nodes),
                    num_workers=workers, command=_command_line())

    return OptionBlock(run)


DiffusionRun = training_run("checkpoints", "checkpoints, logs and samples", "the preset's batch")
AutoencoderRun = training_run("checkpoints and held-out checks", "checkpoints and logs", "8")


ModelFolders = training_folders(
    "model folder to write when training ends", "start from this model folder's UNet (fine-tuning; a text model "
    "becomes a text+mask one with zero-initialised mask channels)", dataset_help="patch dataset folder (with captions)")
AutoencoderFolders = training_folders(
    "autoencoder folder to write (use it with train --autoencoder)",
    "fine-tune this autoencoder (model folder or autoencoder folder)")


def register(app: typer.Typer) -> None:
    app.command("cache")(cache_command)
    app.command("train")(train_command)
    app.command("train-autoencoder")(train_autoencoder_command)


def cache_command(
    dataset: Path = typer.Argument(..., help="patch dataset folder"),
    model: Optional[Path] = typer.Option(
        None, "--model", help="take the autoencoder and text encoder of this model folder"),
    preset: str = PresetOption,
    autoencoder: Optional[Path] = typer.Option(None, "--autoencoder", help="autoencoder folder or model folder"),
    text_encoder: Optional[str] = TextEncoderOption,
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="where to store the cache (default DATASET/cache)"),
    split: str = typer.Option("train", "--split", help="which split of the dataset to encode"),
    label_maps: bool = typer.Option(False, "--label-maps", help="also cache the masks' label maps (for training "
                                    "with --condition mask or text+mask)"),
    device: str = DeviceOption,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="how latents and caption states are stored: "
                                        "bfloat16 (a new cache's default), float16, or float32 (exact); another "
                                        "dtype than the cache's rebuilds it"),
    batch_size: int = typer.Option(4, "--batch-size", help="patches the autoencoder encodes at a time (x 4 flips)"),
    workers: int = WorkersOption,
    devices: int = typer.Option(1, "--devices", help="processes on this machine, each encoding its share of the "
                                "parts on its own GPU (as torchrun --nproc-per-node N); leave it at 1 under torchrun"),
    seed: int = SeedOption,
) -> None:
    """Encode a dataset once: latents of each patch's four flips, each unique caption's embedding (and label maps).

    Under torchrun (or with --devices N) each process encodes its share of the missing parts."""
    from .. import validation
    from ..train.ranks import ranks_from_environment, spawn_ranks
    from ..train.shards import latent_dtype_name

    validation.positive_int(batch_size, "--batch-size")
    validation.int_at_least(workers, "--workers", 0)
    validation.positive_int(devices, "--devices")
    dtype = None if dtype is None else latent_dtype_name(dtype)
    job = (dataset, model, preset, autoencoder, text_encoder, cache_dir, split, label_maps, device, dtype, seed,
           batch_size, workers)
    if devices == 1:
        encode_cache(*job)
    elif ranks_from_environment().distributed:
        raise ConfigError(f"--devices {devices} starts processes of its own; under torchrun leave it out "
                          "(torchrun's --nproc-per-node says how many)")
    else:
        spawn_ranks(devices, encode_cache, *job)


def encode_cache(dataset: Path, model: Optional[Path], preset: str, autoencoder: Optional[Path],
                 text_encoder: Optional[str], cache_dir: Optional[Path], split: str, label_maps: bool, device: str,
                 dtype: Optional[str], seed: int, batch_size: int, workers: int) -> None:
    """`histosynth cache` in this process, its share of the job where several run it (rank 0 reports)."""
    import time

    from ..data.dataset import open_dataset
    from ..devices import pick_device
    from ..train.cache import autoencoder_id, prepare_training_data
    from ..train.ranks import process_group, ranks_from_environment

    started = time.perf_counter()
    classes = open_dataset(dataset).schema.ids if label_maps else None
    with process_group(ranks_from_environment()) as ranks, plain_output():
        torch_device = ranks.device(pick_device(device))
        ae, encoder = _cache_models(model, preset, autoencoder, text_encoder, seed, torch_device)
        data = prepare_training_data(dataset, ae, encoder, cache_dir, split, batch_size, ranks.main,
                                     label_classes=classes, latent_dtype=dtype, workers=workers, ranks=ranks)
    if not ranks.main:
        return
    maps = f", label maps of {len(classes)} classes" if classes else ""
    processes = f" by {ranks.world_size} processes" if ranks.distributed else ""
    typer.echo(
        f"cached {len(data)} patches x 4 flips ({tuple(data.latents.shape[2:])} {data.latents.dtype} latents, "
        f"{autoencoder_id(ae)}){maps} and "
        f"{len(data.embeddings)} unique captions ({encoder.id}) in {cache_dir or Path(dataset) / 'cache'}{processes} "
        f"[{time.perf_counter() - started:.1f} s]"
    )


def _cache_models(model: Optional[Path], preset: str, autoencoder: Optional[Path], text_encoder: Optional[str],
                  seed: int, device):
    """The autoencoder and text encoder of a model folder, or of a preset and the options."""
    from ..models.text import load_text_encoder

    if model is not None:
        from ..models.bundle import load_bundle

        bundle = load_bundle(model, device)
        return bundle.autoencoder, bundle.text_encoder
    from ..presets import load_preset
    from ..train.ldm import resolve_autoencoder

    chosen = load_preset(preset)
    autoencoder = resolve_autoencoder(chosen, autoencoder, seed).to(device)
    return autoencoder, load_text_encoder(text_encoder or chosen.text_encoder, device)


@expand_blocks
def train_command(
    folders: dict = ModelFolders,
    preset: str = PresetOption,
    steps: int = typer.Option(10_000, "--steps", help="training steps in all (a resumed run continues to this)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch per device (default: the preset's)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default: the preset's; pathldm has "
                                       "the thesis' 2.5e-5, §4.1.5)"),
    warmup_steps: Optional[int] = typer.Option(
        None, "--warmup-steps", help="linear LR warm-up steps (default: the preset's)"),
    condition: str = typer.Option("text", "--condition", help="what the model reads: text, mask (a label map at "
                                  "latent resolution as extra UNet input channels) or text+mask"),
    mask_dropout: float = typer.Option(0.2, "--mask-dropout", help="probability of dropping the label map to all "
                                       "zeros (mask conditioning; needed for mask guidance)"),
    mask_branch: str = typer.Option("concat", "--mask-branch", help="how the mask enters: concat (extra UNet input "
                                    "channels, the whole UNet trained) or controlnet (a branch trained on the "
                                    "frozen text model given with --init)"),
    autoencoder: Optional[Path] = typer.Option(None, "--autoencoder", help="autoencoder folder or model folder "
                                               "(default with --init: that model's)"),
    text_encoder: Optional[str] = TextEncoderOption,
    prediction_type: Optional[str] = typer.Option(
        None, "--prediction-type", help="what the network predicts: epsilon (the noise, CompVis'), v_prediction "
        "(the velocity) or flow_prediction (flow matching: the velocity eps - x0 of a straight path); default: the "
        "preset's; kept in the model, sampling follows it"),
    min_snr_gamma: Optional[float] = typer.Option(
        None, "--min-snr-gamma", help="Min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5: the low-noise "
        "timesteps, whose SNR is above gamma, weigh less; default: the preset's (none: the plain MSE)"),
    repeat_rare: Optional[float] = typer.Option(
        None, "--repeat-rare", help="repeat-factor sampling (Gupta et al. 2019), e.g. 0.3: a patch holding a class "
        "that fewer than this share of the patches hold is seen sqrt(share / its class's share) times per epoch; "
        "default: the preset's (none: every patch once)"),
    denoiser: Optional[str] = typer.Option(
        None, "--denoiser", help="unet (CompVis' layout, the preset's unet section) or dit (a PixArt-style "
        "transformer, its dit section; masks are read with --mask-branch concat); default: the preset's"),
    sample_every: int = typer.Option(
        0, "--sample-every", help="steps between sample grids in OUT.run/samples (0: none)"),
    log_every: int = typer.Option(10, "--log-every", help="steps between rows of the CSV log (OUT.run/logs)"),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="latent / embedding cache (default DATASET/cache)"),
    run: dict = DiffusionRun,
) -> None:
    """Train a latent diffusion model conditioned on captions and/or label masks; write its model folder."""
    from ..presets import load_preset
    from ..train.ldm import TrainOptions, train_ldm

    options = TrainOptions(
        **folders, preset=load_preset(preset), steps=steps, batch_size=batch_size, lr=lr,
        warmup_steps=warmup_steps, autoencoder=autoencoder, text_encoder=text_encoder,
        sample_every=sample_every, condition=condition, mask_dropout=mask_dropout, mask_branch=mask_branch,
        cache_dir=cache_dir, log_every=log_every, prediction_type=prediction_type, min_snr_gamma=min_snr_gamma,
        repeat_rare=repeat_rare, denoiser=denoiser,
        **run,
    )
    with plain_output():
        result = train_ldm(options)
    if not result.main_process:
        return
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    typer.echo(f"trained {result.steps} steps in {result.wall_time_s:.0f} s (last loss {loss}); "
               f"model folder {result.bundle}, checkpoints and logs in {result.run_dir}")


@expand_blocks
def train_autoencoder_command(
    folders: dict = AutoencoderFolders,
    preset: str = PresetOption,
    steps: int = typer.Option(5_000, "--steps", help="training steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="batch per device"),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate"),
    disc_start: Optional[int] = typer.Option(
        None, "--disc-start", help="step at which the PatchGAN discriminator is switched on (default: the preset's)"),
    disc_weight: Optional[float] = typer.Option(
        None, "--disc-weight", help="scale of the adaptive GAN weight; 0 = no discriminator (default: the preset's)"),
    perceptual: Optional[Path] = typer.Option(
        None, "--perceptual", help="feature network for a perceptual loss: a .pt2 / TorchScript file or a timm or "
        "diffusers autoencoder folder on disk (images in [-1, 1] -> features); none is downloaded"),
    perceptual_weight: Optional[float] = typer.Option(
        None, "--perceptual-weight", help="weight of the perceptual distance (default: the preset's)"),
    decoder_only: bool = typer.Option(
        False, "--decoder-only", help="with --init: train its decoder only; the latents and latent scale stay "
        "the same, so models trained on them take the new decoder as they are (histosynth replace-decoder)"),
    run: dict = AutoencoderRun,
) -> None:
    """Train or fine-tune the f4 autoencoder (CompVis' first-stage losses: reconstruction, KL / VQ, a PatchGAN
    from --disc-start on); report reconstruction PSNR / SSIM and the two-sample AUC on held-out patches."""
    from ..presets import load_preset
    from ..train.autoencoder import AutoencoderTrainOptions, train_autoencoder, with_loss_options

    chosen = with_loss_options(load_preset(preset), disc_start=disc_start, disc_weight=disc_weight,
                               perceptual_weight=perceptual_weight)
    options = AutoencoderTrainOptions(**folders, preset=chosen, steps=steps, batch_size=batch_size, lr=lr,
                                      perceptual=perceptual, decoder_only=decoder_only, **run)
    with plain_output():
        result = train_autoencoder(options)
    if result.main_process:
        auc = "n/a" if result.two_sample_auc is None else f"{result.two_sample_auc:.3f}"
        typer.echo(f"held-out reconstruction ({result.held_out} patches): PSNR {result.psnr:.2f} dB, "
                   f"SSIM {result.ssim:.4f}, two-sample AUC {auc} after {result.steps} steps; "
                   f"autoencoder folder {result.folder}")


def _command_line() -> str:
    return "histosynth " + " ".join(shlex.quote(a) for a in sys.argv[1:])

"""Model-folder commands: `histosynth import-compvis` takes over a CompVis / PathLDM / generationLDM
checkpoint (a LatentDiffusion becomes a model folder, a first-stage VQModel / AutoencoderKL an autoencoder
folder); `histosynth latent-range` sets the range of training latents that sampling clamps into;
`histosynth replace-decoder` gives a model a decoder fine-tuned for its latents; `histosynth convert-weights`
stores a model's weights in bfloat16 (half the folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import ConfigError, ModelError
from ..models.latent_range import DEFAULT_QUANTILE, check_quantile
from ..terminal import plain_output
from .common import SchemaOption, schema_from_option

#: written instead of a model folder's description when no text encoder is at hand
PARTIAL_FORMAT = "histosynth.compvis-import"


def register(app: typer.Typer) -> None:
    app.command("import-compvis")(import_compvis_command)
    app.command("latent-range")(latent_range_command)
    app.command("replace-decoder")(replace_decoder_command)
    app.command("convert-weights")(convert_weights_command)


def replace_decoder_command(
    model: Path = typer.Argument(..., help="model folder"),
    autoencoder: Path = typer.Option(
        ..., "--autoencoder", help="autoencoder folder whose decoder to take: one fine-tuned with "
        "'histosynth train-autoencoder --init MODEL --decoder-only'"),
    out: Path = typer.Option(..., "--out", help="model folder to write (MODEL with the new decoder)"),
) -> None:
    """Copy a model with another decoder for the same latents: the denoiser is untouched, the images it
    decodes are the new decoder's. Refused when the autoencoder encodes other latents than the model's."""
    from ..models.bundle import replace_decoder

    config = replace_decoder(model, autoencoder, out)
    typer.echo(f"wrote model folder {out}: {model} with the decoder of {autoencoder} (decoder "
               f"{config.latent.decoder}; model id {config.id})")


def convert_weights_command(
    model: Path = typer.Argument(..., help="model folder"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 (half the size) or float32"),
    out: Path = typer.Option(..., "--out", help="model folder to write (MODEL with its weights stored in DTYPE)"),
) -> None:
    """Copy a model with its networks' weights stored in bfloat16: half the folder, float32 compute (the weights
    load as float32, rounded to bfloat16), so its images differ slightly from the model's (another model id)."""
    from ..models.bundle import convert_weights, folder_bytes

    config = convert_weights(model, out, dtype)
    typer.echo(f"wrote model folder {out}: {model} with its weights stored in {dtype} "
               f"({folder_bytes(model) / 2**20:.1f} -> {folder_bytes(out) / 2**20:.1f} MiB; model id {config.id})")


def latent_range_command(
    model: Path = typer.Argument(..., help="model folder"),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", help="patch dataset whose latents give the range (the one the model was trained on)"
    ),
    split: str = typer.Option("train", "--split", help="with --dataset: the split to measure"),
    quantile: float = typer.Option(
        DEFAULT_QUANTILE, "--quantile", help="share of the latents left outside the range on each side, per channel"
    ),
    remove: bool = typer.Option(False, "--remove", help="remove the model's range: sampling no longer clamps"),
) -> None:
    """Set the per-channel range of training latents that sampling clamps each step into (or remove it).

    `histosynth train` stores the range itself; this measures it for a model made without one (an
    older or imported model). The model's id changes with the range.
    """
    from ..models.bundle import load_bundle, set_latent_range

    if remove == (dataset is not None):
        raise ConfigError("give either --dataset (measure and store the range) or --remove")
    check_quantile(quantile)
    if remove:
        model_id = set_latent_range(model, None)
        typer.echo(f"removed the latent range of {model} (id now {model_id}): sampling no longer clamps")
        return
    from ..train.cache import dataset_latent_range

    bundle = load_bundle(model)
    latent_range = dataset_latent_range(dataset, bundle.autoencoder, quantile, split)
    model_id = set_latent_range(model, latent_range)
    bounds = ", ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(latent_range.low, latent_range.high, strict=True))
    typer.echo(f"{model}: latent range per channel {bounds} (quantile {quantile}); id now {model_id}")


def import_compvis_command(
    checkpoint: Path = typer.Argument(..., help="CompVis checkpoint (.ckpt or .safetensors)"),
    config: Path = typer.Option(..., "--config", help="the CompVis YAML the checkpoint was trained with"),
    out: Path = typer.Option(..., "--out", help="model folder to write (an autoencoder folder for a first stage)"),
    text_encoder: Optional[str] = typer.Option(
        None, "--text-encoder",
        help="text encoder the model was trained with (folder or hub id); default: the YAML's cond stage version",
    ),
    ema: Optional[bool] = typer.Option(
        None, "--ema/--no-ema", help="take the EMA denoiser weights (default: when the checkpoint has them)"
    ),
    trust_checkpoint: bool = typer.Option(
        False, "--trust-checkpoint", help="allow full unpickling of a .ckpt (only for files you trust)"
    ),
    latent_scale: Optional[float] = typer.Option(
        None, "--latent-scale", help="first-stage checkpoints: the scale_factor of the LatentDiffusion that is to "
        "use the autoencoder (default 1.0, CompVis' default and PathLDM's VQ-f4)"
    ),
    schema: Optional[str] = SchemaOption,
) -> None:
    """Convert a CompVis checkpoint: a LatentDiffusion into a histosynth model folder, a first-stage
    autoencoder (VQModel / AutoencoderKL, e.g. the model zoo's vq-f4) into an autoencoder folder."""
    from ..models.compvis import is_first_stage, read_compvis_model

    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new --out folder")
    with plain_output():
        if is_first_stage(read_compvis_model(config)):
            if text_encoder is not None or ema is not None:
                raise ConfigError(f"{config} describes a first-stage autoencoder; --text-encoder and --ema/--no-ema "
                                  "belong to LatentDiffusion checkpoints")
            _import_first_stage(checkpoint, config, out, 1.0 if latent_scale is None else latent_scale,
                                trust_checkpoint)
            return
        if latent_scale is not None:
            raise ConfigError(f"{config} describes a LatentDiffusion, whose checkpoint holds its latent scale "
                              "(scale_factor); --latent-scale is for first-stage checkpoints")
        _import_latent_diffusion(checkpoint, config, out, text_encoder, ema, trust_checkpoint, schema)


def _import_first_stage(checkpoint: Path, config: Path, out: Path, latent_scale: float, trust: bool) -> None:
    """A first-stage checkpoint -> an autoencoder folder (``train --autoencoder``, ``cache --autoencoder``)."""
    from .. import validation
    from ..models.autoencoder import write_autoencoder_folder
    from ..models.compvis import import_compvis_autoencoder

    validation.positive_float(latent_scale, "--latent-scale")
    autoencoder, info = import_compvis_autoencoder(checkpoint, config, latent_scale, trust)
    typer.echo(info.summary())
    write_autoencoder_folder(out, autoencoder, {"import.json": info.provenance()})
    hint = ("; a KL autoencoder's latents are rarely of unit spread: give the LDM's scale_factor with --latent-scale"
            if info.kind == "kl" and latent_scale == 1.0 else "")
    typer.echo(f"wrote autoencoder folder {out} (use it with train --autoencoder, cache --autoencoder){hint}")


def _import_latent_diffusion(checkpoint: Path, config: Path, out: Path, text_encoder: Optional[str],
                             ema: Optional[bool], trust: bool, schema: Optional[str]) -> None:
    """A LatentDiffusion checkpoint -> a model folder, or its networks only when no text encoder is at hand."""
    from ..models.compvis import import_compvis

    unet, autoencoder, info = import_compvis(checkpoint, config, use_ema=ema, trust_pickle=trust)
    typer.echo(info.summary())
    encoder_spec = text_encoder or _cond_stage_version(info.text_encoder)
    max_tokens = ((info.text_encoder or {}).get("params") or {}).get("max_length")  # PathLDM: 154
    encoder = _load_text_encoder(encoder_spec, info.context_dim, max_tokens, explicit=text_encoder is not None)
    meta = _bundle_meta(info)
    if encoder is None:
        _write_networks_only(out, unet, autoencoder, info, meta)
        reason = "the config names none" if encoder_spec is None else f"{encoder_spec!r} is not available here"
        typer.echo(
            f"wrote {out} with the networks only (unet/, autoencoder/, scheduler/): no text encoder "
            f"({reason}); rerun with --text-encoder FOLDER for a folder that `histosynth generate` can use"
        )
        return
    from ..models.bundle import save_bundle
    from ..models.diffusion import noise_scheduler

    save_bundle(out, unet, autoencoder, dict(noise_scheduler(info.diffusion).config), encoder,
                schema_from_option(schema), meta)
    typer.echo(f"wrote model folder {out}")


def _cond_stage_version(cond_stage: Optional[dict[str, Any]]) -> Optional[str]:
    """PathLDM's ``FrozenCLIPEmbedder`` names its text tower in ``params.version``."""
    if not cond_stage:
        return None
    return (cond_stage.get("params") or {}).get("version")


def _load_text_encoder(spec: Optional[str], context_dim: int, max_tokens: Optional[int], explicit: bool):
    """The text encoder, or None when the config names none or names one that is not available here.

    One the user named explicitly must exist and fit the denoiser's cross-attention width.
    """
    if spec is None:
        return None
    from ..models.text import resolve_text_encoder

    try:
        source = resolve_text_encoder(spec, max_tokens=max_tokens)
    except ModelError:
        if explicit:
            raise
        return None
    if source.hidden_size != context_dim:
        raise ModelError(
            f"text encoder {spec!r} gives {source.hidden_size} features per token but the checkpoint's "
            f"denoiser reads {context_dim}; pass the text encoder it was trained with (--text-encoder)"
        )
    return source.load()


def _bundle_meta(info) -> dict[str, Any]:
    return {
        "image_size": info.image_size,
        "unet_weights": "ema" if info.used_ema else "raw",
        "provenance": {
            "imported_from": str(Path(info.checkpoint).resolve()),
            "compvis_config": str(Path(info.config).resolve()),
            "global_step": info.global_step,
            "skipped_keys": info.skipped,
        },
    }


def _write_networks_only(out: Path, unet, autoencoder, info, meta: dict[str, Any]) -> None:
    """unet/, autoencoder/, scheduler/ and a description of what is missing, written as a model folder is."""
    from ..models.bundle import save_networks_only
    from ..models.diffusion import noise_scheduler

    save_networks_only(out, unet, autoencoder, dict(noise_scheduler(info.diffusion).config), {
        "format": PARTIAL_FORMAT,
        "complete": False,
        "missing": ["text_encoder"],
        "image_size": info.image_size,
        "latent": {"scale": info.latent_scale, "quantize_before_decode": hasattr(autoencoder, "quantize")},
        "context_dim": info.context_dim,
        "text_encoder": info.text_encoder,
        "diffusion": info.diffusion.model_dump(mode="json"),
        **{k: v for k, v in meta.items() if k != "image_size"},
    })

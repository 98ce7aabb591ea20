"""Import of CompVis / PathLDM / generationLDM ``LatentDiffusion`` checkpoints, and of CompVis first-stage
autoencoder checkpoints (the model zoo's ``vq-f4``, ``kl-f8``, ...), into diffusers models.

A CompVis LatentDiffusion checkpoint holds the denoiser under ``model.diffusion_model.``, the first-stage
autoencoder under ``first_stage_model.``, the text encoder (PLIP/CLIP in PathLDM) under
``cond_stage_model.``, an EMA copy of the denoiser under ``model_ema.`` (flattened names, no dots)
and the diffusion schedule as buffers. Its YAML says how the networks are shaped.

The key renaming is diffusers' own (``diffusers.loaders.single_file_utils``); this module derives the
diffusers configs from the YAML with the settings that reproduce CompVis numerically, picks the EMA
weights when asked, checks every tensor against the config (naming the checkpoint key that does not
fit) and reports what it skipped.

A standalone first-stage checkpoint (YAML ``model.target`` ``ldm.models.autoencoder.VQModel`` or
``AutoencoderKL``) holds the same autoencoder without the ``first_stage_model.`` prefix, plus its
training loss under ``loss.`` (LPIPS and the patch discriminator), which an autoencoder folder does not
keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ..errors import ModelError
from ..presets import DiffusionConfig

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
#: first-stage training extras (LPIPS, discriminator) that an autoencoder never uses
LOSS_PREFIX = "loss."
FIRST_STAGE_IGNORED = (FIRST_STAGE_PREFIX + LOSS_PREFIX,)
#: the first-stage classes of CompVis' ``ldm.models.autoencoder`` (VQModelInterface contains VQModel)
FIRST_STAGE_TARGETS = ("VQModel", "AutoencoderKL")
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor",
}


@dataclass
class ImportInfo:
    """What an import found, used and skipped; enough to write a model folder's description."""

    checkpoint: str
    config: str
    used_ema: bool
    diffusion: DiffusionConfig
    latent_scale: float
    context_dim: int
    image_size: int
    text_encoder: Optional[dict[str, Any]]
    global_step: Optional[int]
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {label}" for label, n in self.skipped.items()) or "nothing"
        return (
            f"imported {'EMA' if self.used_ema else 'non-EMA'} denoiser weights"
            f" (step {self.global_step}), context dim {self.context_dim}, latent scale {self.latent_scale};"
            f" skipped {skipped}"
        )


# --- reading ---------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a ``.ckpt`` (torch) or ``.safetensors`` file, and the checkpoint's other entries.

    ``.ckpt`` files are read with ``weights_only=True`` (no code runs); a Lightning checkpoint whose
    extras need unpickling is refused unless ``trust_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # the unpickler's errors have no common base class
        hint = "" if trust_pickle else (
            "; if you trust its source, retry with --trust-checkpoint (loads it with full unpickling)"
        )
        raise ModelError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}{hint}") from None
    if not isinstance(payload, dict):
        raise ModelError(f"checkpoint {path} holds a {type(payload).__name__}, not a state dict")
    state = payload.get("state_dict", payload)
    extras = {k: v for k, v in payload.items() if k != "state_dict"} if "state_dict" in payload else {}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, extras


def read_compvis_model(path: str | Path) -> dict[str, Any]:
    """The ``model`` section of a CompVis YAML (``target`` and ``params``) of a LatentDiffusion or a first stage."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"config {path} does not exist; pass the YAML the checkpoint was trained with")
    try:
        model = yaml.safe_load(path.read_text())["model"]
        params = model["params"]
    except (yaml.YAMLError, KeyError, TypeError):
        params = model = None
    if not isinstance(params, dict) or not (is_first_stage(model) or "first_stage_config" in params):
        target = model.get("target") if isinstance(model, dict) else None
        raise ModelError(
            f"{path}: not a CompVis LatentDiffusion or first-stage config (model.target {target!r}); histosynth "
            "imports a LatentDiffusion (model.params.unet_config and first_stage_config) or a VQModel / AutoencoderKL"
        )
    return model


def is_first_stage(model: dict[str, Any]) -> bool:
    """Whether a YAML's ``model`` section is a first-stage autoencoder (VQModel, VQModelInterface, AutoencoderKL)."""
    return any(name in str(model.get("target", "")) for name in FIRST_STAGE_TARGETS)


def read_compvis_config(path: str | Path) -> dict[str, Any]:
    """The ``model.params`` section of a CompVis LatentDiffusion YAML."""
    params = read_compvis_model(path)["params"]
    try:
        params["unet_config"]["params"], params["first_stage_config"]["params"]
    except (KeyError, TypeError):
        raise ModelError(
            f"{path}: not a CompVis LatentDiffusion config (needs model.params.unet_config.params and "
            "model.params.first_stage_config.params)"
        ) from None
    return params


# --- configs ---------------------------------------------------------------------------------------


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise ModelError(f"unsupported CompVis setting: {what}")


def unet_config_from_compvis(unet: dict[str, Any]) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config equivalent to a CompVis ``openaimodel.UNetModel``'s params."""
    _refuse(not unet.get("use_spatial_transformer", False), "use_spatial_transformer must be true (text conditioning)")
    _refuse(bool(unet.get("use_scale_shift_norm", False)), "use_scale_shift_norm: true")
    _refuse(bool(unet.get("resblock_updown", False)), "resblock_updown: true")
    _refuse(unet.get("num_classes") is not None, "class-conditional UNet (num_classes)")
    model_channels = unet["model_channels"]
    channels = [model_channels * m for m in unet["channel_mult"]]
    attention = set(unet["attention_resolutions"])
    with_attention = [2**level in attention for level in range(len(channels))]
    head_channels = unet.get("num_head_channels", -1)
    heads = [c // head_channels for c in channels] if head_channels and head_channels > 0 else unet.get("num_heads", 1)
    context_dim = unet["context_dim"]
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    return {
        "sample_size": unet["image_size"],
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": unet["num_res_blocks"],
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": unet.get("transformer_depth", 1),
        "attention_head_dim": heads,  # diffusers reads this as the number of heads
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
    }


def first_stage_kind(first_stage: dict[str, Any]) -> str:
    """``"vq"`` or ``"kl"`` for a first-stage config (``target`` and ``params``)."""
    target = first_stage.get("target", "")
    if "VQModel" in target:
        return "vq"
    if "AutoencoderKL" in target:
        return "kl"
    raise ModelError(f"unsupported first stage {target!r}; expected a CompVis VQModel or AutoencoderKL")


def autoencoder_config_from_compvis(first_stage: dict[str, Any], latent_scale: float) -> dict[str, Any]:
    """The diffusers ``VQModel`` / ``AutoencoderKL`` config for a CompVis first-stage config."""
    params = first_stage["params"]
    dd = params["ddconfig"]
    _refuse(bool(dd.get("attn_resolutions")), f"first-stage attention at resolutions {dd['attn_resolutions']}")
    kind = first_stage_kind(first_stage)
    levels = len(dd["ch_mult"])
    config = {
        "sample_size": dd.get("resolution", 256),
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "scaling_factor": latent_scale,
        "mid_block_add_attention": True,
    }
    if kind == "vq":
        config.update(num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"], norm_type="group")
    else:
        _refuse(params["embed_dim"] != dd["z_channels"], "KL first stage with embed_dim != z_channels")
    return config


def diffusion_config_from_compvis(params: dict[str, Any]) -> DiffusionConfig:
    schedule = params.get("beta_schedule", "linear")
    _refuse(schedule != "linear", f"beta_schedule {schedule!r} (only CompVis 'linear' is supported)")
    parameterization = params.get("parameterization", "eps")
    _refuse(parameterization not in ("eps", "v"), f"parameterization {parameterization!r}")
    return DiffusionConfig(
        num_train_timesteps=params.get("timesteps", 1000),
        beta_start=params.get("linear_start", 1e-4),
        beta_end=params.get("linear_end", 2e-2),
        beta_schedule="scaled_linear",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction",
    )


def _check_schedule_buffer(state: dict[str, torch.Tensor], diffusion: DiffusionConfig) -> None:
    """A wrong YAML shows up as a schedule that differs from the checkpoint's own ``betas`` buffer."""
    if "betas" not in state:
        return
    expected = np.linspace(
        diffusion.beta_start**0.5, diffusion.beta_end**0.5, diffusion.num_train_timesteps, dtype=np.float64
    ) ** 2
    stored = state["betas"].double().numpy()
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-4, atol=1e-7):
        raise ModelError(
            "the checkpoint's 'betas' buffer does not match the schedule in the config "
            f"(linear_start {diffusion.beta_start}, linear_end {diffusion.beta_end}, "
            f"timesteps {diffusion.num_train_timesteps}); is --config the YAML this checkpoint was trained with?"
        )


# --- weights ---------------------------------------------------------------------------------------


def ema_key(unet_key: str) -> str:
    """CompVis ``LitEma`` stores ``model.diffusion_model.a.b`` as ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


EMA_BOOKKEEPING = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")


def _denoiser_weights(state: dict[str, torch.Tensor], take_ema: bool) -> dict[str, torch.Tensor]:
    """The ``model.diffusion_model.*`` tensors, or their EMA twins under the same names."""
    raw = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not take_ema:
        return raw
    missing = [ema_key(k) for k in raw if ema_key(k) not in state]
    if missing:
        raise ModelError(f"EMA weights requested but the checkpoint has no {missing[0]!r} ({len(missing)} missing)")
    return {k: state[ema_key(k)] for k in raw}


def _storage_names(state: dict[str, torch.Tensor]) -> dict[int, str]:
    """Checkpoint key by data address: the converters return the checkpoint's tensors or views of them
    (renamed, or with 1x1 conv dimensions dropped), which start at the same address."""
    return {t.data_ptr(): k for k, t in state.items() if t.numel()}


def _source_key(tensor: torch.Tensor, names: dict[int, str], fallback: str) -> str:
    return names.get(tensor.data_ptr(), fallback) if tensor.numel() else fallback


def _load_checked(
    model: torch.nn.Module,
    converted: dict[str, torch.Tensor],
    names: dict[int, str],
    part: str,
    prefix: str,
) -> set[str]:
    """Load ``converted`` strictly, naming the checkpoint key of any tensor that does not fit.

    Returns the checkpoint keys that were used.
    """
    expected = model.state_dict()
    for key, tensor in converted.items():
        source = _source_key(tensor, names, key)
        if key not in expected:
            raise ModelError(
                f"checkpoint key {source!r} has no place in the {part} built from the config "
                f"(it maps to {key!r}); is --config the YAML this checkpoint was trained with?"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"checkpoint key {source!r} has shape {tuple(tensor.shape)} but the config's {part} expects "
                f"{tuple(expected[key].shape)} (diffusers {key!r}); is --config the right YAML?"
            )
    missing = [k for k in expected if k not in converted]
    if missing:
        where = f" under {prefix!r}" if prefix else ""
        raise ModelError(
            f"the checkpoint has no weights{where} for {len(missing)} {part} tensors "
            f"(first: diffusers {missing[0]!r}); is --config the right YAML?"
        )
    model.load_state_dict(converted, strict=True)
    return {_source_key(t, names, k) for k, t in converted.items()}


def _convert_unet(state: dict[str, torch.Tensor], config: dict[str, Any],
                  names: dict[int, str]) -> tuple[UNet2DConditionModel, set[str]]:
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(state, config)
    return unet, _load_checked(unet, converted, names, "denoiser", UNET_PREFIX)


def _convert_autoencoder(
    state: dict[str, torch.Tensor], config: dict[str, Any], kind: str, names: dict[int, str], prefix: str
) -> tuple[VQModel | AutoencoderKL, set[str]]:
    """The autoencoder whose CompVis weights are the ``prefix``-ed keys of ``state`` (its ``loss.`` left out)."""
    first_stage = {k: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + LOSS_PREFIX)}
    converted = convert_ldm_vae_checkpoint(first_stage, config)
    if kind == "vq":
        codebook = prefix + "quantize.embedding.weight"
        if codebook not in first_stage:
            raise ModelError(f"the checkpoint has no VQ codebook {codebook!r}")
        converted["quantize.embedding.weight"] = first_stage[codebook]
        model = VQModel(**config)
    else:
        model = AutoencoderKL(**config)
    return model, _load_checked(model, converted, names, "autoencoder", prefix)


def _count_skipped(keys: set[str], prefixes: tuple[str, ...]) -> dict[str, int]:
    """Skipped checkpoint keys counted by kind: ``{"cond_stage_model.*": 196, "schedule buffers": 12}``."""
    counts: dict[str, int] = {}
    for key in sorted(keys):
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        label = f"{prefix}*" if prefix else ("schedule buffers" if key in SCHEDULE_BUFFERS else key)
        counts[label] = counts.get(label, 0) + 1
    return counts


def _check_all_used(leftover: set[str], sources: tuple[str, ...], ignored: tuple[str, ...]) -> None:
    """Weights under ``sources`` that no network took mean the YAML describes other networks."""
    stray = sorted(k for k in leftover if k.startswith(sources) and not k.startswith(ignored)
                   and k not in EMA_BOOKKEEPING)
    if stray:
        raise ModelError(
            f"{len(stray)} checkpoint weights were not used by the networks the config describes "
            f"(first: {stray[0]!r}); is --config the YAML this checkpoint was trained with?"
        )


def _float_state(checkpoint: str | Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    raw, extras = read_checkpoint(checkpoint, trust_pickle)
    return {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}, extras


def _global_step(extras: dict[str, Any]) -> Optional[int]:
    return int(extras["global_step"]) if "global_step" in extras else None


def import_compvis(
    checkpoint: str | Path,
    config_yaml: str | Path,
    use_ema: Optional[bool] = None,
    trust_pickle: bool = False,
) -> tuple[UNet2DConditionModel, VQModel | AutoencoderKL, ImportInfo]:
    """A CompVis LatentDiffusion checkpoint + its YAML -> (diffusers UNet, VQ/KL autoencoder, info).

    ``use_ema``: True takes the EMA denoiser weights (error if absent), False the raw ones, None the
    EMA weights when the checkpoint has them. Weights come out as float32.
    """
    params = read_compvis_config(config_yaml)
    state, extras = _float_state(checkpoint, trust_pickle)
    names = _storage_names(state)  # before any EMA swap, so EMA tensors keep their own names
    has_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in state)
    if use_ema and not has_ema:
        raise ModelError(f"{checkpoint}: EMA weights requested but the checkpoint has no '{EMA_PREFIX}*' keys")
    take_ema = has_ema if use_ema is None else bool(use_ema)

    diffusion = diffusion_config_from_compvis(params)
    _check_schedule_buffer(state, diffusion)
    scale = float(state["scale_factor"]) if "scale_factor" in state else float(params.get("scale_factor", 1.0))
    first_stage = params["first_stage_config"]

    unet_config = unet_config_from_compvis(params["unet_config"]["params"])
    unet, used_unet = _convert_unet(_denoiser_weights(state, take_ema), unet_config, names)
    kind = first_stage_kind(first_stage)
    ae, used_ae = _convert_autoencoder(state, autoencoder_config_from_compvis(first_stage, scale), kind, names,
                                       FIRST_STAGE_PREFIX)

    leftover = set(state) - used_unet - used_ae
    _check_all_used(leftover, (EMA_PREFIX if take_ema else UNET_PREFIX, FIRST_STAGE_PREFIX), FIRST_STAGE_IGNORED)
    cond_stage = params.get("cond_stage_config") or {}
    if cond_stage.get("target", "").endswith("Identity"):  # context tensors were fed in directly
        cond_stage = {}
    info = ImportInfo(
        checkpoint=str(checkpoint),
        config=str(config_yaml),
        used_ema=take_ema,
        diffusion=diffusion,
        latent_scale=scale,
        context_dim=unet_config["cross_attention_dim"],
        image_size=unet_config["sample_size"] * (2 ** (len(first_stage["params"]["ddconfig"]["ch_mult"]) - 1)),
        text_encoder=({"target": cond_stage.get("target"), "params": cond_stage.get("params", {})}
                      if cond_stage else None),
        global_step=_global_step(extras),
        skipped=_count_skipped(leftover, (TEXT_PREFIX, EMA_PREFIX, UNET_PREFIX, *FIRST_STAGE_IGNORED)),
    )
    return unet.eval(), ae.eval(), info


@dataclass
class AutoencoderImportInfo:
    """What a first-stage import found and skipped; written beside the autoencoder folder's weights."""

    checkpoint: str
    config: str
    kind: str
    latent_scale: float
    downsampling: int
    latent_channels: int
    global_step: Optional[int]
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {label}" + (" (the training loss: LPIPS, discriminator)"
                                                if label == LOSS_PREFIX + "*" else "")
                            for label, n in self.skipped.items()) or "nothing"
        return (
            f"imported a {self.kind.upper()}-f{self.downsampling} autoencoder ({self.latent_channels} latent channels,"
            f" step {self.global_step}), latent scale {self.latent_scale}; skipped {skipped}"
        )

    def provenance(self) -> dict[str, Any]:
        return {
            "imported_from": str(Path(self.checkpoint).resolve()),
            "compvis_config": str(Path(self.config).resolve()),
            "global_step": self.global_step,
            "latent_scale": self.latent_scale,
            "skipped_keys": self.skipped,
        }


def import_compvis_autoencoder(
    checkpoint: str | Path,
    config_yaml: str | Path,
    latent_scale: float = 1.0,
    trust_pickle: bool = False,
) -> tuple[VQModel | AutoencoderKL, AutoencoderImportInfo]:
    """A CompVis first-stage checkpoint (VQModel / AutoencoderKL) + its YAML -> (diffusers autoencoder, info).

    The checkpoint carries no latent scale: ``latent_scale`` is the ``scale_factor`` of the LatentDiffusion
    that is to use it (CompVis' default and PathLDM's VQ-f4: 1.0). Its ``loss.`` weights (LPIPS, the
    discriminator) and any EMA copy (``model_ema.``) are skipped. Weights come out as float32.
    """
    model = read_compvis_model(config_yaml)
    if not is_first_stage(model):
        raise ModelError(f"{config_yaml}: a LatentDiffusion config, not a first-stage (VQModel / AutoencoderKL) one")
    kind = first_stage_kind(model)
    state, extras = _float_state(checkpoint, trust_pickle)
    if any(k.startswith((FIRST_STAGE_PREFIX, UNET_PREFIX)) for k in state):
        raise ModelError(
            f"{checkpoint} is a LatentDiffusion checkpoint, not a first-stage one; import it with its LatentDiffusion "
            "YAML (the model folder it gives serves as --autoencoder too)"
        )
    names = _storage_names(state)
    config = autoencoder_config_from_compvis(model, latent_scale)
    ae, used = _convert_autoencoder(state, config, kind, names, "")
    leftover = set(state) - used
    _check_all_used(leftover, ("",), (LOSS_PREFIX, EMA_PREFIX))
    info = AutoencoderImportInfo(
        checkpoint=str(checkpoint),
        config=str(config_yaml),
        kind=kind,
        latent_scale=latent_scale,
        downsampling=2 ** (len(config["block_out_channels"]) - 1),
        latent_channels=config["latent_channels"],
        global_step=_global_step(extras),
        skipped=_count_skipped(leftover, (LOSS_PREFIX, EMA_PREFIX)),
    )
    return ae.eval(), info

"""A trained model on disk: one self-describing folder that is all a user needs to sample.

Layout::

    histosynth.json     format version, class schema (caption rules included), image size,
                        normalisation, latent scale (and the training latents' range that
                        sampling clamps into), text encoder reference, conditioning,
                        preset, provenance (data, steps, wall time, command, hardware, metrics)
    unet/               diffusers UNet2DConditionModel (config.json + safetensors)
    controlnet/         only for a ControlNet mask branch: diffusers ControlNetModel steering the
                        frozen unet/ (see models.control)
    autoencoder/        diffusers VQModel or AutoencoderKL
    scheduler/          diffusers scheduler config of the training noise schedule
    text_encoder/       a copy of the text encoder (model + tokenizer), unless histosynth.json
                        names the default "minilm", which ships with the toolkit's dependencies

A bundle is written to a temporary folder beside its destination and renamed into place, so a killed
run never leaves a half bundle. Loading checks every part and fails with a
:class:`~histosynth.errors.ModelError` that names the part.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel

from ..errors import ModelError
from ..io import read_format_json, remove_partial_files, write_json_atomic
from ..schema import ClassSchema
from .conditioning import Conditioning
from .control import CONTROLNET_DIR, MaskControlledUNet, load_mask_branch
from .latent_range import LatentRange
from .text import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderSource, resolve_text_encoder

FORMAT = "histosynth.bundle"
FORMAT_VERSION = 1
CONFIG_FILE = "histosynth.json"
PARTS = ("unet", "autoencoder", "scheduler")
TEXT_ENCODER_DIR = "text_encoder"
#: images enter the autoencoder as float32 in [-1, 1]: pixel / 127.5 - 1
NORMALIZATION = {"range": [-1.0, 1.0], "pixel_to_model": "x / 127.5 - 1"}

Autoencoder = Union[VQModel, AutoencoderKL]
_AUTOENCODER_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}


@dataclass
class Bundle:
    """A loaded model folder. The text encoder is loaded on first use of :attr:`text_encoder`."""

    path: Path
    config: dict[str, Any]
    unet: UNet2DConditionModel | MaskControlledUNet
    autoencoder: Autoencoder
    scheduler_config: dict[str, Any]
    schema: ClassSchema
    device: torch.device
    _text_encoder: Optional[TextEncoder] = field(default=None, repr=False)

    @property
    def id(self) -> str:
        """A short identity of the model (digest of its UNet weights), for generation records."""
        return str(self.config["id"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def latent_range(self) -> Optional[LatentRange]:
        """The per-channel range of the training latents that sampling clamps into, if the model has one."""
        stored = self.config["latent"].get("range")
        return None if stored is None else LatentRange.from_dict(stored)

    @property
    def latent_scale(self) -> float:
        return float(self.config["latent"]["scale"])

    @property
    def mask_channels(self) -> int:
        """Label-map channels concatenated to the latent (0 for a text-only model)."""
        return int(self.config["conditioning"].get("mask_channels", 0))

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning.from_config(self.config["conditioning"])

    @property
    def mask_classes(self) -> list[int]:
        """Schema ids of the label-map channels, in channel order (empty for a text-only model)."""
        return [int(i) for i in self.config["conditioning"].get("mask_classes", [])]

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return int(self.config["latent"]["downsampling"])

    @property
    def text_encoder_source(self) -> TextEncoderSource:
        ref = self.config["text_encoder"]
        spec = ref["ref"] if ref["ref"] == DEFAULT_TEXT_ENCODER else str(self.path / ref["ref"])
        try:
            return resolve_text_encoder(spec, max_tokens=ref["max_tokens"])
        except ModelError as exc:
            raise ModelError(f"{self.path}: part 'text_encoder': {exc}") from None

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder, checked to be the one the model was trained with."""
        if self._text_encoder is None:
            encoder = self.text_encoder_source.load(self.device)
            expected = self.config["text_encoder"]["id"]
            if encoder.id != expected:
                raise ModelError(
                    f"{self.path}: part 'text_encoder' does not match: the model was trained with "
                    f"{expected} but {encoder.source.spec!r} is {encoder.id}"
                )
            self._text_encoder = encoder
        return self._text_encoder

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)


# --- saving -------------------------------------------------------------------------------------
def save_bundle(
    path: str | Path,
    unet: UNet2DConditionModel | MaskControlledUNet,
    autoencoder: Autoencoder,
    scheduler_config: dict[str, Any],
    text_encoder: TextEncoder,
    schema: ClassSchema,
    meta: dict[str, Any],
) -> Path:
    """Write a bundle to ``path`` atomically (replacing an older bundle there) and return ``path``.

    ``meta`` holds ``image_size`` (required) and optionally ``preset`` (dict), ``conditioning``
    (``text_dropout``, ``mask_channels``, ...), ``unet_weights`` ("ema" or "raw"), ``latent_range``
    (a :class:`LatentRange` of the training latents) and ``provenance`` (data, steps, wall_time_s,
    command, metrics, ...; hardware is filled in).
    """
    path = Path(path)
    if "image_size" not in meta:
        raise ValueError("save_bundle needs meta['image_size']")
    source = text_encoder.source
    if unet.config.cross_attention_dim != source.hidden_size:
        raise ModelError(
            f"the UNet's cross-attention reads {unet.config.cross_attention_dim} features but text encoder "
            f"{source.name} gives {source.hidden_size}; build the UNet with context_dim={source.hidden_size}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_files(path)  # the staging folder of a save that was killed
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        if isinstance(unet, MaskControlledUNet):
            unet.save_parts(staging)
        else:
            unet.save_pretrained(staging / "unet")
        autoencoder.save_pretrained(staging / "autoencoder")
        DDPMScheduler.from_config(dict(scheduler_config)).save_pretrained(staging / "scheduler")
        if source.is_default:
            text_ref = DEFAULT_TEXT_ENCODER
        else:
            text_encoder.save_to(staging / TEXT_ENCODER_DIR)
            text_ref = TEXT_ENCODER_DIR
        config = _bundle_config(staging, unet, autoencoder, text_encoder, text_ref, schema, meta)
        write_json_atomic(staging / CONFIG_FILE, config)
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _bundle_config(staging: Path, unet: UNet2DConditionModel, autoencoder: Autoencoder,
                   encoder: TextEncoder, text_ref: str, schema: ClassSchema,
                   meta: dict[str, Any]) -> dict[str, Any]:
    conditioning = {"text": True, "mask_channels": 0, **meta.get("conditioning", {})}
    _check_conditioning(conditioning, schema, "meta['conditioning']")
    latent = {
        "scale": float(autoencoder.config.scaling_factor),
        "channels": int(autoencoder.config.latent_channels),
        "downsampling": 2 ** (len(autoencoder.config.block_out_channels) - 1),
        "quantize_before_decode": isinstance(autoencoder, VQModel),
    }
    latent_range = meta.get("latent_range")
    _store_latent_range(latent, latent_range, "meta['latent_range']")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": _bundle_id(staging, latent_range),
        "image_size": int(meta["image_size"]),
        "normalization": NORMALIZATION,
        "latent": latent,
        "schema": schema.to_dict(),
        "unconditional_caption": "",
        "text_encoder": {
            "ref": text_ref,
            "id": encoder.id,
            "kind": encoder.source.kind,
            "max_tokens": encoder.max_tokens,
            "hidden_size": encoder.hidden_size,
        },
        "conditioning": conditioning,
        "unet_weights": meta.get("unet_weights", "raw"),
        "preset": meta.get("preset"),
        "provenance": {"hardware": hardware_description(), **meta.get("provenance", {})},
    }


def _check_conditioning(conditioning: dict[str, Any], schema: ClassSchema, where: str) -> None:
    """Mask channels must name their classes, one schema id per channel."""
    channels = int(conditioning.get("mask_channels", 0))
    if not channels:
        return
    classes = list(conditioning.get("mask_classes", []))
    if len(classes) != channels or not set(classes) <= set(schema.ids):
        raise ModelError(
            f"{where}: {channels} mask channels need 'mask_classes' with one id of the class schema each "
            f"(schema ids {schema.ids}), got {classes}"
        )


def _bundle_id(folder: Path, latent_range: Optional[LatentRange]) -> str:
    """Digest of the denoiser's weights and, when it has one, the latent range sampling clamps into:
    everything besides the sampling options that decides a generated image."""
    digest = hashlib.sha256()
    for part in (folder / "unet", folder / CONTROLNET_DIR):
        for weights in sorted(part.glob("*.safetensors")):
            with weights.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    if latent_range is not None:
        digest.update(json.dumps(latent_range.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _store_latent_range(latent: dict[str, Any], latent_range: Optional[LatentRange], where: str) -> None:
    """Put ``latent_range`` into a bundle config's latent section (None: take it out)."""
    latent.pop("range", None)
    if latent_range is not None:
        _check_latent_range(latent_range, int(latent["channels"]), where)
        latent["range"] = latent_range.to_dict()


def _check_latent_range(latent_range: LatentRange, channels: int, where: str) -> None:
    if latent_range.channels != channels:
        raise ModelError(f"{where}: the latent range has {latent_range.channels} channels but the autoencoder's "
                         f"latents have {channels}")


def set_latent_range(path: str | Path, latent_range: Optional[LatentRange]) -> str:
    """Store (or, with None, remove) the latent range of the bundle at ``path``; returns its new id.

    The id changes with the range, so generation jobs made with the other range are not resumed
    with this one.
    """
    path = Path(path)
    config = read_bundle_config(path)
    _store_latent_range(config["latent"], latent_range, str(path))
    config["id"] = _bundle_id(path, latent_range)
    write_json_atomic(path / CONFIG_FILE, config)
    return config["id"]


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the finished staging folder onto ``path``; an older bundle there is removed after."""
    old = None
    if path.exists():
        if not (path / CONFIG_FILE).is_file():
            raise ModelError(f"{path} exists and is not a model folder; choose another output path")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def hardware_description() -> str:
    cpu = f"{platform.machine()} x{os.cpu_count()}"
    if torch.cuda.is_available():
        return f"{cpu}; {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return cpu


# --- loading ------------------------------------------------------------------------------------
def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """The checked ``histosynth.json`` of a bundle (no weights loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    config = read_format_json(path / CONFIG_FILE, FORMAT, ModelError, what="model folder",
                              missing=f"{path} is not a histosynth model folder: part '{CONFIG_FILE}' is missing")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        advice = "upgrade histosynth to load it" if newer else "re-save it with the histosynth version that made it"
        raise ModelError(
            f"{path} has model-folder format version {version}; this histosynth reads version "
            f"{FORMAT_VERSION}: {advice}"
        )
    return config


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle's UNet, autoencoder, scheduler config and schema onto ``device`` (eval mode)."""
    path = Path(path)
    config = read_bundle_config(path)
    controlled = Conditioning.from_config(config["conditioning"]).controlnet
    for part in PARTS + ((CONTROLNET_DIR,) if controlled else ()):
        if not (path / part / _part_config_name(part)).is_file():
            raise ModelError(f"{path}: part '{part}' is missing ({part}/{_part_config_name(part)} not found)")
    if config["text_encoder"]["ref"] != DEFAULT_TEXT_ENCODER and not (path / TEXT_ENCODER_DIR).is_dir():
        raise ModelError(f"{path}: part '{TEXT_ENCODER_DIR}' is missing")
    unet = _load_part("unet", lambda: UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False), path)
    if controlled:
        unet = MaskControlledUNet(unet, _load_part(CONTROLNET_DIR, lambda: load_mask_branch(path), path))
    autoencoder = _load_part("autoencoder", lambda: load_autoencoder_folder(path / "autoencoder"), path)
    scheduler = _load_part("scheduler", lambda: DDPMScheduler.from_pretrained(path / "scheduler"), path)
    schema = ClassSchema.from_dict(config["schema"], source=f"{path / CONFIG_FILE}: schema")
    _check_conditioning(config["conditioning"], schema, f"{path / CONFIG_FILE}: conditioning")
    _check_parts_fit(path, config, unet, autoencoder)
    if "range" in config["latent"]:
        _check_latent_range(LatentRange.from_dict(config["latent"]["range"]), int(config["latent"]["channels"]),
                            f"{path / CONFIG_FILE}: latent")
    device = torch.device(device)
    return Bundle(
        path=path,
        config=config,
        unet=unet.to(device).eval(),
        autoencoder=autoencoder.to(device).eval(),
        scheduler_config=dict(scheduler.config),
        schema=schema,
        device=device,
    )


def load_autoencoder_folder(folder: str | Path) -> Autoencoder:
    """A diffusers ``VQModel`` / ``AutoencoderKL`` folder, or the autoencoder/ part of a bundle."""
    import json

    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        folder = folder / "autoencoder"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} is neither a model folder nor an autoencoder folder (no config.json)")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if class_name not in _AUTOENCODER_CLASSES:
        raise ModelError(f"{config_path}: {class_name!r} is not an autoencoder (expected VQModel or AutoencoderKL)")
    return _AUTOENCODER_CLASSES[class_name].from_pretrained(folder, low_cpu_mem_usage=False)


def _part_config_name(part: str) -> str:
    return "scheduler_config.json" if part == "scheduler" else "config.json"


def _load_part(part: str, load, path: Path):
    try:
        return load()
    except ModelError as exc:
        raise ModelError(f"{path}: part '{part}': {exc}") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"{path}: part '{part}' cannot be loaded: {first_line}") from None


def _check_parts_fit(path: Path, config: dict[str, Any], unet: UNet2DConditionModel, autoencoder: Autoencoder) -> None:
    """The parts must agree on latent channels and context size, whatever files were swapped."""
    latent_channels = int(autoencoder.config.latent_channels)
    expected_in = latent_channels + int(config["conditioning"].get("mask_channels", 0))
    if unet.config.in_channels != expected_in or unet.config.out_channels != latent_channels:
        raise ModelError(
            f"{path}: part 'unet' does not fit part 'autoencoder': the UNet maps {unet.config.in_channels} -> "
            f"{unet.config.out_channels} channels, the autoencoder has {latent_channels} latent channels"
            + (f" (+{expected_in - latent_channels} mask channels)" if expected_in != latent_channels else "")
        )
    context = int(config["text_encoder"]["hidden_size"])
    if unet.config.cross_attention_dim != context:
        raise ModelError(
            f"{path}: part 'unet' does not fit part 'text_encoder': cross-attention reads "
            f"{unet.config.cross_attention_dim} features, the text encoder gives {context}"
        )
    if float(autoencoder.config.scaling_factor) != float(config["latent"]["scale"]):
        raise ModelError(
            f"{path}: part 'autoencoder' does not match {CONFIG_FILE}: latent scale "
            f"{autoencoder.config.scaling_factor} vs {config['latent']['scale']}"
        )

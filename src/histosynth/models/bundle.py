"""A trained model on disk: one self-describing folder that is all a user needs to sample.

Layout::

    histosynth.json     format version, class schema (caption rules included), image size,
                        normalisation, latent scale (and the training latents' range that
                        sampling clamps into), text encoder reference, conditioning, the
                        model's sampling defaults (from its preset), preset, provenance (data,
                        steps, wall time, command, hardware, metrics); read into a
                        :class:`ModelConfig` and checked field by field
    unet/               the denoiser: a diffusers UNet2DConditionModel or a DiTDenoiser (config.json + safetensors)
    controlnet/         only for a ControlNet mask branch: diffusers ControlNetModel steering the
                        frozen unet/ (see models.control)
    autoencoder/        diffusers VQModel or AutoencoderKL
    scheduler/          diffusers scheduler config of the training noise schedule
    text_encoder/       a copy of the text encoder (model + tokenizer), unless histosynth.json
                        names the default "minilm", which ships with the toolkit's dependencies
    model_index.json    what diffusers needs to load the folder as a :class:`histosynth.pipeline.HistosynthPipeline`
                        (the pipeline class and each component's library and class; see :func:`model_index`)
    README.md           the model card, written from histosynth.json (see :mod:`histosynth.models.card`)

A bundle is written to a temporary folder beside its destination and renamed into place, so a killed
run never leaves a half bundle. Format version 1 (before the sampling defaults) is still read: its
defaults are its preset's ``sampling`` section. Loading checks every part and fails with a
:class:`~histosynth.errors.ModelError` that names the part.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from diffusers import AutoencoderKL, DDPMScheduler, VQModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from ..captions import UNCONDITIONAL_CAPTION
from ..errors import HistosynthError, ModelError
from ..io import atomic_path, staged_folder, write_json_atomic
from ..schema import ClassSchema
from ..validation import one_of
from .conditioning import Conditioning
from .control import CONTROLNET_DIR, MaskControlledUNet, load_mask_branch
from .denoiser import Denoiser, context_features, denoiser_library, load_denoiser
from .latent_range import LatentRange
from .sampling import SamplingOptions
from .text import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderSource, resolve_text_encoder

FORMAT = "histosynth.bundle"
#: version 2 added the model's own sampling defaults (``sampling``); version 1 folders are read too
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "histosynth.json"
MODEL_INDEX_FILE = "model_index.json"
MODEL_CARD_FILE = "README.md"
#: how model_index.json names the pipeline and the text encoder component (see histosynth.pipeline)
PIPELINE_CLASS = "HistosynthPipeline"
TEXT_ENCODER_COMPONENT = ("histosynth.pipeline", "HistosynthTextEncoder")
PARTS = ("unet", "autoencoder", "scheduler")
TEXT_ENCODER_DIR = "text_encoder"
#: images enter the autoencoder as float32 in [-1, 1]: pixel / 127.5 - 1
NORMALIZATION = {"range": [-1.0, 1.0], "pixel_to_model": "x / 127.5 - 1"}

Autoencoder = Union[VQModel, AutoencoderKL]
_AUTOENCODER_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatentSection(_Section):
    """The autoencoder's latents: scale (latent = encoder output x scale), shape and the training range."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    scale: float = Field(gt=0)
    channels: int = Field(ge=1)
    downsampling: int = Field(ge=1)
    quantize_before_decode: bool = False
    range: Optional[LatentRange] = None
    #: digest of a decoder that replaced the trained one (``histosynth replace-decoder``); part of the id
    decoder: Optional[str] = None

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("range", mode="before")
    @classmethod
    def _read_range(cls, value: Any) -> Optional[LatentRange]:
        if value is None or isinstance(value, LatentRange):
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a mapping with lists 'low' and 'high'")
        try:
            return LatentRange.from_dict(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _range_fits(self) -> "LatentSection":
        if self.range is not None and self.range.channels != self.channels:
            raise ValueError(f"the latent range has {self.range.channels} channels but the autoencoder's latents "
                             f"have {self.channels}")
        return self

    @field_serializer("range")
    def _write_range(self, value: Optional[LatentRange]) -> Optional[dict[str, Any]]:
        return None if value is None else value.to_dict()


class TextEncoderSection(_Section):
    """Which text encoder the model reads: the default's name or the sub-folder holding a copy."""

    ref: str
    id: str
    kind: str
    max_tokens: int = Field(ge=1)
    hidden_size: int = Field(ge=1)


class ConditioningSection(_Section):
    """What the denoiser reads (see :mod:`histosynth.models.conditioning`)."""

    text: bool = True
    text_dropout: float = Field(0.1, ge=0, le=1)
    mask_channels: int = Field(0, ge=0)
    mask_dropout: float = Field(0.0, ge=0, le=1)
    mask_classes: list[int] = []
    label_map: Optional[str] = None
    mask_branch: Literal["concat", "controlnet"] = "concat"

    def to_conditioning(self) -> Conditioning:
        return Conditioning.from_config(self.model_dump())


class ModelConfig(BaseModel):
    """A model folder's ``histosynth.json``, checked when it is read; :func:`read_bundle_config` reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True)

    format: Literal["histosynth.bundle"] = FORMAT
    format_version: Literal[2] = FORMAT_VERSION
    id: str
    image_size: int = Field(ge=1)
    normalization: dict[str, Any] = Field(default_factory=lambda: dict(NORMALIZATION))
    latent: LatentSection
    class_schema: dict[str, Any] = Field(alias="schema")
    unconditional_caption: str = UNCONDITIONAL_CAPTION
    text_encoder: TextEncoderSection
    conditioning: ConditioningSection = ConditioningSection()
    #: the options ``generate`` uses where the user gives none (from the preset the model was trained with)
    sampling: SamplingOptions = SamplingOptions()
    unet_weights: Literal["ema", "raw"] = "raw"
    preset: Optional[dict[str, Any]] = None
    provenance: dict[str, Any] = {}

    @field_validator("sampling", mode="before")
    @classmethod
    def _read_sampling(cls, value: Any) -> SamplingOptions:
        if isinstance(value, SamplingOptions):
            return value
        try:
            return SamplingOptions.from_dict(value)
        except (HistosynthError, TypeError) as exc:
            raise ValueError(str(exc)) from None

    @field_serializer("sampling")
    def _write_sampling(self, value: SamplingOptions) -> dict[str, Any]:
        return value.to_dict()

    @classmethod
    def upgraded(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A version-1 description as version 2: the sampling defaults are the saved preset's."""
        if data.get("format_version") != 1:
            return data
        preset = data.get("preset")
        sampling = preset.get("sampling") if isinstance(preset, dict) else None
        return {**data, "format_version": FORMAT_VERSION, "sampling": sampling}

    def to_json(self) -> dict[str, Any]:
        """The description as written to ``histosynth.json`` (a model without a latent range has no ``range``)."""
        data = self.model_dump(mode="json", by_alias=True)
        for optional in ("range", "decoder"):
            if data["latent"][optional] is None:
                del data["latent"][optional]
        return data



@dataclass
class Bundle:
    """A loaded model folder. The text encoder is loaded on first use of :attr:`text_encoder`."""

    path: Path
    config: ModelConfig
    unet: Denoiser | MaskControlledUNet
    autoencoder: Autoencoder
    scheduler_config: dict[str, Any]
    schema: ClassSchema
    device: torch.device
    _text_encoder: Optional[TextEncoder] = field(default=None, repr=False)

    @property
    def id(self) -> str:
        """A short identity of the model (digest of its UNet weights), for generation records."""
        return self.config.id

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_range(self) -> Optional[LatentRange]:
        """The per-channel range of the training latents that sampling clamps into, if the model has one."""
        return self.config.latent.range

    @property
    def latent_channels(self) -> int:
        return self.config.latent.channels

    @property
    def mask_channels(self) -> int:
        """Label-map channels concatenated to the latent (0 for a text-only model)."""
        return self.config.conditioning.mask_channels

    @property
    def conditioning(self) -> Conditioning:
        return self.config.conditioning.to_conditioning()

    @property
    def mask_classes(self) -> list[int]:
        """Schema ids of the label-map channels, in channel order (empty for a text-only model)."""
        return list(self.config.conditioning.mask_classes)

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return self.config.latent.downsampling

    @property
    def sampling(self) -> SamplingOptions:
        """The model's own sampling defaults (its preset's), which a command's options override."""
        return self.config.sampling

    @property
    def text_encoder_source(self) -> TextEncoderSource:
        return text_encoder_source(self.path, self.config)

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder, checked to be the one the model was trained with."""
        if self._text_encoder is None:
            self._text_encoder = load_bundle_text_encoder(self.path, self.config, self.device)
        return self._text_encoder


def text_encoder_source(path: Path, config: ModelConfig) -> TextEncoderSource:
    """Where the text encoder of the model folder at ``path`` is: the default's package or its text_encoder/."""
    ref = config.text_encoder
    spec = ref.ref if ref.ref == DEFAULT_TEXT_ENCODER else str(Path(path) / ref.ref)
    try:
        return resolve_text_encoder(spec, max_tokens=ref.max_tokens)
    except ModelError as exc:
        raise ModelError(f"{path}: part 'text_encoder': {exc}") from None


def load_bundle_text_encoder(path: Path, config: ModelConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder of the model folder at ``path``, checked to be the one the model was trained with."""
    encoder = text_encoder_source(path, config).load(device)
    expected = config.text_encoder.id
    if encoder.id != expected:
        raise ModelError(
            f"{path}: part 'text_encoder' does not match: the model was trained with "
            f"{expected} but {encoder.source.spec!r} is {encoder.id}"
        )
    return encoder


# --- saving -------------------------------------------------------------------------------------
def save_bundle(
    path: str | Path,
    unet: Denoiser | MaskControlledUNet,
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
    if context_features(unet) != source.hidden_size:
        raise ModelError(
            f"the denoiser's cross-attention reads {context_features(unet)} features but text encoder "
            f"{source.name} gives {source.hidden_size}; build the denoiser with context_dim={source.hidden_size}"
        )
    with _staged(path) as staging:
        _save_networks(staging, unet, autoencoder, scheduler_config)
        if source.is_default:
            text_ref = DEFAULT_TEXT_ENCODER
        else:
            text_encoder.save_to(staging / TEXT_ENCODER_DIR)
            text_ref = TEXT_ENCODER_DIR
        write_model_config(staging, _bundle_config(staging, unet, autoencoder, text_encoder, text_ref, schema, meta))
        write_model_index(staging)
    return path


def save_networks_only(path: str | Path, unet: Denoiser, autoencoder: Autoencoder,
                       scheduler_config: dict[str, Any], description: dict[str, Any]) -> Path:
    """Write the networks of a model that lacks its text encoder (unet/, autoencoder/, scheduler/) and
    ``description`` as its ``histosynth.json``, atomically as :func:`save_bundle` writes a whole one.

    ``description`` says what is missing; such a folder is not loaded as a model (its format differs).
    """
    path = Path(path)
    with _staged(path, into_empty=True) as staging:
        _save_networks(staging, unet, autoencoder, scheduler_config)
        write_json_atomic(staging / CONFIG_FILE, description)
    return path


def _save_networks(folder: Path, unet: Denoiser | MaskControlledUNet, autoencoder: Autoencoder,
                   scheduler_config: dict[str, Any]) -> None:
    if isinstance(unet, MaskControlledUNet):
        unet.save_parts(folder)
    else:
        unet.save_pretrained(folder / "unet")
    autoencoder.save_pretrained(folder / "autoencoder")
    DDPMScheduler.from_config(dict(scheduler_config)).save_pretrained(folder / "scheduler")


def _staged(path: Path, into_empty: bool = False):
    """:func:`~histosynth.io.staged_folder` onto a model folder (an older one there is replaced);
    ``into_empty``: an empty folder at ``path`` (made for the model) is replaced too."""

    def into_place(staging: Path, target: Path) -> None:
        if into_empty and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        _move_into_place(staging, target)

    return staged_folder(path, into_place)


def _bundle_config(staging: Path, unet: Denoiser, autoencoder: Autoencoder,
                   encoder: TextEncoder, text_ref: str, schema: ClassSchema,
                   meta: dict[str, Any]) -> ModelConfig:
    preset = meta.get("preset")
    latent_range = meta.get("latent_range")
    data = {
        "id": _bundle_id(staging, latent_range),
        "image_size": int(meta["image_size"]),
        "latent": {
            "scale": float(autoencoder.config.scaling_factor),
            "channels": int(autoencoder.config.latent_channels),
            "downsampling": 2 ** (len(autoencoder.config.block_out_channels) - 1),
            "quantize_before_decode": isinstance(autoencoder, VQModel),
            "range": latent_range,
        },
        "schema": schema.to_dict(),
        "text_encoder": {
            "ref": text_ref,
            "id": encoder.id,
            "kind": encoder.source.kind,
            "max_tokens": encoder.max_tokens,
            "hidden_size": encoder.hidden_size,
        },
        "conditioning": {"text": True, "mask_channels": 0, **meta.get("conditioning", {})},
        "sampling": preset.get("sampling") if isinstance(preset, dict) else None,
        "unet_weights": meta.get("unet_weights", "raw"),
        "preset": preset,
        "provenance": {"hardware": hardware_description(), **meta.get("provenance", {})},
    }
    config = _validated(data, "the model's description")
    _check_conditioning(config.conditioning, schema, "meta['conditioning']")
    return config


def _validated(data: Any, where: str) -> ModelConfig:
    """A model description checked field by field; a bad one raises a one-line ModelError naming the field."""
    if not isinstance(data, dict):
        raise ModelError(f"{where} must be a JSON object of fields (format, id, latent, ...), "
                         f"not a {type(data).__name__}")
    try:
        return ModelConfig.model_validate(ModelConfig.upgraded(data))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"{where}: {problems}") from None


def _check_conditioning(conditioning: ConditioningSection, schema: ClassSchema, where: str) -> None:
    """Mask channels must name their classes, one schema id per channel (checked with the schema at hand)."""
    channels, classes = conditioning.mask_channels, conditioning.mask_classes
    if channels and (len(classes) != channels or not set(classes) <= set(schema.ids)):
        raise ModelError(
            f"{where}: {conditioning.mask_channels} mask channels need 'mask_classes' with one id of the class "
            f"schema each (schema ids {schema.ids}), got {conditioning.mask_classes}"
        )


def _bundle_id(folder: Path, latent_range: Optional[LatentRange], decoder: Optional[str] = None) -> str:
    """Digest of the denoiser's weights and, when it has them, the latent range sampling clamps into and
    the digest of a replaced decoder: everything besides the sampling options that decides a generated image."""
    digest = hashlib.sha256()
    for part in (folder / "unet", folder / CONTROLNET_DIR):
        for weights in sorted(part.glob("*.safetensors")):
            with weights.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    if latent_range is not None:
        digest.update(json.dumps(latent_range.to_dict(), sort_keys=True).encode())
    if decoder is not None:
        digest.update(f"decoder {decoder}".encode())
    return digest.hexdigest()[:12]


def set_latent_range(path: str | Path, latent_range: Optional[LatentRange]) -> str:
    """Store (or, with None, remove) the latent range of the bundle at ``path``; returns its new id.

    The id changes with the range, so generation jobs made with the other range are not resumed
    with this one.
    """
    path = Path(path)
    config = read_bundle_config(path)
    if latent_range is not None and latent_range.channels != config.latent.channels:
        raise ModelError(f"{path}: the latent range has {latent_range.channels} channels but the autoencoder's "
                         f"latents have {config.latent.channels}")
    updated = config.model_copy(update={"latent": config.latent.model_copy(update={"range": latent_range}),
                                        "id": _bundle_id(path, latent_range, config.latent.decoder)})
    write_model_config(path, updated)
    return updated.id


def replace_decoder(model: str | Path, autoencoder: str | Path, out: str | Path) -> ModelConfig:
    """Write a copy of the model folder ``model`` to ``out`` that decodes with the decoder of ``autoencoder``
    (an autoencoder or model folder) and returns its description.

    Only a decoder for the same latents fits: ``autoencoder`` must encode exactly as ``model``'s own
    autoencoder does (what ``train-autoencoder --init MODEL --decoder-only`` keeps), else the copy is refused.
    The denoiser is untouched; the copy's id changes (generation jobs of the two never mix) and its
    provenance records the decoder (``autoencoder``'s ``metrics.json`` when it has one).
    """
    from .autoencoder import decoder_digest, latents_differ, load_checked_autoencoder

    model, autoencoder = Path(model), Path(autoencoder)
    check_copy_output(model, out)
    config = read_bundle_config(model)
    decoder = load_checked_autoencoder(autoencoder)
    problem = latents_differ(load_autoencoder_folder(model), decoder)
    if problem:
        raise ModelError(f"{autoencoder} does not encode the latents {model} was trained on ({problem}); only a "
                         f"decoder fine-tuned with 'histosynth train-autoencoder --init {model} --decoder-only' "
                         "can replace its decoder")
    digest = decoder_digest(decoder)
    metrics_file = autoencoder_dir(autoencoder) / "metrics.json"
    record = {"from": str(autoencoder.resolve()), "digest": digest,
              **(json.loads(metrics_file.read_text()) if metrics_file.is_file() else {})}

    def with_the_decoder(staging: Path, config: ModelConfig) -> ModelConfig:
        for weights in (staging / "autoencoder").glob("diffusion_pytorch_model*"):
            weights.unlink()  # (its provenance.json stays: the encoder is the one it describes)
        decoder.save_pretrained(staging / "autoencoder")
        return config.model_copy(update={
            "latent": config.latent.model_copy(update={"decoder": digest}),
            "id": _bundle_id(staging, config.latent.range, digest),
            "provenance": {**config.provenance, "decoder": record}})

    return _copy_model(model, config, out, with_the_decoder)


#: the dtypes a model's weights can be stored in; they load as float32 either way
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the parts whose weights :func:`convert_weights` converts
NETWORK_PARTS = ("unet", CONTROLNET_DIR, "autoencoder")


def convert_weights(model: str | Path, out: str | Path, dtype: str) -> ModelConfig:
    """Write a copy of the model folder ``model`` to ``out`` whose networks' weights (denoiser, mask branch,
    autoencoder) are stored in ``dtype`` and return its description.

    bfloat16 halves the folder: the weights load as float32 again, rounded to bfloat16's 8 significant bits,
    so the copy draws other images than ``model`` (its id differs) at float32's speed. Its provenance records
    the dtype, and its card says it.
    """
    one_of(dtype, tuple(WEIGHT_DTYPES), "--dtype")
    model = Path(model)
    check_copy_output(model, out)
    config = read_bundle_config(model)

    def converted(staging: Path, config: ModelConfig) -> ModelConfig:
        for part in NETWORK_PARTS:
            for weights in (staging / part).glob("*.safetensors"):
                _convert_safetensors(weights, WEIGHT_DTYPES[dtype])
        decoder = config.latent.decoder
        if decoder is not None:  # the replaced decoder's digest is of its converted weights now
            from .autoencoder import decoder_digest

            decoder = decoder_digest(load_autoencoder_folder(staging / "autoencoder"))
        return config.model_copy(update={
            "latent": config.latent.model_copy(update={"decoder": decoder}),
            "id": _bundle_id(staging, config.latent.range, decoder),
            "provenance": {**config.provenance, "weights_dtype": dtype}})

    return _copy_model(model, config, out, converted)


def _convert_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Store the floating-point tensors of a safetensors file in ``dtype`` (its metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def folder_bytes(folder: str | Path) -> int:
    """The size of the files in ``folder`` and its sub-folders."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def check_copy_output(model: Path, out: str | Path) -> None:
    """``out`` can receive a copy of the model folder ``model``: a new or empty folder outside it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists and is not an empty folder; choose a new --out folder")
    if out.resolve().is_relative_to(Path(model).resolve()):
        raise ModelError(f"{out} is inside the model folder {model}; choose an --out folder beside it")


def _copy_model(model: Path, config: ModelConfig, out: str | Path, change) -> ModelConfig:
    """Copy the model folder ``model`` (described by ``config``) to ``out`` (atomically), letting ``change(staging,
    config)`` alter the copy's files and return its new description, which is written with its card and index."""
    with staged_folder(out) as staging:
        shutil.copytree(model, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        updated = change(staging, config)
        write_model_config(staging, updated)
        write_model_index(staging)
    return updated


def write_model_config(folder: str | Path, config: ModelConfig) -> None:
    """Write ``histosynth.json`` and the model card made from it into a model folder (atomically)."""
    from .card import model_card

    write_json_atomic(Path(folder) / CONFIG_FILE, config.to_json())
    with atomic_path(Path(folder) / MODEL_CARD_FILE) as temporary:
        temporary.write_text(model_card(config))


def model_index(folder: str | Path) -> dict[str, Any]:
    """The ``model_index.json`` of the model folder at ``folder``: the pipeline class and, for each component,
    its library and class as diffusers loads it (the networks' classes read from their own configs).

    The text encoder is histosynth's component (:class:`histosynth.pipeline.HistosynthTextEncoder`), which
    loads the encoder histosynth.json names: the default from its package, a copy from text_encoder/.
    """
    import diffusers

    folder = Path(folder)
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    for part in PARTS + (CONTROLNET_DIR,):
        config = folder / part / _part_config_name(part)
        class_name = json.loads(config.read_text())["_class_name"] if config.is_file() else None
        index[part] = [denoiser_library(class_name) if part == "unet" else "diffusers", class_name] if class_name \
            else [None, None]
    index[TEXT_ENCODER_DIR] = list(TEXT_ENCODER_COMPONENT)
    return index


def write_model_index(folder: str | Path) -> None:
    """Write :func:`model_index` into the model folder at ``folder`` (atomically)."""
    write_json_atomic(Path(folder) / MODEL_INDEX_FILE, model_index(folder))


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
def read_bundle_config(path: str | Path) -> ModelConfig:
    """The checked ``histosynth.json`` of a model folder (no weights loaded); version-1 folders are upgraded."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelError(f"{path} is not a histosynth model folder: part '{CONFIG_FILE}' is missing")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file} is corrupt ({exc})") from None
    if isinstance(data, dict):
        if data.get("format") != FORMAT:
            raise ModelError(f"{file}: unknown model folder format {data.get('format')!r} (expected {FORMAT})")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            advice = "upgrade histosynth to load it" if newer else "re-save it with the histosynth version that made it"
            raise ModelError(f"{path} has model-folder format version {version}; this histosynth reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}: {advice}")
    return _validated(data, str(file))


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle's UNet, autoencoder, scheduler config and schema onto ``device`` (eval mode)."""
    path = Path(path)
    config = read_bundle_config(path)
    controlled = config.conditioning.to_conditioning().controlnet
    for part in PARTS + ((CONTROLNET_DIR,) if controlled else ()):
        if not (path / part / _part_config_name(part)).is_file():
            raise ModelError(f"{path}: part '{part}' is missing ({part}/{_part_config_name(part)} not found)")
    if config.text_encoder.ref != DEFAULT_TEXT_ENCODER and not (path / TEXT_ENCODER_DIR).is_dir():
        raise ModelError(f"{path}: part '{TEXT_ENCODER_DIR}' is missing")
    schema = _checked_schema(path, config)
    unet = _load_part("unet", lambda: load_denoiser(path / "unet"), path)
    if controlled:
        unet = MaskControlledUNet(unet, _load_part(CONTROLNET_DIR, lambda: load_mask_branch(path), path))
    autoencoder = _load_part("autoencoder", lambda: load_autoencoder_folder(path / "autoencoder"), path)
    scheduler = _load_part("scheduler", lambda: DDPMScheduler.from_pretrained(path / "scheduler"), path)
    _check_parts_fit(path, config, unet, autoencoder)
    return Bundle(
        path=path,
        config=config,
        unet=unet.to(device).eval(),
        autoencoder=autoencoder.to(device).eval(),
        scheduler_config=dict(scheduler.config),
        schema=schema,
        device=torch.device(device),
    )


def saved_prediction_type(path: str | Path) -> Optional[str]:
    """What the model folder's denoiser was trained to predict, as its scheduler part says (None without one)."""
    path = Path(path)
    if not (path / "scheduler" / _part_config_name("scheduler")).is_file():
        return None
    scheduler = _load_part("scheduler", lambda: DDPMScheduler.from_pretrained(path / "scheduler"), path)
    return scheduler.config.prediction_type


def bundle_of_parts(path: str | Path, unet: Denoiser | MaskControlledUNet, autoencoder: Autoencoder,
                    scheduler_config: dict[str, Any], device: str | torch.device,
                    text_encoder: Optional[TextEncoder] = None) -> Bundle:
    """A bundle of networks loaded elsewhere (e.g. by diffusers) with the description of the model folder at
    ``path``, checked as :func:`load_bundle` checks the parts it loads."""
    path = Path(path)
    config = read_bundle_config(path)
    schema = _checked_schema(path, config)
    _check_parts_fit(path, config, unet, autoencoder)
    return Bundle(path=path, config=config, unet=unet.eval(), autoencoder=autoencoder.eval(),
                  scheduler_config=dict(scheduler_config), schema=schema, device=torch.device(device),
                  _text_encoder=text_encoder)


def _checked_schema(path: Path, config: ModelConfig) -> ClassSchema:
    schema = ClassSchema.from_dict(config.class_schema, source=f"{path / CONFIG_FILE}: schema")
    _check_conditioning(config.conditioning, schema, f"{path / CONFIG_FILE}: conditioning")
    return schema


def autoencoder_dir(folder: str | Path) -> Path:
    """The folder of the autoencoder's files: ``folder`` itself, or the autoencoder/ part of a model folder."""
    folder = Path(folder)
    return folder / "autoencoder" if (folder / CONFIG_FILE).is_file() else folder


def load_autoencoder_folder(folder: str | Path) -> Autoencoder:
    """A diffusers ``VQModel`` / ``AutoencoderKL`` folder, or the autoencoder/ part of a bundle."""
    import json

    folder = autoencoder_dir(folder)
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


def _check_parts_fit(path: Path, config: ModelConfig, unet: Denoiser, autoencoder: Autoencoder) -> None:
    """The parts must agree on latent channels and context size, whatever files were swapped."""
    latent_channels = int(autoencoder.config.latent_channels)
    expected_in = latent_channels + config.conditioning.mask_channels
    if unet.config.in_channels != expected_in or unet.config.out_channels != latent_channels:
        raise ModelError(
            f"{path}: part 'unet' does not fit part 'autoencoder': the UNet maps {unet.config.in_channels} -> "
            f"{unet.config.out_channels} channels, the autoencoder has {latent_channels} latent channels"
            + (f" (+{expected_in - latent_channels} mask channels)" if expected_in != latent_channels else "")
        )
    context = config.text_encoder.hidden_size
    if context_features(unet) != context:
        raise ModelError(
            f"{path}: part 'unet' does not fit part 'text_encoder': cross-attention reads "
            f"{context_features(unet)} features, the text encoder gives {context}"
        )
    if float(autoencoder.config.scaling_factor) != config.latent.scale:
        raise ModelError(
            f"{path}: part 'autoencoder' does not match {CONFIG_FILE}: latent scale "
            f"{autoencoder.config.scaling_factor} vs {config.latent.scale}"
        )

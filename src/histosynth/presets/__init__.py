"""Model presets: the sizes and hyper-parameters of one latent diffusion model, as validated data.

Three presets ship with the toolkit:

* ``tiny``    - a ~4 M parameter UNet and a light KL-f4 autoencoder; tests and quick demos on a CPU.
* ``small``   - a ~24 M parameter UNet and a medium KL-f4 autoencoder; a CPU demo that learns something.
* ``pathldm`` - the thesis / PathLDM configuration (VQ-f4 autoencoder, 192-channel UNet, PLIP context).

A user may also pass the path of a YAML file with the same sections. Every field has a default except
the network sizes, so a custom preset names only what differs. Validation errors name the bad field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, describe_validation_error
from ..models.sampling import SamplerKind, SamplingOptions
from ..validation import one_line

__all__ = [
    "DENOISERS",
    "AutoencoderConfig",
    "AutoencoderTrainingConfig",
    "DiTConfig",
    "DiffusionConfig",
    "Preset",
    "SamplingConfig",
    "TrainingConfig",
    "UNetConfig",
    "builtin_presets",
    "load_preset",
]


class _Section(BaseModel):
    # Infinity passes every lower bound and NaN slips past checks written as "refuse if x < low".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_group_norm(channels: tuple[int, ...], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"channel counts {bad} are not multiples of norm_num_groups={groups}")


class AutoencoderConfig(_Section):
    """The frozen image <-> latent autoencoder (diffusers ``VQModel`` or ``AutoencoderKL``)."""

    kind: Literal["vq", "kl"] = Field("vq", description="vector-quantised (VQ) or KL-regularised autoencoder")
    block_out_channels: tuple[int, ...] = Field(min_length=1, description="channels per resolution level")
    layers_per_block: int = Field(2, ge=1, description="ResNet blocks per encoder level")
    latent_channels: int = Field(3, ge=1)
    num_vq_embeddings: int = Field(8192, ge=2, description="codebook size (VQ only)")
    vq_embed_dim: Optional[int] = Field(None, ge=1,
                                        description="codebook vector size (VQ only); default latent_channels")
    norm_num_groups: int = Field(32, ge=1)
    mid_block_attention: bool = Field(True, description="self-attention in the lowest-resolution block")
    latent_scale: float = Field(1.0, gt=0, description="latents = encoder output * latent_scale")

    @model_validator(mode="after")
    def _sizes_fit(self) -> "AutoencoderConfig":
        _check_group_norm(self.block_out_channels, self.norm_num_groups)
        return self

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel along each axis (4 for an f4 autoencoder)."""
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderTrainingConfig(_Section):
    """How ``train-autoencoder`` weighs its losses (CompVis' ``LPIPSWithDiscriminator``; its KL-f4 first stage
    used kl_weight 1e-6, disc_weight 0.5, disc_start 50001 and a 3-layer PatchGAN of 64 channels).

    The reconstruction loss is L1 + ssim_weight x (1 - SSIM) (+ perceptual_weight x the perceptual distance
    when a feature network is given); from step ``disc_start`` on a PatchGAN discriminator joins with a hinge
    loss, its generator term weighted adaptively (see :mod:`histosynth.models.discriminator`).
    """

    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (KL autoencoders)")
    ssim_weight: float = Field(1.0, ge=0, description="weight of the (1 - SSIM) term beside L1")
    perceptual_weight: float = Field(1.0, ge=0, description="weight of the perceptual distance (with --perceptual)")
    disc_weight: float = Field(0.5, ge=0, description="scale of the adaptive GAN weight; 0 = no discriminator")
    disc_start: int = Field(50_001, ge=0, description="training step at which the discriminator is switched on")
    disc_layers: int = Field(3, ge=1, le=6, description="stride-2 convolutions of the PatchGAN discriminator")
    disc_channels: int = Field(64, ge=1, description="channels of the discriminator's first convolution")

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0


class UNetConfig(_Section):
    """The conditional denoiser (diffusers ``UNet2DConditionModel``)."""

    block_out_channels: tuple[int, ...] = Field(min_length=2, description="channels per resolution level")
    layers_per_block: int = Field(2, ge=1)
    cross_attention: tuple[bool, ...] = Field(
        description="per level: whether it has spatial transformers (self- and cross-attention)"
    )
    # diffusers calls this `attention_head_dim` but reads it as the NUMBER of heads; CompVis `num_heads`.
    num_heads: int = Field(1, ge=1, description="attention heads per transformer (CompVis num_heads)")
    transformer_depth: int = Field(1, ge=1, description="transformer blocks per attention layer")
    mid_block_attention: bool = Field(True, description="a transformer in the middle block")
    norm_num_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _sizes_fit(self) -> "UNetConfig":
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(
                f"cross_attention has {len(self.cross_attention)} entries but block_out_channels has "
                f"{len(self.block_out_channels)} levels; give one true/false per level"
            )
        _check_group_norm(self.block_out_channels, self.norm_num_groups)
        bad = [c for c in self.block_out_channels if c % self.num_heads]
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by num_heads={self.num_heads}")
        return self

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiTConfig(_Section):
    """The transformer denoiser of ``denoiser: dit``: a DiT in PixArt-alpha's layout (diffusers
    ``PixArtTransformer2DModel``; Chen et al. 2023), as the newest histopathology generators use. The latent is
    cut into ``patch_size`` x ``patch_size`` tokens; each block has self-attention, cross-attention to the caption
    and an MLP, modulated by the timestep (adaLN-single)."""

    patch_size: int = Field(2, ge=1, description="latent pixels per token along each axis")
    width: int = Field(384, ge=8, description="token features (the hidden size)")
    depth: int = Field(12, ge=1, description="transformer blocks")
    num_heads: int = Field(6, ge=1, description="attention heads per block")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "DiTConfig":
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads={self.num_heads}")
        return self


#: the denoiser architectures a preset can name
DENOISERS = ("unet", "dit")


class DiffusionConfig(_Section):
    """The forward process. Defaults are CompVis' "linear" schedule (linear in sqrt(beta))."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0195, gt=0, lt=1)
    # diffusers "scaled_linear" is CompVis "linear"; diffusers "linear" is linear in beta itself.
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    # flow_prediction: rectified flow / flow matching, x_t = (1 - s) x0 + s eps, the target eps - x0; the beta
    # schedule is then unused
    prediction_type: Literal["epsilon", "v_prediction", "flow_prediction"] = "epsilon"

    @model_validator(mode="after")
    def _ordered(self) -> "DiffusionConfig":
        if not self.beta_start < self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")
        return self


class TrainingConfig(_Section):
    lr: float = Field(2.5e-5, gt=0, description="AdamW base learning rate")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up from 1e-6 x lr to lr")
    batch_size: int = Field(64, ge=1)
    text_dropout: float = Field(0.1, ge=0, le=1, description="probability of replacing the caption by ''")
    ema_decay: Optional[float] = Field(0.9999, gt=0, lt=1, description="EMA of the weights; null = none")
    precision: Literal["32", "bf16-mixed"] = "32"
    hflip: bool = True
    vflip: bool = True
    min_snr_gamma: Optional[float] = Field(
        None, gt=0, description="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; null = the plain MSE")
    repeat_rare: Optional[float] = Field(
        None, gt=0, le=1, description="repeat-factor sampling (Gupta et al. 2019): a patch holding a class that "
        "fewer than this share of the patches hold is seen sqrt(share / class share) times per epoch, e.g. 0.3; "
        "null = every patch once")

    @field_validator("precision", mode="before")
    @classmethod
    def _refuse_fp16(cls, value: Any) -> Any:
        if isinstance(value, str) and "16" in value and "bf16" not in value:
            raise ValueError(
                "fp16 is refused: fp16 autocast silently froze weights whose gradients underflowed "
                "in the thesis' training; use '32' (default) or 'bf16-mixed'"
            )
        return str(value) if isinstance(value, int) else value


_SAMPLING = SamplingOptions()


class SamplingConfig(_Section):
    """A model's sampling defaults: the fields of :class:`~histosynth.models.sampling.SamplingOptions`, with
    its defaults; a model trained from the preset keeps them as its own (``generate`` uses them)."""

    steps: int = Field(_SAMPLING.steps, ge=1)
    guidance: float = Field(_SAMPLING.guidance, ge=0,
                            description="classifier-free guidance scale; 1 = conditional only")
    scheduler: SamplerKind = _SAMPLING.scheduler
    mask_guidance: float = Field(_SAMPLING.mask_guidance, ge=0,
                                 description="guidance scale of the label mask (mask-conditioned models); 1 = none")
    eta: float = Field(_SAMPLING.eta, ge=0, le=1, description="DDIM eta: 0 = deterministic (DDIM only)")

    @model_validator(mode="after")
    def _valid_options(self) -> "SamplingConfig":
        try:
            self.to_options()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_options(self) -> SamplingOptions:
        return SamplingOptions(**self.model_dump())


class Preset(_Section):
    """A whole model configuration: what to build, how to train it, how to sample from it."""

    name: str = "custom"
    image_size: int = Field(256, ge=8, description="training patch size in pixels")
    text_encoder: str = Field("minilm", min_length=1, description="text encoder name or path")
    autoencoder: AutoencoderConfig
    autoencoder_training: AutoencoderTrainingConfig = AutoencoderTrainingConfig()
    unet: UNetConfig
    denoiser: Literal[DENOISERS] = Field("unet", description="the denoiser: the UNet of section unet (CompVis' "
                                         "layout) or the transformer of section dit")
    dit: DiTConfig = DiTConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    training: TrainingConfig = TrainingConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _image_fits_networks(self) -> "Preset":
        factor = self.autoencoder.downsampling_factor * self.denoiser_factor
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {factor} "
                f"(autoencoder factor {self.autoencoder.downsampling_factor} x {self.denoiser_name} factor "
                f"{self.denoiser_factor})"
            )
        return self

    @model_validator(mode="after")
    def _min_snr_needs_a_diffusion_objective(self) -> "Preset":
        if self.training.min_snr_gamma is not None and self.diffusion.prediction_type == "flow_prediction":
            raise ValueError("min_snr_gamma weighs the noise or velocity target of a diffusion schedule; a "
                             "flow_prediction model trains without it (leave min_snr_gamma unset)")
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsampling_factor

    @property
    def denoiser_factor(self) -> int:
        """Latent pixels per position of the denoiser's coarsest grid: the UNet's downsampling or the DiT's patch."""
        return self.dit.patch_size if self.denoiser == "dit" else self.unet.downsampling_factor

    @property
    def denoiser_name(self) -> str:
        return "DiT patch" if self.denoiser == "dit" else "UNet"

    def to_dict(self) -> dict[str, Any]:
        """The preset as plain data; a recipe option left unset is left out (and, for a UNet model, the unused
        DiT section), so that the presets of runs and models made before the option existed read the same."""
        data = self.model_dump(mode="json")
        for option in ("min_snr_gamma", "repeat_rare"):
            if data["training"][option] is None:
                del data["training"][option]
        if self.denoiser == "unet":
            del data["denoiser"], data["dit"]
        return data

    def with_recipe(self, prediction_type: Optional[str] = None, min_snr_gamma: Optional[float] = None,
                    repeat_rare: Optional[float] = None, denoiser: Optional[str] = None) -> "Preset":
        """This preset with the training recipe's options that are given (not None) replaced, checked as a
        preset file's are: what the network predicts (``epsilon``, ``v_prediction`` or ``flow_prediction``),
        the min-SNR-gamma loss weighting, the repeat-factor sampling of rare classes and the denoiser
        (``unet`` or ``dit``, of the preset's section of that name)."""
        data = self.model_dump(mode="json")
        if denoiser is not None:
            data["denoiser"] = denoiser
        if prediction_type is not None:
            data["diffusion"]["prediction_type"] = prediction_type
        for option, value in (("min_snr_gamma", min_snr_gamma), ("repeat_rare", repeat_rare)):
            if value is not None:
                data["training"][option] = value
        return Preset.from_dict(data, source="the training recipe")

    @classmethod
    def from_dict(cls, data: Any, source: str = "preset") -> "Preset":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections (autoencoder, unet, ...)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def builtin_presets() -> list[str]:
    """Names of the presets that ship with the toolkit."""
    folder = resources.files(__name__)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A built-in preset by name (``tiny``, ``small``, ``pathldm``) or a preset YAML file."""
    text, source = _preset_text(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc.__class__.__name__}: {one_line(exc)})") from None
    if isinstance(data, dict) and "name" not in data:
        data["name"] = Path(str(name_or_path)).stem
    return Preset.from_dict(data, source=source)


def _preset_text(name_or_path: str | Path) -> tuple[str, str]:
    candidate = str(name_or_path)
    if candidate in builtin_presets():
        return resources.files(__name__).joinpath(f"{candidate}.yaml").read_text(), f"preset '{candidate}'"
    path = Path(candidate)
    if path.is_file():
        return path.read_text(), str(path)
    raise ConfigError(
        f"unknown preset {candidate!r}: give one of {', '.join(builtin_presets())} or a preset YAML file"
    )

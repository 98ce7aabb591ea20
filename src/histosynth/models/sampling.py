"""How the reverse process runs: one frozen :class:`SamplingOptions`, from the command line to the sampler.

A model folder keeps its own defaults (its ``sampling`` section, taken from the preset it was trained
with); a command overrides only the options the user gave (:meth:`SamplingOptions.overridden`).
Every value is checked when the object is made, so a bad option fails in one line before any work:
steps a positive integer, guidance scales finite and non-negative, a known scheduler, eta in [0, 1],
a known precision (:mod:`histosynth.models.precision`; None: the device's default, settled by
:meth:`SamplingOptions.on_device` once the device is known).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Mapping, Optional

from ..errors import ConfigError
from .conditioning import DEFAULT_MASK_GUIDANCE
from .precision import check_precision_name, device_precision

SamplerKind = Literal["ddim", "dpm++"]
#: the schedulers :func:`histosynth.models.diffusion.sampling_scheduler` makes
SAMPLER_KINDS: tuple[str, ...] = ("ddim", "dpm++")


@dataclass(frozen=True)
class SamplingOptions:
    """Steps, guidance of the text and of the mask, scheduler and DDIM eta of one generation.

    ``guidance`` weights the text (1 = none, 0 = unconditional), ``mask_guidance`` the label mask
    (used only with masks; see :func:`histosynth.sample.sampler.guided_eps`). ``eta`` > 0 makes DDIM
    stochastic, with each item's step noise drawn from its own seed (DPM-Solver++ has none).
    ``precision`` is the format the networks run in (fp32, bf16, fp16; None: the device's default).
    """

    steps: int = 50
    guidance: float = 1.5
    scheduler: str = "ddim"
    mask_guidance: float = DEFAULT_MASK_GUIDANCE
    eta: float = 0.0
    precision: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a whole number of at least 1, got {self.steps!r}")
        for name, low in (("guidance", 0.0), ("mask guidance", 0.0), ("eta", 0.0)):
            value = getattr(self, name.replace(" ", "_"))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            if value < low:
                advice = " (1 = no guidance)" if "guidance" in name else ""
                raise ConfigError(f"{name} must be 0 or more{advice}, got {value}")
            object.__setattr__(self, name.replace(" ", "_"), float(value))
        if self.eta > 1:
            raise ConfigError(f"eta must be between 0 (deterministic DDIM) and 1, got {self.eta}")
        if self.scheduler not in SAMPLER_KINDS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SAMPLER_KINDS)}")
        if self.eta and self.scheduler != "ddim":
            raise ConfigError(f"eta applies to the ddim scheduler only; {self.scheduler} has no step noise")
        if self.precision is not None:
            check_precision_name(self.precision)

    def on_device(self, device: Any) -> "SamplingOptions":
        """These options with the precision settled for ``device``: its default if none was chosen, refused
        where the device cannot sample in it."""
        return replace(self, precision=device_precision(self.precision, device))

    def overridden(self, **given: Any) -> "SamplingOptions":
        """These options with those ``given`` that are not None replacing them (a command's options)."""
        unknown = set(given) - set(asdict(self))
        if unknown:
            raise TypeError(f"unknown sampling options: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The options as a mapping; a precision left to the device is left out (a model folder keeps none)."""
        data = asdict(self)
        if self.precision is None:
            del data["precision"]
        return data

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "SamplingOptions":
        """Options from a mapping (e.g. a preset's ``sampling`` section); missing keys take the defaults,
        keys that are not options are ignored."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"sampling options must be a mapping of steps, guidance, ..., got {data!r}")
        fields = set(asdict(cls()))
        return cls(**{k: v for k, v in data.items() if k in fields})

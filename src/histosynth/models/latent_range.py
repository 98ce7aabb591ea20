"""The range of a model's training latents, per channel, and clamping each sampling step into it.

A small denoiser's prediction of the clean latent can drift out of the latents it was trained on:
a channel far above or below anything the autoencoder ever produced. The decoder renders such a
latent as grain or a stain of its own, which a segmenter then misreads. A bundle can therefore keep
the per-channel range of its training latents (the ``quantile`` and ``1 - quantile`` quantiles);
sampling clamps each step's predicted clean latent into it and re-derives the model output from
the clamped one. This is the static thresholding of pixel-space diffusion (Imagen's, diffusers'
``clip_sample``), per latent channel and with bounds measured on the data instead of [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line starts fast
    import torch

#: share of the training latents left outside the range on each side, per channel
DEFAULT_QUANTILE = 0.01
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_prediction")
#: values per channel that a range is measured on at most (a 1 % quantile is exact enough from these)
MAX_VALUES_PER_CHANNEL = 1 << 24


@dataclass(frozen=True)
class LatentRange:
    """Per-channel bounds (low[c] <= high[c]) of a model's training latents."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    quantile: float = DEFAULT_QUANTILE

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or not self.low:
            raise ModelError(f"a latent range needs one low and one high bound per channel, got "
                             f"{len(self.low)} and {len(self.high)}")
        if any(lo > hi for lo, hi in zip(self.low, self.high, strict=True)):
            raise ModelError(f"a latent range's low bounds must not exceed its high bounds: {self.low} / {self.high}")

    @classmethod
    def of_latents(cls, latents: torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> "LatentRange":
        """The range of latents (..., C, h, w): per channel, the ``quantile`` and ``1 - quantile`` quantiles.

        Of more than :data:`MAX_VALUES_PER_CHANNEL` values per channel, every k-th latent is used.
        """
        check_quantile(quantile)
        channels = latents.shape[-3]
        items = latents.detach().reshape(-1, *latents.shape[-3:])
        step = -(-items[0, 0].numel() * len(items) // MAX_VALUES_PER_CHANNEL)  # ceil
        per_channel = items[::step].float().movedim(1, 0).reshape(channels, -1).cpu().numpy()
        low, high = np.quantile(per_channel, [quantile, 1.0 - quantile], axis=1)
        return cls(tuple(float(v) for v in low), tuple(float(v) for v in high), float(quantile))

    @property
    def channels(self) -> int:
        return len(self.low)

    def to_dict(self) -> dict[str, Any]:
        return {"low": list(self.low), "high": list(self.high), "quantile": self.quantile}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentRange":
        try:
            return cls(tuple(float(v) for v in data["low"]), tuple(float(v) for v in data["high"]),
                       float(data.get("quantile", DEFAULT_QUANTILE)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"a latent range needs lists 'low' and 'high' of numbers, got {data!r}") from exc

    def clamp(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) with each channel clamped into its bounds."""
        import torch

        low = torch.tensor(self.low, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        high = torch.tensor(self.high, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        return torch.maximum(torch.minimum(latents, high), low)


def check_quantile(quantile: float) -> None:
    if not 0.0 <= quantile < 0.5:
        raise ConfigError(f"the latent range's quantile must be in [0, 0.5), got {quantile}")


def clamp_model_output(output: torch.Tensor, x: torch.Tensor, signal: torch.Tensor | float,
                       noise_level: torch.Tensor | float, latent_range: LatentRange,
                       prediction_type: str = "epsilon") -> torch.Tensor:
    """The model output (noise or velocity) whose predicted clean latent is clamped into the range.

    With ``x = signal x0 + noise_level eps`` at the step (sqrt(alpha_bar) and sqrt(1 - alpha_bar) on a
    diffusion schedule, 1 - sigma and sigma on a flow's; see
    :func:`histosynth.models.diffusion.signal_and_noise`): the clean latent the output implies is clamped,
    and the output of the same kind is computed back from ``x`` and the clamped latent, so any scheduler's
    step can use it unchanged. The velocity is ``signal eps - noise_level x0`` (v-prediction) or ``eps - x0``
    (a flow's).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"clamping latents needs a prediction type of {', '.join(PREDICTION_TYPES)}, "
                          f"got {prediction_type!r}")
    import torch

    signal = torch.as_tensor(signal, dtype=torch.float32, device=x.device)
    noise_level = torch.as_tensor(noise_level, dtype=torch.float32, device=x.device)
    x, output_float = x.float(), output.float()
    if prediction_type == "epsilon":
        x0 = (x - noise_level * output_float) / signal
    elif prediction_type == "v_prediction":  # signal^2 + noise_level^2 = 1
        x0 = signal * x - noise_level * output_float
    else:  # a flow: signal + noise_level = 1
        x0 = x - noise_level * output_float
    x0 = latent_range.clamp(x0)
    eps = (x - signal * x0) / noise_level
    if prediction_type == "epsilon":
        return eps.to(output.dtype)
    velocity = signal * eps - noise_level * x0 if prediction_type == "v_prediction" else eps - x0
    return velocity.to(output.dtype)

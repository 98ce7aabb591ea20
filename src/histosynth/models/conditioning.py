"""What a denoiser is conditioned on: text (cross-attention), a label mask, or both.

A label mask reaches the UNet one of two ways (the *mask branch*): ``concat``, its label map
appended to the noisy latent as extra input channels of the UNet, trained whole; or
``controlnet``, a trainable copy of a frozen text UNet's encoder that reads the label map and adds
to the UNet's skip connections (:mod:`histosynth.models.control`).

Each condition is dropped on its own in training (a dropped caption becomes "", a dropped label map
all zeros), so that one text+mask model also serves text-only, mask-only and unconditional
sampling, and guidance can weight text and mask separately. The bundle's ``histosynth.json`` keeps
this under ``conditioning``::

    {"text": true, "text_dropout": 0.1, "mask_channels": 8, "mask_dropout": 0.2,
     "mask_classes": [0, 1, 2, 3, 4, 5, 6, 7], "label_map": "class shares per latent pixel",
     "mask_branch": "concat"}

``mask_channels`` is 0 for a text-only model; ``mask_classes`` are the schema ids of the channels,
in order (see :mod:`histosynth.models.label_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError

CHOICES = ("text", "mask", "text+mask")
MASK_BRANCHES = ("concat", "controlnet")
#: mask guidance where none is given: the best of 1.5-3.0 for the shipped text+mask model in a probe
#: on held-out phantom masks (see the README's "Generating from label masks")
DEFAULT_MASK_GUIDANCE = 2.5
LABEL_MAP_KIND = "class shares per latent pixel"


@dataclass(frozen=True)
class Conditioning:
    """Which conditions a model reads, and how often each was dropped in training."""

    text: bool = True
    mask: bool = False
    text_dropout: float = 0.1
    mask_dropout: float = 0.0
    mask_branch: str = "concat"

    def __post_init__(self) -> None:
        if not (self.text or self.mask):
            raise ConfigError("a model must be conditioned on text, a mask or both")
        if self.mask_branch not in MASK_BRANCHES:
            raise ConfigError(f"unknown mask branch {self.mask_branch!r}; use one of {', '.join(MASK_BRANCHES)}")
        if self.mask_branch != "concat" and not self.mask:
            raise ConfigError(f"the {self.mask_branch} mask branch needs a mask condition: --condition mask or "
                              "text+mask")
        for name, p in (("text", self.text_dropout), ("mask", self.mask_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"the {name} dropout must be between 0 and 1, got {p}")

    @classmethod
    def parse(cls, choice: str, text_dropout: float = 0.1, mask_dropout: float = 0.0,
              mask_branch: str = "concat") -> "Conditioning":
        """From ``text``, ``mask`` or ``text+mask`` (a mask-only model always reads the empty caption)."""
        key = choice.strip().lower().replace(" ", "")
        if key == "mask+text":
            key = "text+mask"
        if key not in CHOICES:
            raise ConfigError(f"unknown condition {choice!r}; use one of {', '.join(CHOICES)}")
        text, mask = "text" in key, "mask" in key
        return cls(text, mask, text_dropout if text else 1.0, mask_dropout if mask else 0.0, mask_branch)

    @property
    def name(self) -> str:
        return "+".join(kind for kind, on in (("text", self.text), ("mask", self.mask)) if on)

    def to_config(self, class_ids: Sequence[int]) -> dict[str, Any]:
        """The ``conditioning`` section of a bundle whose label maps have one channel per ``class_ids``."""
        config: dict[str, Any] = {"text": self.text, "text_dropout": self.text_dropout,
                                  "mask_channels": len(class_ids) if self.mask else 0}
        if self.mask:
            config.update(mask_dropout=self.mask_dropout, mask_classes=[int(i) for i in class_ids],
                          label_map=LABEL_MAP_KIND, mask_branch=self.mask_branch)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Conditioning":
        mask = int(config.get("mask_channels", 0)) > 0
        return cls(bool(config.get("text", True)), mask, float(config.get("text_dropout", 0.1)),
                   float(config.get("mask_dropout", 0.0)) if mask else 0.0, config.get("mask_branch", "concat"))

    @property
    def controlnet(self) -> bool:
        """The mask enters through a ControlNet branch on a frozen text UNet."""
        return self.mask and self.mask_branch == "controlnet"

"""histosynth: synthetic renal histology on command.

Cut whole slide images and label masks into captioned patches, train a text-conditioned latent
diffusion model, generate patches and whole synthetic slides, and measure what the synthetic data
is worth.

In Python (see :mod:`histosynth.api`)::

    import histosynth

    model = histosynth.load_model()                  # the shipped text-conditioned model
    images = model.generate(levels="Glomeruli=high", n=2, seed=3)   # RGB PIL images
    histosynth.caption_for_mask(mask)                # a 2-D array of class ids -> its caption

``import histosynth`` stays light: the names below load :mod:`histosynth.api` (and torch, when a
model is loaded) only when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Model",
    "caption_for_levels",
    "caption_for_mask",
    "evaluate_captions",
    "load_model",
    "parse_caption",
    "tile",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (a tenth of the import)
if TYPE_CHECKING:
    from .api import Model, caption_for_levels, caption_for_mask, evaluate_captions, load_model, parse_caption, tile


def __getattr__(name: str) -> object:
    """The public names of :mod:`histosynth.api`, imported on first use."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'histosynth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

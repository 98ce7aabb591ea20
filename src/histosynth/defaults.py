"""The default models that ship inside the package, and where they are.

``histosynth/weights/`` holds::

    ldm/          the text-conditioned latent diffusion model (a model folder, see models.bundle),
                  its provenance (data, commands, steps, wall time, hardware, metrics) in histosynth.json
    ldm/autoencoder/   the KL-f4 autoencoder it was trained with (provenance.json: PSNR / SSIM)
    ldm-mask/     a text+mask latent diffusion model with the same autoencoder (generate --mask)
    segmenter/    the multi-class valid-padding U-Net on the renal schema (segmenter.json)

They are trained on phantom data (and, for the autoencoder, real H&E sample images) by
``scripts/default_models.py`` (``make default-models``). An installation built before they were
trained has no weights; the functions here then raise a :class:`~histosynth.errors.ModelError`
that says how to make them or what to pass instead.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ModelError

LDM = "ldm"
MASK_LDM = "ldm-mask"
SEGMENTER = "segmenter"
AUTOENCODER = "ldm/autoencoder"
#: The file whose presence marks each shipped folder as complete.
_MARKERS = {LDM: "histosynth.json", MASK_LDM: "histosynth.json", SEGMENTER: "segmenter.json",
            AUTOENCODER: "config.json"}
_HOW_TO_MAKE = "train them with `make default-models` (scripts/default_models.py) in a source checkout"


def weights_dir() -> Path:
    """The package's ``weights/`` folder (it may be absent or empty)."""
    return Path(str(resources.files("histosynth"))) / "weights"


def default_bundle_path() -> Path:
    """The shipped latent diffusion model folder (load it with ``models.bundle.load_bundle``)."""
    return _shipped(LDM, "pass --model MODEL_FOLDER")


def default_mask_bundle_path() -> Path:
    """The shipped text+mask latent diffusion model folder (generation from label masks)."""
    return _shipped(MASK_LDM, "pass --model MODEL_FOLDER (a model trained with --condition text+mask)")


def default_autoencoder_path() -> Path:
    """The shipped KL-f4 autoencoder folder (usable as ``histosynth train --autoencoder``)."""
    return _shipped(AUTOENCODER, "pass --autoencoder FOLDER")


def default_segmenter_path() -> Path:
    """The shipped multi-class segmenter folder (load it with ``segment.segmenter.Segmenter.load``)."""
    return _shipped(SEGMENTER, "pass --segmenter FOLDER")


def default_provenance(name: str = LDM) -> dict[str, Any]:
    """The provenance record of a shipped model: ``ldm``, ``ldm-mask``, ``segmenter`` or ``ldm/autoencoder``."""
    folder = _shipped(name, "")
    if name in (LDM, MASK_LDM):
        return json.loads((folder / "histosynth.json").read_text())["provenance"]
    if name == SEGMENTER:
        return json.loads((folder / "segmenter.json").read_text())["provenance"]
    return json.loads((folder / "provenance.json").read_text())


def _shipped(name: str, alternative: str) -> Path:
    if name not in _MARKERS:
        raise ModelError(f"unknown default model {name!r}; choose one of {', '.join(_MARKERS)}")
    folder = weights_dir() / name
    if not (folder / _MARKERS[name]).is_file():
        instead = f", or {alternative}" if alternative else ""
        raise ModelError(f"the default {name} model is not shipped in this installation ({folder} has no "
                         f"{_MARKERS[name]}); {_HOW_TO_MAKE}{instead}")
    return folder

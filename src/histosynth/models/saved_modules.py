"""Networks a user saved to one file: a ``torch.export`` program (``.pt2``) or a TorchScript module.

Both load without the code that defined the network and without trusting a pickle; the toolkit
never downloads one (feature extractors for FID, feature networks for a perceptual loss).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError


def load_saved_module(path: str | Path, role: str, example_name: str) -> nn.Module:
    """The network saved at ``path`` (``.pt2``: ``torch.export.load``; else ``torch.jit.load``), on the CPU.

    A file that is neither is refused in one line naming ``role`` ("a feature extractor") and how to
    save one (as ``example_name``)."""
    path = Path(path)
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path} cannot be loaded as {role} ({detail}); save yours with "
            f"torch.export.save(torch.export.export(model, example), '{example_name}') or as TorchScript"
        ) from None

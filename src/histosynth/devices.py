"""Choosing the torch device: one rule for every command."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA (the GPU of this process's ``LOCAL_RANK`` under torchrun), else MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None

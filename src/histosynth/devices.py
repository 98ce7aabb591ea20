"""Choosing the torch device: one rule for every command."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from .errors import ConfigError


def pick_device(name: str = "auto", process: Optional[int] = None) -> torch.device:
    """``auto``: CUDA, else MPS, else CPU. ``auto`` and ``cuda`` mean this process's GPU (:func:`process_gpu`):
    torchrun's ``LOCAL_RANK``, else ``process`` (e.g. the i of ``--shard i/n``), else the first; it becomes
    the process's current CUDA device, so that whatever asks for plain "cuda" lands there too."""
    if name == "auto":
        if torch.cuda.is_available():
            return _this_process_gpu(process)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return _this_process_gpu(process)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def _this_process_gpu(process: Optional[int]) -> torch.device:
    device = torch.device("cuda", process_gpu(torch.cuda.device_count(), process))
    torch.cuda.set_device(device)
    return device


def process_gpu(gpus: int, process: Optional[int] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """The index of this process's GPU among ``gpus``: torchrun's ``LOCAL_RANK`` (one process per GPU of a
    node), else ``process``, else 0; modulo ``gpus``, so that more processes than GPUs share them in turn."""
    environ = os.environ if environ is None else environ
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.strip().isdigit():
        return int(local_rank) % max(gpus, 1)
    return (process or 0) % max(gpus, 1)

"""The number format networks sample in, and how they are made faster at it.

``fp32`` runs every network in float32 (on CUDA with TF32 matrix products and convolutions allowed:
10-bit mantissas inside the tensor cores, float32 everywhere else). ``bf16`` and ``fp16`` run the UNet
and the decoder under autocast: matrix products and convolutions in the 16-bit format, reductions and
normalisations in float32. What lies between the networks stays float32 whatever the precision: the
latents between steps, the guidance combination, the scheduler's update, the latent-range clamp, the
VQ codebook look-up and the image blending.

* default: bf16 on CUDA devices that support it, else fp32 (:func:`default_precision`);
* fp16 keeps the decoder in fp32: a decoder's activations can exceed fp16's range (65504), as those of
  Stable Diffusion's VAE do, while bf16 has float32's range (:func:`decoder_precision`);
* fp16 on the CPU is refused: CPU autocast supports fp16 poorly, bf16 is its 16-bit format (fast only
  on CPUs with oneDNN's bf16 kernels, :func:`native_bf16`; elsewhere emulated, many times slower than
  fp32); other devices (MPS) sample in fp32.

An image is a function of its seed, its options and the precision on one kind of device: the same
precision gives the same bytes, another precision other bytes (a job records its precision).

:func:`prepare_unet` makes the UNet faster without changing what it computes beyond rounding:
channels-last memory on CUDA (convolutions in NHWC, the tensor cores' layout) and ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Iterator, Optional

import torch

from ..errors import ConfigError

#: the precisions sampling runs in, the default first
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the device types sampling autocasts on (elsewhere it runs in fp32)
AUTOCAST_DEVICES = ("cpu", "cuda")


def check_precision_name(precision: str) -> None:
    """Refuse a precision that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def default_precision(device: torch.device | str) -> str:
    """bf16 on a CUDA device that supports it, else fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has fast bf16 kernels: a CUDA GPU with bf16 support, or a CPU for which oneDNN has
    them (x86 with AVX-512 BW/VL/DQ, or Arm with bf16; elsewhere bf16 is emulated, many times slower than
    fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_precision(precision: Optional[str], device: torch.device | str) -> str:
    """``precision`` (None: the device's default), refused where the device cannot sample in it."""
    device = torch.device(device)
    if precision is None:
        return default_precision(device)
    check_precision_name(precision)
    if device.type not in AUTOCAST_DEVICES and precision != "fp32":
        raise ConfigError(f"{precision} sampling runs on CUDA GPUs and (bf16) on the CPU; on {device.type} use "
                          "--precision fp32")
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("fp16 sampling on the CPU is refused: CPU autocast supports fp16 poorly (few kernels, "
                          "most of them emulated); use --precision bf16 or fp32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{device} ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                          "use --precision fp16 or fp32")
    return precision


def decoder_precision(precision: Optional[str]) -> Optional[str]:
    """The precision the autoencoder's decoder runs in: the sampling precision, but fp32 for fp16."""
    return "fp32" if precision == "fp16" else precision


@contextlib.contextmanager
def network_precision(precision: Optional[str], device: torch.device | str) -> Iterator[None]:
    """The context in which a network runs at ``precision`` on ``device``.

    bf16 / fp16: autocast to that format. fp32: no autocast (not even an enclosing one) and, on CUDA,
    TF32 allowed for matrix products and convolutions (the global switches are restored on leaving).
    None: the caller's context, unchanged (training's own autocast, say).
    A network's output may be 16-bit: callers turn it to float32 (``.float()``) before arithmetic.
    """
    device_type = torch.device(device).type
    if precision is None:
        yield
        return
    if precision != "fp32":
        check_precision_name(precision)
        with torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[precision]):
            yield
        return
    outer = torch.autocast(device_type, enabled=False) if device_type in AUTOCAST_DEVICES else contextlib.nullcontext()
    with outer, _tf32_allowed(device_type == "cuda"):
        yield


@contextlib.contextmanager
def _tf32_allowed(allowed: bool) -> Iterator[None]:
    if not allowed:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def channels_last_input(x: torch.Tensor, precision: Optional[str]) -> torch.Tensor:
    """A network's input (B, C, H, W) in the memory layout its convolutions are fastest in at ``precision``:
    channels-last on CUDA and for bf16 on the CPU (whose bf16 convolutions without bf16 instructions are
    some 20x slower in NCHW), else as it is (fp32 CPU results stay those of NCHW)."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and precision == "bf16"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


# --- faster UNets -------------------------------------------------------------------------------------------
def prepare_unet(unet: torch.nn.Module, device: torch.device | str, compile: bool = False) -> torch.nn.Module:
    """The UNet made faster in place for sampling on ``device``: channels-last on CUDA; with ``compile``,
    compiled by ``torch.compile`` on its first call (refused in one line where no C++ compiler is found)."""
    if torch.device(device).type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if compile:
        check_compiler()
        unet.compile()
    return unet


def check_compiler() -> str:
    """The C++ compiler torch.compile's inductor builds kernels with, as it looks for it: $CXX, else g++
    (clang++ on macOS); refused in one line when it is not on the PATH."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"--compile needs the C++ compiler {name} (torch.compile builds its kernels with $CXX, "
                          "else g++), which is not on the PATH; install it or leave out --compile")
    return found

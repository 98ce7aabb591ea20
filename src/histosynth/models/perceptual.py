"""A perceptual loss from a feature network the user has on disk (never downloaded).

The distance is LPIPS' (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") with equal channel weights: each feature map is normalised to unit length along its channels,
and the squared differences are summed over channels, averaged over positions and the batch, and summed
over the maps. CompVis trains its first stages with LPIPS on VGG16; any network that turns images into
features serves here:

* a ``torch.export`` program (``.pt2``) or a TorchScript file: it takes float images (B, 3, H, W) in
  [-1, 1] and returns a tensor of features, or a tuple / list / dict of them (several layers);
* a timm folder (``config.json`` naming its ``architecture``, and ``model.safetensors`` or
  ``pytorch_model.bin``): the network's feature maps at each reduction (``features_only``); images are
  brought from [-1, 1] to the normalisation its config names;
* a diffusers autoencoder folder (``VQModel`` / ``AutoencoderKL``): the outputs of its encoder's input
  convolution and of each of its down blocks.

The network is frozen (no gradients for its weights) and kept out of training checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .saved_modules import load_saved_module

#: the image a loaded network is tried on before training starts
PROBE_SHAPE = (1, 3, 64, 64)
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_perceptual_network(path: str | Path) -> nn.Module:
    """The frozen feature network at ``path`` (a file or a folder, see the module's docstring), tried once
    on a (1, 3, 64, 64) image; refused in one line when it cannot be loaded or gives no features."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"perceptual network {path} does not exist; give a .pt2 / TorchScript file or a timm or "
                          "diffusers autoencoder folder on disk (none is downloaded)")
    if path.is_dir():
        network = _load_folder(path)
    else:
        network = load_saved_module(path, "a perceptual network", "features.pt2")
    network = _frozen(network)
    _probe(network, path)
    return network


def _frozen(network: nn.Module) -> nn.Module:
    for parameter in network.parameters():  # (a ScriptModule has no requires_grad_)
        parameter.requires_grad_(False)
    try:
        network.eval()
    except (NotImplementedError, RuntimeError):  # exported programs refuse train() / eval() in some torch versions
        pass
    return network


def _load_folder(path: Path) -> nn.Module:
    config_file = path / "config.json"
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "architecture" in config:
        return _timm_features(path, config)
    if config.get("_class_name") in ("VQModel", "AutoencoderKL"):
        from .bundle import load_autoencoder_folder

        return EncoderFeatures(load_autoencoder_folder(path).encoder)
    raise ConfigError(f"{path} is neither a timm folder (config.json with 'architecture') nor a diffusers "
                      "autoencoder folder (config.json of a VQModel / AutoencoderKL); give one of them or a .pt2 / "
                      "TorchScript file")


def _timm_features(path: Path, config: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{path} is a timm folder, and timm is not installed; pip install timm") from None
    weights = next((path / name for name in TIMM_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"{path} is a timm folder without weights ({' or '.join(TIMM_WEIGHTS)})")
    network = timm.create_model(config["architecture"], pretrained=True, features_only=True,
                                pretrained_cfg_overlay={"file": str(weights)})
    settings = config.get("pretrained_cfg", config)
    return Normalised(network, settings.get("mean", (0.485, 0.456, 0.406)), settings.get("std", (0.229, 0.224, 0.225)))


class Normalised(nn.Module):
    """A network that expects images in [0, 1] normalised by ``mean`` / ``std``, fed images in [-1, 1]."""

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor):
        return self.network(((images + 1) / 2 - self.mean) / self.std)


class EncoderFeatures(nn.Module):
    """The feature maps of a diffusers ``Encoder``: after its input convolution and after each down block."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = [self.encoder.conv_in(images)]
        for block in self.encoder.down_blocks:
            features.append(block(features[-1]))
        return features


def feature_maps(output: Any) -> list[torch.Tensor]:
    """A network's output as a list of feature tensors (a tensor, or a tuple / list / dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    raise TypeError(f"it returned {type(output).__name__}, not a tensor or a tuple / list / dict of tensors")


def _probe(network: nn.Module, path: Path) -> None:
    image = torch.zeros(PROBE_SHAPE, requires_grad=True)
    try:
        maps = feature_maps(network(image))
        bad = [tuple(t.shape) for t in maps if t.dim() < 2 or t.shape[0] != 1 or not t.is_floating_point()]
        if bad:
            raise TypeError(f"it returned features of shapes {bad} for one image, not float (1, C, ...) tensors")
        if not any(t.requires_grad for t in maps):
            raise TypeError("its features carry no gradient back to the image")
    except Exception as exc:  # a user's network fails in its own ways; each becomes one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} does not work as a perceptual network on a {PROBE_SHAPE} image in [-1, 1]: "
                          f"{detail}") from None


def perceptual_distance(network: nn.Module, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """The LPIPS-style distance (equal channel weights) between two image batches in [-1, 1]."""
    both = feature_maps(network(torch.cat([images, reconstructions])))
    total = images.new_zeros(())
    for features in both:
        real, fake = _unit_channels(features.float()).chunk(2)
        total = total + (real - fake).pow(2).sum(dim=1).mean()
    return total


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

"""The classic valid-padding U-Net (Ronneberger et al., 2015), with a configurable width.

Two unpadded 3x3 convolutions per level, 2x2 max pooling down, 2x2 transposed convolutions up
(halving the channels), and the encoder's maps centre-cropped onto the decoder's before they are
concatenated. Base width 64 is the classic network; 4-8 channels make a model small enough for
tests and CPUs. Batch normalisation (optional, on by default) makes small models train quickly and
is, in eval mode, a per-pixel affine map — tiling stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .geometry import DEPTH, output_size


def _double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for channels_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(channels_in, out_channels, kernel_size=3, padding=0, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _centre_crop(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (features.shape[-2] - height) // 2
    left = (features.shape[-1] - width) // 2
    return features[..., top:top + height, left:left + width]


class ValidUNet(nn.Module):
    """Logits of shape (B, out_channels, H - 184, W - 184) for a (B, in_channels, H, W) input
    whose sides are valid sizes (see :mod:`histosynth.segment.geometry`)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_channels: int = 64,
                 depth: int = DEPTH, batch_norm: bool = True):
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.down.append(_double_conv(channels, width, batch_norm))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[-2], widths[-1], batch_norm)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(width * 2, width, kernel_size=2, stride=2))
            self.up.append(_double_conv(width * 2, width, batch_norm))
        self.head = nn.Conv2d(base_channels, out_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for side in images.shape[-2:]:
            output_size(side, self.depth)  # a clear error instead of a shape mismatch deep inside
        skips = []
        x = images
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
            x = upsample(x)
            x = block(torch.cat([_centre_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1))
        return self.head(x)

"""The adversarial part of autoencoder training, as CompVis trained its first stages (Esser, Rombach and
Ommer, "Taming Transformers for High-Resolution Image Synthesis"; Rombach et al., "High-Resolution Image
Synthesis with Latent Diffusion Models"): a PatchGAN discriminator (Isola et al., "Image-to-Image
Translation with Conditional Adversarial Networks") that scores overlapping patches real or
reconstructed, trained with a hinge loss.

The generator term ``-mean(D(x_hat))`` enters the autoencoder's loss with an *adaptive* weight: the norm
of the reconstruction loss's gradient at the decoder's last layer over the norm of the generator term's
gradient there (clamped to [0, 1e4], times ``disc_weight``), so the adversarial pull never outweighs
reconstruction however large the discriminator's gradients grow. Before ``disc_start`` both the
generator term and the discriminator loss are zero (CompVis' ``adopt_weight``).

Both networks take one optimiser step per training step from one backward pass: the discriminator
sees the step's reconstructions detached, and the autoencoder's generator term sees the discriminator
with its parameters detached. (CompVis steps the discriminator after the autoencoder, on reconstructions
of the updated autoencoder; one pass keeps a training step one optimiser step, as Lightning counts
them and as DDP expects one backward pass per step.) The discriminator runs in float32 whatever the
training precision: its 4x4 convolutions under bf16 autocast took 13x as long on a CPU without bf16
units (3-layer PatchGAN of 64 channels, 8 patches of 128 px: 7.6 s fp32, 97 s bf16 on 1 busy thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..presets import AutoencoderTrainingConfig

#: CompVis' bounds of the adaptive weight (before ``disc_weight``) and the guard of its denominator
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


class PatchDiscriminator(nn.Sequential):
    """A PatchGAN discriminator (taming-transformers' ``NLayerDiscriminator`` layout): ``layers`` stride-2
    4x4 convolutions doubling the channels (at most 8x ``channels``), one stride-1 convolution, and a
    1-channel 4x4 convolution giving one logit per patch; batch norm after every convolution but the
    first and the last, LeakyReLU(0.2). Weights drawn as DCGAN draws them (N(0, 0.02); norm scales N(1, 0.02))."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(widths[n - 1], widths[n], 4, stride, 1, bias=False), nn.BatchNorm2d(widths[n]),
                       nn.LeakyReLU(0.2, True)]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        super().__init__(*blocks)
        self.apply(_dcgan_init)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(cfg: AutoencoderTrainingConfig, in_channels: int = 3) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 x (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(reconstruction: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``scale`` x ||d reconstruction / d last_layer|| / (||d generator / d last_layer|| + 1e-4), clamped to
    [0, 1e4] before scaling; detached (the weight is a number, not a path for gradients)."""
    reconstruction_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator, last_layer, retain_graph=True)[0]
    ratio = reconstruction_grad.norm() / (generator_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach() * scale


def with_frozen_parameters(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``module(*inputs)`` with its parameters detached: gradients reach the inputs only."""
    frozen = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, frozen, inputs)


@dataclass
class AdversarialTerms:
    """One step's adversarial loss (``total``: what joins the autoencoder's loss) and its parts, for the log."""

    total: torch.Tensor
    generator: torch.Tensor  # -mean D(x_hat), before its weight
    discriminator: torch.Tensor  # the hinge loss
    weight: torch.Tensor  # the adaptive weight of the generator term (0 before disc_start)
    on: bool


class AdversarialLoss(nn.Module):
    """The discriminator and its schedule: :meth:`forward` gives the step's adversarial terms."""

    def __init__(self, discriminator: nn.Module, weight: float, start: int):
        super().__init__()
        self.discriminator = discriminator
        self.weight = weight
        self.start = start

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor, reconstruction_loss: torch.Tensor,
                last_layer: torch.Tensor, step: int) -> AdversarialTerms:
        if step < self.start:
            return self._off()
        with torch.autocast(images.device.type, enabled=False):
            images, reconstructions = images.float(), reconstructions.float()
            generator = -with_frozen_parameters(self.discriminator, reconstructions).mean()
            discriminator = hinge_discriminator_loss(self.discriminator(images.detach()),
                                                     self.discriminator(reconstructions.detach()))
        weight = adaptive_weight(reconstruction_loss, generator, last_layer, self.weight)
        return AdversarialTerms(weight * generator + discriminator, generator.detach(), discriminator.detach(),
                                weight, True)

    def _off(self) -> AdversarialTerms:
        """Zero, with a zero gradient for every discriminator parameter: Adam steps it as CompVis' disc_factor 0
        does, and under DDP every parameter has its gradient each step."""
        zero = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
        nothing = zero.detach()
        return AdversarialTerms(zero, nothing, nothing, nothing, False)

"""The first stage's training as CompVis trained it: a PatchGAN switched on at disc_start, its adaptive weight,
an optional perceptual loss from a user's feature network, and runs that resume exactly with the discriminator."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from histosynth.cli import main
from histosynth.models.discriminator import (
    AdversarialLoss,
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
)
from histosynth.models.perceptual import load_perceptual_network, perceptual_distance

#: torch deprecates TorchScript, and users still have TorchScript feature networks
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

GAN_RUN = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--accelerator", "cpu"]


def test_the_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    """x_hat = W x; reconstruction 0.5 ||x_hat - y||^2 has gradient (x_hat - y) x^T at W, the generator term
    -mean(v . x_hat) has -v x^T / n: the weight is the ratio of their Frobenius norms, times the scale."""
    torch.manual_seed(0)
    x, y, v = torch.randn(3, 1), torch.randn(2, 1), torch.randn(2, 1)
    weight = torch.randn(2, 3, requires_grad=True)
    x_hat = weight @ x
    reconstruction = 0.5 * (x_hat - y).pow(2).sum()
    generator = -(v * x_hat).mean()
    expected = ((x_hat - y) @ x.T).norm() / ((v @ x.T / 2).norm() + 1e-4)
    got = adaptive_weight(reconstruction, generator, weight, scale=0.5)
    assert torch.allclose(got, 0.5 * expected.detach(), rtol=1e-6)
    assert not got.requires_grad
    # a generator term without gradient there: the ratio is capped at 1e4 (times the scale)
    flat = (weight * 0).sum()
    assert float(adaptive_weight(reconstruction, flat, weight, scale=0.5)) == 0.5 * 1e4


class TinyDecoder(nn.Module):
    """A stand-in decoder whose output convolution is the 'last layer'."""

    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(x)


def adversarial_step(loss: AdversarialLoss, decoder: TinyDecoder, images: torch.Tensor, step: int):
    reconstructions = decoder(images)
    reconstruction = (reconstructions - images).abs().mean()
    terms = loss(images, reconstructions, reconstruction, decoder.conv_out.weight, step)
    (reconstruction + terms.total).backward()
    return terms, reconstruction


def test_the_discriminator_is_switched_on_at_disc_start():
    torch.manual_seed(0)
    decoder, discriminator = TinyDecoder(), PatchDiscriminator(channels=8, layers=2)
    loss = AdversarialLoss(discriminator, weight=0.5, start=3)
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    before, _ = adversarial_step(loss, decoder, images, step=2)
    assert not before.on and float(before.total.detach()) == 0.0 and float(before.weight) == 0.0
    # every discriminator parameter has a gradient, all zero (as CompVis' disc_factor 0 gives; DDP needs them)
    assert all(p.grad is not None and not p.grad.any() for p in discriminator.parameters())
    decoder.zero_grad()

    after, reconstruction = adversarial_step(loss, decoder, images, step=3)
    assert after.on
    with torch.no_grad():
        reconstructions = decoder(images)
        real, fake = discriminator(images), discriminator(reconstructions)
    assert torch.allclose(after.discriminator, hinge_discriminator_loss(real, fake), rtol=1e-5)
    assert torch.allclose(after.generator, -fake.mean(), rtol=1e-5)
    assert float(after.weight) > 0
    assert torch.allclose(after.total, after.weight * after.generator + after.discriminator, rtol=1e-5)
    # the discriminator learns from its hinge loss alone: its gradient is that loss's gradient
    hinge = hinge_discriminator_loss(discriminator(images), discriminator(reconstructions))
    expected = torch.autograd.grad(hinge, list(discriminator.parameters()))
    for p, g in zip(discriminator.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(0.375)


class ChannelMeans(nn.Module):
    """A stand-in feature network: two 'layers' (the image and its 2x2 means)."""

    def forward(self, images: torch.Tensor):
        return [images, nn.functional.avg_pool2d(images, 2)]


@pytest.fixture(scope="module")
def scripted_features(tmp_path_factory):
    path = tmp_path_factory.mktemp("perceptual") / "features.pt"
    torch.jit.save(torch.jit.script(ChannelMeans()), str(path))
    return path


def test_a_perceptual_loss_from_a_torchscript_file(scripted_features):
    network = load_perceptual_network(scripted_features)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert float(perceptual_distance(network, images, images)) == 0.0
    other = -images
    # unit-length channel vectors that point opposite: |a - (-a)|^2 = 4 at every position of both layers
    assert float(perceptual_distance(network, images, other)) == pytest.approx(8.0, rel=1e-5)
    assert not any(p.requires_grad for p in network.parameters())


def test_a_run_with_a_perceptual_network_and_a_discriminator_records_both(blob_dataset, scripted_features, tmp_path):
    out = tmp_path / "ae"
    args = ["train-autoencoder", str(blob_dataset.root), "--out", str(out), "--steps", "2", "--disc-start", "1",
            "--disc-weight", "0.25", "--perceptual", str(scripted_features), "--perceptual-weight", "0.5",
            "--checkpoint-every", "2", *GAN_RUN]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perceptual"] == str(scripted_features.resolve())
    assert (metrics["losses"]["disc_start"], metrics["losses"]["disc_weight"],
            metrics["losses"]["perceptual_weight"]) == (1, 0.25, 0.5)
    assert 0.0 <= metrics["two_sample_auc"] <= 1.0
    checkpoint = torch.load(tmp_path / "ae.run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("adversarial.discriminator.") for k in checkpoint["state_dict"])
    assert not any("perceptual" in k for k in checkpoint["state_dict"])
    assert set(checkpoint["replicas"]) == {"autoencoder", "discriminator"}


@pytest.mark.parametrize("content, message", [
    (b"not a network", "cannot be loaded as a perceptual network"),
    (None, "does not exist; give a .pt2 / TorchScript file or a timm or diffusers autoencoder folder"),
])
def test_a_bad_perceptual_file_is_refused_before_anything_is_written(blob_dataset, tmp_path, refused, content,
                                                                    message):
    network = tmp_path / "net.pt"
    if content is not None:
        network.write_bytes(content)
    args = ["train-autoencoder", str(blob_dataset.root), "--out", str(tmp_path / "ae"), "--steps", "1",
            "--perceptual", str(network)]
    line = refused(args)
    assert line.startswith(f"error: {'perceptual network ' if content is None else ''}{network}") and message in line
    assert not (tmp_path / "ae").exists() and not (tmp_path / "ae.run").exists()


def test_a_network_that_gives_no_features_is_refused(tmp_path, refused, blob_dataset):
    class Scalar(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean()

    path = tmp_path / "scalar.pt"
    torch.jit.save(torch.jit.script(Scalar()), str(path))
    line = refused(["train-autoencoder", str(blob_dataset.root), "--out", str(tmp_path / "ae"), "--steps", "1",
                    "--perceptual", str(path)])
    assert line == (f"error: {path} does not work as a perceptual network on a (1, 3, 64, 64) image in [-1, 1]: "
                    "it returned features of shapes [()] for one image, not float (1, C, ...) tensors")


def load_run(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_a_run_with_its_discriminator_resumes_exactly(blob_dataset, tmp_path):
    """Four steps straight, and two steps resumed to four (mid-epoch: 14 patches are 4 steps of 4), the
    discriminator on from step 1: the same weights, discriminator, optimiser state and batch-norm statistics."""
    def args(name: str, steps: int, *extra: str) -> list[str]:
        return ["train-autoencoder", str(blob_dataset.root), "--out", str(tmp_path / name), "--steps", str(steps),
                "--disc-start", "1", "--checkpoint-every", "2", *GAN_RUN, *extra]

    assert main(args("straight", 5)) == 0
    assert main(args("resumed", 3)) == 0
    (tmp_path / "resumed").rename(tmp_path / "first-part")
    assert main(args("resumed", 5, "--resume")) == 0
    straight, resumed = load_run(tmp_path / "straight.run"), load_run(tmp_path / "resumed.run")
    assert straight["global_step"] == resumed["global_step"] == 5
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    assert any(k.startswith("adversarial.discriminator.") for k in straight["state_dict"])
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    optimiser, again = straight["optimizer_states"][0], resumed["optimizer_states"][0]
    assert len(optimiser["param_groups"]) == 2  # the autoencoder's and the discriminator's
    for index, state in optimiser["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again["state"][index][key], state[key]), (index, key)

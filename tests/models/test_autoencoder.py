"""The f4 autoencoders: presets, latent conventions, tiled coding, training losses and metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from skimage.metrics import structural_similarity

from histosynth.models import autoencoder as aem
from histosynth.models.autoencoder import (
    autoencoder_losses,
    build_autoencoder,
    decode_latents,
    decode_latents_tiled,
    encode_latents,
    encode_latents_tiled,
    psnr,
    reconstruction_loss,
    ssim,
    tile_starts,
)
from histosynth.presets import AutoencoderConfig, load_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_ae() -> AutoencoderKL:
    torch.manual_seed(0)
    return build_autoencoder(load_preset("tiny")).eval()


@pytest.fixture(scope="module")
def small_vq() -> VQModel:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind="vq", block_out_channels=(32, 32, 32), layers_per_block=1, num_vq_embeddings=16,
                            latent_scale=0.5)
    return build_autoencoder(cfg).eval()


def images(n: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_presets_build_the_declared_autoencoders():
    tiny, pathldm = load_preset("tiny"), load_preset("pathldm")
    assert isinstance(build_autoencoder(tiny), AutoencoderKL)
    vq = build_autoencoder(pathldm.autoencoder)
    assert isinstance(vq, VQModel)
    assert vq.quantize.embedding.weight.shape == (8192, 3)
    assert list(vq.config.block_out_channels) == [128, 256, 512] and vq.config.scaling_factor == 1.0
    # channel changes at the first block of levels 1 and 2: the convs CompVis calls nin_shortcut
    assert [b.resnets[0].conv_shortcut is not None for b in vq.encoder.down_blocks] == [False, True, True]


@torch.no_grad()
def test_f4_latents_and_decoding_shapes(tiny_ae):
    latents = encode_latents(tiny_ae, images(2, 64))
    assert latents.shape == (2, 3, 16, 16)
    assert decode_latents(tiny_ae, latents).shape == (2, 3, 64, 64)


@torch.no_grad()
def test_vq_latents_are_unquantised_and_scaled_and_decoding_quantises(small_vq):
    x = images()
    raw = small_vq.quant_conv(small_vq.encoder(x))
    latents = encode_latents(small_vq, x)
    assert torch.equal(latents, raw * 0.5)
    quantised, _, _ = small_vq.quantize(raw)
    expected = small_vq.decoder(small_vq.post_quant_conv(quantised))
    assert torch.allclose(decode_latents(small_vq, latents), expected, atol=1e-6)


@torch.no_grad()
def test_kl_latents_are_the_mean_or_a_seeded_sample(tiny_ae):
    x = images()
    mean = encode_latents(tiny_ae, x)
    assert torch.equal(mean, tiny_ae.encode(x).latent_dist.mean)
    a = encode_latents(tiny_ae, x, sample=True, generator=torch.Generator().manual_seed(1))
    b = encode_latents(tiny_ae, x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_tile_starts_cover_with_the_requested_overlap():
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(100, 64, 16) == [0, 36]
    assert tile_starts(160, 64, 16) == [0, 48, 96]
    with pytest.raises(ValueError):
        tile_starts(100, 16, 16)


def test_blending_reassembles_a_local_coder_exactly():
    """With a coder that has no global context, tiles must blend back to the untiled result."""
    z = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    upsample = lambda t: F.interpolate(t, scale_factor=4, mode="nearest")  # noqa: E731
    tiled = aem._tiled(upsample, z, tile=16, overlap=6, out_per_in=4)
    assert torch.allclose(tiled, upsample(z), atol=1e-6)
    downsample = lambda t: F.avg_pool2d(t, 4)  # noqa: E731
    x = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(aem._tiled(downsample, x, tile=32, overlap=8, out_per_in=1 / 4), downsample(x), atol=1e-6)


@torch.no_grad()
def test_tiled_decode_runs_the_decoder_on_tiles_only(tiny_ae):
    seen = []
    hook = tiny_ae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        z = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
        out = decode_latents_tiled(tiny_ae, z, tile=16, overlap=4)
    finally:
        hook.remove()
    assert out.shape == (1, 3, 160, 160) and torch.isfinite(out).all()
    assert seen == [(16, 16)] * 9  # 3 x 3 tiles of 16 latent pixels, never the whole image
    small = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_latents_tiled(tiny_ae, small, tile=16, overlap=4), decode_latents(tiny_ae, small))


@torch.no_grad()
def test_tiled_encode_matches_shape_and_refuses_unaligned_tiles(tiny_ae):
    x = images(1, 96)
    assert encode_latents_tiled(tiny_ae, x, tile=48, overlap=16).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="multiples of the factor 4"):
        encode_latents_tiled(tiny_ae, x, tile=50, overlap=16)


def test_metrics_agree_with_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    x = images(1, 64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert psnr(x, y).item() == pytest.approx(peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=2), abs=1e-4)
    reference = structural_similarity(x[0].numpy(), y[0].numpy(), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=2, channel_axis=0)
    assert ssim(x, y).item() == pytest.approx(reference, abs=0.01)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)


def test_reconstruction_loss_is_l1_plus_ssim_term():
    x = images(2, 32)
    assert reconstruction_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = x * 0.5
    expected = (x - y).abs().mean() + (1 - ssim(x, y))
    assert reconstruction_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("which", ["kl", "vq"])
def test_autoencoder_losses_train_both_kinds(which, tiny_ae, small_vq):
    ae = {"kl": tiny_ae, "vq": small_vq}[which]
    ae.train()
    try:
        x = images(2, 32)
        losses = autoencoder_losses(ae, x, generator=torch.Generator().manual_seed(0))
        losses.total.backward()
        assert losses.images.shape == x.shape
        assert losses.regularisation.item() > 0
        assert ae.encoder.conv_in.weight.grad is not None and ae.decoder.conv_out.weight.grad.abs().sum() > 0
    finally:
        ae.zero_grad(set_to_none=True)
        ae.eval()


@pytest.mark.parametrize("kind", ["kl", "vq", "kl without post_quant_conv"])
def test_a_decoder_fine_tune_trains_the_weights_after_the_latent_only(kind):
    from diffusers import AutoencoderKL, VQModel

    from histosynth.models.autoencoder import freeze_all_but_decoder, is_decoder_weight

    small = dict(block_out_channels=(8,), norm_num_groups=4)
    ae = {"kl": lambda: AutoencoderKL(latent_channels=2, **small),
          "vq": lambda: VQModel(latent_channels=2, num_vq_embeddings=16, **small),
          "kl without post_quant_conv": lambda: AutoencoderKL(latent_channels=2, use_post_quant_conv=False,
                                                              **small)}[kind]()
    freeze_all_but_decoder(ae)
    trained = {name for name, p in ae.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in ae.named_parameters() if is_decoder_weight(name)}
    assert any(name.startswith("decoder.") for name in trained)
    assert not any(name.startswith(("encoder.", "quant_conv.", "quantize.")) for name in trained)

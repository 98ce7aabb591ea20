"""Large images: blended latent windows, streamed tiled decoding, size rules and the seam measure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histosynth.data.torchdata import to_uint8
from histosynth.errors import ConfigError
from histosynth.models.autoencoder import decode_latents_tiled
from histosynth.sample.large import SeamMeter, WindowedUNet, decode_bands, latent_size, seam_score, window_count


@pytest.fixture(scope="module")
def unet(tiny_bundle):
    return tiny_bundle.unet


def _call(model, x, context, t=500):
    with torch.no_grad():
        return model(x, torch.tensor(t), encoder_hidden_states=context).sample


def test_one_window_is_the_unet_itself(unet):
    torch.manual_seed(0)
    x, context = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 384)
    torch.testing.assert_close(_call(WindowedUNet(unet, window=16), x, context), _call(unet, x, context),
                               rtol=0, atol=0)


def test_windows_blend_with_linear_ramps_where_they_overlap(unet):
    """Latent 16 x 28 with 16-wide windows overlapping by 4: columns 0-11 and 16-27 come from one
    window each; in columns 12-15 the two windows mix with ramp weights (3.5, 2.5, 1.5, 0.5)/4 and
    (0.5, 1.5, 2.5, 3.5)/4 (each normalised by their sum of 1)."""
    torch.manual_seed(1)
    x, context = torch.randn(1, 3, 16, 28), torch.randn(1, 5, 384)
    blended = _call(WindowedUNet(unet, window=16, overlap=4, window_batch=3), x, context)
    left = _call(unet, x[..., :16], context)
    right = _call(unet, x[..., 12:], context)
    torch.testing.assert_close(blended[..., :12], left[..., :12], rtol=0, atol=1e-5)
    torch.testing.assert_close(blended[..., 16:], right[..., 4:], rtol=0, atol=1e-5)
    fade_out = torch.tensor([3.5, 2.5, 1.5, 0.5]) / 4
    expected = left[..., 12:16] * fade_out + right[..., :4] * (1 - fade_out)
    torch.testing.assert_close(blended[..., 12:16], expected, rtol=0, atol=1e-5)


def test_window_batch_changes_speed_not_result(unet):
    torch.manual_seed(2)
    x, context = torch.randn(2, 3, 16, 28), torch.randn(2, 5, 384)
    one = WindowedUNet(unet, window=16, overlap=4, window_batch=1)
    many = WindowedUNet(unet, window=16, overlap=4, window_batch=4)
    torch.testing.assert_close(_call(one, x, context), _call(many, x, context), rtol=0, atol=1e-5)
    assert (one.calls, many.calls) == (4, 1)  # 2 windows x 2 batch elements
    assert window_count((16, 28), 16, 4) == 2 and window_count((256, 256), 64, 16) == 25


def test_streamed_decode_equals_whole_tiled_decode(tiny_bundle):
    ae = tiny_bundle.autoencoder
    latents = torch.randn(1, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    bands = list(decode_bands(ae, latents, tile=16, overlap=4))
    with torch.no_grad():
        whole = to_uint8(decode_latents_tiled(ae, latents, tile=16, overlap=4))[0]
    streamed = np.concatenate(bands)
    assert streamed.shape == (160, 144, 3)
    # strips start at latent rows 0, 12 and 24; rows are final once the next strip has started
    assert [len(b) for b in bands] == [48, 48, 64]
    difference = np.abs(streamed.astype(int) - whole)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_sizes_are_refused_not_rounded():
    assert latent_size(1024, factor=4, window=64, unet_factor=8) == (256, 256)
    assert latent_size((96, 128), factor=4, window=16, unet_factor=2) == (24, 32)
    with pytest.raises(ConfigError, match=r"^image size 1001 px must be a multiple of 4 \(the autoencoder's "
                                          r"downsampling factor\); use 1000 or 1004$"):
        latent_size(1001, factor=4, window=64, unet_factor=8)
    with pytest.raises(ConfigError, match=r"^image size 100 px must be a multiple of 32 when smaller than the "
                                          r"model's 256 px patches; use 96 or 128$"):
        latent_size(100, factor=4, window=64, unet_factor=8)


def test_seam_meter_on_a_known_grid():
    """A horizontal ramp of 1 level per pixel, plus a jump of 5 levels at every 4th column boundary."""
    columns = np.arange(12) + 5 * (np.arange(12) // 4)
    image = np.repeat(np.broadcast_to(columns[None, :, None], (8, 12, 1)), 3, axis=2).astype(np.uint8)
    meter = SeamMeter(4).update(image)
    # across columns: 8 rows x 2 grid lines with (1 + 5)^2 * 3 = 108; 8 x 9 other pairs with 3
    # across rows: all zero; rows 4 | 3 is on the grid (12 pairs), 6 x 12 pairs off it
    on = 8 * 2 * 108 / (8 * 2 + 12)
    off = 8 * 9 * 3 / (8 * 9 + 6 * 12)
    assert meter.ratio == pytest.approx(on / off)
    assert meter.score == pytest.approx(on / off)


def test_seam_meter_streams_bands_and_reads_flat_borders_as_seams():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    image[:, 15:17] = 128  # a flat border on the column grid line 16: less energy there
    whole = SeamMeter(16).update(image)
    streamed = SeamMeter(16)
    for top, bottom in [(0, 5), (5, 21), (21, 40), (40, 64)]:
        streamed.update(image[top:bottom])
    assert streamed.ratio == whole.ratio
    assert whole.ratio < 1 and whole.score == pytest.approx(1 / whole.ratio)
    assert math.isnan(seam_score(image[:16, :16], 16))  # no grid line inside one patch

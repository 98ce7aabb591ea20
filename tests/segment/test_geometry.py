"""Geometry of the classic valid-padding U-Net: exact sizes, as in Ronneberger et al. and the thesis."""

from __future__ import annotations

import pytest
import torch

from histosynth.errors import ConfigError
from histosynth.segment.geometry import (
    context_pixels,
    cover_input_size,
    full_cover_plan,
    is_valid_input_size,
    largest_valid_input,
    lost_pixels,
    mirror_padding_for,
    output_size,
    smallest_valid_input,
    thesis_plan,
)
from histosynth.segment.unet import ValidUNet


def test_classic_sizes():
    assert output_size(572) == 388  # the U-Net paper's figure
    assert output_size(428) == 244  # the thesis: 256 px + 2 x 86
    assert lost_pixels() == 184 and context_pixels() == 92
    assert all(output_size(n) == n - 184 for n in range(188, 1200) if is_valid_input_size(n))


def test_valid_sizes_are_16_apart_from_188():
    assert [n for n in range(100, 460) if is_valid_input_size(n)] == [
        188, 204, 220, 236, 252, 268, 284, 300, 316, 332, 348, 364, 380, 396, 412, 428, 444]
    assert smallest_valid_input(1) == 188
    assert largest_valid_input(440) == 428
    assert largest_valid_input(187) is None


def test_invalid_size_names_the_nearest_valid_ones():
    assert not is_valid_input_size(440)  # 256 + 2 x 92: the padding the thesis could not use
    with pytest.raises(ConfigError, match="440 px is not a valid input size.*428 and 444"):
        output_size(440)


def test_mirror_padding_for_256_is_86():
    assert mirror_padding_for(256) == 86
    assert mirror_padding_for(256, max_pad=85) == 78
    assert mirror_padding_for(512) == 86
    assert mirror_padding_for(500) == 92
    with pytest.raises(ConfigError, match="255 px image"):
        mirror_padding_for(255)  # odd sizes never give a valid input


def test_cover_geometry():
    assert cover_input_size(256) == 444  # smallest valid size >= 256 + 184
    assert cover_input_size(64) == 252


def test_thesis_plan_loses_a_12_px_border():
    plan = thesis_plan(256)
    assert (plan.window, plan.output, plan.pad_before, plan.pad_after) == (428, 244, 86, 86)
    assert (plan.keep_from, plan.keep_to, plan.result_size) == (6, 250, 244)
    assert plan.first_pixel(0) == 6


def test_full_cover_plan_tiles_on_a_16_px_grid():
    plan = full_cover_plan(1000, tile=572)
    assert plan.window == 572 and plan.output == 388
    assert plan.starts == (0, 384, 768)  # stride 384: the output rounded down to a multiple of 16
    assert (plan.pad_before, plan.pad_after) == (92, 768 + 572 - 1000 - 92)
    assert plan.first_pixel(2) + plan.output >= 1000
    small = full_cover_plan(64, tile=572)
    assert (small.window, small.starts, small.pad_before, small.pad_after) == (252, (0,), 92, 96)
    with pytest.raises(ConfigError, match="not a valid input size"):
        full_cover_plan(1000, tile=500)
    with pytest.raises(ConfigError, match="188 px tile predicts fewer than 16 px; use tiles of at least 204 px"):
        full_cover_plan(1000, tile=188)


def test_unet_output_shape_and_size_check():
    net = ValidUNet(in_channels=3, out_channels=5, base_channels=2)
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 428, 300)).shape == (1, 5, 244, 116)
        with pytest.raises(ConfigError, match="430 px is not a valid input size"):
            net(torch.zeros(1, 3, 430, 428))


def test_classic_width_has_the_classic_channel_progression():
    net = ValidUNet(out_channels=2, base_channels=64, batch_norm=False)
    widths = [block[0].out_channels for block in net.down] + [net.bottleneck[0].out_channels]
    assert widths == [64, 128, 256, 512, 1024]
    # 23 convolutional layers in total, as in the U-Net paper
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 23

"""Whole-image prediction: mirror padding, tiling and where each output lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histosynth.data.images import list_images
from histosynth.errors import ConfigError, DataError, ModelError
from histosynth.io import write_png_atomic
from histosynth.schema import RENAL
from histosynth.segment.predict import class_mask, images_to_segment, predict_image, predict_images
from histosynth.segment.segmenter import Segmenter


class RedCentre(nn.Module):
    """A 'network' with the U-Net's geometry that marks pixels whose red value is above 127.5:
    each output pixel depends on the input pixel 92 px in, so misplaced windows show at once."""

    depth = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1, 92:-92, 92:-92]


def red_segmenter() -> Segmenter:
    return Segmenter(schema=RENAL, target_class=4, net=RedCentre())


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape, tile", [((300, 170), 252), ((256, 256), 572), ((37, 500), 220)])
def test_full_coverage_predicts_every_pixel_in_place(shape, tile):
    image = random_image(*shape)
    labels = predict_image(red_segmenter(), image, tile=tile, device="cpu")
    assert labels.shape == shape
    np.testing.assert_array_equal(labels, (image[..., 0] > 127.5).astype(np.uint8))


def test_thesis_coverage_is_the_244_px_centre_of_256():
    image = random_image(256, 256)
    labels = predict_image(red_segmenter(), image, coverage="thesis", device="cpu")
    assert labels.shape == (244, 244)
    np.testing.assert_array_equal(labels, (image[6:250, 6:250, 0] > 127.5).astype(np.uint8))


def test_tiling_is_invisible_for_a_real_unet():
    torch.manual_seed(0)
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2, batch_norm=False)
    for module in segmenter.net.modules():  # weights that make the labels vary from pixel to pixel
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
    image = random_image(90, 60, seed=1)
    one_window = predict_image(segmenter, image, tile=572, device="cpu")  # one window covers 90 x 60 px
    tiled = predict_image(segmenter, image, tile=220, device="cpu")  # 36 px outputs on a 32 px stride
    assert len(np.unique(one_window)) >= 2
    np.testing.assert_array_equal(one_window, tiled)


def test_batches_mix_sizes_and_keep_order():
    images = [random_image(64, 64, 1), random_image(100, 80, 2), random_image(64, 64, 3)]
    results = predict_images(red_segmenter(), images, batch_size=2, device="cpu")
    for image, labels in zip(images, results, strict=True):
        np.testing.assert_array_equal(labels, (image[..., 0] > 127.5).astype(np.uint8))


def test_class_mask_from_multiclass_and_binary():
    multi = Segmenter.for_class(RENAL, None, base_channels=2)
    labels = np.array([[4, 5], [4, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(class_mask(multi, labels, "glomeruli"), [[1, 0], [1, 0]])
    binary = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)
    assert class_mask(binary, labels.clip(0, 1), "Glomeruli").tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ModelError, match="cannot segment 'Tubuli'"):
        class_mask(binary, labels, "Tubuli")


def test_grey_image_is_refused():
    with pytest.raises(DataError, match=r"expected an RGB uint8 image \(H, W, 3\)"):
        predict_image(red_segmenter(), np.zeros((64, 64), dtype=np.uint8))


def test_list_images_finds_images_in_folders(tmp_path):
    for name in ("b.png", "a.png"):
        write_png_atomic(tmp_path / name, random_image(8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "b.png"]
    with pytest.raises(DataError, match="does not exist"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images([tmp_path / "empty"])


def test_images_in_sub_folders_are_found_and_their_labels_mirror_the_folders(tmp_path):
    images = tmp_path / "DS" / "images"
    for name in ("s1/a.png", "s1/b.jpg", "s2/a.png", "s2/deeper/c.png", ".hidden/d.png", "s2/.e.png"):
        write_png_atomic(images / name, random_image(8, 8))
    found = images_to_segment([images])
    assert [(str(i.relative_to(images)), str(t)) for i, t in found] == [
        ("s1/a.png", "s1/a.png"), ("s1/b.jpg", "s1/b.png"), ("s2/a.png", "s2/a.png"),
        ("s2/deeper/c.png", "s2/deeper/c.png")]
    # a patch dataset is read through its images/ folder (never its masks/)
    (tmp_path / "DS" / "dataset.json").write_text("{}")
    write_png_atomic(tmp_path / "DS" / "masks" / "s1" / "a.png", np.zeros((8, 8), np.uint8))
    assert images_to_segment([tmp_path / "DS"]) == found
    # the output folder, even inside the searched one, is never segmented again
    write_png_atomic(images / "labels" / "s1" / "a.png", np.zeros((8, 8), np.uint8))
    assert images_to_segment([images], exclude=images / "labels") == found


def test_images_that_would_share_a_label_file_are_refused(tmp_path):
    for folder in ("x", "y"):
        write_png_atomic(tmp_path / folder / "s1" / "a.png", random_image(8, 8))
    with pytest.raises(DataError, match=r"x/s1/a\.png and .*y/s1/a\.png would both be written as s1/a\.png"):
        images_to_segment([tmp_path / "x", tmp_path / "y"])
    write_png_atomic(tmp_path / "a.jpg", random_image(8, 8))
    with pytest.raises(DataError, match=r"would both be written as a\.png"):
        images_to_segment([tmp_path / "a.jpg", tmp_path / "x" / "s1" / "a.png"])
    with pytest.raises(DataError, match=r"missing does not exist"):
        images_to_segment([tmp_path / "missing"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .* found in .*empty or its sub-folders"):
        images_to_segment([tmp_path / "empty"])


@pytest.mark.parametrize("options, message", [
    ({"tile": 0}, "--tile must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"coverage": "most"}, "unknown coverage 'most'"),
])
def test_prediction_options_are_checked_before_any_window_runs(options, message):
    with pytest.raises(ConfigError, match=message):
        predict_images(red_segmenter(), [random_image(8, 8)], **options)

"""Segmentation: the classic valid-padding U-Net, its geometry, training and whole-image prediction; and
segmenters from elsewhere (an exported network, or masks another model predicted) as judges."""

from .external import PredictedMasks, TorchSegmenter, load_segmenter
from .geometry import (
    cover_input_size,
    is_valid_input_size,
    lost_pixels,
    mirror_padding_for,
    output_size,
)
from .predict import class_mask, predict_image, predict_images
from .segmenter import Segmenter
from .training import SegmentTrainConfig, evaluate_segmenter, train_segmenter, train_segmenter_on_dataset

__all__ = [
    "PredictedMasks", "Segmenter", "SegmentTrainConfig", "TorchSegmenter", "class_mask", "cover_input_size",
    "evaluate_segmenter", "is_valid_input_size", "load_segmenter", "lost_pixels", "mirror_padding_for",
    "output_size", "predict_image", "predict_images", "train_segmenter", "train_segmenter_on_dataset",
]

"""Whole-image prediction with a valid-padding U-Net: mirror padding plus tiling.

Two coverages:

* ``full`` (default): the image is mirror-padded by the network's 92 px context (and more at the
  far sides) and cut into windows of at most `tile` px placed on a 16 px grid, so every pixel is
  predicted and the tiling is invisible (the result equals that of one window over the whole image).
* ``thesis``: one window with the largest mirror padding not above 92 px — 86 px for 256 px, 428 px
  in, 244 px out — exactly as the thesis segmented its samples; the result is the centre of the
  image and a 12 px border (6 px per side) is not segmented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from rich.progress import track

from .. import validation
from ..data.dataset import read_image
from ..devices import pick_device
from ..errors import ConfigError, DataError, ModelError
from .geometry import DEPTH, AxisPlan, full_cover_plan, thesis_plan
from .segmenter import Segmenter

Coverage = Literal["full", "thesis"]
COVERAGES: tuple[str, ...] = ("full", "thesis")
#: The classic U-Net's input size: windows for full coverage are at most this large by default.
DEFAULT_TILE = 572


def axis_plan(size: int, coverage: Coverage, tile: int, depth: int) -> AxisPlan:
    if coverage == "full":
        return full_cover_plan(size, tile, depth)
    if coverage == "thesis":
        return thesis_plan(size, depth)
    raise ConfigError(f"unknown coverage {coverage!r}; use one of {', '.join(COVERAGES)}")


def mirror_pad(image: np.ndarray, rows: AxisPlan, cols: AxisPlan) -> np.ndarray:
    """Mirror the image at its edges (edge pixels not repeated) by the plans' paddings."""
    pad = [(rows.pad_before, rows.pad_after), (cols.pad_before, cols.pad_after)]
    pad += [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect")


def image_batch_to_tensor(windows: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) windows -> float32 (B, 3, H, W) in [-1, 1], the segmenter's input range."""
    batch = torch.from_numpy(np.stack(windows)).permute(0, 3, 1, 2)
    return batch.float().div(127.5).sub(1.0)


class _WindowRunner:
    """Collects windows of equal shape into batches, runs them, and writes each output in place."""

    def __init__(self, segmenter: Segmenter, device: torch.device, batch_size: int):
        self.segmenter = segmenter
        self.device = device
        self.batch_size = batch_size
        self.windows: list[np.ndarray] = []
        self.targets: list[tuple[np.ndarray, AxisPlan, int, AxisPlan, int]] = []

    def add(self, window: np.ndarray, result: np.ndarray, rows: AxisPlan, ky: int, cols: AxisPlan, kx: int) -> None:
        if self.windows and self.windows[0].shape != window.shape:
            self.flush()
        self.windows.append(window)
        self.targets.append((result, rows, ky, cols, kx))
        if len(self.windows) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        if not self.windows:
            return
        logits = self.segmenter.net(image_batch_to_tensor(self.windows).to(self.device))
        labels = self.segmenter.ids_from_logits(logits).cpu().numpy()
        for out, (result, rows, ky, cols, kx) in zip(labels, self.targets, strict=True):
            _place(out, result, rows, ky, cols, kx)
        self.windows, self.targets = [], []


def _place(out: np.ndarray, result: np.ndarray, rows: AxisPlan, ky: int, cols: AxisPlan, kx: int) -> None:
    (r0, r1), (wr0, wr1) = _overlap(rows, ky)
    (c0, c1), (wc0, wc1) = _overlap(cols, kx)
    result[r0:r1, c0:c1] = out[wr0:wr1, wc0:wc1]


def _overlap(plan: AxisPlan, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(result range, window-output range) of the image pixels window k predicts and we keep."""
    first = plan.first_pixel(k)
    lo, hi = max(first, plan.keep_from), min(first + plan.output, plan.keep_to)
    return (lo - plan.keep_from, hi - plan.keep_from), (lo - first, hi - first)


def thesis_centre(labels: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """The centre of a whole-image prediction that the thesis' coverage segments (244 px of 256)."""
    rows, cols = (thesis_plan(size, depth) for size in labels.shape[:2])
    return labels[rows.keep_from:rows.keep_to, cols.keep_from:cols.keep_to]


def check_rgb(image: np.ndarray, source: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"{source}: expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def predict_images(segmenter: Segmenter, images: Iterable[np.ndarray], coverage: Coverage = "full",
                   tile: int = DEFAULT_TILE, batch_size: int = 4, device: str = "auto",
                   progress: bool = False, total: int | None = None) -> list[np.ndarray]:
    """Per-pixel labels (schema ids, or 0/1 for a binary segmenter) for RGB uint8 images of any size.

    With ``coverage="full"`` each result has its image's size; with ``"thesis"`` it is the centre
    ``size - 2 * (92 - pad)`` px of each side (244 px of 256).
    """
    check_prediction_options(coverage, tile, batch_size)
    dev = pick_device(device)
    segmenter.net.eval().to(dev)
    depth = segmenter.architecture.depth
    runner = _WindowRunner(segmenter, dev, batch_size)
    results: list[np.ndarray] = []
    items = track(images, description="segmenting", total=total) if progress else images
    for index, image in enumerate(items):
        image = check_rgb(image, f"image {index}")
        rows = axis_plan(image.shape[0], coverage, tile, depth)
        cols = axis_plan(image.shape[1], coverage, tile, depth)
        result = np.zeros((rows.result_size, cols.result_size), dtype=np.uint8)
        results.append(result)
        canvas = mirror_pad(image, rows, cols)
        for ky, y in enumerate(rows.starts):
            for kx, x in enumerate(cols.starts):
                runner.add(canvas[y:y + rows.window, x:x + cols.window], result, rows, ky, cols, kx)
    runner.flush()
    return results


def predict_image(segmenter: Segmenter, image: np.ndarray, **options) -> np.ndarray:
    return predict_images(segmenter, [image], **options)[0]


def class_mask(segmenter: Segmenter, labels: np.ndarray, class_name: str) -> np.ndarray:
    """A 0/1 mask of one class from a segmenter's labels (either mode)."""
    class_id = segmenter.schema.id_of(class_name)
    if segmenter.binary:
        if class_id != segmenter.target_class:
            raise ModelError(
                f"this {segmenter.describe()} cannot segment {class_name!r}; "
                "train a multi-class segmenter or one for that class"
            )
        return labels
    return (labels == class_id).astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    return read_image(Path(path), mode="RGB")


def images_to_segment(paths: Sequence[str | Path], exclude: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(image, label file relative to the output folder) for every image given or found.

    A file gives ``<stem>.png``. A folder is searched with its sub-folders (hidden ones skipped), and
    the label files mirror them: ``FOLDER/slide/a.jpg`` gives ``slide/a.png``. A patch dataset
    (a folder with ``dataset.json``) is searched in its ``images/`` folder, so its per-slide folders
    are mirrored as well. Files under ``exclude`` (the output folder) are never segmented again. Two
    images that would share a label file are an error naming them.
    """
    from ..data.images import IMAGE_SUFFIXES, is_image_file

    skipped = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((given, Path(f"{given.stem}.png")))
        elif given.is_dir():
            folder = given / "images" if (given / "dataset.json").is_file() and (given / "images").is_dir() else given
            for image in _images_below(folder, skipped, is_image_file):
                found.append((image, image.relative_to(folder).with_suffix(".png")))
        else:
            raise DataError(f"{given} does not exist; give images or folders of images")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))} "
                        "or its sub-folders")
    sources: dict[Path, Path] = {}
    for image, target in found:
        if target in sources and sources[target] != image:
            raise DataError(f"{sources[target]} and {image} would both be written as {target}; "
                            "give them in separate runs or rename one")
        sources[target] = image
    return list(dict.fromkeys(found))


def _images_below(folder: Path, skipped: Path | None, is_image) -> list[Path]:
    """Image files in ``folder`` and its sub-folders, sorted, hidden entries and ``skipped`` left out."""
    import os

    images: list[Path] = []
    for root, folders, files in os.walk(folder):
        here = Path(root)
        if skipped is not None and here.resolve() == skipped:
            folders[:] = []
            continue
        folders[:] = sorted(f for f in folders if not f.startswith(".")
                            and (skipped is None or (here / f).resolve() != skipped))
        images.extend(here / f for f in sorted(files) if is_image(here / f))
    return images


def check_prediction_options(coverage: str, tile: int, batch_size: int) -> None:
    """A known coverage, a window size and a batch size of at least 1: before a model is loaded."""
    if coverage not in COVERAGES:
        raise ConfigError(f"unknown coverage {coverage!r}; use one of {', '.join(COVERAGES)}")
    validation.positive_int(tile, "--tile")
    validation.positive_int(batch_size, "--batch-size")

"""`histosynth segment`: train a valid-padding U-Net on a patch dataset, and segment images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .common import (
    DeviceOption,
    ProgressOption,
    SegmenterTraining,
    coverage_option,
    expand_blocks,
    seed_option,
    segment_train_config,
    training_folders,
)

if TYPE_CHECKING:
    from ..segment.segmenter import Segmenter


SegmenterFolders = training_folders(
    "segmenter folder to write", "segmenter folder to fine-tune (same schema, --class and width)",
    dataset_help="patch dataset (with 'train' and 'val' slides)")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Segmentation U-Net: train on a patch dataset, segment images.", no_args_is_help=True)
    group.command("train")(train)
    group.command("predict")(predict)
    app.add_typer(group, name="segment")


@expand_blocks
def train(
    folders: dict = SegmenterFolders,
    training: dict = SegmenterTraining,
    seed: int = seed_option("seed of the initial weights, the batches and the augmentations"),
    progress: bool = ProgressOption,
) -> None:
    """Train a segmenter: CE/BCE + Dice, EarlyStopping on the 'val' slides, best weights kept."""
    from ..segment.training import train_segmenter_on_dataset

    dataset, out, init = folders["dataset"], folders["out"], folders["init"]
    config = segment_train_config(training, init=None if init is None else str(init), seed=seed)
    run = train_segmenter_on_dataset(dataset, out, config, progress=progress)
    best = run.best
    typer.echo(f"trained {run.segmenter.describe()} for {len(run.history)} epochs in {run.seconds:.0f} s; "
               f"best epoch {best['epoch']}: val loss {best['val_loss']:.4f}, Dice {best['val_dice']:.4f}")
    for split, evaluation in run.record["evaluation"].items():
        per_class = ", ".join(
            f"{_label_name(run.segmenter, label)} {c['dice']:.3f}"
            for label, c in evaluation["classes"].items() if c["pixel_share"] > 0
        )
        typer.echo(f"{split} Dice (whole patches): mean {evaluation['mean_dice']:.4f} ({per_class})")
    typer.echo(f"wrote {out}")


def _label_name(segmenter: Segmenter, label: int) -> str:
    return segmenter.schema.name_of(segmenter.target_class if segmenter.binary else label)


def predict(
    images: list[Path] = typer.Argument(..., help="images, folders of images (searched with their sub-folders) "
                                        "or patch datasets"),
    segmenter: Path = typer.Option(..., "--segmenter", help="segmenter folder, or a TorchScript (.pt) / torch.export "
                                   "(.pt2) file with its JSON (<file>.json or --segmenter-config)"),
    segmenter_config: Optional[Path] = typer.Option(None, "--segmenter-config", help="JSON of an exported "
                                                    "--segmenter network (default: <file>.json beside it)"),
    out: Path = typer.Option(..., "--out", help="folder for the label PNGs"),
    class_name: Optional[str] = typer.Option(None, "--class", help="write a 0/1 mask of this class only"),
    coverage: str = coverage_option("full"),
    tile: int = typer.Option(572, "--tile", help="largest network window in px (a valid size)"),
    batch_size: int = typer.Option(4, "--batch-size"),
    device: str = DeviceOption,
    preview: bool = typer.Option(False, "--preview", help="also write colour pictures of the labels"),
    progress: bool = ProgressOption,
) -> None:
    """Segment images of any size; writes one label PNG (schema ids, or 0/1) per image, in sub-folders
    mirroring those of the images."""
    from ..io import write_png_atomic
    from ..segment.external import TorchSegmenter, load_segmenter
    from ..segment.predict import check_prediction_options, class_mask, images_to_segment, predict_images, read_rgb

    check_prediction_options(coverage, tile, batch_size)
    found = images_to_segment(images, exclude=out)
    paths = [image for image, _ in found]
    model = load_segmenter(segmenter, segmenter_config)
    if class_name is not None:
        model.schema.id_of(class_name)
    pictures = (read_rgb(p) for p in paths)
    if isinstance(model, TorchSegmenter):  # whole images in one window each: --tile does not apply
        labels_iter = model.predict(pictures, coverage, batch_size=batch_size, device=device, progress=progress)
    else:
        labels_iter = predict_images(model, pictures, coverage=coverage, tile=tile, batch_size=batch_size,
                                     device=device, progress=progress, total=len(paths))
    for (_, target), labels in zip(found, labels_iter, strict=True):
        if class_name is not None:
            labels = class_mask(model, labels, class_name)
        write_png_atomic(out / target, labels)
        if preview:
            binary = class_name is not None or model.binary
            picture = labels * 255 if binary else model.schema.colorize(labels)
            write_png_atomic(out / "preview" / target, picture.astype("uint8"))
    typer.echo(f"segmented {len(paths)} images with the {model.describe()} into {out}")

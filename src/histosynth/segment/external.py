"""Segmenters from elsewhere: your own model as the judge of an evaluation.

The thesis judged its generated images with one segmentation model; an evaluation here can be judged
by any of three:

* a histosynth segmenter folder (:class:`~histosynth.segment.segmenter.Segmenter`);
* a network saved with TorchScript (``.pt``, ``.pth``, ``.ts``) or ``torch.export`` (``.pt2``), with a
  small JSON file beside it (``<file>.json``) that says how to feed it (:class:`TorchSegmenter`)::

      {"class_ids": [0, 1, 2, 3, 4, 5, 6, 7],      output channel k -> class id of the schema
       "normalisation": "[-1,1]",                  or "[0,1]", or {"mean": [..3], "std": [..3]} on [0, 1] values
       "padding": {"mode": "reflect", "px": 92},   added on every side (modes: reflect, edge, constant)
       "input_size": 300,                          optional: pad the bottom and right edges up to this side length
       "schema": "renal"}                          optional: a schema name, a YAML path or the schema itself

  The network takes a float (B, 3, H, W) batch and returns (B, C, h, w) logits centred on its input
  (same-size outputs as well as the smaller ones of valid convolutions); the class of a pixel is
  that of its largest logit;
* label PNGs another model predicted (:class:`PredictedMasks`), one per image, named like it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from ..data.dataset import read_image
from ..devices import pick_device
from ..errors import ConfigError, DataError, ModelError
from ..schema import ClassSchema, load_schema
from .predict import check_rgb, thesis_centre
from .segmenter import Segmenter, check_same_classes

#: Suffixes of TorchScript files, and that of torch.export programs.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
EXPORT_SUFFIX = ".pt2"
PAD_MODES = ("reflect", "edge", "constant")
#: Normalisations by name: (mean, std) applied to RGB values scaled to [0, 1].
NAMED_NORMALISATIONS = {"[0,1]": (0.0, 1.0), "[-1,1]": (0.5, 0.5)}


@dataclass(frozen=True)
class InputSpec:
    """How a network wants its images: normalisation, padding, input size, and what its channels mean."""

    class_ids: tuple[int, ...]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad: int = 0
    pad_mode: str = "reflect"
    input_size: int | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "InputSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object with 'class_ids', 'normalisation' and 'padding'")
        ids = data.get("class_ids")
        if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) and 0 <= i < 256 for i in ids):
            raise ConfigError(f"{source}: 'class_ids' must list the class id (0-255) of each output channel, "
                              f"at least 2; got {ids!r}")
        mean, std = _normalisation(data.get("normalisation", "[-1,1]"), source)
        pad, mode = _padding(data.get("padding", {"px": 0}), source)
        size = data.get("input_size")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"{source}: 'input_size' must be a positive number of pixels or null; got {size!r}")
        return cls(tuple(ids), mean, std, pad, mode, size)

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Padded, normalised (B, 3, H, W) float32 input of images of one size."""
        h, w = images[0].shape[:2]
        extra = self._extra(h), self._extra(w)
        pad = [(self.pad, self.pad + extra[0]), (self.pad, self.pad + extra[1]), (0, 0)]
        padded = np.stack([np.pad(img, pad, mode=self.pad_mode) for img in images])
        batch = torch.from_numpy(padded).permute(0, 3, 1, 2).float().div(255.0)
        mean, std = torch.tensor(self.mean)[None, :, None, None], torch.tensor(self.std)[None, :, None, None]
        return (batch - mean) / std

    def _extra(self, side: int) -> int:
        if self.input_size is None:
            return 0
        extra = self.input_size - side - 2 * self.pad
        if extra < 0:
            raise DataError(f"a {side} px image with {self.pad} px padding per side does not fit the network's "
                            f"input size of {self.input_size} px; use smaller images or raise 'input_size'")
        return extra

    def labels(self, logits: torch.Tensor, shape: tuple[int, int], source: str) -> np.ndarray:
        """(B, C, h, w) logits -> (B, H, W) class ids of the image pixels (the output centred on the input)."""
        if logits.ndim != 4 or logits.shape[1] != len(self.class_ids):
            raise ModelError(f"{source} returned {tuple(logits.shape)}, not (batch, {len(self.class_ids)}, height, "
                             f"width) logits for the {len(self.class_ids)} 'class_ids' of its JSON")
        lut = torch.tensor(self.class_ids, dtype=torch.uint8)
        ids = lut[logits.argmax(dim=1).cpu()]
        (top, bottom), (left, right) = (self._window(size, out, given, source) for size, out, given in
                                        zip(shape, logits.shape[2:], self._inputs(shape), strict=True))
        return ids[:, top:bottom, left:right].numpy()

    def _inputs(self, shape: tuple[int, int]) -> tuple[int, int]:
        return tuple(size + 2 * self.pad + self._extra(size) for size in shape)  # type: ignore[return-value]

    def _window(self, size: int, out: int, given: int, source: str) -> tuple[int, int]:
        """Output rows (or columns) of the image's pixels: image pixel 0 is output pixel pad - (in - out) / 2."""
        start = self.pad - (given - out) // 2
        if (given - out) % 2 or start < 0 or start + size > out:
            raise ModelError(f"{source}: a {given} px input gave a {out} px output that does not cover the {size} px "
                             f"image with {self.pad} px padding; raise 'padding' in its JSON to the context the "
                             "network loses per side")
        return start, start + size


def _normalisation(value: Any, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(value, str) and value.replace(" ", "") in NAMED_NORMALISATIONS:
        mean, std = NAMED_NORMALISATIONS[value.replace(" ", "")]
        return (mean,) * 3, (std,) * 3
    if isinstance(value, dict) and all(_three_numbers(value.get(k)) for k in ("mean", "std")) \
            and all(s > 0 for s in value["std"]):
        return tuple(map(float, value["mean"])), tuple(map(float, value["std"]))
    raise ConfigError(f"{source}: 'normalisation' must be \"[0,1]\", \"[-1,1]\" or {{\"mean\": [r, g, b], \"std\": "
                      f"[r, g, b]}} (std > 0, on RGB values in [0, 1]); got {value!r}")


def _three_numbers(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)


def _padding(value: Any, source: str) -> tuple[int, str]:
    if isinstance(value, int):
        value = {"px": value}
    if isinstance(value, dict):
        px, mode = value.get("px", 0), value.get("mode", "reflect")
        if isinstance(px, int) and px >= 0 and mode in PAD_MODES:
            return px, mode
    raise ConfigError(f"{source}: 'padding' must be {{\"mode\": one of {', '.join(PAD_MODES)}, \"px\": pixels per "
                      f"side}}; got {value!r}")


def config_path_of(model: Path) -> Path:
    """The JSON beside an exported network: ``<file>.json`` (e.g. ``unet.pt.json``)."""
    return model.with_name(model.name + ".json")


@dataclass
class TorchSegmenter:
    """A TorchScript or torch.export network with the JSON that says how to feed it."""

    path: Path
    net: Callable[[torch.Tensor], Any]
    spec: InputSpec
    schema: ClassSchema
    binary = False

    @classmethod
    def load(cls, path: str | Path, config: str | Path | None = None) -> "TorchSegmenter":
        path = Path(path)
        config = Path(config) if config is not None else config_path_of(path)
        spec, schema = read_spec(config)
        unknown = sorted(set(spec.class_ids) - set(schema.ids))
        if unknown:
            raise ConfigError(f"{config}: 'class_ids' {unknown} are not in schema '{schema.name}' (ids {schema.ids})")
        return cls(path, _load_network(path), spec, schema)

    def describe(self) -> str:
        kind = "torch.export" if self.path.suffix == EXPORT_SUFFIX else "TorchScript"
        return f"{kind} segmenter {self.path.name} on schema '{self.schema.name}'"

    def check_schema(self, schema: ClassSchema, what: str) -> None:
        check_same_classes(self.schema, schema, what)

    def predict(self, images: Iterable[np.ndarray], coverage: str = "full", batch_size: int = 8,
                device: str = "auto", progress: bool = False) -> list[np.ndarray]:
        """Class ids of every pixel of RGB uint8 images (run in batches of one size); with the thesis' coverage
        only the centre the thesis segmented (244 px of 256)."""
        from rich.progress import track

        dev = pick_device(device)
        net = _on_device(self.net, dev)
        results: list[np.ndarray] = []
        batches = _batches_of_one_size((check_rgb(img, f"image {i}") for i, img in enumerate(images)), batch_size)
        for batch in track(batches, description="segmenting", disable=not progress):
            with torch.inference_mode():
                logits = net(self.spec.batch(batch).to(dev))
            if not isinstance(logits, torch.Tensor):
                raise ModelError(f"{self.path} returned {type(logits).__name__}, not a tensor of logits")
            results.extend(self.spec.labels(logits.float(), batch[0].shape[:2], str(self.path)))
        return [thesis_centre(m) for m in results] if coverage == "thesis" else results


def read_spec(config: Path) -> tuple[InputSpec, ClassSchema]:
    """The input specification and class schema of an exported network's JSON."""
    if not config.is_file():
        raise ConfigError(f"{config} is missing: an exported segmenter needs a JSON beside it (or --segmenter-config) "
                          "with 'class_ids', 'normalisation' and 'padding'")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config} is not valid JSON ({exc})") from None
    spec = InputSpec.from_dict(data, str(config))
    schema = data.get("schema")
    if isinstance(schema, dict):
        return spec, ClassSchema.from_dict(schema, source=str(config))
    return spec, load_schema(schema)


def _load_network(path: Path) -> Callable[[torch.Tensor], Any]:
    exported = path.suffix == EXPORT_SUFFIX
    try:
        if exported:
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} cannot be loaded as a {'torch.export' if exported else 'TorchScript'} network "
                         f"({reason}); save the network itself (not its weights) with torch.jit.save or "
                         "torch.export.save") from None


def _on_device(net: Callable[[torch.Tensor], Any], device: torch.device) -> Callable[[torch.Tensor], Any]:
    return net.to(device) if isinstance(net, torch.nn.Module) else net


def _batches_of_one_size(images: Iterable[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for image in images:
        if batch and (len(batch) >= batch_size or batch[0].shape != image.shape):
            yield batch
            batch = []
        batch.append(image)
    if batch:
        yield batch


@dataclass(frozen=True)
class PredictedMasks:
    """Label PNGs that another model predicted, one per image, holding class ids of ``schema``.

    The mask of an image is found by its path below the evaluated folder: ``DIR/00000/00000.png`` for
    ``IMAGES/00000/00000.png`` (as ``histosynth segment predict IMAGES --out DIR`` writes them), else
    the shorter tails of that path down to ``DIR/00000.png`` (a flat folder).
    """

    folder: Path
    schema: ClassSchema
    binary = False

    def describe(self) -> str:
        return f"masks predicted by another model, read from {self.folder} (schema '{self.schema.name}')"

    def check_schema(self, schema: ClassSchema, what: str) -> None:
        check_same_classes(self.schema, schema, what)

    def check(self) -> None:
        if not self.folder.is_dir():
            raise DataError(f"--predicted-masks {self.folder} is not a folder; give the folder of label PNGs "
                            "your model predicted for the images")

    def mask_path(self, image: Path, root: Path | None = None) -> Path:
        """The predicted mask of an image (its path relative to ``root``, else its name)."""
        try:
            relative = image.relative_to(root) if root is not None else Path(image.name)
        except ValueError:
            relative = Path(image.name)
        parts = relative.with_suffix(".png").parts
        tried = [self.folder.joinpath(*parts[k:]) for k in range(len(parts))]
        found = next((path for path in tried if path.is_file()), None)
        if found is None:
            raise DataError(f"no predicted mask for {image} in {self.folder} (looked for "
                            f"{', '.join(str(p.relative_to(self.folder)) for p in tried)}); predict one per image, "
                            "named like it")
        return found

    def read(self, path: Path, image: np.ndarray, image_path: Path) -> np.ndarray:
        """A predicted mask checked against its image's size and the schema's ids."""
        mask = read_image(path, mode=None)
        if mask.ndim != 2:
            raise DataError(f"{path} is not a label mask (one channel of class ids) but {mask.shape}; write the "
                            "class id of each pixel as a grey-level PNG")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{path} is {mask.shape[0]}x{mask.shape[1]} px but its image {image_path} is "
                            f"{image.shape[0]}x{image.shape[1]} px; predict masks at the images' size")
        self.schema.check_mask(mask, str(path))
        return mask.astype(np.uint8)

    def function(self, images: Sequence[Path], root: Path | None = None, coverage: str = "full"):
        """The masks of ``images`` (in this order) as a function of the images read from them.

        With the thesis' coverage only the centre the thesis segmented is kept (244 px of 256).
        """
        paths = [self.mask_path(image, root) for image in images]  # every mask is found before anything is read

        def segment(pictures: Sequence[np.ndarray]) -> list[np.ndarray]:
            if len(pictures) != len(paths):
                raise ValueError(f"{len(pictures)} images but {len(paths)} predicted masks")
            masks = [self.read(path, picture, image) for path, picture, image in zip(paths, pictures, images,
                                                                                        strict=True)]
            return [thesis_centre(m) for m in masks] if coverage == "thesis" else masks

        return segment


AnySegmenter = Union[Segmenter, TorchSegmenter, PredictedMasks]


def is_exported_network(path: Path) -> bool:
    return path.suffix in (*TORCHSCRIPT_SUFFIXES, EXPORT_SUFFIX)


def load_segmenter(path: str | Path, config: str | Path | None = None) -> Segmenter | TorchSegmenter:
    """A segmenter folder, or an exported network (by its suffix) with its JSON (``config``, else beside it)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist; give a segmenter folder or a TorchScript (.pt) / torch.export "
                         "(.pt2) file")
    if path.is_dir():
        if config is not None:
            raise ConfigError("--segmenter-config is for an exported network (.pt, .pt2); a segmenter folder holds "
                              "its own segmenter.json")
        return Segmenter.load(path)
    if not is_exported_network(path):
        raise ModelError(f"{path} is neither a segmenter folder nor an exported network "
                         f"({', '.join((*TORCHSCRIPT_SUFFIXES, EXPORT_SUFFIX))})")
    return TorchSegmenter.load(path, config)

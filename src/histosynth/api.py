"""The Python interface: what the commands do, as functions for notebooks and scripts.

``import histosynth`` exposes these names (see ``histosynth.__all__``) and loads this module, and
with it torch, only when one of them is first used. Everything here calls the functions the
commands call, so the results are the commands' results:

* :func:`load_model` and :meth:`Model.generate` make the images ``histosynth generate`` writes with
  the same settings, pixel for pixel (the same generation job, kept in memory);
* :func:`caption_for_mask` and :func:`parse_caption` are ``histosynth caption MASK`` and
  ``histosynth caption --parse``;
* :func:`tile` is ``histosynth tile``;
* :func:`evaluate_captions` is the measurement of ``histosynth evaluate captions`` (thesis Table 5.1).

Images are ``PIL.Image.Image`` in mode RGB (``np.asarray(image)``: uint8 (H, W, 3), 0-255); masks
are 2-D arrays of class ids of the schema (uint8 after reading). Errors are the project's
(:mod:`histosynth.errors`), with a message that says what is wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .captions import UNCONDITIONAL_CAPTION, canonical_caption
from .errors import ConfigError, DataError
from .schema import ClassSchema, load_schema

if TYPE_CHECKING:
    from .data.tiling import TilingResult
    from .evaluate.caption_accuracy import CaptionAccuracy
    from .models.bundle import Bundle

#: A label mask: a 2-D integer array (H, W) of class ids, a single-channel PIL image, or a mask file's path.
MaskLike = Union[np.ndarray, Image.Image, str, Path]
#: One file's path, or several.
Paths = Union[str, Path, Sequence[Union[str, Path]]]
#: A class schema: a ClassSchema, a name ('renal') or a schema YAML path; None is the renal schema.
SchemaLike = Union[ClassSchema, str, Path, None]


# --- captions -------------------------------------------------------------------------------------------
def caption_for_mask(mask: MaskLike, schema: SchemaLike = None) -> str:
    """The caption of a label mask (thesis §4.1.4): the level of each class's pixel share, one sentence per line.

    ``mask`` is a 2-D array (H, W) of whole class ids (any unsigned or signed integer dtype, ids >= 0), a
    single-channel PIL image of ids, or a mask file's path; the schema's remapping applies, as when
    ``histosynth caption MASK.png`` reads it. An id outside the schema, or any other dtype or shape, is a
    :class:`~histosynth.errors.DataError`.
    """
    from .captions import caption_for_mask as caption_of

    chosen = load_schema(schema)
    return caption_of(as_mask(mask, chosen), chosen)


def parse_caption(text: str, schema: SchemaLike = None) -> dict[str, str]:
    """The level each captioned class has in a caption: ``{"Glomeruli": "high", "Tubuli": "none", ...}``.

    Levels are ``none``, ``low``, ``medium``, ``high``; a class the caption does not mention is ``none``.
    Sentences may be separated by newlines or spaces. An unknown sentence, class or level is a
    :class:`~histosynth.errors.CaptionError` quoting it. ``caption_for_levels(parse_caption(c))`` is
    ``c`` in canonical form.
    """
    from .captions import parse_caption as levels_of

    return {name: level.value for name, level in levels_of(text, load_schema(schema)).items()}


def caption_for_levels(levels: Union[str, Mapping[str, str]], schema: SchemaLike = None) -> str:
    """The caption of class levels, given as ``"Glomeruli=high,Tubuli=medium"`` or a mapping of class name to
    level (``none``, ``low``, ``medium``, ``high``); classes not given are ``none``. An unknown class or
    level is a :class:`~histosynth.errors.CaptionError`."""
    from .captions import caption_for_levels as caption_of

    return caption_of(levels, load_schema(schema))


def as_mask(mask: MaskLike, schema: ClassSchema, source: str = "mask") -> np.ndarray:
    """A label mask as a 2-D uint8 array of the schema's class ids (remapped and checked)."""
    from .data.masks import read_mask

    if isinstance(mask, (str, Path)):
        return read_mask(mask, schema)
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise DataError(f"{source}: a label mask must be a single-channel image of class ids, got mode "
                            f"{mask.mode}; convert it to mode L")
        mask = np.array(mask)
    if not isinstance(mask, np.ndarray):
        raise DataError(f"{source}: expected a 2-D numpy array of class ids, a PIL image or a path, "
                        f"got {type(mask).__name__}")
    return schema.apply_remap(mask, source=source)


def conditioning_masks(given: Union[MaskLike, Sequence[MaskLike]], schema: ClassSchema) -> list:
    """Conditioning masks (:class:`~histosynth.sample.masks.ConditioningMask`) from one mask or a list: an
    array or PIL image is one mask; a path is a mask file or a folder of them, read as ``--mask`` reads it."""
    from .sample.masks import ConditioningMask, read_masks

    masks = []
    for index, mask in enumerate(given if isinstance(given, (list, tuple)) else [given]):
        if isinstance(mask, (str, Path)):
            masks += read_masks(mask, schema)
        else:
            masks.append(ConditioningMask(f"mask {index}", as_mask(mask, schema, f"mask {index}")))
    return masks


# --- generation -----------------------------------------------------------------------------------------
def load_model(path: Union[str, Path, None] = None, device: str = "auto", *, masks: bool = False) -> "Model":
    """A latent diffusion model folder, loaded for generation (``histosynth generate --model``).

    ``path`` None loads a model shipped with histosynth: the text-conditioned one, or with ``masks`` the
    text+mask one (as ``histosynth generate --mask`` does). ``device`` is ``auto`` (a GPU if there is one,
    else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. A folder that is not a model is a
    :class:`~histosynth.errors.ModelError`.
    """
    from .defaults import default_bundle_path, default_mask_bundle_path
    from .devices import pick_device
    from .models.bundle import load_bundle
    from .sample.generate import prepare_for_sampling

    if path is not None:
        folder = Path(path)
    else:
        folder = default_mask_bundle_path() if masks else default_bundle_path()
    bundle = load_bundle(folder, pick_device(device))
    prepare_for_sampling(bundle)
    return Model(bundle)


@dataclass(repr=False)
class Model:
    """A loaded latent diffusion model (see :func:`load_model`); ``bundle`` is the underlying model folder."""

    bundle: "Bundle"

    def __repr__(self) -> str:
        return f"Model({str(self.bundle.path)!r}, device={str(self.bundle.device)!r})"

    @property
    def schema(self) -> ClassSchema:
        """The class schema the model's captions and masks use."""
        return self.bundle.schema

    @property
    def image_size(self) -> int:
        """The side of the model's patches in px (the default image size)."""
        return self.bundle.image_size

    @property
    def mask_conditioned(self) -> bool:
        """Whether the model also takes a label mask per image."""
        return bool(self.bundle.mask_channels)

    def caption_for_levels(self, levels: Union[str, Mapping[str, str]]) -> str:
        """:func:`caption_for_levels` in the model's schema."""
        return caption_for_levels(levels, self.schema)

    def generate(
        self,
        caption: Optional[str] = None,
        levels: Union[str, Mapping[str, str], None] = None,
        mask: Union[MaskLike, Sequence[MaskLike], None] = None,
        n: Optional[int] = None,
        seed: int = 0,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        *,
        mask_guidance: Optional[float] = None,
        scheduler: Optional[str] = None,
        eta: Optional[float] = None,
        precision: Optional[str] = None,
        size: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> list[Image.Image]:
        """Images of a caption (or class levels) and/or label masks: RGB PIL images of ``size`` x ``size`` px
        (default: the model's patch size; from masks: the masks' size).

        The images are those ``histosynth generate`` writes with the same options (``--caption``,
        ``--levels``, ``--mask``, ``--n``, ``--seed``, ``--steps``, ``--guidance``, ...), pixel for pixel
        on the same kind of device: image i has the seed derived from (``seed``, i), and the batches of
        ``batch_size`` (default 8) are the job's.

        Give one of ``caption`` (the schema's sentences, newline or space separated) or ``levels``
        (``"Glomeruli=high"`` or a mapping); with ``mask`` both may be left out (the unconditional
        caption). ``mask`` (a mask-conditioned model) is one label mask (see :func:`caption_for_mask`), a
        folder of mask files, or a list of them: one image per mask, ``n`` of them drawn with ``seed``
        (default: all).
        Without masks ``n`` defaults to 1. ``seed`` is 0 .. 2**32 - 1. ``steps``, ``guidance``
        (classifier-free scale of the text; 1 = none), ``mask_guidance``, ``scheduler`` (``ddim`` or
        ``dpm++``), ``eta`` (0 .. 1) and ``precision`` (``fp32``, ``bf16``, ``fp16``) default to the
        model's own (``precision``: the device's).
        """
        from .sample.generate import check_seeds
        from .sample.jobs import DEFAULT_BATCH_SIZE, job_in_memory
        from .sample.masks import choose_masks

        check_seeds([seed], "seed")
        bundle = self.bundle
        options = bundle.sampling.overridden(steps=steps, guidance=guidance, mask_guidance=mask_guidance,
                                             scheduler=scheduler, eta=eta, precision=precision)
        masks = None if mask is None else choose_masks(conditioning_masks(mask, self.schema), n, seed)
        captions = [self._caption(caption, levels, required=masks is None)]
        count = None if masks is not None else (1 if n is None else n)
        batches = job_in_memory(bundle, captions, count, seed, options, size,
                                DEFAULT_BATCH_SIZE if batch_size is None else batch_size, masks)
        return [Image.fromarray(image) for _, made in batches for image in made.images]

    def _caption(self, caption: Optional[str], levels: Union[str, Mapping[str, str], None], required: bool) -> str:
        if caption is not None and levels is not None:
            raise ConfigError("give either caption or levels, not both")
        if caption is not None:
            return canonical_caption(caption, self.schema)
        if levels is not None:
            return self.caption_for_levels(levels)
        if required:
            raise ConfigError("give a caption or levels (or a mask, to a mask-conditioned model)")
        return UNCONDITIONAL_CAPTION


# --- data -----------------------------------------------------------------------------------------------
def tile(
    slides: Paths,
    out: Union[str, Path],
    masks: Optional[Paths] = None,
    mpp: float = 0.5,
    size: int = 256,
    *,
    annotations: Optional[Paths] = None,
    min_tissue: float = 0.5,
    schema: SchemaLike = None,
    progress: bool = False,
    workers: Optional[int] = None,
) -> "TilingResult":
    """Cut whole slide images into a patch dataset at ``out`` (``histosynth tile``); re-runs skip finished slides.

    ``slides`` is one slide file's path or a list of them (SVS, TIFF, NDPI, MRXS, ...); ``masks`` (label-mask
    slides) or ``annotations`` (QuPath GeoJSON / ASAP XML) give each slide's labels, one per slide in order.
    Patches are ``size`` x ``size`` px at ``mpp`` µm/px; those with a tissue share below ``min_tissue``
    (0 .. 1) are dropped. Returns the per-slide patch counts and the dataset
    (``result.dataset``, a :class:`~histosynth.data.dataset.PatchDataset`).
    """
    from .data.tiling import SlideInput, TilingOptions, one_per_slide, tile_slides

    paths = _paths(slides)
    masks_of = one_per_slide(_paths(masks), paths, "masks")
    annotations_of = one_per_slide(_paths(annotations), paths, "annotations")
    inputs = [SlideInput(slide, mask=m, annotations=a)
              for slide, m, a in zip(paths, masks_of, annotations_of, strict=True)]
    return tile_slides(inputs, out, load_schema(schema), TilingOptions(mpp=mpp, size=size, min_tissue=min_tissue),
                       progress=progress, workers=workers)


def _paths(given: Optional[Paths]) -> list[Path]:
    if given is None:
        return []
    return [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]


# --- evaluation -----------------------------------------------------------------------------------------
def evaluate_captions(
    images: Sequence[Union[Image.Image, np.ndarray]],
    captions: Union[str, Sequence[str]],
    segmenter: Union[str, Path, None] = None,
    *,
    coverage: str = "thesis",
    schema: SchemaLike = None,
    device: str = "auto",
    batch_size: int = 8,
) -> "CaptionAccuracy":
    """How well generated images show what their captions asked for (``histosynth evaluate captions``;
    thesis Table 5.1): each image is segmented, re-captioned and compared with its caption.

    ``images`` are RGB images (PIL, or uint8 arrays (H, W, 3)); ``captions`` one per image, or one for
    all. ``segmenter`` is a multi-class segmenter folder (default: the shipped one). Returns the result:
    ``result.exact_match_share()`` and ``result.mention_share()`` (%), ``result.level_shares()``,
    ``result.confusion(name)`` and ``result.per_image()`` (pandas DataFrames).
    """
    from .cli.evaluate import check_coverage
    from .defaults import default_segmenter_path
    from .evaluate.caption_accuracy import evaluate_caption_accuracy, segmenter_function
    from .segment.segmenter import Segmenter

    check_coverage(coverage)
    arrays = [np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image) for image in images]
    for index, array in enumerate(arrays):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise DataError(f"image {index}: expected an RGB image, uint8 (H, W, 3), got {array.dtype} "
                            f"{array.shape}; pass PIL images or uint8 arrays")
    wanted = [captions] * len(arrays) if isinstance(captions, str) else list(captions)
    if len(wanted) != len(arrays):
        raise ConfigError(f"{len(arrays)} images but {len(wanted)} captions; give one caption per image, or one")
    loaded = Segmenter.load(segmenter if segmenter is not None else default_segmenter_path())
    chosen = loaded.schema if schema is None else load_schema(schema)
    loaded.check_schema(chosen, "the evaluation")
    segment = segmenter_function(loaded, coverage, device, batch_size)
    return evaluate_caption_accuracy(arrays, [c.replace("\\n", "\n") for c in wanted], segment, chosen)


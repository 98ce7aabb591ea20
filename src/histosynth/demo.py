"""`make demo`: the whole toolkit end to end on the embedded default, in a few minutes on a CPU.

Phantom slides (with their label-mask slides) are tiled into a captioned patch dataset, a contact
sheet shows patches with their masks and captions, the shipped model generates patches for the
thesis' generating caption and a few others, the shipped segmenter measures their caption accuracy,
the shipped text+mask model generates patches from some of the dataset's label masks (the segmenter
measures how well they follow them), and `report.html` gathers what was made with timings. Each
stage is skipped when its output already exists, so a re-run after an interruption continues where
it stopped.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .captions import GENERATING_CAPTION, caption_for_mask, caption_from_levels
from .data.dataset import PatchDataset
from .data.phantom.export import write_phantom_slide
from .data.tiling import SlideInput, TilingOptions, tile_slides
from .errors import ModelError
from .figures import contact_sheet
from .io import write_text_atomic
from .schema import RENAL

if TYPE_CHECKING:
    from .models.bundle import Bundle
    from .segment.segmenter import Segmenter


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    slides: int = 3
    slide_size: int = 2048
    mpp: float = 0.5
    patch_size: int = 256
    sheet_patches: int = 12
    seed: int = 0
    generated_per_caption: int = 6
    generated_from_masks: int = 6
    steps: Optional[int] = None  # None: the model's own sampling options
    guidance: Optional[float] = None

    def sampling_options(self, bundle):
        """The model's sampling options with the demo's steps and guidance, where set."""
        return bundle.sampling.overridden(steps=self.steps, guidance=self.guidance)


#: Captions the demo generates from: the thesis' generating caption first, then two others.
DEMO_CAPTIONS = (
    GENERATING_CAPTION,
    caption_from_levels({"Tubuli": "high", "other kidney tissue": "medium"}),
    caption_from_levels({"Dilated Tubuli": "high", "other kidney tissue": "medium"}),
)


@dataclass
class GenerationResult:
    sheet: Path | None
    table_html: str
    note: str
    title: str = "Generation"


@dataclass
class DemoResult:
    out: Path
    dataset: PatchDataset
    sheet: Path
    report: Path
    generation: GenerationResult
    from_masks: GenerationResult
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(out: str | Path = "demo", settings: Optional[DemoSettings] = None,
             progress: bool = True) -> DemoResult:
    """Run every stage of the demo into `out` (with the default :class:`DemoSettings` unless given) and
    return where things are."""
    out = Path(out)
    settings = DemoSettings() if settings is None else settings
    timings: dict[str, float] = {}
    with _timed(timings, "phantom slides"):
        inputs = make_phantom_slides(out / "slides", settings, progress)
    with _timed(timings, "tiling"):
        dataset = tile_slides(inputs, out / "dataset", RENAL,
                              TilingOptions(mpp=settings.mpp, size=settings.patch_size),
                              progress=progress).dataset
    with _timed(timings, "contact sheet"):
        sheet = make_contact_sheet(dataset, out / "contact_sheet.png", settings)
    with _timed(timings, "generation and caption accuracy"):
        generation = generate_and_judge(out / "generated", settings)
    with _timed(timings, "generation from masks and label fidelity"):
        from_masks = generate_from_masks(dataset, out / "generated", settings)
    report = write_report(out, dataset, sheet, [generation, from_masks], timings)
    return DemoResult(out, dataset, sheet, report, generation, from_masks, timings)


def load_shipped_model(bundle_path: Path) -> tuple[Bundle, Segmenter]:
    """A shipped model folder and the shipped segmenter that judges its images (ModelError where
    either is missing or unreadable)."""
    from .defaults import default_segmenter_path
    from .models.bundle import load_bundle
    from .segment.segmenter import Segmenter

    return load_bundle(bundle_path), Segmenter.load(default_segmenter_path())


def generate_and_judge(folder: Path, settings: DemoSettings) -> GenerationResult:
    """Generate with the shipped model, then re-caption the generating caption's images."""
    from .defaults import default_bundle_path
    from .evaluate.caption_accuracy import evaluate_caption_accuracy, segmenter_function
    from .sample.generate import generate
    from .sample.jobs import item_seed

    try:
        bundle, segmenter = load_shipped_model(default_bundle_path())
    except ModelError as exc:
        return GenerationResult(None, "", f"generation skipped: {exc}", "Generated from captions")
    n = settings.generated_per_caption
    captions = [c for c in DEMO_CAPTIONS for _ in range(n)]
    seeds = [item_seed(settings.seed, i) for i in range(len(captions))]
    images = generate(bundle, captions, seeds, settings.sampling_options(bundle)).images
    sheet = contact_sheet(list(images), None, captions, folder / "generated_sheet.png", bundle.schema,
                          title="Generated by the shipped model (trained on the phantom)", columns=n)
    accuracy = evaluate_caption_accuracy(list(images[:n]), captions[:n], segmenter_function(segmenter),
                                         bundle.schema)
    table = accuracy.level_shares().to_html(index=False, float_format=lambda v: f"{v:.1f}")
    note = (f"{n} images of the generating caption, segmented by the shipped segmenter and re-captioned: "
            f"{accuracy.mention_share():.0f} % mention glomeruli (thesis: 91.3 % of 400). So few images show how "
            "the evaluation works rather than measure the model: run 'histosynth evaluate captions --n 400'.")
    return GenerationResult(sheet, table, note, "Generated from captions, and their caption accuracy (Table 5.1 form)")


def generate_from_masks(dataset: PatchDataset, folder: Path, settings: DemoSettings) -> GenerationResult:
    """Generate from label masks of the demo's dataset with the shipped text+mask model, then compare
    the shipped segmenter's reading of each image with the mask it was generated from."""
    from .defaults import default_mask_bundle_path
    from .evaluate.caption_accuracy import segmenter_function
    from .evaluate.label_fidelity import evaluate_label_fidelity
    from .sample.generate import generate
    from .sample.jobs import item_seed

    try:
        bundle, segmenter = load_shipped_model(default_mask_bundle_path())
    except ModelError as exc:
        return GenerationResult(None, "", f"generation from masks skipped: {exc}", "Generated from label masks")
    rows = pick_varied_rows(dataset, settings.generated_from_masks, settings.seed + 1)
    masks = [dataset.mask(r) for r in rows]
    captions = [caption_for_mask(m, bundle.schema) for m in masks]
    seeds = [item_seed(settings.seed + 1, i) for i in range(len(masks))]
    images = generate(bundle, captions, seeds, settings.sampling_options(bundle), masks=masks).images
    sheet = contact_sheet(list(images), masks, captions, folder / "from_masks_sheet.png", bundle.schema,
                          title="Generated from the label masks beside them (shipped text+mask model)", columns=3)
    fidelity, _ = evaluate_label_fidelity(list(images), masks, segmenter_function(segmenter, coverage="full"),
                                          bundle.schema, [r["patch_id"] for r in rows])
    table = fidelity.per_class().to_html(index=False, float_format=lambda v: f"{v:.3f}")
    note = (f"{len(masks)} images generated from dataset masks (and the captions of those masks), segmented by the "
            f"shipped segmenter: mean Dice {fidelity.mean_dice():.2f} against the masks over the classes with enough "
            "pixels. Run 'histosynth evaluate masks --n 100' for a measurement.")
    return GenerationResult(sheet, table, note, "Generated from label masks (label fidelity)")


def make_phantom_slides(folder: Path, settings: DemoSettings, progress: bool) -> list[SlideInput]:
    inputs = []
    for index in range(settings.slides):
        seed = settings.seed + index
        name = f"phantom-{seed}"
        image, mask = folder / f"{name}.tif", folder / f"{name}-mask.tif"
        if not (image.exists() and mask.exists() and (folder / f"{name}.json").exists()):
            write_phantom_slide(folder, seed=seed, width=settings.slide_size, mpp=settings.mpp,
                                name=name, progress=progress)
        inputs.append(SlideInput(slide=image, mask=mask))
    return inputs


def make_contact_sheet(dataset: PatchDataset, path: Path, settings: DemoSettings) -> Path:
    """Patches chosen to show the variety of captions: the most distinct captions first."""
    rows = pick_varied_rows(dataset, settings.sheet_patches, settings.seed)
    return contact_sheet(
        [dataset.image(r) for r in rows], [dataset.mask(r) for r in rows], [r["caption"] for r in rows],
        path, dataset.schema, title="Phantom patches, their label masks and captions", columns=3,
    )


def pick_varied_rows(dataset: PatchDataset, n: int, seed: int) -> list:
    """Up to n manifest rows, one per distinct caption first, then random others."""
    manifest = dataset.manifest.sample(frac=1.0, random_state=seed)
    firsts = manifest.drop_duplicates("caption")
    rest = manifest.drop(firsts.index)
    chosen = list(firsts.head(n).itertuples(index=False))
    chosen += list(rest.head(max(0, n - len(chosen))).itertuples(index=False))
    return [r._asdict() for r in chosen]


def write_report(out: Path, dataset: PatchDataset, sheet: Path, generations: list[GenerationResult],
                 timings: dict[str, float]) -> Path:
    levels = _caption_counts(dataset)
    rows = "".join(f"<tr><td><pre>{html.escape(c)}</pre></td><td>{n}</td></tr>" for c, n in levels[:10])
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    splits = dataset.manifest["split"].value_counts().to_dict()
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>histosynth demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}td,th{{border:1px solid #ccc;padding:4px;}}
table{{border-collapse:collapse;margin-bottom:1.5em}}pre{{margin:0;font-size:12px}}</style></head><body>
<h1>histosynth demo</h1>
<p>Renal <em>phantom</em> slides (procedural test data, not real tissue) tiled into a captioned patch
dataset: {len(dataset)} patches of {dataset.patch_size} px ({', '.join(f'{k} {v}' for k, v in splits.items())}).</p>
<h2>Patches, masks and captions</h2><img src="{sheet.name}" style="max-width:100%">
{"".join(_generation_section(out, g) for g in generations)}
<h2>Most frequent captions</h2><table><tr><th>caption</th><th>patches</th></tr>{rows}</table>
<h2>Timings</h2><table>{timing_rows}</table>
</body></html>"""
    path = out / "report.html"
    write_text_atomic(path, body)
    write_text_atomic(out / "timings.json", json.dumps(timings, indent=2))
    return path


def _generation_section(out: Path, generation: GenerationResult) -> str:
    if generation.sheet is None:
        return f"<h2>{html.escape(generation.title)}</h2><p>{html.escape(generation.note)}</p>"
    return (f'<h2>{html.escape(generation.title)}</h2><img src="{generation.sheet.relative_to(out)}" '
            f'style="max-width:100%"><p>{html.escape(generation.note)}</p>{generation.table_html}')


def _caption_counts(dataset: PatchDataset) -> list[tuple[str, int]]:
    counts = dataset.manifest["caption"].value_counts()
    return [(str(c), int(n)) for c, n in counts.items()]


class _timed:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.start, 2)
        return False


__all__ = ["DemoSettings", "DemoResult", "run_demo"]

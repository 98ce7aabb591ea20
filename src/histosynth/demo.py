"""`make demo`: the whole toolkit end to end on the embedded default, in a few minutes on a CPU.

Phantom slides (with their label-mask slides) are tiled into a captioned patch dataset, a contact
sheet shows patches with their masks and captions, and `report.html` gathers what was made with
timings. Each stage is skipped when its output already exists, so a re-run after an interruption
continues where it stopped.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from .data.dataset import PatchDataset
from .data.phantom.export import write_phantom_slide
from .data.tiling import SlideInput, TilingOptions, tile_slides
from .figures import contact_sheet
from .io import write_text_atomic
from .schema import RENAL


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    slides: int = 3
    slide_size: int = 2048
    mpp: float = 0.5
    patch_size: int = 256
    sheet_patches: int = 12
    seed: int = 0


@dataclass
class DemoResult:
    out: Path
    dataset: PatchDataset
    sheet: Path
    report: Path
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(out: str | Path = "demo", settings: DemoSettings = DemoSettings(),
             progress: bool = True) -> DemoResult:
    """Run every stage of the demo into `out` and return where things are."""
    out = Path(out)
    timings: dict[str, float] = {}
    with _timed(timings, "phantom slides"):
        inputs = make_phantom_slides(out / "slides", settings, progress)
    with _timed(timings, "tiling"):
        dataset = tile_slides(inputs, out / "dataset", RENAL,
                              TilingOptions(mpp=settings.mpp, size=settings.patch_size),
                              progress=progress).dataset
    with _timed(timings, "contact sheet"):
        sheet = make_contact_sheet(dataset, out / "contact_sheet.png", settings)
    report = write_report(out, dataset, sheet, timings)
    return DemoResult(out, dataset, sheet, report, timings)


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


def write_report(out: Path, dataset: PatchDataset, sheet: Path, timings: dict[str, float]) -> Path:
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
<h2>Most frequent captions</h2><table><tr><th>caption</th><th>patches</th></tr>{rows}</table>
<h2>Timings</h2><table>{timing_rows}</table>
</body></html>"""
    path = out / "report.html"
    write_text_atomic(path, body)
    write_text_atomic(out / "timings.json", json.dumps(timings, indent=2))
    return path


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

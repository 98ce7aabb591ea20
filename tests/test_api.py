"""`import histosynth`: the Python functions give what the commands give, and refuse bad input with the
project's errors; README's Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import histosynth
from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.errors import CaptionError, ConfigError, DataError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model():
    return histosynth.load_model(device="cpu")


def renal_mask() -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask.flat[:77] = 3  # Tubuli, 30 %
    mask.flat[77:205] = 4  # Glomeruli, 50 %
    return mask


def test_generate_makes_the_images_of_the_generate_command(model, tmp_path):
    caption = model.caption_for_levels({"Glomeruli": "high"})
    images = model.generate(caption, n=2, seed=3, steps=2, size=64)
    assert main(["generate", "--levels", "Glomeruli=high", "--n", "2", "--seed", "3", "--steps", "2",
                 "--size", "64", "--device", "cpu", "--out", str(tmp_path)]) == 0
    written = [np.asarray(Image.open(tmp_path / "00000" / f"0000{i}.png")) for i in range(2)]
    assert [(image.mode, image.size) for image in images] == [("RGB", (64, 64))] * 2
    np.testing.assert_array_equal(np.asarray(images[0]), written[0])
    np.testing.assert_array_equal(np.asarray(images[1]), written[1])
    assert not np.array_equal(written[0], written[1])  # each image has its own seed


def test_generate_from_masks_makes_the_images_of_the_generate_command(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 3  # Tubuli on the left, Glomeruli on the right
    mask[:, 32:] = 4
    other = np.rot90(mask).copy()
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, array in zip(paths, (mask, other), strict=True):
        Image.fromarray(array).save(path)
    model = histosynth.load_model(device="cpu", masks=True)
    images = model.generate(mask=[paths[0], other], n=1, seed=2, steps=2)
    assert main(["generate", "--mask", str(tmp_path), "--n", "1", "--seed", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out" / "images").rglob("*.png")
    assert len(images) == 1 and images[0].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(Image.open(written)))
    with pytest.raises(DataError, match=r"mask 0: a label mask holds whole class ids from 0, got float32"):
        model.generate(mask=mask.astype(np.float32), steps=2)
    with pytest.raises(DataError, match="holds no mask files"):
        model.generate(mask=tmp_path / "out" / "records", steps=2)


def test_caption_for_mask_is_what_the_caption_command_prints(tmp_path, capsys):
    path = tmp_path / "m.png"
    Image.fromarray(renal_mask()).save(path)
    assert main(["caption", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == GENERATING_CAPTION
    assert histosynth.caption_for_mask(renal_mask()) == printed
    assert histosynth.caption_for_mask(renal_mask().astype(np.int64)) == printed
    assert histosynth.caption_for_mask(Image.open(path)) == printed
    assert histosynth.caption_for_mask(path) == printed


def test_parse_caption_round_trips():
    levels = histosynth.parse_caption(GENERATING_CAPTION)
    assert levels["Glomeruli"] == "high" and levels["Tubuli"] == "medium" and levels["Arteries"] == "none"
    assert histosynth.caption_for_levels(levels) == GENERATING_CAPTION
    assert histosynth.parse_caption(histosynth.caption_for_levels("Tubuli=low")) == {
        **{name: "none" for name in levels}, "Tubuli": "low"}


def test_bad_input_is_refused_with_the_projects_errors(model):
    with pytest.raises(CaptionError, match="Podocytes"):
        model.generate(levels="Podocytes=high", steps=2)
    with pytest.raises(ConfigError, match="caption or levels"):
        model.generate(steps=2)
    with pytest.raises(ConfigError, match=r"^seed must be"):
        model.generate(GENERATING_CAPTION, seed=-1, steps=2)
    with pytest.raises(ConfigError, match="not both"):
        model.generate(GENERATING_CAPTION, levels="Glomeruli=high")
    with pytest.raises(DataError, match="whole class ids.*float64"):
        histosynth.caption_for_mask(renal_mask().astype(float))
    with pytest.raises(DataError, match="2-D"):
        histosynth.caption_for_mask(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="single-channel.*RGB"):
        histosynth.caption_for_mask(Image.new("RGB", (4, 4)))
    with pytest.raises(DataError, match="id"):
        histosynth.caption_for_mask(np.full((4, 4), 200, np.uint8))


def test_the_public_names_are_the_api_and_load_lazily():
    assert set(histosynth.__all__) <= set(dir(histosynth))
    assert all(callable(getattr(histosynth, name)) for name in histosynth.__all__)
    with pytest.raises(AttributeError, match="no attribute 'sample_latents'"):
        histosynth.sample_latents  # noqa: B018
    fresh = subprocess.run([sys.executable, "-c", "import sys, histosynth; print(sorted(m for m in "
                            "('torch', 'histosynth.api', 'diffusers') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "[]"


def test_the_readme_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Python"):]
    (code,) = re.findall(r"```python\n(.*?)```", section[:section.index("\n## ", 1)], re.S)
    code = code.replace("load_model()", 'load_model(device="cpu")')  # the suite runs on the CPU
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert np.asarray(namespace["images"][1]).shape == (128, 128, 3) and namespace["pixels"].dtype == np.uint8
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "This image showcases various types of tissue structures found in renal tissue."
    assert "'Glomeruli': 'high'" in printed[-1]


def test_tile_makes_the_dataset_of_the_tile_command(tmp_path):
    from histosynth.data.phantom.export import write_phantom_slide

    files = write_phantom_slide(tmp_path / "slides", seed=1, width=512, progress=False)
    result = histosynth.tile(files.image, tmp_path / "api", masks=str(files.mask), size=64)
    assert main(["tile", str(files.image), "--masks", str(files.mask), "--size", "64", "--out",
                 str(tmp_path / "cli"), "--no-progress"]) == 0
    assert result.tiled == {"phantom-1": len(result.dataset)} and len(result.dataset) > 0
    assert (tmp_path / "api" / "manifest.csv").read_text() == (tmp_path / "cli" / "manifest.csv").read_text()
    with pytest.raises(DataError, match="masks was given 2 times for 1 slides"):
        histosynth.tile(files.image, tmp_path / "other", masks=[files.mask, files.mask])


def test_evaluate_captions_compares_the_found_levels_with_the_caption():
    from histosynth.data.phantom.generate import phantom_patch

    image, mask = phantom_patch(seed=123_456, size=256)
    caption = histosynth.caption_for_mask(mask)
    result = histosynth.evaluate_captions([Image.fromarray(image), image], caption, device="cpu")
    assert len(result) == 2
    assert [verdict.requested for verdict in result.verdicts] == [histosynth.parse_caption(caption)] * 2
    first, second = result.per_image().drop(columns="image").to_dict("records")
    assert first == second  # a PIL image and its array are one image
    assert (first["Tubuli found"], first["Dilated Tubuli found"], first["Arteries found"]) == ("medium", "low", "none")
    assert first["Glomeruli requested"] == "none" and first["Glomeruli found"] == "low"  # a few stray pixels
    assert result.exact_match_share() == 0.0
    with pytest.raises(DataError, match=r"image 0: expected an RGB image, uint8 \(H, W, 3\), got float64"):
        histosynth.evaluate_captions([image / 255.0], caption)
    with pytest.raises(ConfigError, match="2 images but 3 captions"):
        histosynth.evaluate_captions([image, image], [caption] * 3)

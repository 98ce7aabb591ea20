"""Sampling options: checked on creation, defaulting to the model folder's own, overridden by what a user gives;
impossible seeds, sizes and resolutions refused before any file is written (the command lines in
tests/test_cli_options.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main
from histosynth.errors import ConfigError
from histosynth.models.bundle import load_bundle, save_bundle
from histosynth.models.sampling import SamplingOptions
from histosynth.sample.generate import generate
from histosynth.sample.jobs import item_seed
from histosynth.schema import RENAL

LEVELS = "Glomeruli=high,Tubuli=medium"


@pytest.mark.parametrize("given, message", [
    ({"steps": 0}, r"^steps must be a whole number of at least 1, got 0$"),
    ({"steps": 2.5}, r"^steps must be a whole number of at least 1, got 2.5$"),
    ({"guidance": math.nan}, r"^guidance must be a finite number, got nan$"),
    ({"guidance": math.inf}, r"^guidance must be a finite number, got inf$"),
    ({"guidance": -0.5}, r"^guidance must be 0 or more \(1 = no guidance\), got -0.5$"),
    ({"mask_guidance": math.nan}, r"^mask guidance must be a finite number, got nan$"),
    ({"scheduler": "euler"}, r"^unknown scheduler 'euler'; use one of ddim, dpm\+\+$"),
    ({"eta": 1.5}, r"^eta must be between 0 \(deterministic DDIM\) and 1, got 1.5$"),
    ({"eta": 0.5, "scheduler": "dpm++"}, r"^eta applies to the ddim scheduler only; dpm\+\+ has no step noise$"),
])
def test_bad_options_are_one_line_errors(given, message):
    with pytest.raises(ConfigError, match=message):
        SamplingOptions(**given)


def test_given_options_override_the_models_and_none_keeps_them():
    model = SamplingOptions(steps=7, guidance=2.0, scheduler="dpm++")
    assert model.overridden(steps=None, guidance=3, scheduler=None) == SamplingOptions(7, 3.0, "dpm++")
    assert SamplingOptions.from_dict({"steps": 7, "unrelated": 1}) == SamplingOptions(steps=7)


@pytest.fixture(scope="module")
def custom_model(tiny_bundle, tmp_path_factory):
    """The tiny model saved with a preset whose sampling section differs from the toolkit's defaults."""
    preset = json.loads((tiny_bundle.path / "histosynth.json").read_text())["preset"]
    preset["sampling"] = {"steps": 2, "guidance": 3.0, "scheduler": "dpm++"}
    return save_bundle(tmp_path_factory.mktemp("models") / "custom", tiny_bundle.unet, tiny_bundle.autoencoder,
                       tiny_bundle.scheduler_config, tiny_bundle.text_encoder, RENAL,
                       {"image_size": 64, "preset": preset})


def test_a_presets_sampling_section_is_what_generate_uses(custom_model, tmp_path):
    out = tmp_path / "job"
    assert main(["generate", "--model", str(custom_model), "--levels", LEVELS, "--n", "1", "--out", str(out)]) == 0
    job = json.loads((out / "job.json").read_text())["job"]
    assert (job["steps"], job["guidance"], job["scheduler"]) == (2, 3.0, "dpm++")
    # the same images as with those options given explicitly
    bundle = load_bundle(custom_model)
    image = np.asarray(Image.open(out / "00000" / "00000.png"))
    seed = item_seed(job["seed"], 0)
    explicit = generate(bundle, job["captions"], [seed], SamplingOptions(2, 3.0, "dpm++"))
    np.testing.assert_array_equal(image, explicit.images[0])
    # an option given on the command line replaces the model's, the others stay
    again = tmp_path / "again"
    assert main(["generate", "--model", str(custom_model), "--levels", LEVELS, "--n", "1", "--steps", "1",
                 "--out", str(again)]) == 0
    job = json.loads((again / "job.json").read_text())["job"]
    assert (job["steps"], job["guidance"], job["scheduler"]) == (1, 3.0, "dpm++")


def test_ddim_with_eta_draws_its_step_noise_from_each_items_seed(tiny_bundle):
    options = SamplingOptions(steps=2, eta=0.7)
    first = generate(tiny_bundle, [GENERATING_CAPTION] * 2, [4, 5], options, batch_size=2)
    alone = generate(tiny_bundle, [GENERATING_CAPTION], [5], options, batch_size=1)
    plain = generate(tiny_bundle, [GENERATING_CAPTION], [5], SamplingOptions(steps=2), batch_size=1)
    assert np.abs(first.images[1].astype(int) - alone.images[0]).max() <= 1  # the seed decides, not the batch
    assert not np.array_equal(plain.images[0], alone.images[0])  # the step noise changes the image
    np.testing.assert_array_equal(generate(tiny_bundle, [GENERATING_CAPTION], [5], options).images, alone.images)
    assert first.records[0]["eta"] == 0.7 and "eta" not in plain.records[0]


def test_the_size_error_names_the_largest_size_that_fits(tiny_bundle, monkeypatch):
    from histosynth.sample import generate as module

    monkeypatch.setattr(module, "free_memory", lambda device: 2 ** 30)
    with pytest.raises(ConfigError, match=r"1.0 GiB are free; the largest square size that fits is about (\d+) px"
                       ) as caught:
        generate(tiny_bundle, [GENERATING_CAPTION], [1], SamplingOptions(steps=1), size=65536)
    largest = int(caught.value.args[0].rsplit("about ", 1)[1].split()[0])
    assert largest % 4 == 0 and largest ** 2 * module._bytes_per_pixel(tiny_bundle) <= 2 ** 30

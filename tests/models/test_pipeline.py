"""Model folders as diffusers pipelines: HistosynthPipeline gives the images of `histosynth generate`,
diffusers' own DiffusionPipeline finds it, model_index.json and the model card follow histosynth.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth import defaults
from histosynth.cli import main
from histosynth.errors import ConfigError, ModelError
from histosynth.models.bundle import MODEL_INDEX_FILE, model_index, read_bundle_config
from histosynth.models.card import PHANTOM_LIMIT, model_card
from histosynth.pipeline import HistosynthPipeline, HistosynthTextEncoder
from histosynth.sample.jobs import item_seed

CAPTION = "There is a lot of Glomeruli visible in the image."


def _shipped(name: str) -> Path:
    try:
        return defaults._shipped(name, "")
    except ModelError:
        pytest.skip(f"the default {name} model is not trained in this checkout (make default-models)")


def _job_images(folder: Path) -> list[np.ndarray]:
    """The PNGs of a finished generation job, in item order."""
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("00000/*.png"))]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_bundle_path) -> HistosynthPipeline:
    return HistosynthPipeline.from_pretrained(tiny_bundle_path)


def test_the_embedded_model_samples_the_images_of_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _shipped("ldm")
    assert main(["generate", "--caption", CAPTION, "--seed", "11", "--steps", "2", "--n", "1",
                 "--out", str(tmp_path / "cli")]) == 0
    (expected,) = _job_images(tmp_path / "cli")

    pipe = HistosynthPipeline.from_pretrained(folder)
    output = pipe(CAPTION, num_inference_steps=2, seed=11)  # both with the default batch size

    (image,) = output.images
    assert image.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert output.records[0]["seed"] == item_seed(11, 0) and output.records[0]["steps"] == 2


def test_prompts_and_images_per_prompt_follow_the_job_of_a_captions_file(tiny_pipe, tiny_bundle_path, tmp_path):
    prompts = [CAPTION, "The image shows a low amount of Tubuli."]
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--model", str(tiny_bundle_path), "--captions-file", str(captions), "--n", "4",
                 "--seed", "5", "--steps", "2", "--batch-size", "3", "--out", str(tmp_path / "cli")]) == 0
    job = _job_images(tmp_path / "cli")  # items: caption 0, 1, 0, 1

    # a generator stands for the seed it was made with
    output = tiny_pipe(prompts, num_images_per_prompt=2, num_inference_steps=2, batch_size=3, output_type="np",
                       generator=torch.Generator().manual_seed(5))

    # diffusers' order: the first prompt's images, then the second's
    expected = np.stack([job[i] for i in (0, 2, 1, 3)])
    np.testing.assert_array_equal(np.rint(output.images * 255).astype(np.uint8), expected)
    assert [r["seed"] for r in output.records] == [item_seed(5, i) for i in (0, 2, 1, 3)]
    assert [r["caption"].endswith(prompts[0]) for r in output.records] == [True, True, False, False]


@pytest.mark.parametrize("options, message", [
    (dict(seed=1, generator=torch.Generator().manual_seed(1)), "give seed or generator, not both"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a whole number of at least 1, got 0"),
    (dict(output_type="latent"), "unknown output_type 'latent'; use one of pil, np"),
    (dict(num_inference_steps=0), "steps must be a whole number of at least 1, got 0"),
])
def test_bad_options_are_refused_in_one_line(tiny_pipe, options, message):
    with pytest.raises(ConfigError) as raised:
        tiny_pipe("", **options)
    assert str(raised.value) == message


def test_diffusers_own_loader_finds_the_pipeline(tiny_bundle_path):
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    pipe = DiffusionPipeline.from_pretrained(tiny_bundle_path)

    assert type(pipe) is HistosynthPipeline
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.autoencoder, AutoencoderKL)
    assert isinstance(pipe.scheduler, DDPMScheduler) and isinstance(pipe.text_encoder, HistosynthTextEncoder)
    assert pipe.controlnet is None
    assert pipe.text_encoder.encoder.id == read_bundle_config(tiny_bundle_path).text_encoder.id


def test_model_index_names_the_components_the_pipeline_loads(tiny_pipe, tiny_bundle_path):
    index = json.loads((tiny_bundle_path / MODEL_INDEX_FILE).read_text())
    assert index["_class_name"] == "HistosynthPipeline"
    components = {k: list(v) for k, v in tiny_pipe.config.items() if not k.startswith("_")}
    assert {k: v for k, v in index.items() if not k.startswith("_")} == components
    assert components["text_encoder"] == ["histosynth.pipeline", "HistosynthTextEncoder"]


@pytest.mark.parametrize("name", ["ldm", "ldm-mask"])
def test_shipped_folders_carry_their_current_index_and_card(name):
    folder = _shipped(name)
    written = json.loads((folder / MODEL_INDEX_FILE).read_text())
    assert {k: v for k, v in written.items() if k != "_diffusers_version"} == \
        {k: v for k, v in model_index(folder).items() if k != "_diffusers_version"}
    config = read_bundle_config(folder)
    card = (folder / "README.md").read_text()
    assert card == model_card(config)
    assert f"training steps: {config.provenance['steps']}" in card and PHANTOM_LIMIT in card
    for command in config.provenance["command"]:
        assert command in card


def test_the_card_says_phantom_only_for_phantom_data(tiny_bundle_path):
    config = read_bundle_config(tiny_bundle_path)
    tissue = config.model_copy(update={"provenance": {"steps": 250000, "data": {"dataset": "kpmp-tiles"},
                                                      "metrics": {"final_loss": 0.05}}})
    phantom = config.model_copy(update={"provenance": {"steps": 800, "data": {"dataset": "runs/data/phantom"}}})

    assert "training steps: 250000" in model_card(tissue) and PHANTOM_LIMIT not in model_card(tissue)
    assert "| training loss (MSE of the noise prediction) at the last step | 0.05 |" in model_card(tissue)
    assert "training steps: 800" in model_card(phantom) and PHANTOM_LIMIT in model_card(phantom)
    assert (tiny_bundle_path / "README.md").read_text() == model_card(config)


def test_the_card_names_the_loss_by_the_objective_and_the_model_a_fine_tune_started_from(tiny_bundle_path):
    config = read_bundle_config(tiny_bundle_path)
    preset = {**config.preset, "diffusion": {**config.preset["diffusion"], "prediction_type": "flow_prediction"}}
    init = {"id": "406e2f6330a6", "steps": 6000, "prediction_type": "flow_prediction", "denoiser": "unet"}
    fine_tune = config.model_copy(update={"preset": preset, "provenance": {
        "steps": 3000, "init": "runs/models/ldm-flow", "init_model": init, "metrics": {"final_loss": 0.58}}})
    card = model_card(fine_tune)
    assert "| training loss (MSE of the flow velocity prediction) at the last step | 0.58 |" in card
    assert "- initialised from `runs/models/ldm-flow` (model `406e2f6330a6`, 6000 steps, flow matching)" in card
    weighted = {**preset, "training": {**preset.get("training", {}), "min_snr_gamma": 5.0},
                "diffusion": {**preset["diffusion"], "prediction_type": "v_prediction"}}
    card = model_card(fine_tune.model_copy(update={"preset": weighted}))
    assert "(MSE of the min-SNR weighted velocity prediction)" in card


def test_a_folder_without_model_index_is_refused_in_one_line(tiny_bundle_path, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle_path, old)
    os.remove(old / MODEL_INDEX_FILE)
    with pytest.raises(ModelError, match=r"has no model_index.json \(it was saved by an older histosynth\); "
                                         r"write it with histosynth.models.bundle.write_model_index"):
        HistosynthPipeline.from_pretrained(old)
    with pytest.raises(ModelError, match="is not a histosynth model folder"):
        HistosynthPipeline.from_pretrained(tmp_path)


def test_a_controlnet_model_loads_its_branch_and_samples_as_generate(tiny_bundle, tmp_path):
    import copy

    from histosynth.models.bundle import load_bundle, save_bundle
    from histosynth.models.conditioning import Conditioning
    from histosynth.models.control import MaskControlledUNet, add_mask_branch
    from histosynth.sample.generate import generate
    from histosynth.schema import RENAL

    torch.manual_seed(0)
    unet = add_mask_branch(copy.deepcopy(tiny_bundle.unet), len(RENAL.ids))
    with torch.no_grad():  # a new branch's zero convolutions would hide the masks: give it weights
        for parameter in unet.controlnet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    conditioning = Conditioning.parse("text+mask", 0.1, 0.2, mask_branch="controlnet").to_config(RENAL.ids)
    folder = save_bundle(tmp_path / "controlled", unet, tiny_bundle.autoencoder, tiny_bundle.scheduler_config,
                         tiny_bundle.text_encoder, RENAL, {"image_size": tiny_bundle.image_size,
                                                           "conditioning": conditioning})
    assert json.loads((folder / MODEL_INDEX_FILE).read_text())["controlnet"] == ["diffusers", "ControlNetModel"]

    pipe = HistosynthPipeline.from_pretrained(folder)
    output = pipe("", num_inference_steps=1, seed=2, batch_size=1, output_type="np")

    bundle = load_bundle(folder)
    assert isinstance(pipe.bundle().unet, MaskControlledUNet)
    (expected,) = generate(bundle, [""], [item_seed(2, 0)], bundle.sampling.overridden(steps=1), batch_size=1).images
    np.testing.assert_array_equal(np.rint(output.images[0] * 255).astype(np.uint8), expected)

    # from label masks: the images of `generate --mask`, one per mask in the masks' order
    size = tiny_bundle.image_size
    masks = [np.zeros((size, size), np.uint8) for _ in range(3)]
    masks[0][:, : size // 2], masks[1][: size // 2], masks[2][:] = 3, 4, 6
    (tmp_path / "masks").mkdir()
    for index, mask in enumerate(masks):
        Image.fromarray(mask).save(tmp_path / "masks" / f"m{index}.png")
    assert main(["generate", "--model", str(folder), "--mask", str(tmp_path / "masks"), "--caption", CAPTION,
                 "--seed", "5", "--steps", "1", "--mask-guidance", "1.5", "--batch-size", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    expected = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "cli" / "images").rglob("*.png"))]
    assert len(expected) == 3
    given = [masks[0], Image.fromarray(masks[1]), tmp_path / "masks" / "m2.png"]  # array, PIL image, file
    for mask in (given, tmp_path / "masks"):
        output = pipe(CAPTION, mask=mask, mask_guidance_scale=1.5, num_inference_steps=1, seed=5, batch_size=2)
        assert [r["seed"] for r in output.records] == [item_seed(5, i) for i in range(3)]
        for image, reference in zip(output.images, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(image), reference)
    unmasked = pipe(CAPTION, num_images_per_prompt=3, num_inference_steps=1, seed=5, batch_size=2).images
    assert all(not np.array_equal(np.asarray(a), b) for a, b in zip(unmasked, expected, strict=True))  # masks count
    with pytest.raises(ConfigError, match="one image is made per mask: leave num_images_per_prompt at 1"):
        pipe(CAPTION, mask=masks, num_images_per_prompt=2)


def test_save_pretrained_writes_the_model_folder_it_was_loaded_from(tiny_pipe, tiny_bundle_path, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")

    saved = tmp_path / "copy"
    assert read_bundle_config(saved).to_json() == read_bundle_config(tiny_bundle_path).to_json()
    assert (saved / MODEL_INDEX_FILE).read_text() == (tiny_bundle_path / MODEL_INDEX_FILE).read_text()
    assert (saved / "README.md").read_text() == (tiny_bundle_path / "README.md").read_text()
    with pytest.raises(ConfigError, match="takes no options; got push_to_hub"):
        tiny_pipe.save_pretrained(tmp_path / "hub", push_to_hub=True)

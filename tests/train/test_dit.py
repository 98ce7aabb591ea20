"""The transformer denoiser (``--denoiser dit``): called as the UNet is, trained with flow matching, saved, loaded
(by histosynth and by diffusers' own pipeline loader), fine-tuned into a text+mask model and sampled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.cli import main
from histosynth.errors import ConfigError
from histosynth.models.bundle import MODEL_INDEX_FILE, load_bundle, read_bundle_config
from histosynth.models.denoiser import (
    DiTDenoiser,
    build_denoiser,
    context_features,
    denoiser_factor,
    input_weight_name,
    widen_input,
)
from histosynth.models.label_maps import label_map
from histosynth.pipeline import HistosynthPipeline
from histosynth.presets import Preset, load_preset
from histosynth.sample.jobs import item_seed
from histosynth.schema import RENAL

from .conftest import check_patches_and_a_slide

#: these runs use the preset's untrained autoencoder on purpose (speed); its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")

FAST = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1",
        "--steps", "4", "--checkpoint-every", "2"]
DIT = ["--denoiser", "dit", "--prediction-type", "flow_prediction"]


def tiny_dit(extra_in_channels: int = 0) -> DiTDenoiser:
    torch.manual_seed(0)
    return build_denoiser(load_preset("tiny").with_recipe(denoiser="dit"), 384, extra_in_channels).eval()


# --- the network -------------------------------------------------------------------------------------
@torch.no_grad()
def test_the_dit_is_called_as_the_unet_is():
    dit = tiny_dit()
    assert (context_features(dit), denoiser_factor(dit), dit.config.sample_size) == (384, 4, 64)
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 3, 16, 16, generator=generator), torch.randn(3, 5, 384, generator=generator)
    per_item = dit(x, torch.tensor([250.5, 250.5, 250.5]), encoder_hidden_states=context).sample
    assert per_item.shape == x.shape and per_item.abs().mean() > 0.01
    # one timestep for the batch, as the samplers give it, real-valued as a flow's
    torch.testing.assert_close(dit(x, torch.tensor(250.5), encoder_hidden_states=context).sample, per_item)
    assert not torch.allclose(dit(x, 700, encoder_hidden_states=context).sample, per_item)
    # the caption's padding is not read: tokens masked out change nothing
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3)
    masked = dit(x, 250.5, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    other_padding = context.clone()
    other_padding[:, 3:] = 7.0
    torch.testing.assert_close(dit(x, 250.5, encoder_hidden_states=other_padding, encoder_attention_mask=mask).sample,
                               masked)
    assert not torch.allclose(masked, per_item)


@torch.no_grad()
def test_a_text_dit_widened_for_masks_computes_what_the_text_dit_computes():
    text_dit, wide = tiny_dit(), tiny_dit(extra_in_channels=8)
    assert input_weight_name(wide) == "pos_embed.proj.weight"
    wide.load_state_dict(widen_input(text_dit.state_dict(), wide.config.in_channels, input_weight_name(wide)))
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 4, 384, generator=generator)
    maps = label_map(torch.randint(0, 8, (2, 64, 64), generator=generator), RENAL.ids, 4)
    expected = text_dit(x, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(wide(torch.cat([x, maps], 1), 500, encoder_hidden_states=context).sample, expected,
                               rtol=1e-5, atol=1e-5)  # (a wider convolution sums in another order)


def test_the_dit_section_is_checked_and_left_out_of_unet_presets():
    tiny = load_preset("tiny")
    assert "dit" not in tiny.to_dict() and "denoiser" not in tiny.to_dict()  # UNet presets read as before
    data = tiny.with_recipe(denoiser="dit").to_dict()
    assert (data["denoiser"], data["dit"]) == ("dit", {"patch_size": 4, "width": 192, "depth": 8, "num_heads": 3})
    assert Preset.from_dict(data) == tiny.with_recipe(denoiser="dit")
    data["dit"]["num_heads"] = 5
    with pytest.raises(ConfigError, match="width 192 is not divisible by num_heads=5"):
        Preset.from_dict(data)
    data["dit"].update(num_heads=3, patch_size=3)
    with pytest.raises(ConfigError, match=r"image_size 256 must be a multiple of 12 \(autoencoder factor 4 x DiT "
                                        r"patch factor 3\)"):
        Preset.from_dict(data)


# --- training and sampling ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, blob_dataset):
    root = tmp_path_factory.mktemp("dit")
    assert main(["train", str(blob_dataset.root), "--out", str(root / "model"), "--cache-dir", str(root / "cache"),
                 *FAST, *DIT]) == 0
    return root


def test_a_dit_flow_model_trains_keeps_its_denoiser_and_samples_patches_and_slides(dit_run, tmp_path):
    model = dit_run / "model"
    config = read_bundle_config(model)
    assert (config.preset["denoiser"], config.preset["dit"]["depth"]) == ("dit", 8)
    assert isinstance(load_bundle(model).unet, DiTDenoiser)
    assert json.loads((model / "unet" / "config.json").read_text())["_class_name"] == "DiTDenoiser"
    assert "The denoiser is a transformer (DiT in PixArt-alpha's layout: 8 blocks of width 192, " \
           "4x4-latent-pixel tokens). Trained to predict the velocity eps - x0 of a straight flow" in \
           (model / "README.md").read_text()
    check_patches_and_a_slide(model, tmp_path)


def test_diffusers_loads_a_dit_model_folder_and_samples_the_images_of_generate(dit_run, tmp_path):
    from diffusers import DiffusionPipeline

    model = dit_run / "model"
    assert json.loads((model / MODEL_INDEX_FILE).read_text())["unet"] == ["histosynth.models.denoiser",
                                                                          "DiTDenoiser"]
    pipe = DiffusionPipeline.from_pretrained(model)
    assert type(pipe) is HistosynthPipeline and isinstance(pipe.unet, DiTDenoiser)
    assert main(["generate", "--model", str(model), "--caption", "", "--seed", "3", "--steps", "2", "--n", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    expected = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "cli").glob("00000/*.png"))]
    output = pipe("", num_images_per_prompt=2, num_inference_steps=2, seed=3)
    assert [r["seed"] for r in output.records] == [item_seed(3, i) for i in range(2)]
    for image, reference in zip(output.images, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(image), reference)


def test_a_text_dit_fine_tuned_into_text_and_mask_draws_from_masks(dit_run, blob_dataset, tmp_path):
    tuned = tmp_path / "mask-model"
    assert main(["train", str(blob_dataset.root), "--out", str(tuned), "--init", str(dit_run / "model"),
                 "--condition", "text+mask", "--cache-dir", str(dit_run / "cache"), *FAST, *DIT]) == 0
    bundle = load_bundle(tuned)
    assert isinstance(bundle.unet, DiTDenoiser) and bundle.unet.config.in_channels == 3 + len(RENAL.ids)
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 4
    Image.fromarray(mask).save(masks / "m0.png")
    out = tmp_path / "images"
    assert main(["generate", "--model", str(tuned), "--mask", str(masks), "--caption", "", "--steps", "2",
                 "--seed", "0", "--out", str(out)]) == 0
    (image,) = sorted((out / "images").rglob("*.png"))
    assert np.asarray(Image.open(image)).shape == (32, 32, 3)


@pytest.mark.parametrize("options, message", [
    (["--denoiser", "transformer"], "--denoiser must be one of unet, dit, got 'transformer'"),
    (["--denoiser", "dit", "--condition", "text+mask", "--mask-branch", "controlnet"],
     "--mask-branch controlnet copies a UNet's encoder; a dit model reads the mask with --mask-branch concat"),
])
def test_what_a_dit_cannot_do_is_refused_before_anything_is_written(blob_dataset, tmp_path, refused, options,
                                                                    message):
    assert refused(["train", str(blob_dataset.root), "--out", str(tmp_path / "model"), *FAST, *options]) == \
        f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_fine_tune_keeps_the_denoiser_of_its_init_model(dit_run, blob_dataset, tmp_path, refused):
    args = ["train", str(blob_dataset.root), "--out", str(tmp_path / "tuned"), "--init", str(dit_run / "model"),
            "--cache-dir", str(dit_run / "cache"), *FAST, "--prediction-type", "flow_prediction"]
    assert refused(args) == (f"error: --init {dit_run / 'model'} has a dit denoiser but this run would train a unet; "
                             "give --denoiser dit (or start without --init)")
    assert not (tmp_path / "tuned").exists()


def test_a_run_resumed_with_another_denoiser_is_refused(dit_run, blob_dataset, refused):
    message = refused(["train", str(blob_dataset.root), "--out", str(dit_run / "model"), "--cache-dir",
                       str(dit_run / "cache"), *FAST, "--prediction-type", "flow_prediction", "--resume"])
    assert message == (f"error: --resume with other settings than the run in {dit_run / 'model.run'}: preset "
                       "differ; resume with the same options or start a new run")


def test_a_damaged_denoiser_config_is_refused_with_the_part_named(dit_run, tmp_path):
    import shutil

    from histosynth.errors import ModelError

    model = shutil.copytree(dit_run / "model", tmp_path / "model")
    (model / "unet" / "config.json").write_text("{")
    with pytest.raises(ModelError, match=r"part 'unet': .*config.json cannot be read \(JSONDecodeError\)"):
        load_bundle(model)

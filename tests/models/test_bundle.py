"""Model folders: round trip, atomic replacement, and errors that name the missing or mismatched part."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from histosynth.errors import ModelError
from histosynth.models.autoencoder import build_autoencoder
from histosynth.models.bundle import CONFIG_FILE, load_bundle, read_bundle_config, save_bundle, set_latent_range
from histosynth.models.denoiser import build_denoiser
from histosynth.models.diffusion import noise_scheduler
from histosynth.models.latent_range import LatentRange
from histosynth.models.text import load_text_encoder, minilm_folder
from histosynth.presets import Preset
from histosynth.schema import RENAL

PRESET = Preset.from_dict({
    "name": "bundle-test",
    "image_size": 32,
    "autoencoder": {"block_out_channels": [32, 32, 32], "layers_per_block": 1, "num_vq_embeddings": 16,
                    "mid_block_attention": False},
    "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention": [False, True]},
})
META = {"image_size": 32, "preset": PRESET.to_dict(), "unet_weights": "ema",
        "provenance": {"data": "phantom", "steps": 3, "command": "histosynth train ..."}}


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def parts(minilm):
    torch.manual_seed(0)
    return build_denoiser(PRESET, context_dim=minilm.hidden_size), build_autoencoder(PRESET)


@pytest.fixture()
def bundle_path(tmp_path, parts, minilm):
    unet, autoencoder = parts
    return save_bundle(tmp_path / "model", unet, autoencoder, noise_scheduler(PRESET).config, minilm, RENAL, META)


def test_round_trip_keeps_weights_schema_and_description(bundle_path, parts, minilm):
    unet, autoencoder = parts
    bundle = load_bundle(bundle_path)
    latents, t, context = torch.randn(1, 3, 8, 8), torch.tensor([500]), torch.randn(1, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(latents, t, context).sample, unet(latents, t, context).sample)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(bundle.autoencoder(image).sample, autoencoder(image).sample)
    assert bundle.schema == RENAL
    assert bundle.scheduler_config["beta_schedule"] == "scaled_linear"
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    assert (config["format"], config["format_version"], config["image_size"]) == ("histosynth.bundle", 2, 32)
    assert config["latent"] == {"scale": 1.0, "channels": 3, "downsampling": 4, "quantize_before_decode": True}
    assert config["normalization"]["range"] == [-1.0, 1.0]
    assert config["text_encoder"]["ref"] == "minilm" and config["text_encoder"]["id"] == minilm.id
    assert config["provenance"]["steps"] == 3 and "hardware" in config["provenance"]
    assert config["preset"]["name"] == "bundle-test" and config["unet_weights"] == "ema"
    # the preset's sampling section becomes the model's sampling defaults
    assert config["sampling"] == {**PRESET.sampling.model_dump(), "mask_guidance": 2.5, "eta": 0.0}
    assert bundle.config.to_json() == config and bundle.sampling.steps == PRESET.sampling.steps
    assert len(bundle.id) == 12
    assert not (bundle_path / "text_encoder").exists()  # the default encoder is referenced, not copied
    assert [p.name for p in bundle_path.parent.iterdir()] == ["model"]  # no staging folder left behind


def test_a_non_default_text_encoder_is_copied_and_keeps_its_id(tmp_path, parts, minilm):
    custom = load_text_encoder(minilm_folder())  # the same weights, named by path: not the default
    path = save_bundle(tmp_path / "model", *parts, noise_scheduler(PRESET).config, custom, RENAL, META)
    assert (path / "text_encoder" / "config.json").is_file()
    bundle = load_bundle(path)
    assert bundle.config.text_encoder.ref == "text_encoder"
    assert bundle.text_encoder.id == minilm.id
    states, _ = bundle.text_encoder.encode([""])
    assert states.shape == (1, 2, 384)


def test_saving_replaces_an_older_bundle_but_never_another_folder(bundle_path, parts, minilm, tmp_path):
    old_id = read_bundle_config(bundle_path).id
    unet, autoencoder = parts
    changed = build_denoiser(PRESET, context_dim=384)
    save_bundle(bundle_path, changed, autoencoder, noise_scheduler(PRESET).config, minilm, RENAL, META)
    assert read_bundle_config(bundle_path).id != old_id
    other = tmp_path / "notes"
    other.mkdir()
    with pytest.raises(ModelError, match="exists and is not a model folder"):
        save_bundle(other, unet, autoencoder, noise_scheduler(PRESET).config, minilm, RENAL, META)


def test_a_unet_that_cannot_read_the_text_encoder_is_refused(tmp_path, parts, minilm):
    wrong = build_denoiser(PRESET, context_dim=512)
    with pytest.raises(ModelError, match="cross-attention reads 512 features but text encoder minilm gives 384"):
        save_bundle(tmp_path / "m", wrong, parts[1], noise_scheduler(PRESET).config, minilm, RENAL, META)


@pytest.mark.parametrize("part", ["unet", "autoencoder", "scheduler"])
def test_a_missing_part_is_named(bundle_path, part):
    shutil.rmtree(bundle_path / part)
    with pytest.raises(ModelError, match=f"part '{part}' is missing"):
        load_bundle(bundle_path)


def test_a_missing_description_is_named(bundle_path):
    (bundle_path / CONFIG_FILE).unlink()
    with pytest.raises(ModelError, match="not a histosynth model folder: part 'histosynth.json' is missing"):
        load_bundle(bundle_path)


def test_a_corrupt_or_foreign_description_is_named(bundle_path):
    config_path = bundle_path / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format": "histosynth.dataset"}))
    with pytest.raises(ModelError, match=r"histosynth.json: unknown model folder format 'histosynth.dataset' "
                                         r"\(expected histosynth.bundle\)"):
        load_bundle(bundle_path)
    config_path.write_text("{")
    with pytest.raises(ModelError, match=r"histosynth.json is corrupt \(Expecting property name"):
        load_bundle(bundle_path)


def test_an_autoencoder_with_other_latent_channels_is_a_mismatch(bundle_path):
    autoencoder = {**PRESET.to_dict()["autoencoder"], "latent_channels": 4}
    other = Preset.from_dict({**PRESET.to_dict(), "autoencoder": autoencoder})
    shutil.rmtree(bundle_path / "autoencoder")
    build_autoencoder(other).save_pretrained(bundle_path / "autoencoder")
    with pytest.raises(ModelError, match="part 'unet' does not fit part 'autoencoder': the UNet maps 3 -> 3 "
                                         "channels, the autoencoder has 4 latent channels"):
        load_bundle(bundle_path)


def test_weights_that_do_not_fit_the_config_name_the_part(bundle_path):
    config_path = bundle_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [32, 96]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="part 'unet' cannot be loaded"):
        load_bundle(bundle_path)


def test_a_changed_text_encoder_is_detected_on_first_use(bundle_path):
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    config["text_encoder"]["id"] = "bert:256:0000000000000000"
    (bundle_path / CONFIG_FILE).write_text(json.dumps(config))
    bundle = load_bundle(bundle_path)
    with pytest.raises(ModelError, match="part 'text_encoder' does not match: the model was trained with "
                                         "bert:256:0000000000000000"):
        _ = bundle.text_encoder


def test_a_newer_format_version_asks_for_an_upgrade(bundle_path):
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    config["format_version"] = 3
    (bundle_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="format version 3; this histosynth reads versions 1, 2: upgrade histosynth"):
        load_bundle(bundle_path)


def test_a_version_1_folder_loads_with_its_presets_sampling_defaults(bundle_path):
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    version_1 = {k: v for k, v in config.items() if k != "sampling"}
    version_1["format_version"] = 1
    version_1["latent"] = {k: v for k, v in config["latent"].items() if k != "range"}
    version_1["preset"]["sampling"] = {"steps": 7, "guidance": 2.0, "scheduler": "dpm++"}
    (bundle_path / CONFIG_FILE).write_text(json.dumps(version_1))
    bundle = load_bundle(bundle_path)
    assert (bundle.sampling.steps, bundle.sampling.guidance, bundle.sampling.scheduler) == (7, 2.0, "dpm++")
    assert bundle.sampling.mask_guidance == 2.5 and bundle.config.format_version == 2


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], r"histosynth.json must be a JSON object of fields .* not a list$"),
    (lambda c: {k: v for k, v in c.items() if k != "latent"}, r"histosynth.json: latent: Field required$"),
    (lambda c: {**c, "image_size": "big"}, r"histosynth.json: image_size: Input should be a valid integer"),
    (lambda c: {**c, "sampling": {**c["sampling"], "guidance": float("nan")}},
     r"histosynth.json: sampling: Value error, guidance must be a finite number, got nan$"),
    (lambda c: {**c, "conditioning": {"mask_channels": -2}},
     r"conditioning.mask_channels: Input should be greater than or equal to 0$"),
])
def test_a_bad_model_description_is_one_line_naming_the_field(bundle_path, edit, message):
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    (bundle_path / CONFIG_FILE).write_text(json.dumps(edit(config)))
    with pytest.raises(ModelError, match=message) as caught:
        read_bundle_config(bundle_path)
    assert "\n" not in str(caught.value)


def test_a_latent_range_is_kept_and_changes_the_id(bundle_path, parts, minilm, tmp_path):
    latent_range = LatentRange((-2.0, -1.0, 0.0), (1.0, 1.5, 3.0), 0.01)
    with_range = save_bundle(tmp_path / "ranged", *parts, noise_scheduler(PRESET).config, minilm, RENAL,
                             {**META, "latent_range": latent_range})
    plain = load_bundle(bundle_path)
    ranged = load_bundle(with_range)
    assert plain.latent_range is None and ranged.latent_range == latent_range
    assert ranged.config.to_json()["latent"]["range"] == {"low": [-2.0, -1.0, 0.0], "high": [1.0, 1.5, 3.0],
                                                          "quantile": 0.01}
    assert ranged.id != plain.id  # the same weights sample other images with a range
    # removing the range gives back the plain model's id; setting it again, the ranged one's
    assert set_latent_range(with_range, None) == plain.id and load_bundle(with_range).latent_range is None
    assert set_latent_range(with_range, latent_range) == ranged.id
    with pytest.raises(ModelError, match="the latent range has 2 channels but the autoencoder's latents have 3"):
        set_latent_range(with_range, LatentRange((0.0, 0.0), (1.0, 1.0)))


def test_a_corrupt_latent_range_is_named_on_load(bundle_path):
    config = json.loads((bundle_path / CONFIG_FILE).read_text())
    config["latent"]["range"] = {"low": [0.0, 0.0], "high": [1.0, 1.0]}
    (bundle_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="latent range has 2 channels but the autoencoder's latents have 3"):
        load_bundle(bundle_path)
    config["latent"]["range"] = {"low": "none"}
    (bundle_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="lists 'low' and 'high'"):
        load_bundle(bundle_path)

"""Presets: the shipped sizes (thesis §4.1 for pathldm) and errors that name the bad field."""

from __future__ import annotations

import pytest
import yaml

from histosynth.errors import ConfigError
from histosynth.models.denoiser import denoiser_config
from histosynth.models.sampling import SamplingOptions
from histosynth.presets import builtin_presets, load_preset


def test_builtin_presets_are_listed_and_load():
    assert builtin_presets() == ["pathldm", "small", "tiny"]
    for name in builtin_presets():
        preset = load_preset(name)
        assert preset.name == name
        assert preset.image_size == 256 and preset.latent_size == 64
        assert preset.autoencoder.latent_channels == 3 and preset.autoencoder.downsampling_factor == 4


def test_pathldm_preset_has_the_thesis_sizes():
    preset = load_preset("pathldm")
    ae, unet = preset.autoencoder, preset.unet
    assert (ae.kind, ae.block_out_channels, ae.layers_per_block, ae.num_vq_embeddings, ae.vq_embed_dim) == (
        "vq", (128, 256, 512), 2, 8192, 3
    )
    assert ae.latent_scale == 1.0
    assert unet.block_out_channels == (192, 384, 576, 960)  # 192 x [1, 2, 3, 5]
    assert (unet.layers_per_block, unet.num_heads, unet.transformer_depth) == (2, 1, 1)
    # attention at downsampling 2, 4 and 8 = levels 1, 2, 3
    assert unet.cross_attention == (False, True, True, True)
    d, t, s = preset.diffusion, preset.training, preset.sampling
    assert (d.num_train_timesteps, d.beta_start, d.beta_end, d.beta_schedule, d.prediction_type) == (
        1000, 0.0015, 0.0195, "scaled_linear", "epsilon"
    )
    assert (t.lr, t.warmup_steps, t.batch_size, t.text_dropout, t.precision) == (2.5e-5, 1000, 64, 0.1, "32")
    assert (s.steps, s.guidance, s.scheduler) == (50, 1.5, "ddim")
    config = denoiser_config(preset, context_dim=512)
    assert config["down_block_types"] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3
    assert config["up_block_types"] == ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]
    assert config["attention_head_dim"] == 1 and config["cross_attention_dim"] == 512


def _write(tmp_path, data) -> str:
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _tiny_dict() -> dict:
    return load_preset("tiny").to_dict()


def test_a_preset_file_round_trips(tmp_path):
    data = _tiny_dict()
    data["training"]["batch_size"] = 3
    preset = load_preset(_write(tmp_path, data))
    assert preset.training.batch_size == 3 and preset.unet == load_preset("tiny").unet


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("unet", "cross_attention", [True, False],
         "field 'unet': cross_attention has 2 entries but block_out_channels has 4 levels"),
        ("unet", "block_out_channels", [32, 48, 96, 96],
         "field 'unet': channel counts [48] are not multiples of norm_num_groups=32"),
        ("autoencoder", "kind", "gan", "field 'autoencoder.kind'"),
        ("training", "precision", "16-mixed", "field 'training.precision': fp16 is refused"),
        ("training", "lr", -1, "field 'training.lr'"),
        ("diffusion", "beta_end", 0.001, "beta_start (0.0015) must be below beta_end (0.001)"),
        ("sampling", "stepz", 10, "field 'sampling.stepz': Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_named(tmp_path, section, field, value, message):
    data = _tiny_dict()
    data[section][field] = value
    with pytest.raises(ConfigError) as err:
        load_preset(_write(tmp_path, data))
    assert message in str(err.value)


def test_image_size_must_fit_the_networks(tmp_path):
    data = _tiny_dict()
    data["image_size"] = 100
    with pytest.raises(ConfigError,
                       match=r"image_size 100 must be a multiple of 32 \(autoencoder factor 4 x UNet factor 8\)"):
        load_preset(_write(tmp_path, data))


def test_unknown_preset_name_lists_the_choices():
    with pytest.raises(ConfigError,
                       match="unknown preset 'huge': give one of pathldm, small, tiny or a preset YAML file"):
        load_preset("huge")


# YAML's own spellings of infinity and NaN, as a user's file would hold them, each in each of these fields
@pytest.mark.parametrize("value", [".inf", ".nan"])
@pytest.mark.parametrize("name", ["training.lr", "training.weight_decay", "training.ema_decay", "sampling.guidance",
                                  "autoencoder.latent_scale", "diffusion.beta_start"])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, name, value):
    path = tmp_path / "p.yaml"
    data = _tiny_dict()
    section, field = name.split(".")
    data[section][field] = "__VALUE__"
    path.write_text(yaml.safe_dump(data).replace("__VALUE__", value))
    with pytest.raises(ConfigError, match=rf"field '{name}': Input should be a finite number") as err:
        load_preset(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("unet: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(ParserError: ") as err:
        load_preset(path)
    assert "\n" not in str(err.value)


def test_the_sampling_section_holds_every_sampling_option_with_its_defaults(tmp_path):
    assert load_preset("tiny").sampling.to_options() == SamplingOptions()
    data = _tiny_dict()
    data["sampling"] = {"steps": 7, "mask_guidance": 1.0, "eta": 0.5}
    assert load_preset(_write(tmp_path, data)).sampling.to_options() == SamplingOptions(steps=7, mask_guidance=1.0,
                                                                                         eta=0.5)
    data["sampling"] = {"scheduler": "dpm++", "eta": 0.5}
    with pytest.raises(ConfigError, match="field 'sampling': eta applies to the ddim scheduler only"):
        load_preset(_write(tmp_path, data))

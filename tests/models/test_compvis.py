"""CompVis checkpoint import, checked against the CompVis reference fixture (tests/fixtures/compvis).

The fixture's tensors were computed by the original CompVis / PathLDM code; tolerances are the ones its
README recommends for fp32 on a CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from safetensors.torch import load_file

from histosynth.cli import main
from histosynth.errors import ModelError
from histosynth.models.autoencoder import decode_latents, encode_latents, load_checked_autoencoder
from histosynth.models.compvis import ema_key, import_compvis, import_compvis_autoencoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def expected(compvis_expected) -> dict[str, torch.Tensor]:
    return compvis_expected


@pytest.fixture(scope="module")
def fixture_state(compvis_dir) -> dict[str, torch.Tensor]:
    return load_file(str(compvis_dir / "tiny_ldm.safetensors"))


@pytest.fixture(scope="module")
def fixture_config(compvis_dir) -> dict:
    return yaml.safe_load((compvis_dir / "tiny_ldm.yaml").read_text())


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["ckpt", "safetensors"])
def test_imported_networks_reproduce_compvis_outputs(compvis_dir, compvis_ckpt, checkpoint, expected):
    path = compvis_ckpt if checkpoint == "ckpt" else compvis_dir / "tiny_ldm.safetensors"
    unet, vq, info = import_compvis(path, compvis_dir / "tiny_ldm.yaml")
    with torch.no_grad():
        eps = unet(expected["unet_x"], expected["unet_t"], encoder_hidden_states=expected["unet_ctx"]).sample
        latent = encode_latents(vq, expected["vq_image"])
        quantized, _, (_, _, indices) = vq.quantize(expected["vq_latent"])
        decoded = decode_latents(vq, expected["vq_latent"])
    assert max_error(eps, expected["unet_eps"]) < 1e-4
    assert max_error(latent, expected["vq_latent"]) < 1e-4
    assert max_error(quantized, expected["vq_quantized"]) < 1e-5
    assert torch.equal(indices.view(expected["vq_indices"].shape), expected["vq_indices"])
    assert max_error(decoded, expected["vq_decoded"]) < 1e-4
    assert info.latent_scale == 1.0 and info.context_dim == 64 and info.image_size == 64
    assert info.skipped == {"schedule buffers": 12}
    assert info.used_ema is False
    assert (info.diffusion.beta_start, info.diffusion.beta_end, info.diffusion.beta_schedule) == (
        0.0015, 0.0195, "scaled_linear"
    )


# --- EMA and text-encoder keys ---------------------------------------------------------------------


def _save_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], config: dict) -> tuple[Path, Path]:
    ckpt, yaml_path = tmp_path / "model.ckpt", tmp_path / "model.yaml"
    torch.save({"state_dict": state, "global_step": 1234}, ckpt)
    yaml_path.write_text(yaml.safe_dump(config))
    return ckpt, yaml_path


def test_ema_weights_are_taken_when_present_and_text_encoder_keys_are_skipped(tmp_path, fixture_state, fixture_config):
    state = dict(fixture_state)
    unet_keys = [k for k in fixture_state if k.startswith("model.diffusion_model.")]
    for key in unet_keys:
        state[ema_key(key)] = fixture_state[key].float() + 0.5
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1234)
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    ckpt, yaml_path = _save_checkpoint(tmp_path, state, fixture_config)

    raw_unet, _, raw_info = import_compvis(ckpt, yaml_path, use_ema=False)
    ema_unet, _, ema_info = import_compvis(ckpt, yaml_path)  # default: EMA when present

    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(raw_unet.conv_in.weight, fixture_state[conv_in].float())
    assert torch.equal(ema_unet.conv_in.weight, fixture_state[conv_in].float() + 0.5)
    assert ema_key(conv_in) == "model_ema.diffusion_modelinput_blocks00weight"
    assert ema_info.used_ema and not raw_info.used_ema
    assert ema_info.global_step == 1234
    assert ema_info.skipped == {
        "cond_stage_model.*": 2, "model.diffusion_model.*": len(unet_keys), "model_ema.*": 2, "schedule buffers": 12
    }
    assert raw_info.skipped == {"cond_stage_model.*": 2, "model_ema.*": len(unet_keys) + 2, "schedule buffers": 12}


def test_asking_for_ema_weights_that_are_absent_is_an_error(compvis_dir):
    with pytest.raises(ModelError, match="EMA weights requested"):
        import_compvis(compvis_dir / "tiny_ldm.safetensors", compvis_dir / "tiny_ldm.yaml", use_ema=True)


# --- checkpoints that do not fit their config ------------------------------------------------------


def _write_yaml(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("keys, value, message", [
    pytest.param(("unet_config", "params", "context_dim"), 32, "^" + re.escape(
        "checkpoint key 'model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight' "
        "has shape (32, 64) but the config's denoiser expects (32, 32)"), id="shape-mismatch-names-the-key"),
    pytest.param(("unet_config", "params", "num_res_blocks"), 2,
                 r"checkpoint key 'model\.diffusion_model\.input_blocks\.3\.0\.[\w.]+' has no place",
                 id="extra-res-blocks-name-the-misplaced-key"),
    pytest.param(("first_stage_config", "params", "n_embed"), 128,
                 r"checkpoint key 'first_stage_model\.quantize\.embedding\.weight' has shape \(64, 3\)",
                 id="wrong-autoencoder-size-names-the-key"),
    pytest.param(("linear_end",), 0.012, "'betas' buffer does not match", id="wrong-schedule-caught-by-betas-buffer"),
])
def test_a_config_that_does_not_fit_the_checkpoint_is_refused(compvis_dir, tmp_path, fixture_config, keys, value,
                                                              message):
    config = yaml.safe_load(yaml.safe_dump(fixture_config))
    params = config["model"]["params"]
    for key in keys[:-1]:
        params = params[key]
    params[keys[-1]] = value
    with pytest.raises(ModelError, match=message):
        import_compvis(compvis_dir / "tiny_ldm.safetensors", _write_yaml(tmp_path, config))


def test_missing_checkpoint_and_non_compvis_yaml_are_clear_errors(compvis_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        import_compvis(tmp_path / "none.ckpt", compvis_dir / "tiny_ldm.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\n")
    with pytest.raises(ModelError, match="not a CompVis LatentDiffusion or first-stage config"):
        import_compvis(compvis_dir / "tiny_ldm.safetensors", bad)


# --- the VQ nin_shortcut mapping of real PathLDM VQ-f4 checkpoints ---------------------------------

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def compvis_vq_key(key: str, levels: int) -> str:
    """The CompVis (taming) name of a diffusers VQModel parameter, written out from the CompVis layout."""
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_PARTS[m[3]]}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_RESNET_PARTS[m[3]]}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_PARTS[m[3]]}."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_ATTENTION_PARTS[m[2]]}."),
    ]
    for pattern, replacement in rules:
        key, n = re.subn("^" + pattern, replacement, key)
        if n:
            break
    return "first_stage_model." + key


def compvis_vq_state(vq: VQModel) -> dict[str, torch.Tensor]:
    levels = len(vq.config.block_out_channels)
    state = {}
    for key, value in vq.state_dict().items():
        name = compvis_vq_key(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # CompVis attention projections are 1x1 convs
        state[name] = value.clone()
    return state


def test_inverse_vq_names_are_the_compvis_names_of_the_fixture(compvis_dir, fixture_state):
    unet, vq, _ = import_compvis(compvis_dir / "tiny_ldm.safetensors", compvis_dir / "tiny_ldm.yaml")
    fixture_vq = {k: v for k, v in fixture_state.items() if k.startswith("first_stage_model.")}
    generated = compvis_vq_state(vq)
    assert set(generated) == set(fixture_vq)
    assert all(generated[k].shape == fixture_vq[k].shape for k in generated)


def test_pathldm_style_vq_with_channel_changes_round_trips_strictly(tmp_path, fixture_state, fixture_config):
    """ch_mult [1, 2, 4] (as the real PathLDM VQ-f4) has nin_shortcut convs; they must map to conv_shortcut."""
    torch.manual_seed(0)
    original = VQModel(
        block_out_channels=[32, 64, 128], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=3,
        num_vq_embeddings=64, vq_embed_dim=3, sample_size=64, scaling_factor=1.0,
    ).eval()
    with torch.no_grad():  # GroupNorm affine parameters start at 1/0; make a mix-up detectable
        for p in original.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vq_state = compvis_vq_state(original)
    shortcuts = sorted(k for k in vq_state if "nin_shortcut" in k)
    assert shortcuts == [
        f"first_stage_model.{part}.block.0.nin_shortcut.{p}"
        for part in ("decoder.up.0", "decoder.up.1", "encoder.down.1", "encoder.down.2") for p in ("bias", "weight")
    ]
    state = {k: v for k, v in fixture_state.items() if not k.startswith("first_stage_model.")} | vq_state
    config = yaml.safe_load(yaml.safe_dump(fixture_config))
    config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = [1, 2, 4]
    ckpt, yaml_path = _save_checkpoint(tmp_path, state, config)

    _, imported, _ = import_compvis(ckpt, yaml_path)

    reference = original.state_dict()
    assert imported.state_dict().keys() == reference.keys()
    assert all(torch.equal(imported.state_dict()[k], reference[k]) for k in reference)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(imported(image).sample, original(image).sample)


# --- the command -----------------------------------------------------------------------------------


def test_import_command_writes_loadable_networks(compvis_dir, compvis_ckpt, tmp_path, expected):
    out = tmp_path / "imported"
    command = ["import-compvis", str(compvis_ckpt), "--config", str(compvis_dir / "tiny_ldm.yaml"), "--out", str(out)]
    code = main(command)
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"unet", "autoencoder", "scheduler", "histosynth.json"}
    description = json.loads((out / "histosynth.json").read_text())
    assert (description["format"], description["missing"], description["context_dim"]) == (
        "histosynth.compvis-import", ["text_encoder"], 64
    )
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    vq = VQModel.from_pretrained(out / "autoencoder")
    with torch.no_grad():
        eps = unet(expected["unet_x"], expected["unet_t"], encoder_hidden_states=expected["unet_ctx"]).sample
        decoded = decode_latents(vq, expected["vq_latent"])
    assert max_error(eps, expected["unet_eps"]) < 1e-4
    assert max_error(decoded, expected["vq_decoded"]) < 1e-4
    assert main(command) == 2


def test_import_with_a_fitting_text_encoder_writes_a_complete_model_folder(tmp_path, fixture_state, fixture_config,
                                                                            expected):
    """The fixture's denoiser re-sized to read MiniLM states (384 features) gives a folder load_bundle accepts."""
    from histosynth.models.bundle import load_bundle

    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape[0], 384, generator=generator) * 0.05 if re.search(r"attn2\.to_[kv]\.weight$", k) else v
        for k, v in fixture_state.items()
    }
    config = yaml.safe_load(yaml.safe_dump(fixture_config))
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 384
    ckpt, yaml_path = _save_checkpoint(tmp_path, state, config)
    out = tmp_path / "bundle"

    assert main(["import-compvis", str(ckpt), "--config", str(yaml_path), "--out", str(out),
                 "--text-encoder", "minilm"]) == 0

    bundle = load_bundle(out)
    assert bundle.config.text_encoder.ref == "minilm" and bundle.config.unet_weights == "raw"
    assert bundle.config.to_json()["latent"] == {"scale": 1.0, "channels": 3, "downsampling": 4,
                                                 "quantize_before_decode": True}
    assert bundle.image_size == 64 and bundle.config.provenance["global_step"] == 1234
    with torch.no_grad():
        assert max_error(decode_latents(bundle.autoencoder, expected["vq_latent"]), expected["vq_decoded"]) < 1e-4


def test_a_text_encoder_of_the_wrong_width_is_refused(compvis_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["import-compvis", str(compvis_dir / "tiny_ldm.safetensors"),
                 "--config", str(compvis_dir / "tiny_ldm.yaml"), "--out", str(out), "--text-encoder", "minilm"])
    assert code == 2 and not out.exists()
    assert ("text encoder 'minilm' gives 384 features per token but the checkpoint's denoiser reads 64"
            in capsys.readouterr().err)


# --- standalone first-stage checkpoints (the model zoo's vq-f4/model.ckpt + config.yaml) -----------


def test_a_standalone_vq_first_stage_reproduces_compvis_outputs(compvis_vq_first_stage, expected):
    """The fixture's first stage cut out of the LDM gives the original code's encode / quantise / decode."""
    ckpt, config = compvis_vq_first_stage
    vq, info = import_compvis_autoencoder(ckpt, config)
    with torch.no_grad():
        latent = encode_latents(vq, expected["vq_image"])
        quantized, _, (_, _, indices) = vq.quantize(expected["vq_latent"])
        decoded = decode_latents(vq, expected["vq_latent"])
    assert max_error(latent, expected["vq_latent"]) < 1e-4
    assert max_error(quantized, expected["vq_quantized"]) < 1e-5
    assert torch.equal(indices.view(expected["vq_indices"].shape), expected["vq_indices"])
    assert max_error(decoded, expected["vq_decoded"]) < 1e-4
    assert (info.kind, info.downsampling, info.latent_channels, info.latent_scale, info.global_step) == (
        "vq", 4, 3, 1.0, 42)
    assert info.skipped == {"loss.*": 3}
    assert info.summary() == ("imported a VQ-f4 autoencoder (3 latent channels, step 42), latent scale 1.0; "
                              "skipped 3 loss.* (the training loss: LPIPS, discriminator)")


def test_a_standalone_kl_first_stage_round_trips_strictly(tmp_path, first_stage_checkpoint):
    """A KL-f4 with a channel change (nin_shortcut convs) written out in CompVis names imports to the same
    network, with the latent scale given."""
    torch.manual_seed(0)
    original = AutoencoderKL(
        block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, sample_size=64,
        scaling_factor=0.25,
    ).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k[len("first_stage_model."):]: v for k, v in compvis_vq_state(original).items()}
    first_stage = {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    ckpt, config = first_stage_checkpoint(tmp_path, state, first_stage, "ldm.models.autoencoder.AutoencoderKL")

    imported, info = import_compvis_autoencoder(ckpt, config, latent_scale=0.25)

    reference = original.state_dict()
    assert imported.state_dict().keys() == reference.keys()
    assert all(torch.equal(imported.state_dict()[k], reference[k]) for k in reference)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode_latents(imported, image), encode_latents(original, image))
        assert torch.equal(imported(image).sample, original(image).sample)
    assert (info.kind, info.downsampling, info.latent_channels, info.skipped) == ("kl", 4, 4, {"loss.*": 3})


def test_import_command_writes_an_autoencoder_folder_for_a_first_stage_checkpoint(compvis_vq_first_stage, tmp_path,
                                                                                   expected, capsys):
    ckpt, config = compvis_vq_first_stage
    out = tmp_path / "vq-f4"
    assert main(["import-compvis", str(ckpt), "--config", str(config), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                     "import.json"]
    notes = json.loads((out / "import.json").read_text())
    assert (notes["global_step"], notes["latent_scale"], notes["skipped_keys"]) == (42, 1.0, {"loss.*": 3})
    assert f"wrote autoencoder folder {out}" in capsys.readouterr().out
    with torch.no_grad():
        decoded = decode_latents(load_checked_autoencoder(out), expected["vq_latent"])
    assert max_error(decoded, expected["vq_decoded"]) < 1e-4


def _without(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def test_bad_first_stage_inputs_are_refused_in_one_line(compvis_dir, compvis_vq_first_stage, tmp_path, refused,
                                                        first_stage_checkpoint):
    ckpt, config = compvis_vq_first_stage
    command = ["import-compvis", str(ckpt), "--config", str(config)]
    other = tmp_path / "ddpm.yaml"
    other.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.DDPM", "params": {}}}))
    assert refused(["import-compvis", str(ckpt), "--config", str(other), "--out", str(tmp_path / "a")]) == (
        f"error: {other}: not a CompVis LatentDiffusion or first-stage config (model.target "
        "'ldm.models.diffusion.ddpm.DDPM'); histosynth imports a LatentDiffusion (model.params.unet_config and "
        "first_stage_config) or a VQModel / AutoencoderKL")

    state = torch.load(ckpt, weights_only=True)["state_dict"]
    first_stage = yaml.safe_load(config.read_text())["model"]
    no_encoder, _ = first_stage_checkpoint(tmp_path / "no-encoder", _without(state, "encoder."), first_stage,
                                           first_stage["target"])
    assert refused(["import-compvis", str(no_encoder), "--config", str(config), "--out", str(tmp_path / "b")]) == (
        "error: the checkpoint has no weights for 60 autoencoder tensors (first: diffusers 'encoder.conv_in.weight');"
        " is --config the right YAML?")

    remapped, _ = first_stage_checkpoint(tmp_path / "remapped", state | {"quantize.used": torch.arange(8)},
                                         first_stage, first_stage["target"])
    assert refused(["import-compvis", str(remapped), "--config", str(config), "--out", str(tmp_path / "b")]) == (
        "error: 1 checkpoint weights were not used by the networks the config describes (first: 'quantize.used'); "
        "is --config the YAML this checkpoint was trained with?")
    assert refused(["import-compvis", str(compvis_dir / "tiny_ldm.safetensors"), "--config", str(config), "--out",
                    str(tmp_path / "b")]).endswith("is a LatentDiffusion checkpoint, not a first-stage one; import it "
                                                   "with its LatentDiffusion YAML (the model folder it gives serves "
                                                   "as --autoencoder too)")
    assert refused([*command, "--out", str(tmp_path / "c"), "--ema"]).endswith(
        "describes a first-stage autoencoder; --text-encoder and --ema/--no-ema belong to LatentDiffusion checkpoints")
    assert refused([*command, "--out", str(tmp_path / "d"), "--latent-scale", "0"]).startswith("error: --latent-scale")
    assert refused(["import-compvis", str(compvis_dir / "tiny_ldm.safetensors"), "--config",
                    str(compvis_dir / "tiny_ldm.yaml"), "--out", str(tmp_path / "e"), "--latent-scale", "0.5"]
                   ).endswith("--latent-scale is for first-stage checkpoints")
    assert not any((tmp_path / name).exists() for name in "abcde")

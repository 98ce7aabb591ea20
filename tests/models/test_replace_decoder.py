"""`histosynth replace-decoder`: a model copy that decodes the same latents with another decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histosynth.cli import main
from histosynth.models.autoencoder import decode_latents, decoder_digest, write_autoencoder_folder
from histosynth.models.bundle import load_autoencoder_folder, load_bundle, read_bundle_config, set_latent_range
from histosynth.models.sampling import SamplingOptions
from histosynth.sample.generate import CaptionEmbeddings, generate, sample_latents

CAPTION = "Tubuli medium, a lot of Glomeruli"
OPTIONS = SamplingOptions(steps=2, guidance=1.5)


def changed_autoencoder(model, out, prefix: str, metrics: dict | None = None):
    """The model's autoencoder with the weights under ``prefix`` shifted, written to ``out``."""
    autoencoder = load_autoencoder_folder(model)
    with torch.no_grad():
        for name, parameter in autoencoder.named_parameters():
            if name.startswith(prefix):
                parameter.add_(0.05 * torch.randn_like(parameter))
    write_autoencoder_folder(out, autoencoder, {"metrics.json": metrics} if metrics else {})
    return autoencoder


def replace_decoder(model, autoencoder, out) -> int:
    return main(["replace-decoder", str(model), "--autoencoder", str(autoencoder), "--out", str(out)])


def test_the_copy_decodes_the_same_latents_with_the_new_decoder(tiny_bundle_path, tmp_path, capsys):
    torch.manual_seed(1)
    decoder = changed_autoencoder(tiny_bundle_path, tmp_path / "ae", "decoder.", {"steps": 7, "psnr_db": 30.5}).eval()
    out = tmp_path / "model"
    assert replace_decoder(tiny_bundle_path, tmp_path / "ae", out) == 0
    config, original = read_bundle_config(out), read_bundle_config(tiny_bundle_path)
    assert config.latent.decoder == decoder_digest(decoder) and config.id != original.id
    assert f"model id {config.id}" in capsys.readouterr().out
    record = config.provenance["decoder"]
    assert record["steps"] == 7 and record["digest"] == config.latent.decoder
    assert "The decoder was replaced by one fine-tuned alone" in (out / "README.md").read_text()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_bundle_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    old, new = load_bundle(tiny_bundle_path), load_bundle(out)
    latents = sample_latents(old, [CAPTION], [5], OPTIONS, CaptionEmbeddings.for_bundle(old, [CAPTION]))
    with torch.no_grad():
        expected = ((decode_latents(decoder, latents).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    made = generate(new, [CAPTION], [5], OPTIONS).images
    assert np.array_equal(made, expected.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(made, generate(old, [CAPTION], [5], OPTIONS).images)
    # the id keeps the decoder when the latent range changes
    assert set_latent_range(out, None) == config.id


@pytest.mark.parametrize("prefix, problem", [
    ("encoder.", "its weights before the latent differ (first: 'encoder."),
    ("quant_conv.", "its weights before the latent differ (first: 'quant_conv."),
])
def test_an_autoencoder_for_other_latents_is_refused(tiny_bundle_path, tmp_path, capsys, prefix, problem):
    changed_autoencoder(tiny_bundle_path, tmp_path / "ae", prefix)
    out = tmp_path / "model"
    assert replace_decoder(tiny_bundle_path, tmp_path / "ae", out) == 2
    err = capsys.readouterr().err
    assert "does not encode the latents" in err and problem in err and "--decoder-only" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_another_latent_scale_is_refused(tiny_bundle_path, tmp_path, capsys):
    autoencoder = load_autoencoder_folder(tiny_bundle_path)
    autoencoder.register_to_config(scaling_factor=autoencoder.config.scaling_factor * 2)
    write_autoencoder_folder(tmp_path / "ae", autoencoder, {})
    assert replace_decoder(tiny_bundle_path, tmp_path / "ae", tmp_path / "model") == 2
    assert "its scaling_factor is" in capsys.readouterr().err and not (tmp_path / "model").exists()


def test_an_existing_output_is_never_overwritten(tiny_bundle_path, tmp_path, capsys):
    changed_autoencoder(tiny_bundle_path, tmp_path / "ae", "decoder.")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    assert replace_decoder(tiny_bundle_path, tmp_path / "ae", tmp_path / "model") == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["notes.txt"]


def test_a_decoder_fine_tuned_from_the_model_replaces_its_decoder(tiny_bundle_path, tmp_path):
    from tests.train.conftest import write_blob_dataset

    dataset = write_blob_dataset(tmp_path / "blobs", n=8)
    tuned = tmp_path / "ae"
    assert main(["train-autoencoder", str(dataset.root), "--init", str(tiny_bundle_path), "--decoder-only",
                 "--out", str(tuned), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "2"]) == 0
    assert replace_decoder(tiny_bundle_path, tuned, tmp_path / "model") == 0
    record = read_bundle_config(tmp_path / "model").provenance["decoder"]
    assert record["trained"] == "decoder" and record["steps"] == 2
    assert json.loads((tuned / "metrics.json").read_text())["psnr_db"] == record["psnr_db"]


def test_an_output_inside_the_model_folder_is_refused(tiny_bundle_path, tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_bundle_path, tmp_path / "model")
    changed_autoencoder(model, tmp_path / "ae", "decoder.")
    before = sorted(p.name for p in model.iterdir())
    assert replace_decoder(model, tmp_path / "ae", model / "copy") == 2
    assert "is inside the model folder" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before

"""Mask conditioning in training: cached label maps, flipped and dropped per batch, `train --condition`,
fine-tuning a text model into a text+mask model that starts out exactly as the text model, and the
ControlNet mask branch trained on a frozen text model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.cli import main
from histosynth.errors import ModelError
from histosynth.models.bundle import load_bundle, save_bundle
from histosynth.models.conditioning import Conditioning
from histosynth.models.control import MaskControlledUNet, add_mask_branch
from histosynth.models.denoiser import build_denoiser
from histosynth.models.diffusion import noise_scheduler
from histosynth.models.label_maps import label_map
from histosynth.presets import load_preset
from histosynth.sample.generate import SamplingOptions, generate
from histosynth.schema import RENAL
from histosynth.train.cache import FLIP_VARIANTS, prepare_training_data
from histosynth.train.data import ConditionDropout, StepBatches
from histosynth.train.ldm import initialise_from_bundle

from .conftest import seeded_autoencoder, write_blob_dataset

pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")

FAST = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def with_maps(blob_dataset, minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    data = prepare_training_data(blob_dataset, seeded_autoencoder(), minilm, folder, show_progress=False,
                                 label_classes=RENAL.ids)
    return data, folder


def blob_masks(dataset) -> np.ndarray:
    return np.stack([dataset.mask(row) for _, row in dataset.manifest.iterrows()])


# --- the cache ------------------------------------------------------------------------------------
def test_label_maps_are_cached_once_per_patch(blob_dataset, with_maps, minilm):
    data, folder = with_maps
    assert data.label_counts.torch_dtype == torch.uint8 and data.label_counts.shape == (16, 8, 8, 8)
    assert (data.label_classes, data.label_factor) == (tuple(RENAL.ids), 4)
    expected = label_map(blob_masks(blob_dataset), RENAL.ids, 4)
    torch.testing.assert_close(data.label_counts[:].float() / 16, expected, rtol=0, atol=0)
    part = next((folder / "labels").glob("f4-*-train/part-00000.npy"))
    stamp = part.stat().st_mtime_ns
    again = prepare_training_data(blob_dataset, seeded_autoencoder(), minilm, folder, show_progress=False,
                                  label_classes=RENAL.ids)
    assert part.stat().st_mtime_ns == stamp and torch.equal(again.label_counts[:], data.label_counts[:])


def test_the_cache_command_caches_label_maps_on_request(blob_dataset, tmp_path, capsys):
    args = ["cache", str(blob_dataset.root), "--preset", "tiny", "--cache-dir", str(tmp_path)]
    assert main(args) == 0 and not (tmp_path / "labels").exists()
    assert main([*args, "--label-maps"]) == 0
    assert "label maps of 8 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "labels").glob("f4-*-train/part-00000.npy"))) == 1


def test_batches_flip_each_label_map_with_its_latent(blob_dataset, with_maps):
    data, _ = with_maps
    masks = blob_masks(blob_dataset)
    batch = StepBatches(data, 16, seed=3, dropout=ConditionDropout(text=0.0, label_maps=0.0))[5]
    seen = set()
    for latent, item, shares in zip(batch.latents, batch.items.tolist(), batch.condition.label_maps, strict=True):
        variant = next(v for v in range(4) if torch.equal(data.latents[item][v].float(), latent))
        horizontal, vertical = FLIP_VARIANTS[variant]
        axes = [a for a, flip in ((1, horizontal), (0, vertical)) if flip]
        flipped = np.flip(masks[item], axis=axes).copy() if axes else masks[item]
        torch.testing.assert_close(shares, label_map(flipped, RENAL.ids, 4), rtol=0, atol=0)
        seen.add(variant)
    assert seen == {0, 1, 2, 3}


def test_mask_dropout_is_its_own_and_leaves_text_batches_as_they_were(with_maps):
    data, _ = with_maps
    dropout = ConditionDropout(text=0.3, label_maps=0.5)
    batches = [StepBatches(data, 16, seed=0, dropout=dropout)[s] for s in range(40)]
    dropped_maps = torch.cat([b.condition.label_maps.flatten(1).sum(1) == 0 for b in batches])
    assert 0.4 < dropped_maps.float().mean() < 0.6
    text_only = replace(data, label_counts=None)
    for step, batch in enumerate(batches[:5]):
        plain = StepBatches(text_only, 16, seed=0, dropout=dropout)[step]
        assert plain.condition.label_maps is None
        assert torch.equal(plain.latents, batch.latents) and torch.equal(plain.condition.text, batch.condition.text)


# --- the command ------------------------------------------------------------------------------------
def test_train_text_and_mask_writes_a_mask_conditioned_model(blob_dataset, tmp_path):
    out = tmp_path / "model"
    args = ["train", str(blob_dataset.root), "--out", str(out), "--steps", "4", "--checkpoint-every", "4",
            "--cache-dir", str(tmp_path / "cache"), "--condition", "text+mask", "--mask-dropout", "0.3",
            "--sample-every", "4", *FAST]
    assert main(args) == 0
    bundle = load_bundle(out)
    assert bundle.conditioning == Conditioning(text=True, mask=True, text_dropout=0.1, mask_dropout=0.3)
    assert (bundle.mask_classes, bundle.unet.config.in_channels) == (RENAL.ids, 11)
    assert bundle.config.provenance["condition"] == "text+mask"
    assert json.loads((tmp_path / "model.run" / "run.json").read_text())["condition"] == "text+mask"
    # the sample grid shows the conditioning masks (coloured) above the images drawn from them
    grid = np.asarray(Image.open(tmp_path / "model.run" / "samples" / "step-0000004.png"))
    assert grid.shape == (64, 4 * 32, 3)
    first_mask = blob_masks(blob_dataset)[0]
    majority = label_map(first_mask, RENAL.ids, 4).argmax(0).numpy()
    np.testing.assert_array_equal(grid[:32, :32], RENAL.colorize(np.repeat(np.repeat(majority, 4, 0), 4, 1)))


def test_a_mask_only_model_needs_no_captions(tmp_path, capsys):
    dataset = write_blob_dataset(tmp_path / "bare", n=4, captions=False)
    out = tmp_path / "model"
    assert main(["train", str(dataset.root), "--out", str(out), "--steps", "2", "--condition", "mask", *FAST]) == 0
    conditioning = load_bundle(out).config.conditioning.model_dump()
    assert (conditioning["text"], conditioning["mask_channels"], conditioning["mask_dropout"]) == (False, 8, 0.2)
    assert main(["train", str(dataset.root), "--out", str(tmp_path / "m2"), "--steps", "2", "--condition", "image",
                 *FAST]) == 2
    assert "unknown condition 'image'; use one of text, mask, text+mask" in capsys.readouterr().err


# --- fine-tuning a text model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory, minilm):
    preset = load_preset("tiny")
    torch.manual_seed(1)
    unet = build_denoiser(preset, context_dim=minilm.hidden_size)
    path = tmp_path_factory.mktemp("text") / "model"
    return save_bundle(path, unet, seeded_autoencoder(), dict(noise_scheduler(preset).config), minilm, RENAL,
                       {"image_size": 32, "preset": preset.to_dict()})


@torch.no_grad()
def test_a_text_model_fine_tuned_into_text_and_mask_starts_as_the_text_model(text_bundle, minilm):
    text_unet = load_bundle(text_bundle).unet
    unet = build_denoiser(load_preset("tiny"), context_dim=minilm.hidden_size, extra_in_channels=8).eval()
    initialise_from_bundle(unet, text_bundle, RENAL.ids)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=generator)
    context, mask = minilm.encode(["", "The image shows a low amount of Glomeruli.", "x"])
    masks = torch.randint(0, 8, (3, 32, 32), generator=generator)
    maps = label_map(masks, RENAL.ids, 4)
    maps[0] = 0  # the dropped map too
    t = torch.tensor([10, 500, 990])
    expected = text_unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    widened = unet(torch.cat([x, maps], 1), t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    assert expected.abs().mean() > 0.01
    # equal up to float32 rounding (a wider convolution sums in another order)
    torch.testing.assert_close(widened, expected, rtol=1e-5, atol=1e-5)


def test_fine_tuning_by_command_and_what_cannot_be_fine_tuned(text_bundle, blob_dataset, tmp_path, capsys):
    out = tmp_path / "mask-model"
    args = ["train", str(blob_dataset.root), "--out", str(out), "--steps", "2", "--init", str(text_bundle),
            "--condition", "text+mask", "--cache-dir", str(tmp_path / "cache"), *FAST]
    assert main(args) == 0  # the autoencoder is the --init model's: no warning about an untrained one
    bundle = load_bundle(out)
    assert bundle.mask_channels == 8 and bundle.config.provenance["init"] == str(text_bundle)
    text_autoencoder = load_bundle(text_bundle).autoencoder
    assert torch.equal(bundle.autoencoder.encoder.conv_in.weight, text_autoencoder.encoder.conv_in.weight)
    back = ["train", str(blob_dataset.root), "--out", str(tmp_path / "text-again"), "--steps", "2", "--init", str(out),
            "--cache-dir", str(tmp_path / "cache"), *FAST]
    assert main(back) == 2
    assert (f"--init {out} reads label maps of classes {RENAL.ids}; it cannot be fine-tuned into a model without "
            "a mask condition") in capsys.readouterr().err
    with pytest.raises(ModelError, match="cannot be fine-tuned into mask classes"):
        initialise_from_bundle(build_denoiser(load_preset("tiny"), 384, extra_in_channels=2), out, [4, 6])


# --- the ControlNet mask branch --------------------------------------------------------------------
@torch.no_grad()
def test_a_new_controlnet_branch_leaves_the_text_model_exactly_as_it_was(text_bundle, minilm):
    text_unet = load_bundle(text_bundle).unet
    controlled = add_mask_branch(load_bundle(text_bundle).unet, len(RENAL.ids)).eval()
    assert controlled.config.in_channels == 3 + 8 and list(controlled.config.block_out_channels) == [32, 64, 96, 96]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    context, mask = minilm.encode(["", "The image shows a low amount of Glomeruli."])
    maps = label_map(torch.randint(0, 8, (2, 32, 32), generator=generator), RENAL.ids, 4)
    t = torch.tensor([10, 700])
    expected = text_unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    steered = controlled(torch.cat([x, maps], 1), t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(steered, expected, rtol=0, atol=0)  # the branch adds zeros until trained


def test_train_a_controlnet_branch_on_a_frozen_text_model(text_bundle, blob_dataset, tmp_path, capsys):
    def train(out, *extra):
        return main(["train", str(blob_dataset.root), "--out", str(out), "--steps", "2", "--condition", "text+mask",
                     "--mask-branch", "controlnet", "--cache-dir", str(tmp_path / "cache"), *FAST, *extra])

    out = tmp_path / "controlled"
    assert train(out, "--init", str(text_bundle)) == 0
    bundle, text_model = load_bundle(out), load_bundle(text_bundle)
    assert isinstance(bundle.unet, MaskControlledUNet) and bundle.unet.config.in_channels == 11
    assert bundle.config.conditioning.mask_branch == "controlnet" and bundle.mask_classes == RENAL.ids
    assert bundle.id != text_model.id  # the identity covers the branch's weights
    text_weights = text_model.unet.state_dict()
    assert all(torch.equal(w, text_weights[k]) for k, w in bundle.unet.base.state_dict().items())  # frozen
    assert bundle.unet.controlnet.controlnet_down_blocks[0].weight.abs().sum() > 0  # trained from zero
    # the trained branch reaches the images: same seed, other mask, another image
    glomerulus, tissue = np.full((32, 32), 4, np.uint8), np.full((32, 32), 6, np.uint8)
    made = generate(bundle, ["", ""], [3, 3], SamplingOptions(steps=2), masks=[glomerulus, tissue], batch_size=2).images
    assert made.shape == (2, 32, 32, 3) and np.abs(made[0].astype(int) - made[1]).max() > 0

    assert train(tmp_path / "no-init") == 2
    assert "--mask-branch controlnet trains a branch on a frozen text model: give that model with --init" \
        in capsys.readouterr().err
    assert train(tmp_path / "again", "--init", str(out)) == 2
    message = f"--init {out} already reads masks; the ControlNet branch steers a text-only model"
    assert message in capsys.readouterr().err
    assert train(tmp_path / "x", "--init", str(text_bundle), "--mask-branch", "lora") == 2
    assert "unknown mask branch 'lora'; use one of concat, controlnet" in capsys.readouterr().err

    shutil.rmtree(out / "controlnet")
    with pytest.raises(ModelError, match="part 'controlnet' is missing"):
        load_bundle(out)

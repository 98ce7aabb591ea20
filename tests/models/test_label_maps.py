"""Label maps, the conditioning record of a model folder, and widening a text UNet for mask channels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histosynth.errors import ConfigError, DataError, ModelError
from histosynth.models.bundle import CONFIG_FILE, load_bundle
from histosynth.models.conditioning import Conditioning
from histosynth.models.denoiser import build_denoiser, input_weight_name, widen_input
from histosynth.models.label_maps import (
    check_mask_grid,
    check_mask_ids,
    ids_from_label_map,
    label_counts,
    label_map,
)
from histosynth.schema import RENAL

_spec = importlib.util.spec_from_file_location("maskmodels", Path(__file__).parents[1] / "sample" / "maskmodels.py")
maskmodels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maskmodels)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- label maps ------------------------------------------------------------------------------------
MASK = np.array([
    [6, 6, 4, 4, 0, 0, 0, 0],
    [6, 6, 4, 4, 0, 0, 0, 3],
    [6, 4, 4, 4, 3, 3, 3, 3],
    [6, 6, 6, 4, 3, 3, 3, 3],
], dtype=np.uint8)


def test_label_counts_are_class_pixels_per_latent_block():
    counts = label_counts(MASK, [0, 3, 4, 6], factor=2)
    assert counts.dtype == torch.uint8 and counts.shape == (4, 2, 4)
    assert counts[0].tolist() == [[0, 0, 4, 3], [0, 0, 0, 0]]  # white background
    assert counts[1].tolist() == [[0, 0, 0, 1], [0, 0, 4, 4]]  # Tubuli
    assert counts[2].tolist() == [[0, 4, 0, 0], [1, 3, 0, 0]]  # Glomeruli
    assert counts[3].tolist() == [[4, 0, 0, 0], [3, 1, 0, 0]]  # other kidney tissue
    shares = label_map(MASK, [0, 3, 4, 6], factor=2)
    torch.testing.assert_close(shares, counts.float() / 4)
    torch.testing.assert_close(shares.sum(0), torch.ones(2, 4))  # every pixel is one of these classes
    assert ids_from_label_map(shares, [0, 3, 4, 6]).tolist() == [[6, 4, 0, 0], [6, 4, 3, 3]]


def test_a_label_map_flips_with_its_mask():
    """Why the cache stores one map per patch: the map of a flipped mask is the flipped map."""
    mask = np.random.default_rng(0).integers(0, 8, (16, 24)).astype(np.uint8)
    maps = label_counts(mask, RENAL.ids, factor=4)
    for dims in ([-1], [-2], [-1, -2]):
        flipped_mask = np.flip(mask, axis=[d + 2 for d in dims]).copy()
        assert torch.equal(label_counts(flipped_mask, RENAL.ids, factor=4), maps.flip(dims))


def test_masks_off_the_latent_grid_or_with_other_ids_are_refused():
    with pytest.raises(DataError, match=r"^m.png is 30x16 px; a mask's sides must be multiples of 4 \(the model's "
                                        r"latent factor\): crop or pad it, e.g. to 28x16 px$"):
        check_mask_grid((16, 30), 4, "m.png")
    with pytest.raises(DataError, match=r"^m.png: mask ids \[9\] are not classes of the model \(ids \[0, 4, 6\]\)"):
        check_mask_ids(np.array([[0, 9], [4, 6]]), [0, 4, 6], "m.png")


# --- conditioning -----------------------------------------------------------------------------------
def test_conditioning_choices_and_their_record():
    both = Conditioning.parse("text+mask", text_dropout=0.1, mask_dropout=0.3)
    assert (both.text, both.mask, both.name) == (True, True, "text+mask")
    assert both.to_config([0, 4, 6]) == {
        "text": True, "text_dropout": 0.1, "mask_channels": 3, "mask_dropout": 0.3, "mask_classes": [0, 4, 6],
        "label_map": "class shares per latent pixel", "mask_branch": "concat",
    }
    assert Conditioning.from_config(both.to_config([0, 4, 6])) == both
    older = {k: v for k, v in both.to_config([0, 4, 6]).items() if k != "mask_branch"}
    assert Conditioning.from_config(older) == both  # folders written before the branch was recorded: concat
    controlled = Conditioning.parse("text+mask", 0.1, 0.3, "controlnet")
    assert controlled.controlnet and not both.controlnet and not Conditioning.parse("text", 0.1).controlnet
    assert Conditioning.from_config(controlled.to_config([0, 4, 6])) == controlled
    with pytest.raises(ConfigError, match=r"^unknown mask branch 'lora'; use one of concat, controlnet$"):
        Conditioning.parse("mask", mask_branch="lora")
    with pytest.raises(ConfigError, match=r"^the controlnet mask branch needs a mask condition: --condition mask or "):
        Conditioning.parse("text", mask_branch="controlnet")
    text = Conditioning.parse("text", 0.1, 0.3)
    assert text.to_config(RENAL.ids) == {"text": True, "text_dropout": 0.1, "mask_channels": 0}
    assert Conditioning.from_config({"text": True, "mask_channels": 0, "text_dropout": 0.1}) == text
    mask_only = Conditioning.parse("mask", 0.1, 0.2)
    assert (mask_only.text, mask_only.text_dropout, mask_only.name) == (False, 1.0, "mask")
    with pytest.raises(ConfigError, match=r"^unknown condition 'image'; use one of text, mask, text\+mask$"):
        Conditioning.parse("image")
    with pytest.raises(ConfigError, match=r"^the mask dropout must be between 0 and 1, got 1.5$"):
        Conditioning.parse("mask", mask_dropout=1.5)


def test_a_mask_model_folder_restores_its_conditioning(tmp_path):
    path = maskmodels.make_mask_bundle(tmp_path / "model", mask_dropout=0.25)
    bundle = load_bundle(path)
    assert bundle.conditioning == Conditioning(text=True, mask=True, text_dropout=0.1, mask_dropout=0.25)
    assert (bundle.mask_channels, bundle.mask_classes, bundle.latent_factor) == (8, RENAL.ids, 4)
    assert bundle.unet.config.in_channels == 3 + 8

    config = json.loads((path / CONFIG_FILE).read_text())
    config["conditioning"]["mask_classes"] = [0, 1, 2]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"conditioning: 8 mask channels need 'mask_classes' with one id of the "
                                         r"class schema each \(schema ids \[0, 1, 2, 3, 4, 5, 6, 7\]\), "
                                         r"got \[0, 1, 2\]"):
        load_bundle(path)


# --- widening a text UNet ---------------------------------------------------------------------------
@torch.no_grad()
def test_a_widened_unet_computes_what_the_text_unet_computes(tiny_bundle):
    """Fine-tuning a text model into text+mask starts exactly from the text model, whatever the map."""
    text_unet = tiny_bundle.unet
    preset_like = maskmodels.micro_preset()
    wide = build_denoiser(preset_like, context_dim=text_unet.config.cross_attention_dim, extra_in_channels=8)
    wide.load_state_dict(widen_input(text_unet.state_dict(), wide.config.in_channels, input_weight_name(wide)))
    wide.eval()
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 5, 384, generator=generator)
    maps = label_map(torch.randint(0, 8, (2, 64, 64), generator=generator), RENAL.ids, 4)
    expected = text_unet(x, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(wide(torch.cat([x, maps], 1), 500, encoder_hidden_states=context).sample,
                               expected, rtol=1e-5, atol=1e-5)  # up to float32 rounding
    # once the new weights learn something, the map matters
    wide.conv_in.weight[:, 3:] = 0.05
    changed = wide(torch.cat([x, maps], 1), 500, encoder_hidden_states=context).sample
    assert (changed - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot narrow conv_in.weight from 11 to 3 input channels"):
        widen_input(wide.state_dict(), 3, input_weight_name(wide))

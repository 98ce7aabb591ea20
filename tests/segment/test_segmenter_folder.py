"""The segmenter folder: safetensors weights + segmenter.json, and the checks on loading it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histosynth.errors import ModelError
from histosynth.schema import RENAL, ClassInfo, ClassSchema
from histosynth.segment.predict import predict_image
from histosynth.segment.segmenter import Segmenter


def test_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    segmenter = Segmenter.for_class(RENAL, "Glomeruli", base_channels=2)
    segmenter.training = {"epochs": 3}
    segmenter.save(tmp_path / "seg")
    loaded = Segmenter.load(tmp_path / "seg")
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_image(segmenter, image, device="cpu"),
                                  predict_image(loaded, image, device="cpu"))
    for key, value in segmenter.net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[key], value)


def test_config_describes_mode_classes_and_geometry(tmp_path):
    Segmenter.for_class(RENAL, "Sclerotic Glomeruli", base_channels=4).save(tmp_path)
    config = json.loads((tmp_path / "segmenter.json").read_text())
    assert config["format"] == "histosynth.segmenter/1"
    assert config["mode"] == "binary"
    assert config["target_class"] == {"id": 5, "name": "Sclerotic Glomeruli"}
    assert config["output_ids"] == [0, 1]
    assert config["architecture"] == {"base_channels": 4, "depth": 4, "batch_norm": True, "in_channels": 3}
    assert config["geometry"] == {"lost_pixels": 184, "context_pixels": 92, "valid_size_step": 16, "padding": "valid"}
    assert ClassSchema.from_dict(config["schema"]) == RENAL
    assert (tmp_path / "model.safetensors").is_file()
    multi = Segmenter.for_class(RENAL, None, base_channels=4)
    assert multi.mode == "multiclass" and multi.out_channels == 8 and multi.output_ids == list(range(8))


def test_missing_or_broken_folders_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not a segmenter folder.*histosynth segment train"):
        Segmenter.load(tmp_path)
    Segmenter.for_class(RENAL, None, base_channels=4).save(tmp_path)
    config = json.loads((tmp_path / "segmenter.json").read_text())
    config["architecture"]["base_channels"] = 8
    (tmp_path / "segmenter.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="does not fit the architecture"):
        Segmenter.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        Segmenter.load(tmp_path)


def test_schema_check_names_both_class_lists():
    other = ClassSchema(name="two", classes=(ClassInfo(id=0, name="background", color=(0, 0, 0)),
                                             ClassInfo(id=1, name="Glomeruli", color=(0, 255, 0))))
    segmenter = Segmenter.for_class(RENAL, None, base_channels=2)
    segmenter.check_schema(RENAL, "the model")
    with pytest.raises(ModelError, match="differ from those of the model.*'background'"):
        segmenter.check_schema(other, "the model")


def test_multiclass_never_predicts_ids_outside_the_schema():
    gappy = ClassSchema(name="gappy", classes=(ClassInfo(id=0, name="background", color=(0, 0, 0)),
                                               ClassInfo(id=3, name="Glomeruli", color=(0, 255, 0))))
    segmenter = Segmenter.for_class(gappy, None, base_channels=2)
    logits = torch.tensor([[1.0, 9.0, 0.0, 2.0]])[:, :, None, None]  # id 1 has the top logit
    assert segmenter.ids_from_logits(logits).item() == 3

"""`histosynth convert-weights`: a model copy whose weights are stored in bfloat16 (half the folder) and load as
float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from histosynth.cli import main
from histosynth.models.bundle import folder_bytes, load_bundle, read_bundle_config
from histosynth.models.sampling import SamplingOptions
from histosynth.sample.generate import generate

CAPTION = "Tubuli medium, a lot of Glomeruli"


def stored_weights(folder) -> tuple[set[str], int]:
    """The dtypes and the bytes of the tensors stored in a model folder's unet/ and autoencoder/."""
    dtypes, size = set(), 0
    for part in ("unet", "autoencoder"):
        for weights in (folder / part).glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    dtypes.add(str(tensor.dtype))
                    size += tensor.numel() * tensor.element_size()
    return dtypes, size


@pytest.fixture(scope="module")
def converted(tiny_bundle_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "model"
    assert main(["convert-weights", str(tiny_bundle_path), "--out", str(out)]) == 0
    return out


def test_the_copy_stores_bfloat16_and_loads_the_rounded_weights_as_float32(tiny_bundle_path, tiny_bundle, converted):
    (before_dtypes, before), (after_dtypes, after) = stored_weights(tiny_bundle_path), stored_weights(converted)
    assert (before_dtypes, after_dtypes) == ({"torch.float32"}, {"torch.bfloat16"}) and after * 2 == before
    assert folder_bytes(converted) < 0.6 * folder_bytes(tiny_bundle_path)  # (headers and card are not halved)
    copy = load_bundle(converted)
    for network, original in ((copy.unet, tiny_bundle.unet), (copy.autoencoder, tiny_bundle.autoencoder)):
        for (name, loaded), before in zip(network.state_dict().items(), original.state_dict().values(), strict=True):
            assert loaded.dtype == torch.float32, name
            assert torch.equal(loaded, before.to(torch.bfloat16).float()), name


def test_the_copy_is_another_model_that_draws_nearly_the_same_images(tiny_bundle_path, tiny_bundle, converted):
    original, copy = read_bundle_config(tiny_bundle_path), read_bundle_config(converted)
    assert copy.id != original.id
    assert copy.provenance == {**original.provenance, "weights_dtype": "bfloat16"}
    assert "The weights are stored in bfloat16 (`histosynth convert-weights`) and load as float32" in \
        (converted / "README.md").read_text()
    options = SamplingOptions(steps=2, guidance=1.5)
    (before,) = generate(tiny_bundle, [CAPTION], [3], options).images
    (after,) = generate(load_bundle(converted), [CAPTION], [3], options).images
    difference = np.abs(before.astype(int) - after.astype(int))
    assert 0 < difference.max() and difference.mean() < 1.0  # (out of 255)


def test_the_diffusers_pipeline_loads_the_copy(converted):
    from histosynth.pipeline import HistosynthPipeline

    pipe = HistosynthPipeline.from_pretrained(converted)
    assert pipe.unet.dtype == torch.float32
    assert pipe("", num_inference_steps=1, seed=0, output_type="np").images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("options, message", [
    (["--dtype", "float16"], "--dtype must be one of float32, bfloat16, got 'float16'"),
    (["--out", "{model}/inner"], "{model}/inner is inside the model folder {model}; choose an --out folder beside it"),
])
def test_bad_conversions_are_refused(tiny_bundle_path, tmp_path, refused, options, message):
    args = ["convert-weights", str(tiny_bundle_path), "--out", str(tmp_path / "copy"),
            *[o.format(model=tiny_bundle_path) for o in options]]
    assert refused(args) == "error: " + message.format(model=tiny_bundle_path)
    assert list(tmp_path.iterdir()) == [] and not (tiny_bundle_path / "inner").exists()

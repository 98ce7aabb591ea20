"""generate(): conditions, per-item determinism, records, schedulers, sizes and bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.captions import GENERATING_CAPTION, UNCONDITIONAL_CAPTION
from histosynth.errors import ConfigError
from histosynth.sample.generate import SamplingOptions, bundle_scheduler, generate, initial_noise

STEPS = 2


# --- generation ----------------------------------------------------------------------------------------
THREE_CAPTIONS = [GENERATING_CAPTION, GENERATING_CAPTION, UNCONDITIONAL_CAPTION]


@pytest.fixture(scope="module")
def three(tiny_bundle):
    return generate(tiny_bundle, THREE_CAPTIONS, [11, 12, 13], SamplingOptions(steps=STEPS), batch_size=3)


def test_images_and_records(three, tiny_bundle):
    assert three.images.shape == (3, 64, 64, 3) and three.images.dtype == np.uint8
    assert three.images.std() > 5  # not a blank image
    assert not np.array_equal(three.images[0], three.images[1])  # another seed, another image
    assert three.records[2] == {
        "caption": "", "seed": 13, "steps": STEPS, "guidance": 1.5, "scheduler": "ddim",
        "model_id": tiny_bundle.id, "height": 64, "width": 64,
    }


def test_an_image_does_not_depend_on_what_shares_its_batch(three, tiny_bundle):
    # the same batch again: the same bytes (no hidden random state)
    again = generate(tiny_bundle, THREE_CAPTIONS, [11, 12, 13], SamplingOptions(steps=STEPS), batch_size=3)
    np.testing.assert_array_equal(again.images, three.images)
    # other batch shapes: float32 kernels round differently, at most one level on rare pixels
    alone = generate(tiny_bundle, [GENERATING_CAPTION, ""], [12, 13], SamplingOptions(steps=STEPS), batch_size=2)
    assert np.abs(alone.images.astype(int) - three.images[1:]).max() <= 1
    single = generate(tiny_bundle, THREE_CAPTIONS, [11, 12, 13], SamplingOptions(steps=STEPS), batch_size=1)
    difference = np.abs(single.images.astype(int) - three.images)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_a_model_with_a_latent_range_samples_inside_it(tiny_bundle_path, tmp_path):
    import shutil

    from histosynth.models.bundle import load_bundle, set_latent_range
    from histosynth.models.latent_range import LatentRange
    from histosynth.sample.generate import CaptionEmbeddings, SamplingOptions, sample_latents

    def final_latents(bundle):
        embeddings = CaptionEmbeddings.for_bundle(bundle, [GENERATING_CAPTION])
        return sample_latents(bundle, [GENERATING_CAPTION] * 2, [3, 4], SamplingOptions(steps=STEPS), embeddings)

    model = shutil.copytree(tiny_bundle_path, tmp_path / "model")
    free = final_latents(load_bundle(model))
    # a range far tighter than what the untrained model draws: its middle half, per channel
    tight = LatentRange.of_latents(free, quantile=0.25)
    set_latent_range(model, tight)
    clamped = final_latents(load_bundle(model))
    outside = float((clamped - tight.clamp(clamped)).abs().max())
    # DDIM's last step lands on alphas_cumprod[0], not 1: a small noise term stays in the result
    assert outside < 0.2 and outside < 0.1 * float((free - tight.clamp(free)).abs().max())


def test_noise_comes_from_the_item_seed_alone():
    batch = initial_noise([5, 6], (3, 4, 4))
    torch.testing.assert_close(batch[1], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6)),
                               rtol=0, atol=0)


def test_ddim_uses_compvis_timesteps(tiny_bundle):
    scheduler = bundle_scheduler(tiny_bundle, "ddim")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))


def test_dpm_solver_and_larger_sizes(three, tiny_bundle):
    dpm = generate(tiny_bundle, [GENERATING_CAPTION], [11], SamplingOptions(steps=STEPS, scheduler="dpm++"))
    assert dpm.records[0]["scheduler"] == "dpm++"
    assert not np.array_equal(dpm.images[0], three.images[0])
    wide = generate(tiny_bundle, [GENERATING_CAPTION], [11], SamplingOptions(steps=STEPS), size=(64, 96))
    assert wide.images.shape == (1, 64, 96, 3) and wide.images.std() > 5
    assert (wide.records[0]["height"], wide.records[0]["width"]) == (64, 96)


@pytest.mark.parametrize("options, message", [
    ({"size": 66}, r"^image size 66 px must be a multiple of 4 \(the autoencoder's downsampling factor\); "
                   r"use 64 or 68$"),
    ({"size": 36}, r"^image size 36 px must be a multiple of 8 when smaller than the model's 64 px patches; "
                   r"use 32 or 40$"),
])
def test_bad_options_are_refused(tiny_bundle, options, message):
    with pytest.raises(ConfigError, match=message):
        generate(tiny_bundle, [GENERATING_CAPTION], [1], SamplingOptions(steps=1), **options)

"""The latent / embedding cache and the step-indexed batches built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.data.dataset import open_dataset
from histosynth.data.torchdata import to_model_range
from histosynth.errors import DataError
from histosynth.models.autoencoder import encode_latents
from histosynth.train.cache import autoencoder_id, prepare_training_data
from histosynth.train.data import ConditionDropout, StepBatches, global_batch_items

from .conftest import seeded_autoencoder, write_blob_dataset


@pytest.fixture(scope="module")
def cached(blob_dataset, minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    return prepare_training_data(blob_dataset, seeded_autoencoder(), minilm, folder, show_progress=False), folder


def test_latents_are_the_encodings_of_the_four_flipped_images(blob_dataset, cached):
    data, _ = cached
    assert data.latents.shape == (16, 4, 3, 8, 8)
    ae = seeded_autoencoder()
    image = to_model_range(blob_dataset.image(blob_dataset.manifest.iloc[5]))[None]
    with torch.no_grad():
        for variant, dims in enumerate([[], [-1], [-2], [-1, -2]]):
            expected = encode_latents(ae, image.flip(dims) if dims else image)[0]
            # stored as bfloat16 (by default): the encoding rounded to 8 significant bits
            torch.testing.assert_close(data.latents[5][variant].float(), expected, atol=1e-5, rtol=2**-8)


def test_each_unique_caption_is_embedded_once_with_the_empty_caption(blob_dataset, cached, minilm):
    data, _ = cached
    captions = blob_dataset.manifest["caption"].tolist()
    assert data.embeddings.captions == ["", *dict.fromkeys(captions)]
    assert [data.embeddings.captions[r] for r in data.caption_rows] == captions
    states, mask = data.embeddings.lookup(data.caption_rows[:2])
    expected, expected_mask = minilm.encode(captions[:2])
    # stored as bfloat16, like the latents (by default)
    torch.testing.assert_close(states * mask[..., None], expected * expected_mask[..., None], atol=1e-5, rtol=2**-8)


def test_a_killed_cache_run_encodes_only_what_is_missing(blob_dataset, cached, minilm):
    data, folder = cached
    part = next((folder / "latents").glob("*/part-00000.npy"))
    stamp = part.stat().st_mtime_ns
    again = prepare_training_data(blob_dataset, seeded_autoencoder(), minilm, folder, show_progress=False)
    assert part.stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(again.latents[:], data.latents[:])
    part.unlink()
    rebuilt = prepare_training_data(blob_dataset, seeded_autoencoder(), minilm, folder, show_progress=False)
    assert torch.equal(rebuilt.latents[:], data.latents[:])


def test_another_autoencoder_gets_its_own_cache(blob_dataset, cached, minilm):
    _, folder = cached
    other = seeded_autoencoder(seed=1)
    assert autoencoder_id(other) != autoencoder_id(seeded_autoencoder())
    prepare_training_data(blob_dataset, other, minilm, folder, show_progress=False)
    assert len(list((folder / "latents").iterdir())) == 2


def test_a_dataset_without_captions_is_refused(tmp_path, minilm):
    dataset = write_blob_dataset(tmp_path / "bare", n=2, captions=False)
    with pytest.raises(DataError, match="none of its 2 'train' patches has a caption; caption them with "
                                        "'histosynth caption --dataset"):
        prepare_training_data(open_dataset(dataset.root), seeded_autoencoder(), minilm, show_progress=False)


# --- batches ------------------------------------------------------------------------------------
def test_each_epoch_visits_every_patch_once():
    steps = [global_batch_items(10, 4, seed=3, step=s) for s in range(5)]  # 20 items = 2 epochs
    stream = np.concatenate(steps)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # reshuffled per epoch


def test_ranks_split_the_global_batch_of_a_single_process(cached):
    data, _ = cached
    dropout = ConditionDropout(text=0.5)
    single = StepBatches(data, 4, seed=1, dropout=dropout)[7]
    halves = [StepBatches(data, 2, seed=1, dropout=dropout, rank=r, world_size=2)[7] for r in (0, 1)]
    assert torch.equal(torch.cat([h.items for h in halves]), single.items)
    assert torch.equal(torch.cat([h.latents for h in halves]), single.latents)


def test_caption_dropout_uses_the_empty_caption_at_its_rate(cached):
    data, _ = cached
    batches = StepBatches(data, 16, seed=0, dropout=ConditionDropout(text=0.1))
    empty_length = int(data.embeddings.lookup([data.empty_caption_row])[1].sum())  # "" = [CLS] [SEP]
    dropped = sum(int((batches[i].condition.text_mask.sum(1) == empty_length).sum()) for i in range(100))
    assert 0.07 < dropped / 1600 < 0.13


def test_flips_off_means_the_unflipped_latents(cached):
    data, _ = cached
    batch = StepBatches(data, 8, seed=0, dropout=ConditionDropout(text=0.0), flips=(False, False))[3]
    assert torch.equal(batch.latents, data.latents[batch.items][:, 0].float())


def test_an_epoch_of_batches_visits_each_patch_as_often_as_its_repeat_factor_asks(cached):
    from dataclasses import replace

    from histosynth.train.balance import repeat_counts

    data, _ = cached
    factors = np.ones(len(data), np.float32)
    factors[[2, 5]] = 3.0  # whole factors: exactly 3 visits each per epoch
    repeated = replace(data, repeat_factors=factors)
    batches = StepBatches(repeated, 4, seed=0, dropout=ConditionDropout(text=0.0))
    epoch = torch.cat([batches[step].items for step in range(5)])  # 16 + 2 x 2 = 20 visits = 5 steps of 4
    expected = repeat_counts(factors, 0)
    assert expected.tolist() == [1, 1, 3, 1, 1, 3, *[1] * 10]
    assert np.bincount(epoch.numpy(), minlength=len(data)).tolist() == expected.tolist()
    plain = torch.cat([StepBatches(data, 4, seed=0, dropout=ConditionDropout(text=0.0))[s].items for s in range(4)])
    assert sorted(plain.tolist()) == list(range(len(data)))  # without factors: each patch once

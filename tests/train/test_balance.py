"""Repeat-factor sampling: patches that hold a rare class are visited more often per epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.cli import main
from histosynth.models.bundle import read_bundle_config
from histosynth.train.balance import repeat_counts, repeat_factors
from histosynth.train.cache import class_fractions
from histosynth.train.data import EpochOrders

pytestmark = pytest.mark.filterwarnings("ignore:no --autoencoder given")


def test_a_patch_is_repeated_as_its_rarest_class_asks():
    fractions = np.zeros((10, 3), np.float32)
    fractions[:9, 0] = 0.5  # class 0 in 9 of 10 patches
    fractions[0, 1] = 0.2  # class 1 in 1 of 10: sqrt(0.4 / 0.1) = 2
    fractions[:5, 2] = 0.1  # class 2 in 5 of 10: sqrt(0.4 / 0.5) < 1, so 1
    factors = repeat_factors(fractions, 0.4)
    np.testing.assert_allclose(factors, [2, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # patch 9 holds no class: 1
    np.testing.assert_allclose(repeat_factors(fractions, 0.9), [3, *[np.sqrt(0.9 / 0.5)] * 4, *[1.0] * 5],
                               rtol=1e-6)
    assert factors.dtype == np.float32


def test_whole_repeats_keep_the_factors_expectation_and_follow_the_seed():
    factors = np.array([1.0, 2.0, 3.0] + [1.5] * 10_000, np.float32)
    counts = repeat_counts(factors, seed=4)
    assert counts[:3].tolist() == [1, 2, 3] and set(counts[3:].tolist()) == {1, 2}
    assert counts[3:].mean() == pytest.approx(1.5, abs=0.02)
    assert np.array_equal(counts, repeat_counts(factors, seed=4))
    assert not np.array_equal(counts, repeat_counts(factors, seed=5))


def test_an_epoch_visits_each_patch_its_repeats_in_a_seeded_order():
    repeats = np.array([3, 1, 1, 2, 1])
    orders = EpochOrders(5, seed=0, repeats=repeats)
    assert orders.epoch_length == 8  # visits per epoch
    for epoch in range(3):
        assert np.bincount(orders.order(epoch), minlength=5).tolist() == repeats.tolist()
    assert not np.array_equal(orders.order(0), orders.order(1))
    # batches of 3 run across epochs: 8 steps are 3 epochs of visits, in order
    stream = np.concatenate([orders.global_batch(3, step) for step in range(8)])
    np.testing.assert_array_equal(stream, np.concatenate([orders.order(e) for e in range(3)]))
    np.testing.assert_array_equal(EpochOrders(5, seed=0, repeats=repeats).global_batch(3, 5), orders.global_batch(3, 5))


def test_a_run_with_repeat_rare_records_what_it_repeated(blob_dataset, tmp_path):
    model = tmp_path / "model"
    assert main(["train", str(blob_dataset.root), "--out", str(model), "--cache-dir", str(tmp_path / "cache"),
                 "--preset", "tiny", "--batch-size", "4", "--warmup-steps", "0", "--steps", "2",
                 "--repeat-rare", "0.9"]) == 0
    factors = repeat_factors(class_fractions(blob_dataset, blob_dataset.rows("train")), 0.9)
    assert (factors > 1).sum() > 0
    config = read_bundle_config(model)
    assert config.preset["training"]["repeat_rare"] == 0.9
    assert config.provenance["data"]["patches_repeated"] == int((factors > 1).sum())
    assert config.provenance["data"]["visits_per_epoch"] == round(float(factors.sum()))
    assert "Patches holding a class that fewer than 0.9 of the patches hold were repeated (repeat-factor " \
           "sampling)." in (model / "README.md").read_text()
    run = json.loads((tmp_path / "model.run" / "run.json").read_text())
    assert run["preset"]["training"]["repeat_rare"] == 0.9  # a --resume without it is another run


@pytest.mark.parametrize("value, message", [
    ("0", "--repeat-rare must be above 0, got 0.0"),
    ("1.5", "--repeat-rare must be at most 1, got 1.5"),
])
def test_a_bad_repeat_share_is_refused_before_anything_is_written(blob_dataset, tmp_path, refused, value, message):
    args = ["train", str(blob_dataset.root), "--out", str(tmp_path / "model"), "--preset", "tiny", "--steps", "2",
            "--repeat-rare", value]
    assert refused(args) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_repeat_rare_on_a_manifest_without_class_fractions_is_refused_before_anything_is_written(dataset_copy,
                                                                                                 tmp_path, refused):
    import pandas as pd

    manifest = dataset_copy / "manifest.csv"
    pd.read_csv(manifest).drop(columns=["frac_4"]).to_csv(manifest, index=False)
    out = tmp_path / "out"
    args = ["train", str(dataset_copy), "--out", str(out / "model"), "--cache-dir", str(out / "cache"),
            "--preset", "tiny", "--steps", "2", "--repeat-rare", "0.3"]
    assert refused(args) == (f"error: {dataset_copy}: its manifest lacks the class fractions frac_4 that "
                             "--repeat-rare reads; tile the dataset again (histosynth tile writes them)")
    assert not out.exists()

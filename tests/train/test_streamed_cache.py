"""The latent cache on disk: its dtypes, memory-mapped parts read row by row, the index, older
caches, and epoch orders that cost a slice per step."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from histosynth.data.dataset import open_dataset
from histosynth.data.torchdata import to_model_range
from histosynth.errors import DataError
from histosynth.models.autoencoder import decode_latents, encode_latents, psnr
from histosynth.models.latent_range import LatentRange
from histosynth.train.cache import cached_latents, latent_range, prepare_training_data
from histosynth.train.data import ORDER_STREAM, EpochOrders
from histosynth.train.shards import ShardedRows, write_part

from .conftest import seeded_autoencoder


@pytest.fixture(scope="module")
def fp32_cache(blob_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "latents"
    latents = cached_latents(blob_dataset, blob_dataset.manifest, seeded_autoencoder(), folder, "train",
                             show_progress=False, dtype="float32")
    return latents, folder


def test_a_float32_cache_holds_the_encodings_exactly(blob_dataset, fp32_cache):
    latents, _ = fp32_cache
    assert latents.dtype == "float32" and latents.shape == (16, 4, 3, 8, 8)
    image = to_model_range(blob_dataset.image(blob_dataset.manifest.iloc[9]))[None]
    with torch.no_grad():
        expected = encode_latents(seeded_autoencoder(), image.flip([-1]))[0]
    torch.testing.assert_close(latents[9][1], expected, atol=1e-5, rtol=1e-5)
    assert latent_range(latents) == LatentRange.of_latents(latents[:])  # as a whole tensor of them would give


def test_the_index_says_dtype_shape_and_count_and_bfloat16_halves_the_bytes(blob_dataset, fp32_cache, tmp_path):
    fp32, fp32_folder = fp32_cache
    bf16 = cached_latents(blob_dataset, blob_dataset.manifest, seeded_autoencoder(), tmp_path, "train",
                          show_progress=False)  # the default
    (folder,) = [p for p in tmp_path.iterdir()]
    index = json.loads((folder / "index.json").read_text())
    assert (index["dtype"], index["row_shape"], index["patches"]) == ("bfloat16", [4, 3, 8, 8], 16)
    assert [p.name for p in sorted(folder.iterdir())] == ["index.json", "part-00000.npy"]
    assert bf16.bytes_per_row * 2 == fp32.bytes_per_row == 4 * 3 * 8 * 8 * 4
    assert torch.equal(bf16[:], fp32[:].to(torch.bfloat16))  # the float32 encodings, rounded once
    fp32_part = next(fp32_folder.glob("*/part-00000.npy")).stat().st_size
    assert (folder / "part-00000.npy").stat().st_size < 0.55 * fp32_part


def test_a_cache_keeps_its_dtype_until_rebuilt_with_another(blob_dataset, tmp_path):
    def cache(dtype=None):
        return cached_latents(blob_dataset, blob_dataset.manifest, seeded_autoencoder(), tmp_path, "train",
                              show_progress=False, dtype=dtype)

    assert cache("fp32").dtype == "float32"
    part = next(tmp_path.glob("*/part-00000.npy"))
    stamp = part.stat().st_mtime_ns
    assert cache().dtype == "float32" and part.stat().st_mtime_ns == stamp  # read as it is
    assert cache("float16").dtype == "float16" and part.stat().st_mtime_ns != stamp  # re-encoded
    assert json.loads((part.parent / "index.json").read_text())["dtype"] == "float16"


def test_rows_are_read_from_their_parts_in_any_order(tmp_path):
    values = torch.randn(10, 4, 2, 3)
    parts = [tmp_path / f"part-{k}.npy" for k in range(4)]
    for k, path in enumerate(parts):
        write_part(path, values[3 * k : 3 * k + 3], "bfloat16")
    rows = ShardedRows(parts, 10, (4, 2, 3), "bfloat16", part_size=3)
    items, variants = np.array([9, 0, 4, 4, 7, 2]), np.array([3, 0, 1, 2, 0, 3])
    assert torch.equal(rows.read(items, variants), values.to(torch.bfloat16)[items, variants])
    assert torch.equal(rows[-1], values[9].to(torch.bfloat16))
    with pytest.raises(IndexError):
        rows.read([10])
    # a worker or spawned process receives the paths, not the content or open files
    rows.read(np.arange(10))
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 2000 and copy._files == [None] * 4
    assert torch.equal(copy[:], rows[:])


def test_float16_refuses_latents_it_cannot_hold(tmp_path):
    with pytest.raises(DataError, match="do not fit float16; cache them as bfloat16"):
        write_part(tmp_path / "part.npy", torch.tensor([[1e5]]), "float16")
    assert not any(tmp_path.iterdir())


def test_a_cache_of_the_older_format_is_refused_with_how_to_rebuild(blob_dataset, minilm, tmp_path):
    from histosynth.train.cache import autoencoder_id

    ae = seeded_autoencoder()
    old = tmp_path / "latents" / f"{autoencoder_id(ae)}-train"
    old.mkdir(parents=True)
    (old / "index.json").write_text(json.dumps({"format": "histosynth.latents/1"}))
    (old / "part-00000.safetensors").write_bytes(b"old")
    with pytest.raises(DataError, match="is a cache of an older format .*; delete that folder and run "
                                        "'histosynth cache' again"):
        prepare_training_data(blob_dataset, ae, minilm, tmp_path, show_progress=False)


def test_an_unknown_dtype_is_refused_before_any_work(blob_dataset, tmp_path, capsys):
    from histosynth.cli import main

    assert main(["cache", str(blob_dataset.root), "--cache-dir", str(tmp_path / "c"), "--dtype", "int8"]) == 2
    assert capsys.readouterr().err == ("error: --dtype must be one of bfloat16, float16 or float32 (or bf16, fp16, "
                                       "fp32), got 'int8'\n")
    assert not (tmp_path / "c").exists()


# --- epoch orders ------------------------------------------------------------------------------------
def permutation_per_step(n_items: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The batch order as every step drew it before: the permutations of the epochs it straddles."""
    first = step * global_batch
    epochs = range(first // n_items, (first + global_batch - 1) // n_items + 1)
    stream = np.concatenate([np.random.default_rng((seed, e, ORDER_STREAM)).permutation(n_items) for e in epochs])
    offset = first - epochs[0] * n_items
    return stream[offset : offset + global_batch]


@pytest.mark.parametrize("n_items, global_batch", [(10, 4), (7, 7), (5, 12), (1000, 64)])
def test_epoch_orders_give_the_batches_of_a_permutation_per_step(n_items, global_batch):
    orders = EpochOrders(n_items, seed=4)
    for step in [*range(40), 3, 0, 100]:  # in order, then back (a resume), then far ahead
        assert np.array_equal(orders.global_batch(global_batch, step),
                              permutation_per_step(n_items, global_batch, 4, step)), step
        assert len(orders._orders) <= 2


# --- reconstruction --------------------------------------------------------------------------------------
def test_half_precision_latents_decode_within_half_a_db_of_float32(tmp_path):
    """Phantom patches through the shipped autoencoder: PSNR of images decoded from bfloat16 / float16
    cached latents against the PSNR from float32 ones."""
    from histosynth.data.phantom.export import write_phantom_patches
    from histosynth.defaults import default_autoencoder_path
    from histosynth.models.bundle import load_autoencoder_folder

    dataset = write_phantom_patches(tmp_path / "phantom", n=4, size=64, progress=False)
    dataset = open_dataset(dataset.root)
    ae = load_autoencoder_folder(default_autoencoder_path()).eval()
    images = torch.stack([to_model_range(dataset.image(row)) for _, row in dataset.manifest.iterrows()])
    quality = {}
    for dtype in ("float32", "bfloat16", "float16"):
        latents = cached_latents(dataset, dataset.manifest, ae, tmp_path / dtype, "all", show_progress=False,
                                 dtype=dtype)
        with torch.no_grad():
            decoded = decode_latents(ae, latents.read(np.arange(4), np.zeros(4)).float())
        quality[dtype] = float(psnr(images, decoded))
    assert quality["float32"] > 20, quality  # a real reconstruction, not noise
    assert abs(quality["bfloat16"] - quality["float32"]) < 0.5, quality
    assert abs(quality["float16"] - quality["float32"]) < 0.5, quality


def test_the_latent_range_of_a_cache_is_that_of_its_latents_as_one_tensor(tmp_path, monkeypatch):
    import histosynth.models.latent_range as latent_range_module

    monkeypatch.setattr(latent_range_module, "MAX_VALUES_PER_CHANNEL", 500)  # every k-th variant, k > 1
    values = torch.randn(50, 4, 2, 4, 4) * torch.tensor([1.0, 3.0]).view(1, 1, 2, 1, 1)
    parts = [tmp_path / f"part-{k}.npy" for k in range(4)]
    for k, path in enumerate(parts):
        write_part(path, values[16 * k : 16 * k + 16], "float32")
    rows = ShardedRows(parts, 50, (4, 2, 4, 4), "float32", part_size=16)
    assert latent_range(rows, 0.05, chunk=3) == LatentRange.of_latents(values, 0.05)


def test_reading_a_row_reads_that_row_and_checks_the_part_against_the_index(tmp_path):
    values = torch.randn(8, 1000)
    write_part(tmp_path / "part.npy", values, "float32")
    rows = ShardedRows([tmp_path / "part.npy"], 8, (1000,), "float32", part_size=8)
    assert torch.equal(rows.read([2, 7, 2]), values[[2, 7, 2]])
    rows.close()
    assert torch.equal(rows[3], values[3])  # opened again
    wrong = ShardedRows([tmp_path / "part.npy"], 8, (1000,), "bfloat16", part_size=8)
    with pytest.raises(DataError, match="holds float32 .*the cache index says bfloat16 .*run 'histosynth cache' again"):
        wrong.read([0])


def test_forked_data_loader_workers_read_the_rows_they_ask_for(tmp_path):
    values = torch.arange(64 * 50, dtype=torch.float32).reshape(64, 50)
    write_part(tmp_path / "part.npy", values, "float32")
    rows = ShardedRows([tmp_path / "part.npy"], 64, (50,), "float32", part_size=64)
    rows.read([0])  # opened in the parent before the workers fork

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return rows.read([i, 63 - i] * 20)

    loader = torch.utils.data.DataLoader(Rows(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    for i, got in enumerate(loader):
        assert torch.equal(got, values[[i, 63 - i] * 20]), i

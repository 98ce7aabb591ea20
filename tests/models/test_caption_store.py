"""The caption store on disk: appends that rewrite nothing, kills that lose only the unfinished rows,
exact lookups, and the conversion of the older single-file cache."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import histosynth.models.caption_store as caption_store
from histosynth.errors import DataError
from histosynth.models.caption_store import RECORD, CaptionStore, store_name

ENCODER = "bert:8:synthetic"
HIDDEN = 4


def synthetic_states(captions: list[str]) -> list[torch.Tensor]:
    """Distinct states for each caption: as many tokens as letters (at least one), values from its text."""
    return [torch.arange(max(1, len(c)) * HIDDEN, dtype=torch.float32).reshape(-1, HIDDEN) + sum(map(ord, c)) / 64
            for c in captions]


def filled_store(folder, captions: list[str], dtype: str = "float32") -> CaptionStore:
    store = CaptionStore.open(folder, ENCODER, dtype)
    store.append(captions, synthetic_states(captions))
    return store


def file_bytes(store: CaptionStore) -> dict[str, bytes]:
    return {name: (store.folder / name).read_bytes() for name in ("states.bin", "captions.bin", "rows.bin")}


def test_lookups_return_the_appended_states_padded_to_the_longest_of_the_batch(tmp_path):
    captions = ["", "glomerulus", "tubuli", "Ünïcode ✓"]
    store = filled_store(tmp_path, captions)
    reopened = CaptionStore.open(tmp_path, ENCODER)
    assert len(reopened) == 4 and reopened.captions == captions and reopened.hidden_size == HIDDEN
    rows = reopened.rows(["tubuli", "", "glomerulus"])
    assert rows.tolist() == [2, 0, 1]
    states, mask = reopened.lookup(rows)
    assert states.dtype == torch.float32 and states.shape == (3, 10, HIDDEN)
    assert mask.sum(1).tolist() == [6, 1, 10]
    for i, caption in enumerate(["tubuli", "", "glomerulus"]):
        expected = synthetic_states([caption])[0]
        assert torch.equal(states[i, : len(expected)], expected) and not states[i, len(expected) :].any()
    assert store.append(captions, synthetic_states(captions)) == 0  # each caption is stored once
    unpickled = pickle.loads(pickle.dumps(reopened))  # (a data-loader worker's copy opens the files itself)
    assert torch.equal(unpickled.lookup([3])[0], reopened.lookup([3])[0])


def test_bfloat16_rows_round_to_8_significant_bits(tmp_path):
    store = filled_store(tmp_path, ["abc"], dtype="bf16")
    expected = synthetic_states(["abc"])[0]
    assert store.dtype == "bfloat16" and (store.folder / "states.bin").stat().st_size == 3 * HIDDEN * 2
    torch.testing.assert_close(store.encode(["abc"])[0][0], expected, atol=0, rtol=2**-8)


def test_appending_keeps_the_stored_bytes_and_adds_exactly_the_new_rows(tmp_path):
    store = filled_store(tmp_path, ["one", "two"])
    before = file_bytes(store)
    inodes = {name: (store.folder / name).stat().st_ino for name in before}
    store.append(["three", "four"], synthetic_states(["three", "four"]))
    after = file_bytes(store)
    assert {name: data[: len(before[name])] for name, data in after.items()} == before
    grown = {name: len(after[name]) - len(before[name]) for name in after}
    assert grown == {"states.bin": (5 + 4) * HIDDEN * 4, "captions.bin": 9, "rows.bin": 2 * RECORD.itemsize}
    assert {name: (store.folder / name).stat().st_ino for name in after} == inodes  # appended, not replaced
    assert json.loads((store.folder / "store.json").read_text())["rows"] == 4


def test_a_killed_append_leaves_the_rows_it_had(tmp_path):
    store = filled_store(tmp_path, ["one", "two"])
    complete = file_bytes(store)
    # what a kill leaves: a row's bytes half written to each file, the new header not yet renamed in place
    for name, partial in (("states.bin", b"\x01" * 10), ("captions.bin", b"thr"), ("rows.bin", b"\x02" * 20)):
        with open(store.folder / name, "ab") as file:
            file.write(partial)
    (store.folder / ".store.json.k3j9x_2a.part.json").write_text('{"rows": 3')

    reopened = CaptionStore.open(tmp_path, ENCODER)
    assert len(reopened) == 2 and reopened.captions == ["one", "two"]
    assert torch.equal(reopened.lookup([1])[0][0, :3], synthetic_states(["two"])[0])
    assert "three" not in reopened
    reopened.append(["three"], synthetic_states(["three"]))  # the leftovers go first
    after = file_bytes(reopened)
    assert {name: data[: len(complete[name])] for name, data in after.items()} == complete
    assert [len(after[n]) - len(complete[n]) for n in after] == [5 * HIDDEN * 4, 5, RECORD.itemsize]
    assert sorted(p.name for p in store.folder.iterdir()) == ["captions.bin", "rows.bin", "states.bin", "store.json"]
    assert CaptionStore.open(tmp_path, ENCODER).captions == ["one", "two", "three"]


def test_a_store_another_process_appended_to_is_caught_up_before_appending(tmp_path):
    first = filled_store(tmp_path, ["one"])
    second = CaptionStore.open(tmp_path, ENCODER)
    first.append(["two"], synthetic_states(["two"]))
    assert second.append(["two", "three"], synthetic_states(["two", "three"])) == 1
    assert second.captions == ["one", "two", "three"] and second.rows(["three"]).tolist() == [2]


def test_captions_that_share_a_digest_are_still_told_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_store, "caption_digests", lambda captions: torch.zeros(len(captions)).long().numpy()
                        .astype("uint64"))
    captions = ["alpha", "beta", "gamma"]
    store = filled_store(tmp_path, captions)
    assert CaptionStore.open(tmp_path, ENCODER).rows(["gamma", "alpha", "beta", "gamma"]).tolist() == [2, 0, 1, 2]
    assert store.missing(["beta", "delta"]) == ["delta"]


def test_another_dtype_rebuilds_the_store(tmp_path):
    filled_store(tmp_path, ["one"], dtype="float32")
    assert len(CaptionStore.open(tmp_path, ENCODER)) == 1  # no dtype: the store's own
    rebuilt = CaptionStore.open(tmp_path, ENCODER, "float16")
    assert rebuilt.dtype == "float16" and len(rebuilt) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{store_name(ENCODER)}", f"{store_name(ENCODER)}.lock"]


def test_a_safetensors_cache_of_the_older_format_is_converted_once(tmp_path):
    captions = ["", "glomerulus", "tubuli"]
    states = synthetic_states(captions)
    offsets = torch.tensor([0, *torch.tensor([len(s) for s in states]).cumsum(0).tolist()])
    old = tmp_path / f"{store_name(ENCODER)}.safetensors"
    save_file({"states": torch.cat(states), "offsets": offsets}, str(old),
              metadata={"encoder_id": ENCODER, "captions": json.dumps(captions)})
    store = CaptionStore.open(tmp_path, ENCODER)
    assert not old.exists() and store.dtype == "float32" and store.captions == captions  # (exactly as stored)
    assert torch.equal(store.encode(["glomerulus"])[0][0], states[1])


def test_unreadable_stores_are_refused_with_how_to_rebuild(tmp_path):
    old = tmp_path / f"{store_name(ENCODER)}.safetensors"
    old.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="older format that cannot be read .* delete it and run 'histosynth cache'"):
        CaptionStore.open(tmp_path, ENCODER)
    old.unlink()
    store = filled_store(tmp_path, ["one", "two"])
    with open(store.folder / "states.bin", "r+b") as file:
        file.truncate(HIDDEN * 4)
    with pytest.raises(DataError, match="states.bin is shorter than its store header says; delete .* and run"):
        CaptionStore.open(tmp_path, ENCODER)
    (store.folder / "store.json").write_text("{")
    with pytest.raises(DataError, match="store.json is corrupt"):
        CaptionStore.open(tmp_path, ENCODER)


def test_the_appending_process_holds_the_store_lock(tmp_path):
    import fcntl

    store = filled_store(tmp_path, ["one"])
    with open(store.lock_path, "a+b") as other:  # (another open file: what another process would hold)
        with store._writing():
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once the append is done


def _append_in_chunks(folder, captions: list[str]) -> None:
    store = CaptionStore.open(folder, ENCODER)
    for first in range(0, len(captions), 10):
        store.append(captions[first : first + 10], synthetic_states(captions[first : first + 10]))


def test_processes_appending_at_once_store_each_caption_once(tmp_path):
    import multiprocessing

    CaptionStore.open(tmp_path, ENCODER, "float32")
    captions = [f"caption {i}" for i in range(300)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_in_chunks, args=(tmp_path, part))
               for part in (captions[:200], captions[100:][::-1])]  # 100 captions in common
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    store = CaptionStore.open(tmp_path, ENCODER)
    assert len(store) == 300 and sorted(store.captions) == sorted(captions)
    states, mask = store.encode(captions)
    for i, expected in enumerate(synthetic_states(captions)):
        assert torch.equal(states[i, : len(expected)], expected) and mask[i].sum() == len(expected)

"""A dataset's caption embeddings on disk: appended to, never rewritten, read by the rows of a batch.

One store per text encoder, in the cache's ``text/`` folder::

    <encoder id>/store.json     format, encoder id, dtype, hidden size, and how many rows, state tokens and
                                caption bytes are valid
    <encoder id>/rows.bin       one 32-byte record per row: where its states and its caption start, their
                                lengths, and a 64-bit digest of the caption
    <encoder id>/states.bin     the rows' unmasked token states, (tokens, D) each, one after another
    <encoder id>/captions.bin   the captions, UTF-8, one after another
    <encoder id>.lock           locked by the process that appends

States are stored as bfloat16 unless the store is built with another dtype (float16, or float32 to
keep the encoder's states exactly), like the latents beside them (:mod:`histosynth.train.cache`);
lookups return float32. A row holds only its caption's tokens, padded by the lookup to the longest of
the batch: a BERT-like encoder's row is as long as its caption, not its 256-token limit; a CLIP window
is whole (all of its states are attended to). A lookup reads only the rows of its batch (``pread``,
no mapped pages kept: see :mod:`histosynth.train.shards`).

Appends: under the lock, the data files are cut back to the sizes the header names (dropping what a
killed append left), the new rows are written at their ends and flushed to disk, and only then is the
header replaced (an atomic rename) by one that counts them. A kill at any moment leaves a header that
names complete rows only; bytes already stored are never rewritten.

Finding a caption's row: the digests of all rows, sorted when a process first looks a caption up
(16 bytes a row: 15 MiB for a million captions, where a dict of the million ~90-character captions
to their rows took 188 MiB; see ``benchmarks/caption_cache.py``). A digest match is confirmed against the stored
caption, so lookups are exact even where two captions share a digest. Rows appended since the sort
wait in a small dict until the next one.

Processes: readers take no lock (the header they read counts complete rows, and those never change).
The process that appends holds ``<encoder id>.lock`` from reading the header to replacing it. Under
DDP every rank opens the store and asks for its captions: the first to take the lock encodes and
appends what is missing while the others wait, and then find nothing missing. So one process writes.

A cache of the older format (``text/<encoder id>.safetensors``, one file rewritten whole on every
addition) is converted on first use, keeping its float32 states exactly, and then deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Sequence as SequenceABC
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError, ModelError
from ..io import atomic_path, remove_partial_files, remove_scratch_folders, scratch_folder
from ..train.shards import STORAGE_DTYPES, from_storage, latent_dtype_name, read_at, to_storage
from .text import EmbeddingCache

try:
    import fcntl
except ImportError:  # (Windows: one process per store)
    fcntl = None

FORMAT = "histosynth.caption-states/1"
HEADER = "store.json"
STATES, CAPTIONS, ROWS = "states.bin", "captions.bin", "rows.bin"
#: one row's record in rows.bin
RECORD = np.dtype([("tokens_start", "<i8"), ("tokens", "<i4"), ("text_start", "<i8"), ("text_bytes", "<i4"),
                   ("digest", "<u8")])
#: how a new store keeps its states unless built with another dtype
DEFAULT_DTYPE = "bfloat16"
#: rows appended since the digests were sorted that are kept in a dict before they are sorted in
RECENT_LIMIT = 1 << 16
#: captions looked up at a time
FIND_CHUNK = 1 << 16
_TEXT_ENCODING = ("utf-8", "surrogatepass")


def store_name(encoder_id: str) -> str:
    """The file-name form of an encoder id (the store's folder, and the older format's file stem)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id)


def caption_digests(captions: Sequence[str]) -> np.ndarray:
    """A 64-bit BLAKE2b digest of each caption's UTF-8 text, as uint64."""
    joined = b"".join(hashlib.blake2b(c.encode(*_TEXT_ENCODING), digest_size=8).digest() for c in captions)
    return np.frombuffer(joined, "<u8").astype(np.uint64)


_held_locks: dict[Path, list] = {}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (re-entrant within a process; released if the process dies)."""
    held = _held_locks.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as file:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        _held_locks[path] = [file, 1]
        try:
            yield
        finally:
            del _held_locks[path]
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _rebuild_hint(folder: Path) -> str:
    return f"delete {folder} and run 'histosynth cache' again to encode its captions anew"


def _read_header(folder: Path) -> Optional[dict]:
    """The store's header, or None where there is none (no store, or its creation was killed)."""
    path = folder / HEADER
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); {_rebuild_hint(folder)}") from None
    if header.get("format") != FORMAT:
        raise DataError(f"{path}: unknown caption store format {header.get('format')!r} (expected {FORMAT}); "
                        f"{_rebuild_hint(folder)}")
    return header


def _write_header(folder: Path, header: dict) -> None:
    with atomic_path(folder / HEADER) as tmp, open(tmp, "w") as file:
        file.write(json.dumps(header, indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _valid_sizes(header: dict) -> dict[str, int]:
    """How many bytes of each data file the header counts."""
    row_bytes = header["hidden_size"] * STORAGE_DTYPES[header["dtype"]][1].itemsize
    return {STATES: header["tokens"] * row_bytes, CAPTIONS: header["caption_bytes"],
            ROWS: header["rows"] * RECORD.itemsize}


class CaptionStore(EmbeddingCache):
    """The caption store of one encoder in a ``text/`` folder (see the module docstring); open it with
    :meth:`open`. Picklable: a data-loader worker or spawned process opens the files itself."""

    #: captions :meth:`add` encodes before it appends them (and a killed run keeps them)
    rows_per_append = 1024

    def __init__(self, folder: Path, header: dict):
        super().__init__(header["encoder_id"])
        self.folder = Path(folder)
        self.lock_path = self.folder.with_name(self.folder.name + ".lock")
        self._take(header)

    def _take(self, header: dict) -> None:
        """Use ``header``'s rows: check the files hold them, forget what was read of others."""
        for name, size in _valid_sizes(header).items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size < size:
                raise DataError(f"{path} is shorter than its store header says; {_rebuild_hint(self.folder)}")
        self.header = header
        self._files: dict[str, BinaryIO] = {}
        self._records: Optional[np.ndarray] = None
        self._sorted: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._recent: dict[int, list[int]] = {}

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "header": self.header}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["header"])

    def close(self) -> None:
        """Close the files (they are opened again when read)."""
        for file in self._files.values():
            file.close()
        self._files, self._records = {}, None

    # --- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: str | Path, encoder_id: str, dtype: Optional[str] = None) -> "CaptionStore":
        """The store of ``encoder_id`` in ``cache_dir``, created if there is none (converting a cache of the
        older format). ``dtype`` rebuilds a store of another dtype (all its captions are encoded again)."""
        folder = Path(cache_dir) / store_name(encoder_id)
        wanted = None if dtype is None else latent_dtype_name(dtype)
        old = folder.with_name(folder.name + ".safetensors")
        header = _read_header(folder)
        if header is not None and not old.is_file() and wanted in (None, header["dtype"]):
            return cls._checked(folder, header, encoder_id)
        with _locked(folder.with_name(folder.name + ".lock")):
            header = _read_header(folder)
            if header is not None and wanted not in (None, header["dtype"]):
                cls._remove(folder)
                header = None
            if header is None:
                header = cls._create(folder, encoder_id, wanted or ("float32" if old.is_file() else DEFAULT_DTYPE))
            store = cls._checked(folder, header, encoder_id)
            if old.is_file():
                store._convert(old)
            return store

    @classmethod
    def existing(cls, cache_dir: str | Path, encoder_id: str) -> Optional["CaptionStore"]:
        """The store of ``encoder_id`` in ``cache_dir`` as it is, or None where there is none yet (or only one
        of the older format, which :meth:`open` converts); nothing is written."""
        folder = Path(cache_dir) / store_name(encoder_id)
        header = _read_header(folder)
        if header is None or folder.with_name(folder.name + ".safetensors").is_file():
            return None
        return cls._checked(folder, header, encoder_id)

    @classmethod
    def _checked(cls, folder: Path, header: dict, encoder_id: str) -> "CaptionStore":
        if header["encoder_id"] != encoder_id:
            raise DataError(f"{folder} holds the captions of {header['encoder_id']}, not {encoder_id}; move it away")
        return cls(folder, header)

    @staticmethod
    def _create(folder: Path, encoder_id: str, dtype: str) -> dict:
        """An empty store (the header last: a killed creation leaves no store)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in (STATES, CAPTIONS, ROWS):
            (folder / name).write_bytes(b"")
        header = {"format": FORMAT, "encoder_id": encoder_id, "dtype": dtype, "hidden_size": 0, "rows": 0,
                  "tokens": 0, "caption_bytes": 0, "created": secrets.token_hex(8)}
        _write_header(folder, header)
        return header

    @staticmethod
    def _remove(folder: Path) -> None:
        """Delete a store (moved aside first: a killed removal leaves no half store)."""
        remove_scratch_folders(folder, "removed")
        with scratch_folder(folder, "removed") as trash:
            os.replace(folder, trash / folder.name)

    def _convert(self, old: Path) -> None:
        """Append the rows of a cache of the older format (one safetensors file), then delete it."""
        from safetensors import safe_open

        try:
            with safe_open(str(old), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("encoder_id") != self.encoder_id:
                    return  # another encoder's whose id gives the same file name: not ours to convert
                captions = json.loads(metadata["captions"])
                states, offsets = handle.get_tensor("states"), handle.get_tensor("offsets").tolist()
        except Exception as exc:  # a truncated or foreign file: any failure means it cannot be read
            raise DataError(f"{old} is a caption cache of an older format that cannot be read "
                            f"({exc.__class__.__name__}); delete it and run 'histosynth cache' again to encode "
                            "its captions anew") from None
        for first in range(0, len(captions), self.rows_per_append):
            rows = range(first, min(first + self.rows_per_append, len(captions)))
            self.append([captions[i] for i in rows], [states[offsets[i] : offsets[i + 1]] for i in rows])
        old.unlink()

    # --- writing ----------------------------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's lock, with this process's view brought up to the latest header."""
        with _locked(self.lock_path):
            remove_partial_files(self.folder / HEADER)
            header = _read_header(self.folder)
            if header is None:
                raise DataError(f"{self.folder} was removed while in use; run 'histosynth cache' again")
            if header.get("created") != self.header.get("created"):  # rebuilt by another process
                self.close()
                self._take(header)
            elif header["rows"] != self.header["rows"]:
                self.header, self._records, self._sorted = header, None, None
            for name, size in _valid_sizes(self.header).items():
                with open(self.folder / name, "r+b") as file:
                    file.truncate(size)  # what a killed append left beyond the valid rows
            yield

    def add(self, captions, encoder, batch_size: int = 64, show_progress: bool = True) -> int:
        with self._writing():
            return super().add(captions, encoder, batch_size, show_progress)

    def append(self, captions: Sequence[str], states: Sequence[torch.Tensor]) -> int:
        with self._writing():
            return super().append(captions, states)

    def _append(self, captions: list[str], states: list[torch.Tensor]) -> None:
        with self._writing():
            header = dict(self.header)
            hidden = {int(s.shape[1]) for s in states} | ({header["hidden_size"]} if header["hidden_size"] else set())
            if len(hidden) != 1:
                raise ModelError(f"{self.folder} holds states of width {header['hidden_size'] or 'unknown'}; "
                                 f"got widths {sorted(hidden)}")
            header["hidden_size"] = hidden.pop()
            texts = [c.encode(*_TEXT_ENCODING) for c in captions]
            records = np.zeros(len(captions), RECORD)
            records["tokens"] = [len(s) for s in states]
            records["tokens_start"] = header["tokens"] + np.cumsum(records["tokens"]) - records["tokens"]
            records["text_bytes"] = [len(t) for t in texts]
            records["text_start"] = header["caption_bytes"] + np.cumsum(records["text_bytes"]) - records["text_bytes"]
            records["digest"] = caption_digests(captions)
            array = to_storage(torch.cat(states), header["dtype"], "caption states")
            for name, data in ((STATES, array.tobytes()), (CAPTIONS, b"".join(texts)), (ROWS, records.tobytes())):
                with open(self.folder / name, "ab") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
            header.update(rows=header["rows"] + len(captions), tokens=header["tokens"] + int(records["tokens"].sum()),
                          caption_bytes=header["caption_bytes"] + len(b"".join(texts)))
            _write_header(self.folder, header)
            self._note_appended(header, records["digest"])

    def _note_appended(self, header: dict, digests: np.ndarray) -> None:
        first = self.header["rows"]
        self.header, self._records = header, None
        if self._sorted is None:
            return
        for row, digest in enumerate(digests.tolist(), start=first):
            self._recent.setdefault(digest, []).append(row)
        if len(self._recent) > RECENT_LIMIT:
            self._sorted = None

    # --- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.header["rows"])

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def hidden_size(self) -> int:
        return int(self.header["hidden_size"])

    @property
    def captions(self) -> "StoredCaptions":
        return StoredCaptions(self)

    def _file(self, name: str) -> BinaryIO:
        if name not in self._files:
            self._files[name] = open(self.folder / name, "rb", buffering=0)  # (pread: safe to share with forks)
        return self._files[name]

    def records(self) -> np.ndarray:
        """The valid rows' records (memory-mapped)."""
        if self._records is None:
            rows = len(self)
            # (a plain array over the mapped file: np.memmap's own indexing is many times slower)
            self._records = (np.memmap(self.folder / ROWS, RECORD, mode="r", shape=(rows,)).view(np.ndarray) if rows
                             else np.zeros(0, RECORD))
        return self._records

    def caption(self, row: int) -> str:
        return self._caption_bytes(row).decode(*_TEXT_ENCODING)

    def _read_bytes(self, name: str, size: int, offset: int) -> bytes:
        data = os.pread(self._file(name).fileno(), size, offset) if size else b""
        if len(data) != size:
            raise DataError(f"{self.folder / name} ends early; {_rebuild_hint(self.folder)}")
        return data

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        records = self.records()[rows]
        lengths = records["tokens"].astype(np.int64)
        out = np.empty((int(lengths.sum()), self.hidden_size), STORAGE_DTYPES[self.dtype][1])
        row_bytes = out.itemsize * self.hidden_size
        file, filled = self._file(STATES), 0
        for start, tokens in zip(records["tokens_start"].tolist(), lengths.tolist(), strict=True):
            if tokens and read_at(file, memoryview(out[filled : filled + tokens]).cast("B"), start * row_bytes) != (
                    tokens * row_bytes):
                raise DataError(f"{self.folder / STATES} ends early; {_rebuild_hint(self.folder)}")
            filled += tokens
        return from_storage(out, self.dtype), lengths

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """The sorted digests of the rows and the row of each."""
        if self._sorted is None:
            digests = np.array(self.records()["digest"], dtype=np.uint64)
            order = np.argsort(digests, kind="stable")
            self._sorted, self._recent = (digests[order], order), {}
        return self._sorted

    def _find(self, captions: Sequence[str]) -> np.ndarray:
        found = np.full(len(captions), -1, dtype=np.int64)
        if len(self):
            for first in range(0, len(captions), FIND_CHUNK):  # (what a chunk holds of Python objects is freed)
                found[first : first + FIND_CHUNK] = self._find_chunk(captions[first : first + FIND_CHUNK])
        return found

    def _find_chunk(self, captions: Sequence[str]) -> np.ndarray:
        found = np.full(len(captions), -1, dtype=np.int64)
        keys = caption_digests(captions)
        digests, order = self._index()
        left, right = np.searchsorted(digests, keys, "left"), np.searchsorted(digests, keys, "right")
        candidates = right > left
        if self._recent:
            candidates |= np.fromiter((k in self._recent for k in keys.tolist()), bool, len(keys))
        # most captions have one candidate, the first of their digest's sorted rows: checked in one pass
        records, fd = self.records(), self._file(CAPTIONS).fileno()
        checked = np.flatnonzero(candidates)
        first = order[np.minimum(left[checked], len(order) - 1)]
        sorted_hit = right[checked] > left[checked]
        starts, sizes = records["text_start"][first].tolist(), records["text_bytes"][first].tolist()
        for i, row, start, size, hit in zip(checked.tolist(), first.tolist(), starts, sizes, sorted_hit.tolist(),
                                            strict=True):
            text = captions[i].encode(*_TEXT_ENCODING)
            if hit and size == len(text) and os.pread(fd, size, start) == text:
                found[i] = row
            else:
                others = order[left[i] : right[i]].tolist() + self._recent.get(int(keys[i]), [])
                found[i] = next((r for r in others if self._caption_bytes(r) == text), -1)
        return found

    def _caption_bytes(self, row: int) -> bytes:
        record = self.records()[row]
        return self._read_bytes(CAPTIONS, int(record["text_bytes"]), int(record["text_start"]))


class StoredCaptions(SequenceABC):
    """The captions of a store's rows, read from its file when asked for."""

    def __init__(self, store: CaptionStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.store.caption(i) for i in range(*index.indices(len(self)))]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.store.caption(index % len(self))

    def __eq__(self, other) -> bool:
        if not isinstance(other, SequenceABC) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

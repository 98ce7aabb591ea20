"""Writing a generation job's images off the critical path, and the record of what is finished.

:class:`ImageWriter` encodes PNGs on a few threads while the model samples the next batch (Pillow
releases the GIL while it compresses: on a GPU the encoding overlaps sampling entirely, on a CPU it
takes the cores the sampler leaves). At most ``pending`` batches wait for their writers; beyond that
the caller blocks, so memory stays bounded. An error in a writer is raised in the caller's thread at
its next call; a batch is recorded only if every one of its images was written.

:class:`RecordFile` is one shard's append-only record: a JSON line per finished batch - ``{"batch": b}``
for a batch written whole, ``{"batch": b, "items": [i, ...]}`` for the items written of a batch that
was partly finished before - appended (and flushed to the system) only once every image it names is
on disk: written under a temporary name, synced, renamed, its folder synced. A process killed at any
moment therefore leaves at most unrecorded images and temporary files, never a recorded image that
is not whole; a line cut short by the kill is not a record and is dropped when the shard appends
again. :func:`read_records` reads every shard's record back.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import JobError
from ..io import write_png_atomic

#: threads encoding PNGs
DEFAULT_WRITERS = min(4, os.cpu_count() or 1)
#: batches handed to the writers and not yet on disk, at most (the caller waits beyond that)
DEFAULT_PENDING = 2


class RecordFile:
    """One shard's record of finished batches, opened for appending (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        _drop_cut_line(self._fd)

    def append(self, batch: int, items: Optional[Sequence[int]] = None) -> None:
        """Record batch ``batch`` as finished (``items``: only these of its items): one line, one write."""
        entry = {"batch": int(batch)} if items is None else {"batch": int(batch), "items": [int(i) for i in items]}
        os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_cut_line(fd: int) -> None:
    """Truncate a last line that a killed process left without its newline."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def read_records(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """What every shard's record (``*.jsonl`` in ``folder``) lists as finished: (numbers of the batches
    finished whole, indices of the items of the batches finished in part)."""
    whole, parts = [], []
    for path in sorted(Path(folder).glob("*.jsonl")):
        data = path.read_bytes()
        data = data[:data.rfind(b"\n") + 1]  # a last line without its newline was cut short by a kill
        whole_lines, in_part = _split_partial_lines(data)
        numbers = _whole_batches(whole_lines)
        entries = _entries(path, data if numbers is None else in_part)
        whole.append(numbers if numbers is not None else np.asarray(
            [e["batch"] for e in entries if "items" not in e], dtype=np.int64))
        parts.extend(e["items"] for e in entries if "items" in e)
    return (np.concatenate(whole) if whole else np.zeros(0, np.int64),
            np.fromiter(chain.from_iterable(parts), dtype=np.int64))


_WHOLE_PREFIX, _WHOLE_SUFFIX = b'{"batch":', b"}\n"


def _split_partial_lines(data: bytes) -> tuple[bytes, bytes]:
    """(the other lines, the lines that list ``"items"``: those of partly finished batches, which are rare)."""
    kept, partial, start = [], [], 0
    found = data.find(b'"items"')
    while found >= 0:
        begin = data.rfind(b"\n", 0, found) + 1
        end = data.find(b"\n", found) + 1
        kept.append(data[start:begin])
        partial.append(data[begin:end])
        start = end
        found = data.find(b'"items"', end)
    kept.append(data[start:])
    return b"".join(kept), b"".join(partial)


def _whole_batches(data: bytes) -> Optional[np.ndarray]:
    """The batch numbers of record lines that are all ``{"batch":b}`` (the writers' form), read without a
    Python object per line (a million lines in a fraction of a second); None for any other content."""
    lines = data.count(b"\n")
    if data.count(_WHOLE_PREFIX) != lines or data.count(_WHOLE_SUFFIX) != lines:
        return None
    digits = data.replace(_WHOLE_PREFIX, b"").replace(_WHOLE_SUFFIX, b"\n")
    if digits.translate(None, b"0123456789\n") or b"\n\n" in b"\n" + digits:
        return None
    numbers = np.fromstring(digits.decode(), dtype=np.int64, sep="\n") if lines else np.zeros(0, np.int64)
    return numbers if len(numbers) == lines else None


def _entries(path: Path, data: bytes) -> list[dict]:
    """The record lines in ``data`` (complete lines of ``path``), parsed and checked."""
    lines = data.decode().splitlines()
    try:  # one parse for all the lines
        entries = json.loads("[" + ",".join(lines) + "]")
        if all(_is_entry(entry) for entry in entries):
            return entries
    except ValueError:
        pass
    for line in lines:
        try:
            if _is_entry(json.loads(line)):
                continue
        except ValueError:
            pass
        number = path.read_bytes().decode().splitlines().index(line) + 1
        raise JobError(f"{path} line {number} is not a record of finished images ({line[:60]!r}); delete that "
                       "line (its images are made again) or the whole file (all of its shard's images are)")
    raise AssertionError("unreachable")


def _is_entry(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("batch"), int) and isinstance(entry.get("items", []), list)


@dataclass
class _Batch:
    number: int
    items: list[int]
    paths: list[Path]
    writes: list[Future]
    whole: bool


def _error(write: Future) -> Optional[BaseException]:
    """The error of a finished write (None while it runs, once cancelled, or when it succeeded)."""
    return write.exception() if write.done() and not write.cancelled() else None


class ImageWriter:
    """Writes batches of images on ``threads`` threads and records each batch once all of it is on disk.

    A batch is recorded by the writer thread that finishes its last image (batches in the order they
    were handed over), so a process killed while it samples the next batch has already recorded every
    batch that is on disk. Use it as a context manager: leaving the block normally waits for every
    write (raising the first error); leaving it with an exception records the batches already written
    and abandons the rest. ``done(k)`` is called (from a writer thread) with the number of images of
    each batch recorded.
    """

    def __init__(self, record: RecordFile, threads: int = DEFAULT_WRITERS, pending: int = DEFAULT_PENDING,
                 done: Optional[Callable[[int], None]] = None):
        if threads < 1 or pending < 1:
            raise ValueError(f"an image writer needs at least one thread and one pending batch, got {threads}, "
                             f"{pending}")
        self.record, self.pending, self.done = record, pending, done
        self.written = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="png-writer")
        self._waiting: deque[_Batch] = deque()
        self._lock = threading.RLock()

    def submit(self, batch: int, files: Sequence[tuple[int, Path, np.ndarray]], whole: bool = True) -> None:
        """Hand over a batch's images as (item index, path, uint8 image) - all of it (``whole``) or some of its
        items; waits while ``pending`` batches are being written."""
        self._raise_failed()
        while self._pending_count() >= self.pending:
            self._wait_for_first()
        entry = _Batch(batch, [index for index, _, _ in files], [path for _, path, _ in files], [], whole)
        with self._lock:
            self._waiting.append(entry)
            entry.writes = [self._pool.submit(write_png_atomic, path, image, True) for _, path, image in files]
        for write in entry.writes:
            write.add_done_callback(self._record_written)
        if not entry.writes:
            self._record_written()

    def close(self) -> None:
        """Wait for every write and record it; the first error is raised."""
        try:
            while self._pending_count():
                self._wait_for_first()
        finally:
            self._abandon()

    def _pending_count(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _wait_for_first(self) -> None:
        """Wait until the oldest batch is written and recorded; raise its error."""
        with self._lock:
            first = self._waiting[0] if self._waiting else None
        if first is not None:
            wait(first.writes)
            self._record_written()
            self._raise_failed()

    def _record_written(self, _: Optional[Future] = None) -> None:
        """Record the oldest batches whose images are all written without error (a writer's callback)."""
        with self._lock:
            while self._waiting and all(write.done() and not write.cancelled() and _error(write) is None
                                        for write in self._waiting[0].writes):
                self._record(self._waiting.popleft())

    def _raise_failed(self) -> None:
        """Raise the error of the oldest batch if one of its writes failed."""
        with self._lock:
            first = self._waiting[0] if self._waiting else None
        for path, write in zip(first.paths, first.writes, strict=True) if first is not None else ():
            exc = _error(write)
            if isinstance(exc, OSError):
                raise JobError(f"could not write {path} ({exc.strerror or exc}); free the disk or fix the "
                               "folder, then run the job again (it resumes)") from exc
            if exc is not None:
                raise exc

    def _record(self, batch: _Batch) -> None:
        if batch.items:
            self.record.append(batch.number, None if batch.whole else batch.items)
        self.written += len(batch.items)
        if self.done is not None:
            self.done(len(batch.items))

    def _abandon(self) -> None:
        """Record what is written without error, in order, and drop the rest."""
        with self._lock:
            for batch in self._waiting:
                for write in batch.writes:
                    write.cancel()
        self._pool.shutdown(wait=True)
        self._record_written()
        with self._lock:
            self._waiting.clear()

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._abandon()

"""The caption store at a million unique captions: appending, opening, finding rows, batch lookups, memory.

Prints ``name value unit`` lines, for a store of N synthetic rows (N = 10^6; ``--rows`` sets another)
written with :meth:`CaptionStore.append` in appends of 1024 rows, as ``add`` appends while it encodes
(no encoder: each row is 8 tokens of 32 random bfloat16 values, 512 bytes, so that the run measures
the store and not the disk; a MiniLM row takes 768 bytes per token of its caption). Captions are
distinct ~70-character strings, made as they are appended, so only the store keeps anything of them.
Everything runs in a child process, whose memory is measured:

* ``caption_cache_1M_add_s``: appending all N rows (each append flushed to disk, header replaced).
* ``caption_cache_1M_append_1024_ms``: one more append of 1024 rows to the full store: the cost of an
  addition does not grow with the store (the older format rewrote the whole file on every addition).
* ``caption_cache_1M_open_s``: opening the store and sorting its digests (the first caption lookup).
* ``caption_cache_1M_rows_s``: the rows of all N captions (what training does once, per patch).
* ``caption_cache_lookup_batch64_ms``: the states of 64 random rows (mean of 200 batches).
* ``caption_cache_1M_peak_rss`` / ``_rss_growth``: the child's peak resident memory, and that peak minus
  its memory after the imports (``_add_open_rss_growth``: before the rows of all N captions are looked
  up, which holds the benchmark's own list of N strings). ``caption_index_1M_mib``: the sorted digests and their rows;
  ``caption_dict_1M_mib``: what a dict of the N caption strings to rows would take instead
  (tracemalloc, strings included), measured after the rest.

Run (from the repository root)::

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_cache.py

Measured on the 2-core CPU machine (torch 2.13 CPU, one thread, other jobs running: load average
about 9), N = 10^6, 0.63 GB on disk in /tmp (about 3 minutes in all)::

    caption_cache_1M_bytes 0.629 GB
    caption_cache_1M_add_s 99.6 s
    caption_cache_1M_append_1024_ms 79.8 ms
    caption_cache_1M_open_s 0.51 s
    caption_cache_1M_rows_s 19.1 s
    caption_cache_lookup_batch64_ms 4.41 ms
    caption_cache_1M_peak_rss 552 MiB
    caption_cache_1M_add_open_rss_growth 85 MiB
    caption_cache_1M_rss_growth 322 MiB
    caption_index_1M_mib 15.3 MiB
    caption_dict_1M_mib 187.5 MiB

An append of 1024 rows cost 52 ms at 10^5 rows and 80-97 ms at 10^6 (three runs), a third of it the
four ``fsync`` calls; the rest of the difference is load. ``_rows_s`` is 19 us a caption: its digest,
and one ``pread`` of the stored caption that confirms the match (a caption that repeats is looked up
once: the rows of 10^6 patches with 20 distinct captions took 0.4 s). The growth during ``rows`` is
the benchmark's list of 10^6 caption strings (about 150 MB) and the dict that finds repeats in it
(about 90 MB, freed after), not the store. Times vary with the load: other runs gave 89-130 s to add,
18-23 s for the rows and 2.8-5.1 ms a batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

TOKENS, HIDDEN = 8, 32
APPEND_ROWS = 1024


def caption(i: int) -> str:
    return f"caption {i:07d}: a patch with a moderate amount of tubuli and {i % 97} glomeruli, free text"


def fill(store, rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(APPEND_ROWS, TOKENS, HIDDEN, generator=generator)
    for first in range(0, rows, APPEND_ROWS):
        count = min(APPEND_ROWS, rows - first)
        store.append([caption(i) for i in range(first, first + count)], list(block[:count] + first))


def current_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def dict_mib(rows: int) -> float:
    tracemalloc.start()
    row_of = {caption(i): i for i in range(rows)}
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del row_of
    return size / 2**20


def measure(folder: Path, rows: int) -> dict:
    """Everything but the dict, in this (child) process."""
    from histosynth.models.caption_store import CaptionStore

    baseline = current_rss_mib()
    results = {}
    started = time.perf_counter()
    store = CaptionStore.open(folder, "bert:8:synthetic", "bfloat16")
    fill(store, rows)
    results["add_s"] = time.perf_counter() - started
    started = time.perf_counter()
    store.append([f"one more {i}" for i in range(APPEND_ROWS)], list(torch.zeros(APPEND_ROWS, TOKENS, HIDDEN)))
    results["append_1024_ms"] = (time.perf_counter() - started) * 1e3
    del store

    started = time.perf_counter()
    store = CaptionStore.open(folder, "bert:8:synthetic")
    assert store.rows([caption(rows // 2)]).tolist() == [rows // 2]
    results["open_s"] = time.perf_counter() - started
    digests, order = store._index()
    results["index_mib"] = (digests.nbytes + order.nbytes) / 2**20
    results["add_open_rss_growth_mib"] = peak_rss_mib() - baseline

    started = time.perf_counter()
    found = store.rows([caption(i) for i in range(rows)])
    results["rows_s"] = time.perf_counter() - started
    assert torch.equal(found, torch.arange(rows))
    del found

    batches = np.random.default_rng(0).integers(0, rows, (200, 64))
    started = time.perf_counter()
    for batch in batches:
        states, mask = store.lookup(batch)
    results["lookup_ms"] = (time.perf_counter() - started) / len(batches) * 1e3
    assert states.shape == (64, TOKENS, HIDDEN) and bool(mask.all())
    results["bytes"] = sum(p.stat().st_size for p in store.folder.iterdir())
    results["peak_rss_mib"] = peak_rss_mib()
    results["rss_growth_mib"] = results["peak_rss_mib"] - baseline
    results["dict_mib"] = dict_mib(rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(measure(args.child, args.rows)))
        return
    folder = Path(tempfile.mkdtemp(prefix="histosynth-captions-", dir="/tmp"))
    try:
        child = subprocess.run([sys.executable, __file__, "--child", str(folder), "--rows", str(args.rows)],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = "1M" if args.rows == 1_000_000 else str(args.rows)
    print(f"caption_cache_{n}_bytes {r['bytes'] / 1e9:.3f} GB")
    print(f"caption_cache_{n}_add_s {r['add_s']:.1f} s")
    print(f"caption_cache_{n}_append_1024_ms {r['append_1024_ms']:.1f} ms")
    print(f"caption_cache_{n}_open_s {r['open_s']:.2f} s")
    print(f"caption_cache_{n}_rows_s {r['rows_s']:.1f} s")
    print(f"caption_cache_lookup_batch64_ms {r['lookup_ms']:.2f} ms")
    print(f"caption_cache_{n}_peak_rss {r['peak_rss_mib']:.0f} MiB")
    print(f"caption_cache_{n}_add_open_rss_growth {r['add_open_rss_growth_mib']:.0f} MiB")
    print(f"caption_cache_{n}_rss_growth {r['rss_growth_mib']:.0f} MiB")
    print(f"caption_index_{n}_mib {r['index_mib']:.1f} MiB")
    print(f"caption_dict_{n}_mib {r['dict_mib']:.1f} MiB")


if __name__ == "__main__":
    main()

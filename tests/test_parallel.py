"""The ordered, bounded thread map that tiling reads and writes patches with."""

from __future__ import annotations

import threading
import time

import pytest

from histosynth.parallel import AHEAD_PER_THREAD, ordered_map


def test_results_come_in_the_order_of_the_items_whatever_finishes_first():
    def slow_first(item: int) -> int:
        time.sleep(0.002 * (10 - item))  # early items finish last
        return item * item

    assert list(ordered_map(slow_first, range(10), threads=3)) == [i * i for i in range(10)]


def test_items_are_taken_lazily_and_an_error_stops_the_rest():
    taken, started = [], []
    lock = threading.Lock()

    def items():
        for item in range(100):
            taken.append(item)
            yield item

    def work(item: int) -> int:
        with lock:
            started.append(item)
        if item == 3:
            raise ValueError("item 3 is bad")
        return item

    results = ordered_map(work, items(), threads=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(results)
    assert len(taken) <= 3 + 2 * AHEAD_PER_THREAD + 1  # never the whole input
    assert len(started) < 100

"""Threads for work that releases the GIL (slide reads, PNG compression): an ordered, bounded map.

Reading a region with openslide and compressing a PNG with libdeflate run outside the GIL, so a
few threads keep every CPU busy without the start-up and copying costs of processes.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from .errors import ConfigError

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Items handed to each thread ahead of the consumer, which bounds the memory their results hold.
AHEAD_PER_THREAD = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the system tells it, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], threads: int,
                name: str = "worker") -> Iterator[Result]:
    """``map(function, items)`` on `threads` threads, results in the order of `items`.

    At most ``AHEAD_PER_THREAD * threads`` items are in flight; `items` is consumed lazily, so it may
    be a generator fed by another map. An exception of `function` is raised where its result would
    have been yielded; then, or when the consumer stops early, the items not yet started are
    dropped and those running are waited for.
    """
    pending: deque[Future[Result]] = deque()
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= AHEAD_PER_THREAD * max(1, threads):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (from 0, as torchrun's RANK) of a job split across processes or machines:
    the items (generation batches, experiment runs, slides in name order) whose place is ``index`` modulo
    ``count``. Every command that takes ``--shard i/n`` means this."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count} does not exist; use i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """A shard from ``"i/n"``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard expects i/n such as 0/4, got {text!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls, environ: Optional[dict[str, str]] = None) -> "Shard":
        """torchrun's RANK / WORLD_SIZE when set, else the whole job."""
        environ = os.environ if environ is None else environ
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        return cls()

    def takes(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

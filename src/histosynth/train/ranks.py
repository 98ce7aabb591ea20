"""The processes of a job that several processes share (``torchrun``, or ``histosynth cache --devices N``).

Each process learns its place from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); without it a job is one process. The processes wait for each other through a gloo
process group, on the CPU whatever device they compute on. A process that dies closes its
connections, so the others stop waiting at once with an error instead of hanging (``torchrun``
usually ends them first); one that hangs alive is given up on after :data:`WAIT_LIMIT`.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from ..errors import ConfigError, HistosynthError, JobError

#: how long a process waits for the others at one meeting point before giving up
WAIT_LIMIT = timedelta(hours=4)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world_size`` processes of a job (rank 0 is the main one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th, from its rank on."""
        return list(items[self.rank :: self.world_size])

    def device(self, device: torch.device) -> torch.device:
        """The device this process computes on: with several processes, a CUDA device named without an
        index (``cuda``, or ``auto``'s choice) is the GPU of this process's local rank."""
        if device.type != "cuda" or not self.distributed:
            return device
        if device.index not in (None, self.local_rank % max(1, torch.cuda.device_count())):
            raise ConfigError(f"--device {device} names one GPU for all {self.world_size} processes; give --device "
                              "cuda (or auto): each process takes the GPU of its LOCAL_RANK")
        return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))

    def wait_for_all(self, what: str) -> None:
        """Wait until every process has reached this point (``what`` names it in an error)."""
        if self.distributed:
            with _others_stopped(self, what):
                torch.distributed.barrier()

    def from_main(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` (picklable), in every process."""
        if not self.distributed:
            return value
        box = [value]
        with _others_stopped(self, what):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = Ranks()


def ranks_from_environment() -> Ranks:
    """This process's place, from ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process without)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    given = {name: os.environ.get(name) for name in names}
    if given["WORLD_SIZE"] is None:
        return ONE_PROCESS
    try:
        rank, world_size = int(given["RANK"] or ""), int(given["WORLD_SIZE"] or "")
        local_rank = int(given["LOCAL_RANK"] or rank)
    except ValueError:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, got {given}; start the "
                          "processes with torchrun") from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK {rank} is not one of the WORLD_SIZE {world_size} processes; start them with torchrun")
    return Ranks(rank, world_size, local_rank)


@contextmanager
def process_group(ranks: Ranks) -> Iterator[Ranks]:
    """The gloo group of the job's processes while the block runs (nothing for one process).

    It meets at ``MASTER_ADDR:MASTER_PORT`` as ``torchrun`` sets them."""
    if not ranks.distributed or torch.distributed.is_initialized():
        yield ranks
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set for a job of {ranks.world_size} processes; "
                          "start them with torchrun")
    with _others_stopped(ranks, "for the other processes to start"):
        torch.distributed.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size,
                                             timeout=WAIT_LIMIT)
    try:
        yield ranks
    finally:
        torch.distributed.destroy_process_group()


@contextmanager
def _others_stopped(ranks: Ranks, what: str) -> Iterator[None]:
    """A failed meeting of the processes as one line: which process gave up, on what, and what to do."""
    try:
        yield
    except RuntimeError as exc:  # (gloo's errors, DistBackendError and timeouts included)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"process {ranks.rank} of {ranks.world_size} stopped waiting {what}: another process of the "
                       f"job stopped or hangs ({detail[:200]}); see its output, then run the same command again: "
                       "it continues with what is missing") from None


def spawn_ranks(count: int, function: Callable[..., None], *args: Any) -> None:
    """``function(*args)`` in ``count`` new processes of one job on this machine, each with the
    environment ``torchrun --nproc-per-node count`` would give it. When one fails the others are
    ended and the job stops with a one-line error (the process prints its own error first)."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_as_rank, args=(count, _free_port(), function, args), nprocs=count,
                           start_method="spawn")
    except mp.ProcessExitedException as exc:
        raise JobError(f"process {exc.error_index} of {count} stopped (exit code {exc.exit_code}; its error is "
                       "above) and the others were ended; run the same command again: it continues with what "
                       "is missing") from None


def _as_rank(index: int, count: int, port: int, function: Callable[..., None], args: tuple) -> None:
    """One spawned process: its place in the environment, and a user's error as the CLI prints it."""
    os.environ.update(RANK=str(index), WORLD_SIZE=str(count), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(count),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        function(*args)
    except HistosynthError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

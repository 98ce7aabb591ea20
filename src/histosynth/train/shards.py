"""Arrays of one row per patch, stored as ``.npy`` parts and read row by row through memory maps.

A training process reads only the rows of its batches: a part is mapped (not read) when first
touched, and a batch copies out just its rows, so a process's memory does not grow with the number
of patches. bfloat16, which numpy lacks, is stored as its raw 16 bits (``uint16``); the index of
the folder names the real dtype.

Pages of a mapped file that a process has read count towards its resident memory until the map is
closed, so the maps are closed (and reopened on demand) after every :data:`MAPPED_BYTES_LIMIT`
bytes of rows read: an epoch over a cache larger than the machine's memory does not look like a leak.

The maps are opened lazily and never pickled: a data-loader worker or a spawned DDP process that
receives a :class:`ShardedRows` maps the files itself instead of receiving a copy of their content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..io import atomic_path

#: storage dtypes of cached arrays: name -> (torch dtype, numpy dtype on disk)
STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
    "uint8": (torch.uint8, np.dtype("u1")),
}
#: what each name may be given as on the command line
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16"}
FLOAT16_MAX = 65504.0
#: bytes read through the maps after which they are closed, releasing the pages they hold
MAPPED_BYTES_LIMIT = 64 << 20


def latent_dtype_name(name: str) -> str:
    """The storage dtype a user's ``--dtype`` names (bf16/bfloat16, fp16/float16, fp32/float32)."""
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"--dtype must be one of bfloat16, float16 or float32 (or bf16, fp16, fp32), "
                        f"got {name!r}") from None


def write_part(path: Path, values: torch.Tensor, dtype: str) -> None:
    """Store ``values`` (rows, ...) as ``dtype`` in the ``.npy`` file ``path``, atomically."""
    torch_dtype, _ = STORAGE_DTYPES[dtype]
    if dtype == "float16" and values.is_floating_point() and values.abs().max() > FLOAT16_MAX:
        raise DataError(f"latents beyond {FLOAT16_MAX:g} do not fit float16; cache them as bfloat16 "
                        "(the default) or float32 with --dtype")
    stored = values.detach().cpu().to(torch_dtype).contiguous()
    array = stored.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else stored.numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as file:  # (np.save given a name would append ".npy")
        np.save(file, array, allow_pickle=False)


class ShardedRows:
    """``count`` rows of shape ``row_shape`` in parts of ``part_size`` rows (the last may be shorter)."""

    def __init__(self, parts: Sequence[Path], count: int, row_shape: Sequence[int], dtype: str, part_size: int):
        self.parts = [Path(p) for p in parts]
        self.count = int(count)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = dtype
        self.part_size = int(part_size)
        self._maps: list[Optional[np.ndarray]] = [None] * len(self.parts)
        self._mapped_bytes = 0

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.row_shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype][0]

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.row_shape)) * STORAGE_DTYPES[self.dtype][1].itemsize

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.parts), "_mapped_bytes": 0}

    def close(self) -> None:
        """Unmap the parts (they are mapped again when read)."""
        self._maps = [None] * len(self.parts)
        self._mapped_bytes = 0

    def _part(self, k: int) -> np.ndarray:
        mapped = self._maps[k]
        if mapped is None:
            mapped = np.load(self.parts[k], mmap_mode="r", allow_pickle=False)
            expected = min(self.part_size, self.count - k * self.part_size)
            if mapped.shape != (expected, *self.row_shape) or mapped.dtype != STORAGE_DTYPES[self.dtype][1]:
                raise DataError(f"{self.parts[k]} holds {mapped.dtype} {mapped.shape}, the cache index says "
                                f"{self.dtype} {(expected, *self.row_shape)}; delete {self.parts[k].parent} and "
                                "run 'histosynth cache' again")
            self._maps[k] = mapped
        return mapped

    def read(self, items: np.ndarray | torch.Tensor | Sequence[int], sub: Optional[np.ndarray | torch.Tensor] = None
             ) -> torch.Tensor:
        """Rows ``items`` (in their order) as a tensor of the stored dtype; with ``sub``, element
        ``sub[i]`` of row ``items[i]`` only (e.g. one flip variant of each patch's latents)."""
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if len(items) and (items.min() < 0 or items.max() >= self.count):
            raise IndexError(f"rows {items.min()}..{items.max()} of {self.count}")
        sub = None if sub is None else np.asarray(sub, dtype=np.int64).reshape(-1)
        shape = self.row_shape if sub is None else self.row_shape[1:]
        out = np.empty((len(items), *shape), STORAGE_DTYPES[self.dtype][1])
        parts = items // self.part_size
        for k in np.unique(parts):
            where = np.flatnonzero(parts == k)
            local = items[where] - k * self.part_size
            out[where] = self._part(int(k))[local] if sub is None else self._part(int(k))[local, sub[where]]
        # whole rows, not just the bytes read: a page fault maps its neighbours too (fault-around)
        self._mapped_bytes += len(items) * self.bytes_per_row
        if self._mapped_bytes > MAPPED_BYTES_LIMIT:
            self.close()
        if self.dtype == "bfloat16":
            return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(out)

    def __getitem__(self, index: int | slice | np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Row ``index`` (an int), or the rows of a slice or of an array of positions."""
        if isinstance(index, (int, np.integer)):
            return self.read([int(index) + (self.count if index < 0 else 0)])[0]
        if isinstance(index, slice):
            return self.read(np.arange(*index.indices(self.count)))
        return self.read(index)

"""Arrays of one row per patch, stored as ``.npy`` parts and read row by row.

A training process reads only the rows of its batches: each row is read from its part at its
offset (the ``.npy`` header gives where the data starts), so a process's memory does not grow with
the number of patches. The parts are plain ``.npy`` files that ``np.load(..., mmap_mode="r")`` opens
as well; training does not map them because a mapped page stays resident in the process once read,
and the kernel maps whole large folios (up to 2 MB) per fault: sparse rows of a 4 GB cache made the
resident memory of a short run grow by 760 MB. bfloat16, which numpy lacks, is stored as its raw
16 bits (``uint16``); the index of the folder names the real dtype.

Files are opened lazily and never pickled: a data-loader worker or a spawned DDP process that
receives a :class:`ShardedRows` opens them itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

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


def latent_dtype_name(name: str) -> str:
    """The storage dtype a user's ``--dtype`` names (bf16/bfloat16, fp16/float16, fp32/float32)."""
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"--dtype must be one of bfloat16, float16 or float32 (or bf16, fp16, fp32), "
                        f"got {name!r}") from None


def to_storage(values: torch.Tensor, dtype: str, what: str = "latents") -> np.ndarray:
    """``values`` as the numpy array that stores them as ``dtype`` (bfloat16 as its raw 16 bits)."""
    torch_dtype, _ = STORAGE_DTYPES[dtype]
    if dtype == "float16" and values.is_floating_point() and values.numel() and values.abs().max() > FLOAT16_MAX:
        raise DataError(f"{what} beyond {FLOAT16_MAX:g} do not fit float16; cache them as bfloat16 "
                        "(the default) or float32 with --dtype")
    stored = values.detach().cpu().to(torch_dtype).contiguous()
    return stored.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else stored.numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor of ``dtype`` that a stored array holds (the inverse of :func:`to_storage`)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def write_part(path: Path, values: torch.Tensor, dtype: str) -> None:
    """Store ``values`` (rows, ...) as ``dtype`` in the ``.npy`` file ``path``, atomically."""
    array = to_storage(values, dtype)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:  # (np.save given a name would append ".npy")
        np.save(file, array, allow_pickle=False)


def read_at(file: BinaryIO, buffer: memoryview, offset: int) -> int:
    """Read into ``buffer`` from ``offset`` without moving the file position where the OS allows it."""
    if hasattr(os, "preadv"):
        return os.preadv(file.fileno(), [buffer], offset)
    file.seek(offset)
    return file.readinto(buffer)


class ShardedRows:
    """``count`` rows of shape ``row_shape`` in parts of ``part_size`` rows (the last may be shorter)."""

    def __init__(self, parts: Sequence[Path], count: int, row_shape: Sequence[int], dtype: str, part_size: int):
        self.parts = [Path(p) for p in parts]
        self.count = int(count)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = dtype
        self.part_size = int(part_size)
        self._files: list[Optional[tuple[BinaryIO, int]]] = [None] * len(self.parts)
        self._pid = os.getpid()

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
        return {**self.__dict__, "_files": [None] * len(self.parts)}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the part files (they are opened again when read)."""
        for opened in getattr(self, "_files", []):
            if opened is not None:
                opened[0].close()
        self._files = [None] * len(self.parts)

    def _part(self, k: int) -> tuple[BinaryIO, int]:
        """Part ``k``'s open file and the offset of its first row, its header checked against the index."""
        if self._pid != os.getpid():  # a forked data-loader worker: files of its own, not the parent's
            self._files, self._pid = [None] * len(self.parts), os.getpid()
        opened = self._files[k]
        if opened is None:
            file = open(self.parts[k], "rb", buffering=0)
            try:
                version = np.lib.format.read_magic(file)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"npy format version {version}")
                shape, fortran, dtype = read_header(file)
            except (ValueError, OSError) as exc:
                file.close()
                raise DataError(f"{self.parts[k]} is not a cache part ({exc}); delete {self.parts[k].parent} and "
                                "run 'histosynth cache' again") from None
            expected = (min(self.part_size, self.count - k * self.part_size), *self.row_shape)
            if shape != expected or dtype != STORAGE_DTYPES[self.dtype][1] or fortran:
                file.close()
                raise DataError(f"{self.parts[k]} holds {dtype} {shape}, the cache index says {self.dtype} "
                                f"{expected}; delete {self.parts[k].parent} and run 'histosynth cache' again")
            opened = self._files[k] = (file, file.tell())
        return opened

    def read(self, items: np.ndarray | torch.Tensor | Sequence[int], sub: Optional[np.ndarray | torch.Tensor] = None
             ) -> torch.Tensor:
        """Rows ``items`` (in their order) as a tensor of the stored dtype; with ``sub``, element
        ``sub[i]`` of row ``items[i]`` only (e.g. one flip variant of each patch's latents)."""
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if len(items) and (items.min() < 0 or items.max() >= self.count):
            raise IndexError(f"rows {items.min()}..{items.max()} of {self.count}")
        subs = None if sub is None else np.asarray(sub, dtype=np.int64).reshape(-1)
        if subs is not None and len(subs) and (subs.min() < 0 or subs.max() >= self.row_shape[0]):
            raise IndexError(f"elements {subs.min()}..{subs.max()} of {self.row_shape[0]}")
        shape = self.row_shape if subs is None else self.row_shape[1:]
        out = np.empty((len(items), *shape), STORAGE_DTYPES[self.dtype][1])
        size = out[0].nbytes if len(items) else 0
        for i, item in enumerate(items.tolist()):
            file, start = self._part(item // self.part_size)
            offset = start + (item % self.part_size) * self.bytes_per_row + (0 if subs is None else int(subs[i]) * size)
            if read_at(file, memoryview(out[i]).cast("B"), offset) != size:
                raise DataError(f"{self.parts[item // self.part_size]} ends early; delete its folder and run "
                                "'histosynth cache' again")
        return from_storage(out, self.dtype)

    def __getitem__(self, index: int | slice | np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Row ``index`` (an int), or the rows of a slice or of an array of positions."""
        if isinstance(index, (int, np.integer)):
            return self.read([int(index) + (self.count if index < 0 else 0)])[0]
        if isinstance(index, slice):
            return self.read(np.arange(*index.indices(self.count)))
        return self.read(index)

"""Training batches of cached latents and their conditions, indexed by training step.

Every random choice of a batch (which patches, which flip variant, which captions are dropped to "")
is drawn from a generator seeded by (run seed, step), never from a global RNG. A run resumed at step
``s`` therefore sees exactly the batches an uninterrupted run sees from step ``s`` on, whatever the
number of data-loader workers. With several processes (DDP), step ``s``'s global batch is cut into
one slice per rank.

The condition of a batch is one :class:`Condition`: text and/or a label map, each with its own
dropout (:class:`ConditionDropout`). Text-only training fills ``text``; mask conditioning adds
``label_maps`` (class shares per latent pixel, concatenated to the UNet input) through the same seam.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..models.label_maps import counts_to_shares
from .balance import repeat_counts
from .cache import FLIP_VARIANTS, TrainingData, flip_each

#: independent RNG streams: batch choices and diffusion noise (per step), patch order (per epoch)
DATA_STREAM, NOISE_STREAM, ORDER_STREAM = 0, 1, 2


@dataclass(frozen=True)
class ConditionDropout:
    """Probability of dropping each condition in training (classifier-free guidance needs both).

    A dropped caption becomes "" (its cached embedding); a dropped label map becomes all zeros (no
    class anywhere). The two are drawn independently, so with both > 0 some items drop both.
    """

    text: float = 0.1
    label_maps: float = 0.0


@dataclass
class Condition:
    """What the denoiser is conditioned on. ``text`` (B, L, D) with ``text_mask`` (B, L);
    ``label_maps`` (B, K, h, w) enters as extra input channels."""

    text: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    label_maps: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "Condition":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, text=move(self.text), text_mask=move(self.text_mask), label_maps=move(self.label_maps))


@dataclass
class LatentBatch:
    latents: torch.Tensor  # (B, C, h, w)
    condition: Condition
    items: torch.Tensor  # (B,) dataset positions, to name the patches of a failing batch
    step: int

    def to(self, device: torch.device | str) -> "LatentBatch":
        return replace(self, latents=self.latents.to(device, non_blocking=True), condition=self.condition.to(device))


def step_generator(seed: int, step: int, *stream: int) -> np.random.Generator:
    """The RNG of one training step; ``stream`` numbers separate independent uses (data, noise, rank)."""
    return np.random.default_rng((seed, step, *stream))


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n_items`` dataset positions (a seeded permutation)."""
    order = np.random.default_rng((seed, epoch, ORDER_STREAM)).permutation(n_items)
    return order.astype(np.int32) if n_items < 2**31 else order  # half the memory; the same positions


class EpochOrders:
    """Step ``s``'s global batch: items ``s * B`` to ``(s + 1) * B`` of the concatenated epoch orders.

    Each epoch's permutation is drawn once and kept while the steps cut from it (the two epochs a
    batch may straddle), so a step costs a slice, not a permutation of the whole dataset. With
    ``repeats`` (whole repeats per item, see :func:`repeat_counts`) an epoch visits item i ``repeats[i]``
    times, in a seeded permutation of all those visits.
    """

    def __init__(self, n_items: int, seed: int, repeats: Optional[np.ndarray] = None):
        self.seed = seed
        index_type = np.int32 if n_items < 2**31 else np.int64
        self._visits = None if repeats is None else np.repeat(np.arange(n_items, dtype=index_type), repeats)
        self.epoch_length = n_items if self._visits is None else len(self._visits)  # visits per epoch
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # at most two kept
            order = epoch_order(self.epoch_length, self.seed, epoch)
            self._orders[epoch] = order if self._visits is None else self._visits[order]
        return self._orders[epoch]

    def global_batch(self, global_batch: int, step: int) -> np.ndarray:
        first = step * global_batch
        epochs = range(first // self.epoch_length, (first + global_batch - 1) // self.epoch_length + 1)
        offset = first - epochs[0] * self.epoch_length
        if len(epochs) == 1:
            return self.order(epochs[0])[offset : offset + global_batch].astype(np.int64)
        stream = np.concatenate([self.order(epoch) for epoch in epochs])
        return stream[offset : offset + global_batch].astype(np.int64)


def global_batch_items(n_items: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Dataset positions of step ``step``'s global batch: consecutive slices of seeded permutations
    (one step on its own; a training run keeps its :class:`EpochOrders`)."""
    return EpochOrders(n_items, seed).global_batch(global_batch, step)


class StepBatches(Dataset):
    """Map-style dataset whose item ``s`` is this rank's batch for training step ``s``."""

    def __init__(self, data: TrainingData, batch_size: int, seed: int, dropout: ConditionDropout,
                 flips: tuple[bool, bool] = (True, True), rank: int = 0, world_size: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.dropout = dropout
        self.variants = [i for i, (h, v) in enumerate(FLIP_VARIANTS) if (flips[0] or not h) and (flips[1] or not v)]
        self.rank = rank
        self.world_size = world_size
        self.repeats = None if data.repeat_factors is None else repeat_counts(data.repeat_factors, seed)
        self.orders = EpochOrders(len(data), seed, self.repeats)

    def __getstate__(self) -> dict:  # a data-loader worker draws its own epoch orders
        return {**self.__dict__, "orders": EpochOrders(len(self.data), self.seed, self.repeats)}

    def __len__(self) -> int:  # steps are unbounded; the trainer stops at max_steps
        return 2**62

    def __getitem__(self, step: int) -> LatentBatch:
        global_items = self.orders.global_batch(self.batch_size * self.world_size, step)
        rng = step_generator(self.seed, step, DATA_STREAM)
        variants = rng.choice(self.variants, size=len(global_items))
        dropped = rng.random(len(global_items)) < self.dropout.text
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        items = torch.from_numpy(global_items[mine])
        my_variants = torch.from_numpy(variants[mine])
        latents = self.data.latents.read(items, my_variants).float()  # (bf16 / fp16 storage: fp32 to train)
        rows = self.data.caption_rows[items].clone()
        rows[torch.from_numpy(dropped[mine])] = self.data.empty_caption_row
        text, text_mask = self.data.embeddings.lookup(rows)
        condition = Condition(text=text, text_mask=text_mask)
        if self.data.label_counts is not None:
            # drawn after the text draws, so text-only batches are what they always were
            masks_dropped = torch.from_numpy(rng.random(len(global_items)) < self.dropout.label_maps)[mine]
            condition.label_maps = self.label_maps(items, my_variants, masks_dropped)
        return LatentBatch(latents, condition, items, step)

    def label_maps(self, items: torch.Tensor, variants: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Float label maps of ``items``, flipped like their latents; dropped ones all zero."""
        counts = flip_each(self.data.label_counts.read(items), variants)
        counts[dropped] = 0
        return counts_to_shares(counts, self.data.label_factor)


class StepSampler(torch.utils.data.Sampler[int]):
    """Yields step numbers from the trainer's step at the time iteration starts up to ``last_step``.

    Lightning may iterate the loader again after a resume (it counts epochs in batches); starting
    from the live step keeps every step's batch the same however often that happens. The length is
    the whole run, which is what Lightning's restored batch counter is measured against.
    """

    def __init__(self, current_step: Callable[[], int], last_step: int):
        self.current_step = current_step
        self.last_step = last_step

    def __iter__(self):
        return iter(range(self.current_step(), self.last_step))

    def __len__(self) -> int:
        return self.last_step


class StepDataLoader(DataLoader):
    """A loader that resumes by construction: its batches follow the trainer's step, not a position
    of its own, so it has no state to save (which tells Lightning a mid-epoch resume is safe)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LatentDataModule(L.LightningDataModule):
    def __init__(self, data: TrainingData, batch_size: int, max_steps: int, seed: int = 0,
                 dropout: ConditionDropout = ConditionDropout(), flips: tuple[bool, bool] = (True, True),
                 num_workers: int = 0):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.dropout = dropout
        self.flips = flips
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches = StepBatches(self.data, self.batch_size, self.seed, self.dropout, self.flips,
                              trainer.global_rank, trainer.world_size)
        sampler = StepSampler(lambda: trainer.global_step, self.max_steps)
        return StepDataLoader(batches, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                              persistent_workers=False)

    def transfer_batch_to_device(self, batch: LatentBatch, device: torch.device, dataloader_idx: int) -> LatentBatch:
        return batch.to(device)


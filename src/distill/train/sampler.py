"""A shuffling sampler whose order depends only on (seed, epoch), sharded across processes, able to start
mid-epoch: this is what makes a resumed run see exactly the batches an uninterrupted run would."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(
        self,
        length: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # samples of this process's shard to skip (resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        # Pad by wrapping so every process gets the same number of samples (as DistributedSampler does).
        per_rank = -(-self.length // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]
        return iter(order[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return -(-self.length // self.world_size) - self.start

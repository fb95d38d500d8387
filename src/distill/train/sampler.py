"""A shuffling sampler whose order depends only on (seed, epoch), sharded across processes, able to start
mid-epoch: this is what makes a resumed run see exactly the batches an uninterrupted run would.

Given each sample's `lengths` (token counts of padded text), it groups by length as Hugging Face's
`group_by_length` does: the shuffled order is cut into mega-batches of `GROUP_BATCHES` batches, each sorted
by length, and that mega-batch's batches are shuffled again. A batch then holds texts of similar length, and a
model that cuts its batch to the longest text (`distill.models.encoders`) computes far less padding; the
order still depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

GROUP_BATCHES = 50


class EpochSampler(Sampler[int]):
    def __init__(
        self,
        length: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        lengths: Tensor | None = None,
        batch_size: int = 1,
    ) -> None:
        self.length = length
        self.lengths = lengths.tolist() if lengths is not None and len(lengths) == length else None
        self.batch_size = batch_size
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
        order = torch.randperm(self.length, generator=generator).tolist()
        if self.lengths is None:
            return order
        step = self.batch_size * self.world_size  # one optimizer step's samples over every process
        grouped = []
        for start in range(0, len(order), step * GROUP_BATCHES):
            mega = sorted(
                order[start : start + step * GROUP_BATCHES], key=self.lengths.__getitem__, reverse=True
            )
            batches = [mega[i : i + step] for i in range(0, len(mega), step)]
            for index in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[index]
        return grouped

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        # Pad by wrapping so every process gets the same number of samples (as DistributedSampler does).
        per_rank = -(-self.length // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]
        return iter(order[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return -(-self.length // self.world_size) - self.start

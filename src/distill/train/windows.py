"""An epoch's training batches from a given batch on (the order survives a resume), grouped into
gradient-accumulation windows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from distill.train.sampler import EpochSampler


def epoch_batches(loader: DataLoader, epoch: int, start_batch: int, batch_size: int) -> Iterator[Any]:
    """The epoch's batches from `start_batch` on: our own loaders' sampler starts there, a user's own
    DataLoader is skipped through by counting."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start=start_batch * batch_size)
        yield from loader
        return
    for index, batch in enumerate(loader):
        if index >= start_batch:
            yield batch


def accumulation_windows(
    batches: Iterator[Any], start_batch: int, accum: int, batches_per_epoch: int
) -> Iterator[list[Any]]:
    """`batches` (those of one epoch from `start_batch` on) grouped into windows of `accum`, aligned to the
    epoch start, the last one possibly shorter."""
    window: list[Any] = []
    index = start_batch
    for batch in batches:
        window.append(batch)
        index += 1
        if index % accum == 0 or index == batches_per_epoch:
            yield window
            window = []

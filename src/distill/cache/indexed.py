"""Batches that carry their samples' ids, so a teacher cache is read by id: shuffling, accumulation and
several processes cannot misalign a sample with its cached targets."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate


class IndexedDataset(Dataset):
    """`base`'s samples, each batch a dict with an `index` tensor of the samples' positions in `base`."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[index], index

    def collate_fn(self, items: list[tuple[Any, int]]) -> dict[str, Any]:
        samples = [sample for sample, _ in items]
        index = torch.tensor([i for _, i in items], dtype=torch.long)
        own = getattr(self.base, "collate_fn", None)
        if own is not None:  # language-model examples: already a dict batch
            return own(samples) | {"index": index}
        columns = default_collate(samples)
        batch = {"inputs": columns[0], "labels": columns[1] if len(columns) > 1 else None, "index": index}
        if len(columns) > 2:
            batch["mask"] = columns[2]
        return batch


def rows_per_sample(mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """How many rows each sample contributes: its counted tokens (a (B, T) mask), else one."""
    if mask is None or mask.dim() < 2:
        return torch.ones(batch_size, dtype=torch.long)
    return mask.reshape(mask.shape[0], -1).sum(1).cpu()

"""Loaders whose order depends only on (seed, epoch), and the split of a batch into inputs, labels, mask."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of
from distill.train.sampler import EpochSampler


def make_loader(
    data: Dataset | DataLoader, batch_size: int, *, seed: int, shuffle: bool, acc: Accelerator
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if len(data) == 0:  # type: ignore[arg-type]
        raise UserError("data: the training set is empty" if shuffle else "data: the evaluation set is empty")
    # Training data is sharded across processes; every process evaluates the whole evaluation set, so the
    # metrics need no gathering (and rank 0 alone writes them).
    sampler = EpochSampler(
        len(data),  # type: ignore[arg-type]
        seed=seed,
        shuffle=shuffle,
        rank=acc.process_index if shuffle else 0,
        world_size=acc.num_processes if shuffle else 1,
        lengths=getattr(data, "lengths", None),  # token counts: batches of similar length
        batch_size=batch_size,
    )
    # A private generator: iterating a DataLoader otherwise draws a seed from the global RNG, which would
    # shift dropout masks after a mid-epoch resume. A data set with a `collate_fn` attribute (token
    # sequences padded per batch) brings its own collation.
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=getattr(data, "collate_fn", None),
    )


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def split_batch(batch: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """(inputs, labels, mask) from a tuple `(x, y)` / `(x, y, mask)` or a dict with those keys.

    A dict with `input_ids` (and no `inputs`) is a language-model batch: its model inputs (`input_ids`,
    `attention_mask`, ...) stay a dict and are passed to the model as keyword arguments."""
    if isinstance(batch, dict):
        if "inputs" not in batch and "input_ids" in batch:
            inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
            return inputs, batch.get("labels"), batch.get("mask")
        return batch.get("inputs", batch.get("input_ids")), batch.get("labels"), batch.get("mask")
    if isinstance(batch, list | tuple):
        return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None
    return batch, None, None


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None
) -> tuple[Tensor, Tensor]:
    """A model's float32 logits (on the CPU) and the labels over a whole evaluation loader, in eval mode; on
    the accelerator's device under its autocast, or (none given) on the model's own device."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        inputs, y, _ = split_batch(batch)
        inputs = (
            {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
        )
        with autocast():
            logits.append(logits_of(call_model(model, inputs)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def counted_rows(inputs: Any, mask: Tensor | None) -> int:
    """The rows a batch's losses average over: its masked tokens, else its samples."""
    if mask is not None:
        return int(mask.sum())
    return len(inputs) if not isinstance(inputs, dict) else len(next(iter(inputs.values())))

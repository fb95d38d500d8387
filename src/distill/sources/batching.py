"""Batches that know their prompts: a training set whose batches carry each row's prompt length and example
index (so a batch transform can cut a row into prompt and completion), and the way back from rows to the
trainer's batch convention (`distill.data.text`: labels pre-shifted, `mask = labels != -100`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.text import Example, LMDataset, collate

# Extra keys a prompt-aware batch carries; the trainer passes only model inputs, labels and mask on.
PROMPT_LEN, EXAMPLE_INDEX = "prompt_len", "example_index"


class PromptAwareDataset(Dataset):
    """An `LMDataset` whose batches also hold `prompt_len` and `example_index` (B,) tensors."""

    def __init__(self, base: LMDataset) -> None:
        self.base = base
        self.examples: list[Example] = list(base.examples)
        self.pad_id = base.pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, Example]:
        return index, self.examples[index]

    def collate_fn(self, items: list[tuple[int, Example]]) -> dict[str, Tensor]:
        batch = collate([e for _, e in items], self.pad_id)
        batch[PROMPT_LEN] = torch.tensor([e.prompt_len for _, e in items], dtype=torch.long)
        batch[EXAMPLE_INDEX] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch

    def counted_tokens(self) -> int:
        return sum(e.counted for e in self.examples)


@dataclass
class Row:
    """One sequence of a batch: its tokens, which of them count (as `Example.targets`), its prompt length."""

    ids: list[int]
    targets: list[bool]
    prompt_len: int

    @property
    def prompt(self) -> list[int]:
        return self.ids[: self.prompt_len]

    @property
    def completion(self) -> list[int]:
        return self.ids[self.prompt_len :]


def batch_rows(batch: dict[str, Tensor]) -> list[Row]:
    """The rows of a prompt-aware batch, unpadded; `targets` recovered from the shifted labels."""
    ids, attention, labels = batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["labels"].cpu()
    prompt_lens = batch[PROMPT_LEN].cpu().tolist()
    rows = []
    for b, prompt_len in enumerate(prompt_lens):
        n = int(attention[b].sum())
        targets = [False] + (labels[b, : n - 1] != -100).tolist()
        rows.append(Row(ids[b, :n].tolist(), targets, int(prompt_len)))
    return rows


def rows_batch(rows: Sequence[Row], pad_id: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rows back into a batch on the device of `like`, keeping its extra keys (example indices)."""
    examples = [Example(r.ids, r.targets, r.prompt_len) for r in rows]
    batch = collate(examples, pad_id)
    batch[PROMPT_LEN] = torch.tensor([r.prompt_len for r in rows], dtype=torch.long)
    device = like["input_ids"].device
    out = {k: v.to(device) for k, v in batch.items()}
    for key, value in like.items():
        out.setdefault(key, value)
    return out


def completion_row(prompt: list[int], completion: list[int]) -> Row:
    """A prompt and a completion whose every token counts."""
    return Row(prompt + completion, [False] * len(prompt) + [True] * len(completion), len(prompt))


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any printable parts (run seed, step, example ids): reproducible across resumes."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tensor_key(tensor: Tensor) -> str:
    """A content key for a (small) integer tensor: how objectives find what a batch transform stored."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()

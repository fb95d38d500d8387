"""A frozen teacher's outputs, remembered by the exact bytes of each input.

A benchmark trains many students (methods x seeds) against one frozen teacher on the same, un-augmented
images, so the teacher would otherwise compute the same logits again at every step of every run. The
teacher is deterministic in eval mode, so its logits for a given input row are a function of that row:
`MemoizedTeacher` keys each row by a hash of its bytes, runs the teacher only on rows it has not seen, and
returns the remembered logits for the rest. The numbers a student sees are the teacher's own (computed once,
on the first batch that held the row); only the repeated forward passes are saved. It is meant for
un-augmented data: augmented rows are all new, so the cache is capped and stops growing at `max_rows`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


class MemoizedTeacher(nn.Module):
    """A frozen classifier whose `forward(x)` equals `teacher(x)` (eval mode), run once per distinct row."""

    def __init__(self, teacher: nn.Module, max_rows: int = 200_000) -> None:
        super().__init__()
        self.teacher = teacher
        self.max_rows = max_rows
        self._memo: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _keys(inputs: Tensor) -> list[bytes]:
        rows = inputs.detach().to("cpu", copy=False).contiguous().flatten(1).numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]

    def forward(self, inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor) or inputs.dim() < 2:
            return self.teacher(inputs)
        keys = self._keys(inputs)
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        if missing:
            fresh = self.teacher(inputs[missing])
            if not isinstance(fresh, Tensor):
                return self.teacher(inputs)  # not a plain classifier: no memo
            for i, row in zip(missing, fresh.detach().to("cpu"), strict=True):
                if len(self._memo) < self.max_rows:
                    self._memo[keys[i]] = row.clone()
            if len(missing) == len(keys):
                self.misses += len(keys)
                return fresh
            found = {i: row for i, row in zip(missing, fresh.detach().to("cpu"), strict=True)}
        else:
            found = {}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = [found[i] if i in found else self._memo[key] for i, key in enumerate(keys)]
        return torch.stack(rows).to(inputs.device)

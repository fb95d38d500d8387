"""The `soda` source: SODA's (teacher response, student snapshot) pairs ("SODA: Semi On-Policy Black-Box
Distillation for Large Language Models", Chen et al., 2026; the loss: `distill.losses.preference`, the
objective `soda`). The student's outputs are sampled once, before training (a static snapshot), and paired
with the teacher's responses to the same prompts (or the data set's completions); only the teacher's text is
used (black-box), no teacher logits.

Batches interleave the pairs: rows 2i (teacher) and 2i + 1 (snapshot), so `data.batch_size` counts pairs.
The frozen reference (the initial student) runs in the trainer's teacher slot (its logits reach the `soda`
objective as `teacher_logits`), so the method may not combine `soda` with objectives that need the real
teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from distill.data.text import Example, collate
from distill.sources.settings import require

RESPONSES = ("teacher_generations", "dataset")


@dataclass(frozen=True)
class SODASettings:
    """`source: {name: soda, params: ...}`: where the chosen responses come from and how the snapshot is
    sampled (`teacher`: the teacher's generation settings, as `teacher_generations`' params)."""

    responses: str = "teacher_generations"
    teacher: dict[str, Any] = field(default_factory=lambda: {"do_sample": False})
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    seed: int = 0

    def check(self) -> None:
        require(self.responses in RESPONSES, f"responses must be one of {', '.join(RESPONSES)}")
        require(isinstance(self.teacher, dict), "teacher must be a mapping of generation settings")
        require(
            self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0,
            "need temperature > 0, 0 < top_p <= 1 and top_k >= 0",
        )
        require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")

    def sampling(self) -> dict[str, Any]:
        return dict(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )


class PairDataset(Dataset):
    """(chosen, rejected) example pairs; a batch holds them interleaved, chosen first."""

    def __init__(self, chosen: Sequence[Example], rejected: Sequence[Example], pad_id: int) -> None:
        if len(chosen) != len(rejected):
            raise ValueError("chosen and rejected must pair up")
        self.pairs = list(zip(chosen, rejected, strict=True))
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Example, Example]:
        return self.pairs[index]

    def collate_fn(self, items: list[tuple[Example, Example]]) -> dict[str, Tensor]:
        return collate([e for pair in items for e in pair], self.pad_id)

    def counted_tokens(self) -> int:
        return sum(c.counted + r.counted for c, r in self.pairs)

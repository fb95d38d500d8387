"""SODA: semi on-policy black-box distillation ("SODA: Semi On-Policy Black-Box Distillation for Large
Language Models", Chen et al., 2026). The student's outputs are sampled once, before training (a static
snapshot), and paired with the teacher's responses to the same prompts; the student learns to imitate the
teacher and to prefer the teacher's response to its own snapshot, with a DPO term whose reference is the
initial student:

    L = w_sft * (-(1/N_c) sum_{t in chosen} log q(y_t^T | .))
        + (1/P) sum_pairs -log sigmoid( beta [ (log q(y^T) - log q0(y^T)) - (log q(y^S) - log q0(y^S)) ] ),

y^T the teacher's response, y^S the snapshot, q0 the frozen initial student, log q(y) a sequence's summed
token log-probabilities. Only the teacher's text is used (black-box); no teacher logits.

Batches interleave the pairs: rows 2i (teacher) and 2i + 1 (snapshot), so `data.batch_size` counts pairs.
The frozen reference runs in the trainer's teacher slot (its logits reach the `soda` objective as
`teacher_logits`), so the method may not combine `soda` with objectives that need the real teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill.lm.data import Example, collate
from distill.objectives.base import register_logit_loss
from distill.onpolicy.pg import token_log_probs
from distill.onpolicy.settings import require

_SODA = "SODA: Semi On-Policy Black-Box Distillation for Large Language Models (Chen et al., 2026)"
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


def sequence_log_probs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Per row, the summed log-probability of its counted label tokens."""
    return (token_log_probs(logits, labels, temperature) * mask).sum(-1)


def soda_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """SFT on the chosen (even) rows + DPO of chosen over rejected (odd) rows; `teacher_logits` are the frozen
    reference's. (B, T, V) logits with (B, T) labels, or (B, V) logits as one-token sequences."""
    if beta <= 0 or sft_weight < 0:
        raise ValueError(f"soda needs beta > 0 and sft_weight >= 0, got {beta}, {sft_weight}")
    if reduction != "mean":
        raise ValueError("soda supports reduction 'mean' only")
    if student_logits.dim() == 2:
        student_logits, teacher_logits, labels = (
            student_logits[:, None],
            teacher_logits[:, None],
            labels[:, None],
        )
        mask = None if mask is None else mask[:, None]
    if student_logits.shape[0] % 2:
        raise ValueError("soda needs (chosen, rejected) row pairs: an even number of rows")
    mask = (labels != -100) if mask is None else mask & (labels != -100)
    policy = sequence_log_probs(student_logits, labels, mask, temperature)
    with torch.no_grad():
        reference = sequence_log_probs(teacher_logits, labels, mask, temperature)
    ratio = policy - reference
    dpo = -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2])).mean()
    chosen_tokens = mask[0::2].sum().clamp(min=1)
    sft = -policy[0::2].sum() / chosen_tokens
    return sft_weight * sft + dpo


register_logit_loss(
    "soda",
    soda_loss,
    paper=_SODA,
    summary="SODA: SFT on teacher responses + DPO of them over a static snapshot of the student's outputs",
    needs_labels=True,
)

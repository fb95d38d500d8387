"""The `opsd` source: OPSD's rollouts and its self-teacher ("Self-Distilled Reasoner: On-Policy
Self-Distillation for Large Language Models", 2026; the objective and its maths: `distill.objectives.opsd`).

`source: {name: opsd}` rolls out the student (all `student_rollouts` settings) and, per batch, records each
row's privileged sequence (context + the same completion) under a key of the batch's labels; the `opsd`
objective, bound to the `PrivilegedTeacher`, finds it there, runs the model on it and aligns its logits with
the student's completion tokens. The teacher is the model being trained (`teacher_weights: current`, the
paper's setting) or a frozen copy of it as training starts (`initial`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.data.text import Example
from distill.errors import UserError
from distill.models.adapters import logits_of
from distill.objectives.base import Progress, StepOutputs
from distill.sources.batching import EXAMPLE_INDEX, tensor_key
from distill.sources.context import DEFAULT_TEMPLATE, check_template, privileged_prompts
from distill.sources.rollouts import RolloutSettings, StudentRollouts


@dataclass(frozen=True)
class OPSDSettings(RolloutSettings):
    """`source: {name: opsd, params: ...}`: the rollout settings plus the privileged context's template."""

    context: str = DEFAULT_TEMPLATE
    # "current": the teacher is the model being trained (the paper's setting); "initial": a frozen copy of
    # it as training starts, which cannot drift with the student (small models can collapse otherwise).
    teacher_weights: str = "current"

    def check(self) -> None:
        super().check()
        check_template(self.context)
        if self.teacher_weights not in ("current", "initial"):
            raise ValueError(f"teacher_weights must be 'current' or 'initial', got {self.teacher_weights!r}")


@dataclass
class PrivilegedBatch:
    ids: Tensor  # (B, L) right-padded privileged sequences
    attention: Tensor
    spans: list[tuple[int, int, int]]  # per row: (student start, teacher start, length) of the completion


@dataclass
class PrivilegedTeacher:
    """Shared by the transform (which fills `pending`) and the objective (which reads it)."""

    contexts: list[list[int]]
    pad_id: int
    model: nn.Module | None = None
    pending: dict[str, list[PrivilegedBatch]] = field(default_factory=dict)
    calls: int = 0
    tokens: int = 0

    def record(self, batch: dict[str, Tensor], completions: list[list[int]], prompt_lens: list[int]) -> None:
        indices = batch[EXAMPLE_INDEX].tolist()
        sequences = [self.contexts[i] + c for i, c in zip(indices, completions, strict=True)]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        spans = []
        for row, (i, seq, completion) in enumerate(zip(indices, sequences, completions, strict=True)):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            # logits at position p predict token p + 1: the completion is predicted from one position earlier
            spans.append((prompt_lens[row] - 1, len(self.contexts[i]) - 1, len(completion)))
        self.pending.setdefault(tensor_key(batch["labels"]), []).append(
            PrivilegedBatch(ids, attention, spans)
        )

    @torch.no_grad()
    def logits_for(self, outputs: StepOutputs) -> Tensor:
        if self.model is None or outputs.labels is None:
            raise UserError(
                "objective 'opsd' needs source 'opsd' (the student's rollouts with a privileged context)"
            )
        queue = self.pending.get(tensor_key(outputs.labels))
        if not queue:
            raise UserError("objective 'opsd': this batch did not come from source 'opsd'")
        entry = queue.pop(0)
        device = outputs.student_logits.device
        was_training = self.model.training
        self.model.eval()
        try:
            logits = logits_of(
                self.model(input_ids=entry.ids.to(device), attention_mask=entry.attention.to(device))
            )
        finally:
            self.model.train(was_training)
        self.calls += 1
        self.tokens += int(entry.attention.sum())
        aligned = torch.zeros_like(outputs.student_logits)
        for row, (s, t, n) in enumerate(entry.spans):
            aligned[row, s : s + n] = logits[row, t : t + n].to(aligned.dtype)
        return aligned


class OPSDRollouts:
    """The batch transform: student rollouts, then each row's privileged sequence recorded for the loss."""

    def __init__(self, rollouts: StudentRollouts, teacher: PrivilegedTeacher, *, follow: bool = True) -> None:
        self.rollouts = rollouts
        self.teacher = teacher
        self.follow = follow  # the teacher is the student's current weights

    def __call__(self, batch: dict[str, Tensor], student: nn.Module, progress: Progress) -> dict[str, Tensor]:
        if self.follow or self.teacher.model is None:
            self.teacher.model = student
        if progress.step != getattr(self, "_step", None):  # a new window: what was not consumed is stale
            self.teacher.pending.clear()
            self._step = progress.step
        new = self.rollouts(batch, student, progress)
        rows = self.rollouts.rows
        self.teacher.record(new, [r.completion for r in rows], [r.prompt_len for r in rows])
        return new


def opsd_teacher(
    settings: OPSDSettings, tokenizer: Any, examples: list[Example], pad_id: int
) -> PrivilegedTeacher:
    return PrivilegedTeacher(privileged_prompts(tokenizer, examples, settings.context), pad_id)

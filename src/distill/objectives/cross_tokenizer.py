"""Cross-tokenizer objectives: `uld` and `aligned_kd` (losses in `distill.losses.cross_tokenizer`).

They read a teacher with its own tokenizer (`distill.teachers.cross_tokenizer`): its logits over its own
positions and vocabulary, and the `cross_tokenizer.*` features (its labels and counted positions, the
byte-aligned groups, the matched vocabulary). With a teacher that shares the student's tokenizer they work
too: every counted position is its own group and the whole vocabulary is matched (so `aligned_kd` is then
the generalized JSD, and `uld` the sorted-probability L1 of the same positions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.data.token_alignment import CrossTokenBatch
from distill.errors import UserError
from distill.losses.cross_tokenizer import aligned_kd_loss, uld_loss
from distill.objectives.base import OBJECTIVES, Objective, StepOutputs, number_in, positive_number

_ULD = (
    "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs "
    "(Boizard et al., 2024)"
)
_GOLD = "Unlocking On-Policy Distillation for Any Model Family (TRL's GOLD, Hugging Face, 2025)"


def _teacher_logits(outputs: StepOutputs, name: str) -> Tensor:
    if outputs.teacher_logits is None:
        raise UserError(f"objective '{name}' needs the teacher's logits, but the step has none")
    return outputs.teacher_logits


def _same_tokenizer(outputs: StepOutputs) -> dict[str, Tensor]:
    """A shared-tokenizer teacher's view in the cross-tokenizer form: each counted position one group."""
    mask = outputs.mask
    if mask is None:
        mask = torch.ones(
            outputs.student_logits.shape[:-1], dtype=torch.bool, device=outputs.student_logits.device
        )
    groups = torch.where(mask, mask.reshape(-1).long().cumsum(0).reshape(mask.shape) - 1, -1)
    vocab = torch.arange(outputs.student_logits.shape[-1], device=mask.device)
    labels = outputs.labels if outputs.labels is not None else torch.full_like(groups, -100)
    return {
        "labels": labels,
        "mask": mask,
        "student_groups": groups,
        "teacher_groups": groups,
        "matched": torch.stack([vocab, vocab], 1),
    }


class ULD(Objective):
    """Universal Logit Distillation: sorted-probability L1 between positions paired by rank."""

    cross_tokenizer = True

    def __init__(self, student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> None:
        super().__init__()
        self.student_temperature = positive_number("uld", "student_temperature", student_temperature)
        self.teacher_temperature = positive_number("uld", "teacher_temperature", teacher_temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        teacher = _teacher_logits(outputs, "uld")
        view = CrossTokenBatch.from_features(outputs.teacher_features) or _same_tokenizer(outputs)
        return uld_loss(
            outputs.student_logits,
            teacher,
            student_mask=outputs.mask,
            teacher_mask=view["mask"],
            student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature,
        )


class AlignedKD(Objective):
    """GOLD's aligned loss: byte-aligned groups, JSD(beta) on shared vocabulary, sorted L1 on the rest."""

    cross_tokenizer = True

    def __init__(
        self,
        beta: float = 0.5,
        matched_weight: float | None = None,
        unmatched_weight: float | None = None,
        vocabulary_mapping: bool = True,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.beta = number_in("aligned_kd", "beta", beta, 0.0, 1.0)
        if (matched_weight is None) != (unmatched_weight is None):
            raise UserError(
                "objective 'aligned_kd': give both matched_weight and unmatched_weight, or neither (GOLD's "
                "adaptive weights: the share of the teacher's vocabulary that both tokenizers hold)"
            )
        self.matched_weight = (
            None if matched_weight is None else number_in("aligned_kd", "matched_weight", matched_weight, 0.0)
        )
        self.unmatched_weight = (
            None
            if unmatched_weight is None
            else number_in("aligned_kd", "unmatched_weight", unmatched_weight, 0.0)
        )
        if not isinstance(vocabulary_mapping, bool):
            raise UserError(
                f"objective 'aligned_kd': params.vocabulary_mapping must be true or false, "
                f"got {vocabulary_mapping!r}"
            )
        self.vocabulary_mapping = vocabulary_mapping
        self.student_temperature = positive_number("aligned_kd", "student_temperature", student_temperature)
        self.teacher_temperature = positive_number("aligned_kd", "teacher_temperature", teacher_temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        teacher = _teacher_logits(outputs, "aligned_kd")
        view = CrossTokenBatch.from_features(outputs.teacher_features) or _same_tokenizer(outputs)
        if outputs.labels is None:
            raise UserError("objective 'aligned_kd' needs the batch's labels (a language-model batch)")
        return aligned_kd_loss(
            outputs.student_logits,
            teacher,
            student_labels=outputs.labels,
            teacher_labels=view["labels"],
            student_groups=view["student_groups"],
            teacher_groups=view["teacher_groups"],
            matched=view["matched"] if self.vocabulary_mapping else None,
            beta=self.beta,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature,
        )


# The objectives a teacher with its own tokenizer can serve (`distill.tasks.causal_lm` reads this).
CROSS_TOKENIZER_OBJECTIVES = ("uld", "aligned_kd")

OBJECTIVES.add(
    "uld",
    ULD,
    summary="Universal Logit Distillation: sorted-probability L1, any two tokenizers, no alignment",
    paper=_ULD,
    function=uld_loss,
)
OBJECTIVES.add(
    "aligned_kd",
    AlignedKD,
    summary="cross-tokenizer KD aligned by byte offsets: JSD on shared tokens, sorted L1 on the rest",
    paper=_GOLD,
    function=aligned_kd_loss,
)

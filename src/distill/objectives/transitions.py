"""S34 TPA (Align-TI's transition probability alignment) as the objective `tpa`: the loss
`distill.losses.transitions.transition_alignment` on a causal LM's (B, T, V) logits, over consecutive
counted (response) positions. Combine it with a token-level KD term in a recipe, as the paper adds TPA to
vanilla KD:

    objectives: [{name: forward_kl}, {name: tpa, weight: 1.0, params: {top_k: 8}}]
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill.errors import UserError
from distill.losses.transitions import DIVERGENCES, transition_alignment
from distill.objectives.base import (
    OBJECTIVES,
    Objective,
    ParamError,
    StepOutputs,
    check_params,
    positive_number,
    shown,
    whole_number,
)

_ALIGN_TI = (
    "Beyond Next-Token Alignment: Distilling Multimodal Large Language Models via Token Interactions "
    "(Chen et al., 2026)"
)


class TransitionAlignment(Objective):
    """D(J_teacher || J_student) over the (k + 1)^2 cells of each consecutive pair of counted positions."""

    def __init__(self, *, top_k: int = 8, temperature: float = 1.0, divergence: str = "tvd") -> None:
        super().__init__()
        self.top_k = whole_number("tpa", "top_k", top_k, 1, 1 << 20)
        self.temperature = positive_number("tpa", "temperature", temperature)
        if divergence not in DIVERGENCES:
            valid = ", ".join(DIVERGENCES)
            raise ParamError("tpa", "divergence", f"must be one of {valid}, got {shown(divergence)}")
        self.divergence = divergence

    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.teacher_logits is None:
            raise UserError(
                "objective 'tpa' needs the teacher's full logits (not a top-k cache or fused head)"
            )
        if outputs.student_logits.dim() != 3:
            raise UserError(
                f"objective 'tpa' reads token sequences (B, T, V), got {tuple(outputs.student_logits.shape)}"
            )
        return transition_alignment(
            outputs.student_logits,
            outputs.teacher_logits,
            mask=outputs.mask,
            temperature=self.temperature,
            top_k=self.top_k,
            divergence=self.divergence,
        )


def build_tpa(**params: Any) -> Objective:
    """The factory: an unknown parameter is refused in one line, naming the nearest valid one."""
    check_params("tpa", transition_alignment, params, reserved={"mask", "reduction"})
    return TransitionAlignment(**params)


OBJECTIVES.add(
    "tpa",
    build_tpa,
    summary="Align-TI TPA: divergence of consecutive-token transition distributions on the teacher's top-k",
    paper=_ALIGN_TI,
    function=transition_alignment,
    classification=False,  # reads (B, T, V) token sequences: not a method of the image benchmark
)

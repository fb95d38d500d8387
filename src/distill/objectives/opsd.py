"""OPSD: on-policy self-distillation ("Self-Distilled Reasoner: On-Policy Self-Distillation for Large
Language Models", 2026). One model is teacher and student: the student policy q_theta(. | x, y_<t) sees the
question x, the teacher policy q_theta(. | x, y*, x, y_<t) the same weights given privileged information,
the verified solution y*. On the student's own rollouts y ~ q_theta(. | x),

    L = (1/N) sum_t D( q_theta(. | x, y*, y_<t) || q_theta(. | x, y_<t) ),

gradients through the student branch only (the teacher pass runs under no_grad). D is any registered
token-level divergence (`divergence`, default reverse KL as in on-policy distillation).

Wiring: `source: {name: opsd}` (`distill.sources.opsd`) rolls out the student (all `student_rollouts`
settings) and, per batch, records each row's privileged sequence (context + the same completion); the
source binds this objective to its self-teacher (`bind`), whose `logits_for` runs the model on the
privileged sequences and aligns their logits with the student's completion tokens. No external teacher is
needed (the objective does not ask the trainer for one).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from distill.errors import UserError
from distill.objectives.base import OBJECTIVES, Objective, StepOutputs, build_objective, shown

_OPSD = "Self-Distilled Reasoner: On-Policy Self-Distillation for Large Language Models (2026)"
DIVERGENCES = ("reverse_kl", "forward_kl", "generalized_jsd", "kl_mixing", "total_variation")


class SelfTeacher(Protocol):
    """What the objective reads: the privileged-context logits aligned with a step's student logits
    (`distill.sources.opsd.PrivilegedTeacher`)."""

    def logits_for(self, outputs: StepOutputs) -> Tensor: ...


class OPSDObjective(Objective):
    """Per-token divergence between the model given the privileged context and the model given the prompt."""

    needs_teacher = False

    def __init__(self, *, divergence: str = "reverse_kl", **params: Any) -> None:
        super().__init__()
        if not isinstance(divergence, str) or divergence not in DIVERGENCES:
            raise UserError(
                f"objective 'opsd': divergence {shown(divergence)} is not one of {', '.join(DIVERGENCES)}"
            )
        self.divergence = build_objective(divergence, params)
        self.teacher: SelfTeacher | None = None

    def bind(self, teacher: SelfTeacher) -> OPSDObjective:
        self.teacher = teacher
        return self

    def forward(self, outputs: StepOutputs) -> Tensor:
        if self.teacher is None:
            raise UserError(
                "objective 'opsd' needs source 'opsd' (the student's rollouts with a privileged context)"
            )
        teacher_logits = self.teacher.logits_for(outputs)
        return self.divergence(
            StepOutputs(
                student_logits=outputs.student_logits,
                teacher_logits=teacher_logits,
                labels=outputs.labels,
                mask=outputs.mask,
                progress=outputs.progress,
            )
        )


OBJECTIVES.add(
    "opsd",
    OPSDObjective,
    summary="on-policy self-distillation: divergence to the same model given the verified solution",
    paper=_OPSD,
)

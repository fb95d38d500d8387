"""A teacher that learns beside the student (online / mutual distillation, a trained router).

Each step the teacher runs with gradients; the student learns from its detached logits and the teacher from
its own objectives, in which the roles swap: the teacher is the "student" of its terms and the student's
detached logits are their "teacher" (deep mutual learning: cross-entropy + KL towards the peer). Both losses
are summed into one backward pass, so gradient accumulation and the token normalisation apply to both, and
the teacher's parameters join the optimizer as their own parameter group (its own learning rate and weight
decay), whose state is checkpointed with the student's. One process only: a co-trained teacher is not
wrapped in DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of
from distill.objectives import Objective, StepOutputs, build_objective
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest


class CoTrainedTeacher(Teacher):
    kind = "co-trained"
    trainable = True
    static = False

    def __init__(
        self,
        model: nn.Module,
        objectives: Sequence[tuple[str, float] | tuple[str, float, dict[str, Any]]] = (
            ("cross_entropy", 1.0),
        ),
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        if not objectives:
            raise UserError("a co-trained teacher needs at least one objective of its own")
        self.model = model
        built = [(build_objective(o[0], o[2] if len(o) > 2 else None), float(o[1])) for o in objectives]
        self.objectives = nn.ModuleList([objective for objective, _ in built])
        self.weights = [weight for _, weight in built]
        self._options = {k: v for k, v in {"lr": lr, "weight_decay": weight_decay}.items() if v is not None}
        self._autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
        self._logits: Tensor | None = None

    @property
    def module(self) -> nn.Module:
        return self.model

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        if layers:
            raise UserError("a co-trained teacher serves logit objectives only (no teacher layers)")
        self.model.to(device).train()
        self.objectives.to(device)
        self._autocast = autocast

    def check_objectives(self, names: list[str], objectives: Sequence[Objective]) -> None:
        fused = [n for n, o in zip(names, objectives, strict=True) if getattr(o, "teacher_layers", ())]
        if fused:
            raise UserError(
                f"objectives {', '.join(fused)} read teacher layers; a co-trained teacher has none"
            )

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        self.model.train()
        with self._autocast():
            self._logits = logits_of(call_model(self.model, request.inputs))
        return TeacherOutputs(logits=self._logits.detach())

    def loss(self, step: StepOutputs) -> Tensor | None:
        if self._logits is None:
            return None
        swapped = replace(
            step,
            student_logits=self._logits,
            teacher_logits=step.student_logits.detach(),
            student_features={},
            teacher_features={},
            student_head=None,
            teacher_head=None,
        )
        self._logits = None
        return sum(w * objective(swapped) for objective, w in zip(self.objectives, self.weights, strict=True))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + [p for p in self.objectives.parameters() if p.requires_grad]

    def optimizer_options(self) -> dict[str, Any]:
        return dict(self._options)

    def state_module(self) -> nn.Module:
        return nn.ModuleDict({"model": self.model, "objectives": self.objectives})

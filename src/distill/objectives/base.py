"""Objectives: named, weighted training terms built from the pure functions in `distill.losses`.

An objective declares what it needs (teacher logits, labels, features at module paths) so that the
trainer computes nothing it does not need. Stateful schedules (TAID's t, BD-KD's balance) live on the
objective as buffers, so checkpoints carry them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.objectives.topk import bucketed
from distill.registry import Registry, nearest

OBJECTIVES: Registry[Objective] = Registry("objective")


@dataclass(frozen=True)
class Progress:
    """Where training stands; schedules read it."""

    step: int  # optimizer steps taken so far
    total_steps: int
    epoch: float  # fractional epoch, e.g. 2.5 halfway through the third epoch

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass
class StepOutputs:
    """Everything one micro-batch produced that an objective may compare.

    `mask` is boolean over the logits' leading dimensions (True = counts); None means every row counts.
    """

    student_logits: Tensor
    teacher_logits: Tensor | None = None
    labels: Tensor | None = None
    mask: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    progress: Progress = field(default_factory=lambda: Progress(0, 1, 0.0))
    # A teacher cache's top-k targets (`distill.losses.sparse.SparseTargets`), one row per counted row in
    # mask order, in place of `teacher_logits`.
    teacher_topk: Any = None


class Objective(nn.Module):
    """One loss term. Subclasses set what they need and implement `forward`."""

    needs_teacher: bool = True
    needs_labels: bool = False
    # Whether the objective can learn from a teacher cache's top-k targets (`distill.objectives.topk`).
    accepts_topk: bool = False
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()

    def forward(self, outputs: StepOutputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, progress: Progress, loss: float) -> None:
        """Called once per optimizer step with the term's value; adaptive schedules update here."""


def check_params(name: str, fn: Callable[..., Any], params: dict[str, Any], reserved: set[str]) -> None:
    """Refuse parameters the loss function does not take, naming the nearest valid one."""
    signature = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = [
        p
        for p, spec in signature.parameters.items()
        if spec.kind is inspect.Parameter.KEYWORD_ONLY and p not in reserved
    ]
    for key in params:
        if key not in valid:
            hint = nearest(key, valid)
            suggestion = f"; did you mean '{hint}'?" if hint else f"; valid: {', '.join(valid) or 'none'}"
            raise UserError(f"objective '{name}' has no parameter '{key}'{suggestion}")


class LogitObjective(Objective):
    """Wraps a pure loss `fn(student_logits, teacher_logits, *, mask, [labels], **params)`."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Tensor],
        params: dict[str, Any],
        *,
        needs_labels: bool,
        topk: bool = False,
    ) -> None:
        super().__init__()
        check_params(name, fn, params, reserved={"mask", "labels", "reduction"})
        self.loss_name = name
        self.fn = fn
        self.params = dict(params)
        self.needs_labels = needs_labels
        # Logit standardisation reads raw logits, which a top-k target does not hold.
        self.accepts_topk = topk and not params.get("standardize", False)
        self._dry_run()

    @property
    def temperature(self) -> float:
        """The temperature the loss softens with (its default when the recipe gives none)."""
        if "temperature" in self.params:
            return float(self.params["temperature"])
        default = inspect.signature(self.fn).parameters.get("temperature")
        return 1.0 if default is None else float(default.default)

    def _dry_run(self) -> None:
        """Call the loss once on a tiny batch so that a bad parameter value (a zero temperature, a weight
        outside its range) is refused when the recipe is checked, not hours into training."""
        logits = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
        extra = {"labels": torch.tensor([0, 1])} if self.needs_labels else {}
        try:
            value = self.fn(logits, logits.flip(-1), **extra, **self.params)
        except (ValueError, TypeError) as err:
            raise UserError(f"objective '{self.loss_name}': {err}") from err
        if not torch.isfinite(value).all():
            raise UserError(f"objective '{self.loss_name}' with {self.params} is not finite on a test batch")

    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.teacher_logits is None and outputs.teacher_topk is not None:
            if not self.accepts_topk:
                raise UserError(
                    f"objective '{self.loss_name}' needs the teacher's full logits, not a top-k cache"
                )
            student, teacher = bucketed(
                outputs.student_logits, outputs.mask, outputs.teacher_topk, self.temperature
            )
            return self.fn(student, teacher, **self.params)
        if outputs.teacher_logits is None:
            raise UserError(f"objective '{self.loss_name}' needs teacher logits, but the step has none")
        extra: dict[str, Any] = {}
        if self.needs_labels:
            if outputs.labels is None:
                raise UserError(f"objective '{self.loss_name}' needs labels, but the data has none")
            extra["labels"] = outputs.labels
        return self.fn(
            outputs.student_logits, outputs.teacher_logits, mask=outputs.mask, **extra, **self.params
        )

    def extra_repr(self) -> str:
        return f"{self.loss_name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def register_logit_loss(
    name: str,
    fn: Callable[..., Tensor],
    *,
    paper: str,
    summary: str,
    needs_labels: bool = False,
    topk: bool = False,
) -> None:
    """Register a pure logit loss as an objective usable from recipes and the Python API. `topk`: its value
    depends only on the two softened distributions, so it learns from a teacher cache's top-k targets through
    the tail-bucket reduction (`distill.objectives.topk`)."""

    def factory(**params: Any) -> Objective:
        return LogitObjective(name, fn, params, needs_labels=needs_labels, topk=topk)

    OBJECTIVES.add(name, factory, summary=summary, paper=paper, function=fn)


def build_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    return OBJECTIVES.build(name, **(params or {}))

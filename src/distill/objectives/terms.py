"""Weighted objectives as the trainer takes them (`Term`), and the batch hook of on-policy sources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from distill.objectives.base import Objective, build_objective
from distill.objectives.base import Progress as TrainProgress


@dataclass
class Term:
    """One weighted objective. `warmup_epochs` ramps the weight linearly from 0 (DKD's warm-up)."""

    objective: str | Objective
    weight: float = 1.0
    params: dict[str, Any] | None = None
    warmup_epochs: float = 0.0
    label: str | None = None

    def build(self) -> tuple[str, Objective]:
        if isinstance(self.objective, Objective):
            return self.label or type(self.objective).__name__, self.objective
        return self.label or self.objective, build_objective(self.objective, self.params)

    def weight_at(self, epoch: float) -> float:
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, epoch / self.warmup_epochs)


# (batch, unwrapped student, progress) -> batch
BatchTransform = Callable[[Any, nn.Module, TrainProgress], Any]

TermLike = Term | tuple[Any, ...] | str | Objective


def as_term(spec: TermLike) -> Term:
    """Accept `Term`, `"name"`, an `Objective`, `(name, weight)` or `(name, weight, params)`."""
    if isinstance(spec, Term):
        return spec
    if isinstance(spec, str | Objective):
        return Term(spec)
    return Term(*spec)

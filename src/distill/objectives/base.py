"""Objectives: named, weighted training terms built from the pure functions in `distill.losses`.

An objective declares what it needs (teacher logits, labels, features at module paths) so that the
trainer computes nothing it does not need. Stateful schedules (TAID's t, BD-KD's balance) live on the
objective as buffers, so checkpoints carry them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError, shown
from distill.losses.fused_linear import fused_linear_divergence
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


@dataclass(frozen=True)
class HeadInputs:
    """A model's output layer and what it reads: logits = hidden @ weight.T + bias, never built whole
    (the trainer's fused path for large vocabularies; see `distill.heads`)."""

    hidden: Tensor  # (..., H)
    weight: Tensor  # (V, H)
    bias: Tensor | None = None


@dataclass
class StepOutputs:
    """Everything one micro-batch produced that an objective may compare.

    `mask` is boolean over the logits' leading dimensions (True = counts); None means every row counts.
    On the fused path (`student_head` set) `student_logits` is the model's empty (..., 0, V) output, kept only
    so that a zero loss still reaches every parameter; objectives read `student_head` / `teacher_head`.
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
    student_head: HeadInputs | None = None
    teacher_head: HeadInputs | None = None
    # Each sample's position in the training set, when the data set adds it (`IndexedDataset`).
    index: Tensor | None = None
    # Per-row values a data set supplies beside the inputs: the batch dict's other keys (not model inputs,
    # `labels`, `mask`, `index`), each with the mask's leading shape (e.g. `privacy` scores for `swing_kd`).
    row_data: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """One loss term. Subclasses set what they need and implement `forward`."""

    needs_teacher: bool = True
    # False for objectives that read only the teacher's features: the teacher may then stop early.
    needs_teacher_logits: bool = True
    needs_labels: bool = False
    # Whether the objective can learn from a teacher cache's top-k targets (`distill.objectives.topk`).
    accepts_topk: bool = False
    # Whether the objective computes its value from `StepOutputs.student_head` / `teacher_head` (the
    # trainer's fused large-vocabulary path) as well as from logits.
    fused_capable: bool = False
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    # The `StepOutputs.row_data` keys the objective reads (the recipe check's dry run supplies them).
    row_keys: tuple[str, ...] = ()

    def forward(self, outputs: StepOutputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, progress: Progress, loss: float) -> None:
        """Called once per optimizer step with the term's value; adaptive schedules update here."""

    def hold_out(self, data: Any, seed: int) -> Any:
        """Called once as training starts, before the training loader is built, with the training set and
        the trainer's seed. An objective that learns its own parameters on held-out data (bilevel, e.g.
        TGeo-KD's ratio network) keeps a part here and returns the rest, which the student trains on.
        Default: `data` unchanged."""
        return data

    def after_optimizer_step(self, student: nn.Module, inputs: Any, progress: Progress, lr: float) -> None:
        """Called after each optimizer step taken, with the unwrapped student (its weights just updated), the
        inputs of the last micro-batch `forward` saw, where training stood and the learning rate of the next
        step. Objectives whose parameters learn outside the student's optimizer (on what `hold_out` kept)
        update them here."""


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
            hint = nearest(key, valid) if isinstance(key, str) else None
            suggestion = f"; did you mean '{hint}'?" if hint else f"; valid: {', '.join(valid) or 'none'}"
            raise UserError(f"objective '{name}' has no parameter {shown(key)}{suggestion}")


# ------------------------------------------------------------------------- parameter values


class ParamError(UserError):
    """An objective parameter whose value the objective cannot use. `distill.recipe.check` places it in the
    recipe: `objectives[0].params.temperature: must be a positive finite number, got nan`."""

    def __init__(self, objective: str, key: str, problem: str) -> None:
        self.objective, self.key, self.problem = objective, key, problem
        super().__init__(f"objective '{objective}': params.{key}: {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_number(objective: str, key: str, value: Any) -> float:
    """A positive finite number (a temperature, a scale)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ParamError(objective, key, f"must be a positive finite number, got {shown(value)}")
    return float(value)


def number_in(
    objective: str,
    key: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number in the interval from `low` to `high` (closed unless `low_open` / `high_open`)."""
    if _is_number(value) and math.isfinite(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return float(value)
    if math.isinf(low) and math.isinf(high):
        where = "a finite number"
    elif math.isinf(high):
        where = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif math.isinf(low):
        where = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        where = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ParamError(objective, key, f"must be {where}, got {shown(value)}")


def whole_number(objective: str, key: str, value: Any, low: int, high: int) -> int:
    """An integer from `low` to `high` (seeds: 0 .. 2**32 - 1)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ParamError(objective, key, f"must be a whole number from {low} to {high}, got {shown(value)}")
    return value


def flag(objective: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamError(objective, key, f"must be true or false, got {shown(value)}")
    return value


@dataclass(frozen=True)
class FusedDivergence:
    """How a logit loss maps onto `fused_linear_divergence`: its divergence name, and whether the loss
    multiplies the divergence by T^2 (Hinton's scaling; the fused divergences do not)."""

    divergence: str
    times_t_squared: bool = False


def _counted_labels(labels: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Rows whose label is hidden (-100, a semi-supervised split) do not count for a term that reads labels;
    their label is replaced by 0 so that indexing stays valid."""
    hidden = labels == -100
    if not bool(hidden.any()):
        return labels, mask
    counted = ~hidden if mask is None else mask & ~hidden
    return labels.masked_fill(hidden, 0), counted


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
        fused: FusedDivergence | None = None,
    ) -> None:
        super().__init__()
        check_params(name, fn, params, reserved={"mask", "labels", "reduction"})
        self.loss_name = name
        self.fn = fn
        self.params = dict(params)
        self.needs_labels = needs_labels
        # Logit standardisation reads raw logits, which a top-k target does not hold.
        self.accepts_topk = topk and not params.get("standardize", False)
        # The fused kernels take the plain divergence: no standardisation, no normalised JSD.
        self.fused = (
            fused
            if fused is not None
            and not any(params.get(flag, False) for flag in ("standardize", "normalized"))
            else None
        )
        self.fused_capable = self.fused is not None
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
            raise UserError(
                f"objective '{self.loss_name}' with {shown(self.params)} is not finite on a test batch"
            )

    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.teacher_topk is not None and not self.accepts_topk:
            raise UserError(
                f"objective '{self.loss_name}' needs the teacher's full logits, not a top-k cache"
            )
        if outputs.student_head is not None:
            return self._fused_forward(outputs, outputs.student_head)
        if outputs.teacher_logits is None and outputs.teacher_topk is not None:
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
            if outputs.labels.is_floating_point():  # a mixup / cutmix source's (N, C) mixed labels
                raise UserError(f"objective '{self.loss_name}' needs class indices, not soft (mixed) labels")
            extra["labels"], mask = _counted_labels(outputs.labels, outputs.mask)
            return self.fn(outputs.student_logits, outputs.teacher_logits, mask=mask, **extra, **self.params)
        return self.fn(
            outputs.student_logits, outputs.teacher_logits, mask=outputs.mask, **extra, **self.params
        )

    def _fused_forward(self, outputs: StepOutputs, student: HeadInputs) -> Tensor:
        """The same value from hidden states and output layers (`fused_linear_divergence`)."""
        if self.fused is None:
            raise UserError(f"objective '{self.loss_name}' needs logits; the fused loss path cannot serve it")
        if outputs.teacher_topk is not None:
            teacher: dict[str, Any] = {"teacher_hidden": outputs.teacher_topk}
        elif outputs.teacher_head is not None:
            head = outputs.teacher_head
            teacher = {
                "teacher_hidden": head.hidden,
                "teacher_weight": head.weight,
                "teacher_bias": head.bias,
            }
        else:
            raise UserError(f"objective '{self.loss_name}' needs the teacher, but the step has none")
        shape = {k: self.params[k] for k in ("beta", "alpha") if k in self.params}
        value = fused_linear_divergence(
            student.hidden,
            student.weight,
            **teacher,
            student_bias=student.bias,
            divergence=self.fused.divergence,
            temperature=self.temperature,
            mask=outputs.mask,
            **shape,
        )
        return value * self.temperature**2 if self.fused.times_t_squared else value

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
    fused: FusedDivergence | None = None,
) -> None:
    """Register a pure logit loss as an objective usable from recipes and the Python API. `topk`: its value
    depends only on the two softened distributions, so it learns from a teacher cache's top-k targets through
    the tail-bucket reduction (`distill.objectives.topk`). `fused`: the same loss as a divergence of
    `fused_linear_divergence`, which the trainer uses for large vocabularies."""

    def factory(**params: Any) -> Objective:
        return LogitObjective(name, fn, params, needs_labels=needs_labels, topk=topk, fused=fused)

    OBJECTIVES.add(name, factory, summary=summary, paper=paper, function=fn)


def build_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    return OBJECTIVES.build(name, **(params or {}))

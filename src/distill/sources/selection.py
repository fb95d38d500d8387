"""Which unlabelled rows a classification student learns from: LLKD's selection (S05: "Learning with Less:
Knowledge Distillation from Large Language Models via Unlabeled Data", Li et al., Findings of NAACL 2025,
arXiv 2411.08028) and its baseline, a fixed random share of the pool. See docs/llkd.md.

LLKD keeps a row when the teacher is confident in its pseudo-label AND the student's information need is
high, each judged against an adaptive threshold that follows "the global training status and the
class-specific learning progress" (the paper, built on FreeMatch's self-adaptive thresholds: "FreeMatch:
Self-adaptive Thresholding for Semi-supervised Learning", Wang et al., ICLR 2023). Per micro-batch, over its
unlabelled rows i, with q_i = softmax(teacher logits), p_i = softmax(student logits), C classes:

- teacher confidence c_i = max_c q_i(c), pseudo-label y_i = argmax_c q_i(c);
- student need u_i = H(p_i) / log C, the entropy of its prediction (normalised to [0, 1]; the thresholds
  follow the same scale, so the normalisation does not change which rows are kept);
- global thresholds, exponential moving averages with momentum lambda of the batch means:
  tau_T <- lambda tau_T + (1 - lambda) mean_i c_i, tau_S <- lambda tau_S + (1 - lambda) mean_i u_i;
- class terms, moving averages of the mean predicted distributions:
  qbar <- lambda qbar + (1 - lambda) mean_i q_i, pbar <- lambda pbar + (1 - lambda) mean_i p_i;
- class thresholds (FreeMatch's MaxNorm): tau_T(y) = tau_T qbar(y) / max qbar,
  tau_S(y) = tau_S pbar(y) / max pbar (a class the student predicts less asks less need of its rows);
- keep row i when c_i >= tau_T(y_i) and u_i >= tau_S(y_i); the averages are updated with the batch first.

The averages are bias-corrected, as Adam's moments: each is divided by 1 - lambda^t after t updates, so
that it is the lambda-weighted mean of the batch statistics seen so far from the first batch on. FreeMatch
starts its averages at 1/C instead, an untrained model's confidence; LLKD's teacher is trained and fixed, and
no start of that kind fits the student's need, so none is assumed (docs/llkd.md, deviations). With the long
memory of lambda = 0.999 (FreeMatch's momentum) the student's threshold stays near the mean need of the whole
run so far while its need falls, so the share of rows kept shrinks as the student learns. Everything here is
pure tensor maths: the state goes in and a new state comes out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.errors import UserError
from distill.sources.settings import require

SELECTION_SOURCES = ("llkd", "random_subset")


@dataclass(frozen=True)
class LLKDSettings:
    """`source: {name: llkd, params: ...}`."""

    momentum: float = 0.999  # lambda of the thresholds' moving averages (FreeMatch's)
    class_thresholds: bool = True  # scale each threshold by its class term (MaxNorm); false: global only
    pseudo_labels: bool = True  # a kept row is labelled with the teacher's argmax (label terms read it)

    def check(self) -> None:
        require(
            isinstance(self.momentum, int | float) and not isinstance(self.momentum, bool),
            f"momentum must be a number, got {self.momentum!r}",
        )
        require(0.0 <= self.momentum < 1.0, f"momentum must lie in [0, 1), got {self.momentum}")
        for key in ("class_thresholds", "pseudo_labels"):
            value = getattr(self, key)
            require(isinstance(value, bool), f"{key} must be true or false, not {value!r}")


@dataclass(frozen=True)
class SubsetSettings:
    """`source: {name: random_subset, params: ...}`: a fixed random share of the unlabelled rows (the labelled
    ones always stay), drawn once per run seed, or once for all with `seed`."""

    fraction: float = 0.5  # the share of the unlabelled pool kept
    seed: int | None = None  # the draw's seed; None: the run seed

    def check(self) -> None:
        require(
            isinstance(self.fraction, int | float) and not isinstance(self.fraction, bool),
            f"fraction must be a number, got {self.fraction!r}",
        )
        require(0.0 < self.fraction <= 1.0, f"fraction must lie in (0, 1], got {self.fraction}")
        require(
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
            f"seed must be a whole number, got {self.seed!r}",
        )
        require(
            self.seed is None or 0 <= self.seed < 2**32, f"seed must lie in 0 .. 2**32 - 1, got {self.seed}"
        )


# ----------------------------------------------------------------------------------------- LLKD


@dataclass(frozen=True)
class ThresholdState:
    """The moving averages behind LLKD's thresholds (one per run, updated once per micro-batch), kept
    unnormalised: `weight` is the moving average of 1 (1 - lambda^t), the bias correction."""

    teacher: Tensor  # () moving average of the batch mean of c (tau_T = teacher / weight)
    student: Tensor  # () moving average of the batch mean of u (tau_S = student / weight)
    teacher_classes: Tensor  # (C,) moving average of the teacher's mean distribution (qbar, unnormalised)
    student_classes: Tensor  # (C,) the student's (pbar, unnormalised)
    weight: Tensor  # () 1 - lambda^t
    updates: int = 0

    @classmethod
    def initial(cls, num_classes: int) -> ThresholdState:
        if num_classes < 2:
            raise UserError(f"source 'llkd' needs at least 2 classes, got {num_classes}")
        zero = torch.tensor(0.0)
        return cls(zero, zero, torch.zeros(num_classes), torch.zeros(num_classes), zero)

    def global_thresholds(self) -> tuple[float, float]:
        """(tau_T, tau_S): the bias-corrected averages (0 before any update: every row passes)."""
        if float(self.weight) <= 0:
            return 0.0, 0.0
        return float(self.teacher / self.weight), float(self.student / self.weight)

    def thresholds(self, class_thresholds: bool = True) -> tuple[Tensor, Tensor]:
        """(tau_T(y), tau_S(y)), each (C,): the global thresholds scaled by MaxNorm of the class terms (whose
        bias correction cancels in the ratio)."""
        tau_t, tau_s = self.global_thresholds()
        size = self.teacher_classes.shape
        if not class_thresholds or float(self.weight) <= 0:
            return torch.full(size, tau_t), torch.full(size, tau_s)
        return (
            tau_t * self.teacher_classes / self.teacher_classes.max().clamp_min(1e-12),
            tau_s * self.student_classes / self.student_classes.max().clamp_min(1e-12),
        )


@dataclass(frozen=True)
class Selection:
    keep: Tensor  # (N,) bool: the rows LLKD trains on
    labels: Tensor  # (N,) the teacher's pseudo-labels (argmax)
    confidence: Tensor  # (N,) c_i
    need: Tensor  # (N,) u_i
    state: ThresholdState  # after this batch's update


def confidence_and_labels(teacher_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q, c, y): the teacher's distribution, its top probability and its argmax, per row (float32)."""
    q = torch.softmax(teacher_logits.float(), dim=-1)
    c, y = q.max(dim=-1)
    return q, c, y


def information_need(student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(p, u): the student's distribution and its entropy / log C, per row (float32)."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    p = logp.exp()
    u = -(p * logp).nan_to_num(0.0).sum(-1) / math.log(student_logits.shape[-1])
    return p, u


def updated(
    state: ThresholdState, q: Tensor, c: Tensor, p: Tensor, u: Tensor, momentum: float
) -> ThresholdState:
    """The moving averages after one batch (rows of q, c, p, u); an empty batch leaves them as they were."""
    if len(c) == 0:
        return state
    m = momentum
    device = c.device

    def ema(old: Tensor, new: Tensor) -> Tensor:
        return m * old.to(device) + (1 - m) * new

    return ThresholdState(
        ema(state.teacher, c.mean()),
        ema(state.student, u.mean()),
        ema(state.teacher_classes, q.mean(0)),
        ema(state.student_classes, p.mean(0)),
        ema(state.weight, torch.tensor(1.0, device=device)),
        state.updates + 1,
    )


def llkd_select(
    teacher_logits: Tensor,
    student_logits: Tensor,
    state: ThresholdState,
    settings: LLKDSettings | None = None,
) -> Selection:
    """LLKD's rule on one batch of unlabelled rows ((N, C) logits): update the thresholds with the batch,
    then keep the rows whose teacher confidence and student need both reach their pseudo-label's
    thresholds."""
    settings = settings or LLKDSettings()
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
        raise UserError(
            "source 'llkd' compares (N, C) teacher and student logits, got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape[1] != state.teacher_classes.shape[0]:
        raise UserError(
            f"source 'llkd': the models predict {teacher_logits.shape[1]} classes but the data has "
            f"{state.teacher_classes.shape[0]}"
        )
    q, c, y = confidence_and_labels(teacher_logits)
    p, u = information_need(student_logits)
    state = updated(state, q, c, p, u, settings.momentum)
    tau_t, tau_s = state.thresholds(settings.class_thresholds)
    keep = (c >= tau_t.to(c.device)[y]) & (u >= tau_s.to(c.device)[y])
    return Selection(keep, y, c, u, state)


# ----------------------------------------------------------------------------------------- random subset


def random_subset(hidden: Tensor, fraction: float, seed: int) -> Tensor:
    """The positions of a training set kept by `random_subset`: every labelled row (`hidden` False) and
    round(fraction x unlabelled) unlabelled ones drawn without replacement by `seed`, in ascending order."""
    hidden = hidden.bool().cpu()
    pool = torch.nonzero(hidden).flatten()
    count = min(len(pool), max(1, round(fraction * len(pool)))) if len(pool) else 0
    generator = torch.Generator().manual_seed(int(seed))
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]]
    kept = torch.cat([torch.nonzero(~hidden).flatten(), chosen])
    return kept.sort().values

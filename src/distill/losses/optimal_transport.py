"""Optimal-transport distillation: Sinkhorn distance over the batch (SinKD)."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import flatten_rows, reduce_rows


def sinkhorn_plan(cost: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Log-domain Sinkhorn-Knopp on the Gibbs kernel exp(-cost / epsilon), alternating row then column
    normalisation ``iterations`` times (SinKD's scheme: rows and columns each sum to 1 at convergence,
    i.e. n times the uniform-marginal transport plan). Differentiable through every iteration."""
    log_plan = -cost / epsilon
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True)
    return log_plan.exp()


def sinkhorn_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "mean",
    epsilon: float = 0.1,
    iterations: int = 20,
) -> Tensor:
    """SinKD: entropic optimal transport between the student's and the teacher's batch of predictions.

    From "Sinkhorn Distance Minimization for Knowledge Distillation" (Cui et al., LREC-COLING 2024), in its
    batch-wise reformulation and following the official code: with p_s, p_t the T-softened probabilities of
    the n counted rows, the cost between student row i and teacher row j is C_ij = ||p_s_i - p_t_j||_1,
    the plan P comes from ``iterations`` (20) Sinkhorn normalisations of exp(-C / epsilon) (epsilon = 0.1)
    in the log domain, and the distance is sum_ij P_ij C_ij. Defaults T = 2 as in the code.

    P's rows sum to 1, so P / n is the plan with uniform marginals 1/n: ``reduction="mean"`` is
    sum(P C) / n = <P / n, C>, which at convergence equals POT's ``ot.sinkhorn2(1/n, 1/n, C, epsilon)``;
    ``"sum"`` is the official sum(P C) (which the code then multiplies by 0.002); ``"none"`` gives each
    student row's share sum_j P_ij C_ij. Masked rows are dropped before the batch cost is formed.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    if rows.student.shape[0] == 0:
        return reduce_rows(rows.student.sum(-1), rows, reduction)
    ps = torch.softmax(rows.student / temperature, -1)
    pt = torch.softmax(rows.teacher / temperature, -1)
    cost = torch.cdist(ps, pt, p=1)
    plan = sinkhorn_plan(cost, epsilon, iterations)
    return reduce_rows((plan * cost).sum(1), rows, reduction)

"""Divergences between the teacher distribution P = softmax(z_t / T) and the student Q = softmax(z_s / T).

All functions follow the conventions of `distill.losses._common` (mask, reduction, float32 math, ``-inf``
logits). None multiplies by ``T^2``; `hinton_kd` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses._common import (
    entropy_from_log_probs,
    flatten_rows,
    fused_kl,
    kl_from_log_probs,
    reduce_rows,
    soften,
)


def _log_probs(rows_logits: Tensor, temperature: float, standardize: bool) -> Tensor:
    return torch.log_softmax(soften(rows_logits, temperature, standardize), dim=-1)


def _kl_rows(p_logits: Tensor, q_logits: Tensor, temperature: float, standardize: bool) -> Tensor:
    """Per-row KL(softmax(p_logits / T) || softmax(q_logits / T)) through the memory-lean fused kernel."""
    if standardize:
        return fused_kl(soften(p_logits, temperature, True), soften(q_logits, temperature, True))
    return fused_kl(p_logits, q_logits, temperature)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
) -> Tensor:
    """Forward KL, KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), per row.

    The true KL: zero when the student equals the teacher. torchtune's ``ForwardKLLoss``, DistiLLM's and
    TAID's ``fkl`` use the cross-entropy form ``-sum_v P log Q = KL(P || Q) + H(P)``, which has the same
    gradient in the student but is offset by the teacher entropy H(P).
    ``standardize=True`` applies logit standardisation ("Logit Standardization in Knowledge Distillation",
    Sun et al., CVPR 2024) to both logits before the temperature.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    return reduce_rows(_kl_rows(rows.teacher, rows.student, temperature, standardize), rows, reduction)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
) -> Tensor:
    """Reverse KL, KL(Q || P) = sum_v Q(v) (log Q(v) - log P(v)), per row (mode-seeking).

    As used by MiniLLM ("MiniLLM: Knowledge Distillation of Large Language Models", Gu et al., 2024) and
    on-policy distillation ("Decoupling KL and Trajectories", 2025) at the token level.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    return reduce_rows(_kl_rows(rows.student, rows.teacher, temperature, standardize), rows, reduction)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    standardize: bool = False,
) -> Tensor:
    """Total variation distance, TVD(P, Q) = 1/2 sum_v |P(v) - Q(v)|, per row (in [0, 1]).

    As in "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (Wen et al., ACL 2023).
    TAID's ``tvd`` baseline uses the same 1/2 factor.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    q = torch.softmax(soften(rows.student, temperature, standardize), dim=-1)
    p = torch.softmax(soften(rows.teacher, temperature, standardize), dim=-1)
    return reduce_rows(0.5 * (p - q).abs().sum(-1), rows, reduction)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b) from log a and log b, for 0 < w < 1 (``-inf`` where both are 0, NaN-free)."""
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    safe_a = torch.where(both_zero, zero, log_a)
    safe_b = torch.where(both_zero, zero, log_b)
    mixed = torch.logaddexp(safe_a + math.log(weight_a), safe_b + math.log1p(-weight_a))
    return torch.where(both_zero, torch.full((), -torch.inf, dtype=log_a.dtype, device=log_a.device), mixed)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    beta: float = 0.5,
    normalized: bool = False,
    standardize: bool = False,
) -> Tensor:
    """Generalised Jensen-Shannon divergence with TRL's convention.

    JSD_beta(P, Q) = beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q, and by
    definition JSD_0 = KL(P || Q) (forward) and JSD_1 = KL(Q || P) (reverse), as in TRL's
    ``GKDTrainer.generalized_jsd_loss`` ("On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", Agarwal et al., ICLR 2024). That definition jumps at both ends: JSD_beta -> 0
    as beta -> 0 or 1.

    ``normalized=True`` returns JSD_beta / (beta (1 - beta)), which tends to KL(P || Q) as beta -> 0 and to
    KL(Q || P) as beta -> 1, so it is continuous on [0, 1] (at beta = 0.5 it is 4 JSD).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    log_q = _log_probs(rows.student, temperature, standardize)
    log_p = _log_probs(rows.teacher, temperature, standardize)
    if beta == 0.0:
        per_row = kl_from_log_probs(log_p, log_q)
    elif beta == 1.0:
        per_row = kl_from_log_probs(log_q, log_p)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        per_row = beta * kl_from_log_probs(log_p, log_m) + (1.0 - beta) * kl_from_log_probs(log_q, log_m)
        if normalized:
            per_row = per_row / (beta * (1.0 - beta))
    # A divergence is >= 0, but rounding leaves about -1e-8 on nearly equal rows (worse at low T); a
    # negative loss would reward the student for nothing, so the rounding error is cut off.
    return reduce_rows(per_row.clamp_min(0.0), rows, reduction)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float = 0.1,
    standardize: bool = False,
) -> Tensor:
    """Skew forward KL, KL(P || alpha P + (1 - alpha) Q), per row.

    From "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al., ICML 2024),
    default alpha = 0.1 as in the paper. alpha = 0 is the forward KL. DistiLLM's code returns the
    cross-entropy form ``-sum P log(mix)`` = this value + H(P); the gradients in the student agree.
    The mixture is not detached (as in DistiLLM).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    log_q = _log_probs(rows.student, temperature, standardize)
    log_p = _log_probs(rows.teacher, temperature, standardize)
    if alpha == 0.0:
        log_m = log_q
    elif alpha == 1.0:
        log_m = log_p
    else:
        log_m = _log_mixture(log_p, log_q, alpha)
    return reduce_rows(kl_from_log_probs(log_p, log_m), rows, reduction)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float = 0.1,
    standardize: bool = False,
) -> Tensor:
    """Skew reverse KL, KL(Q || alpha Q + (1 - alpha) P), per row.

    From "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al., ICML 2024),
    default alpha = 0.1. alpha = 0 is the reverse KL. This matches DistiLLM's ``skewed_reverse_kl`` exactly
    (a true KL there too).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    log_q = _log_probs(rows.student, temperature, standardize)
    log_p = _log_probs(rows.teacher, temperature, standardize)
    if alpha == 0.0:
        log_m = log_p
    elif alpha == 1.0:
        log_m = log_q
    else:
        log_m = _log_mixture(log_q, log_p, alpha)
    return reduce_rows(kl_from_log_probs(log_q, log_m), rows, reduction)


def student_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Shannon entropy of the student, H(Q) = -sum_v Q(v) log Q(v), per row; the teacher is ignored.

    An entropy regulariser: add ``-w * student_entropy`` to keep the student's entropy from collapsing
    ("Decoupling KL and Trajectories", 2025), or ``+w * student_entropy`` to sharpen it (the entropy term
    of TSD-KD, "Explain in Your Own Words", 2026).
    """
    rows = flatten_rows(student_logits, None, mask=mask, temperature=temperature, reduction=reduction)
    log_q = _log_probs(rows.student, temperature, False)
    return reduce_rows(entropy_from_log_probs(log_q), rows, reduction)


def kl_mixing(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    forward_weight: float = 0.5,
    entropy_weight: float = 0.0,
) -> Tensor:
    """KL mixing: w KL(P || Q) + (1 - w) KL(Q || P) - lambda_H H(Q), per row.

    From "Decoupling KL and Trajectories: A Unified Perspective for SFT, DAgger, Offline RL, and OPD in LLM
    Distillation" (2025): long-horizon distillation needs a substantial forward-KL weight ``w`` to prevent
    entropy collapse. ``entropy_weight`` (lambda_H >= 0 rewards student entropy) is the optional entropy
    regulariser; 0 leaves the pure mixture.
    """
    if not 0.0 <= forward_weight <= 1.0:
        raise ValueError(f"forward_weight must lie in [0, 1], got {forward_weight}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    per_row = rows.student.new_zeros(rows.student.shape[0])
    if forward_weight > 0:
        per_row = per_row + forward_weight * fused_kl(rows.teacher, rows.student, temperature)
    if forward_weight < 1:
        per_row = per_row + (1.0 - forward_weight) * fused_kl(rows.student, rows.teacher, temperature)
    if entropy_weight != 0:
        per_row = per_row - entropy_weight * entropy_from_log_probs(
            _log_probs(rows.student, temperature, False)
        )
    return reduce_rows(per_row, rows, reduction)

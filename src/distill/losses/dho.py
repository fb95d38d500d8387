"""DHO: the two heads' training loss and their mixture at inference.

From "Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head
Optimization" (Kang, Lee, Jang and Hwang, 2025; arXiv 2505.07675; official code github.com/erjui/DHO). A
student has one feature extractor f and two linear heads on its output z = f(x): h_CE learns the labels,
h_KD the teacher. Paper Eq. 4-8:

    L = lambda CE(h_CE(z), y)  over the labelled rows
      + (1 - lambda) T^2 KL(softmax(t / T) || softmax(h_KD(z) / T))  over every row (labelled and not),

    p = alpha softmax(h_CE(z)) + (1 - alpha) softmax(h_KD(z) / beta)  at inference.

Constants: lambda = 0.5 and T = 2 as `train_others.py` / `train_imgnet_semi.py` of the official code (its
`0.5 * ce_loss + 0.5 * (distill_loss_labeled + distill_loss_unlabeled)`, each KD term a `batchmean` times
T^2). alpha = lambda = 0.5 and beta = 1 are the paper's analysis point (with alpha = lambda and beta = 1 the
mixture approximates the optimal single-head predictor); the official few-shot script picks (alpha, beta) on
a validation split from alpha in {0, 0.05, ..., 1} x beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}, its
semi-supervised ImageNet script fixes alpha = 0.5, beta = 0.5.

Differences from the official code: the KD term is the mean over all counted rows (the paper's
L_KD(D_l u D_u)); the code sums a labelled batch's mean and an unlabelled batch's mean of equal sizes, which
is twice the mean over their union (so its KD weight is effectively 2 (1 - lambda)). Masks, reductions and
dtypes follow `distill.losses._common`: float32 maths whatever the input dtype, a row whose label is < 0
(-100, hidden) counts for the KD term only, the CE term is 0 (never NaN) when no row is labelled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses._common import compute_dtype, flatten_rows, fused_kl, reduce_rows


def dho_mixture(ce_logits: Tensor, kd_logits: Tensor, *, alpha: float = 0.5, beta: float = 1.0) -> Tensor:
    """log(alpha softmax(ce_logits) + (1 - alpha) softmax(kd_logits / beta)), along the last dimension.

    Log-probabilities (a softmax of them is the mixture itself), computed as a logsumexp of the two heads'
    weighted log-probabilities, so a confident head never underflows to log 0. alpha = 1 is the CE head
    alone, alpha = 0 the KD head alone at temperature beta. float32 maths (float64 stays float64); the
    result has the inputs' dtype."""
    if not 0.0 <= alpha <= 1.0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha}")
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if ce_logits.shape != kd_logits.shape:
        raise ValueError(
            f"the heads' logits differ in shape: {tuple(ce_logits.shape)} and {tuple(kd_logits.shape)}"
        )
    dtype = compute_dtype(ce_logits, kd_logits)
    ce = torch.log_softmax(ce_logits.to(dtype), dim=-1)
    kd = torch.log_softmax(kd_logits.to(dtype) / beta, dim=-1)
    if alpha == 1.0:
        return ce.to(ce_logits.dtype)
    if alpha == 0.0:
        return kd.to(ce_logits.dtype)
    # An entry -inf in both heads (a masked class) stays -inf with a zero gradient, not logaddexp's NaN.
    both = torch.isneginf(ce) & torch.isneginf(kd)
    zero = torch.zeros((), dtype=dtype, device=ce.device)
    ce, kd = torch.where(both, zero, ce), torch.where(both, zero, kd)
    mixed = torch.logaddexp(ce + math.log(alpha), kd + math.log1p(-alpha))
    return mixed.masked_fill(both, -math.inf).to(ce_logits.dtype)


def dho_terms(
    ce_logits: Tensor,
    kd_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """(CE of the CE head on the labelled rows, T^2 KL(teacher || KD head) on every counted row).

    Shapes: logits ``(N, C)`` or ``(B, T, V)``, labels and mask the leading shape. A row counts for the KD
    term where `mask` is True (every row when None), for the CE term where it also has a label >= 0.
    ``reduction``: each term's mean over its own counted rows (0 when none), sum, or per-row values with
    the leading shape (0 where a row does not count for that term)."""
    if ce_logits.shape != kd_logits.shape:
        raise ValueError(
            f"the heads' logits differ in shape: {tuple(ce_logits.shape)} and {tuple(kd_logits.shape)}"
        )
    supervised = flatten_rows(ce_logits, None, mask=mask, reduction=reduction, labels=labels)
    assert supervised.labels is not None
    log_z = torch.logsumexp(supervised.student, dim=-1)
    picked = supervised.student.gather(-1, supervised.labels.unsqueeze(-1)).squeeze(-1)
    ce = reduce_rows(log_z - picked, supervised, reduction)
    taught = flatten_rows(kd_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction)
    kl = fused_kl(taught.teacher, taught.student, temperature)
    kd = reduce_rows(temperature**2 * kl, taught, reduction)
    return ce, kd


def dho_loss(
    ce_logits: Tensor,
    kd_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    ce_weight: float = 0.5,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """DHO's training loss: ``ce_weight * CE + (1 - ce_weight) * KD`` of `dho_terms` (the paper's lambda is
    `ce_weight`). Each term reaches only its own head (and the shared features)."""
    if not 0.0 <= ce_weight <= 1.0 or not math.isfinite(ce_weight):
        raise ValueError(f"ce_weight must be a number in [0, 1], got {ce_weight}")
    ce, kd = dho_terms(
        ce_logits, kd_logits, teacher_logits, labels, mask=mask, temperature=temperature, reduction=reduction
    )
    return ce_weight * ce + (1.0 - ce_weight) * kd

"""Classic logit distillation losses users expect: Hinton KD, DKD, DIST."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import (
    flatten_rows,
    fused_kl,
    kl_from_log_probs,
    reduce_rows,
    soften,
)


def hinton_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 4.0,
    reduction: str = "mean",
    standardize: bool = False,
) -> Tensor:
    """Hinton KD: T^2 KL(softmax(z_t / T) || softmax(z_s / T)), per row.

    From "Distilling the Knowledge in a Neural Network" (Hinton et al., 2015); the T^2 factor keeps the
    gradient scale independent of T. ``reduction="mean"`` is PyTorch's ``batchmean`` (mdistiller's
    ``kd_loss``). torchdistill's ``KDLoss`` returns alpha * CE + (1 - alpha) * T^2 KL, so with alpha = 0 it
    equals this value (and with alpha = 1 it drops the T^2 term entirely). ``standardize=True`` gives
    "Logit Standardization in Knowledge Distillation" (Sun et al., CVPR 2024), where the temperature is the
    paper's base temperature.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    if standardize:
        kl = fused_kl(soften(rows.teacher, temperature, True), soften(rows.student, temperature, True))
    else:
        kl = fused_kl(rows.teacher, rows.student, temperature)
    return reduce_rows(temperature**2 * kl, rows, reduction)


def _without_class(logits: Tensor, labels: Tensor) -> Tensor:
    """Logits with the labelled class set to ``-inf`` (differentiable in the other entries)."""
    fill = torch.full_like(labels, 0, dtype=logits.dtype).unsqueeze(1) - torch.inf
    return logits.scatter(1, labels.unsqueeze(1), fill)


def _binary_log_probs(logits: Tensor, others: Tensor, labels: Tensor) -> Tensor:
    """log [p_gt, 1 - p_gt] per row, from logits (computed by logsumexp, never log(1 - p))."""
    log_z = torch.logsumexp(logits, dim=-1)
    log_gt = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - log_z
    log_rest = torch.logsumexp(others, dim=-1) - log_z
    return torch.stack([log_gt, log_rest], dim=-1)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor,
    mask: Tensor | None = None,
    temperature: float = 4.0,
    reduction: str = "mean",
    alpha: float = 1.0,
    beta: float = 8.0,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD: alpha TCKD + beta NCKD, each times T^2, per row.

    From "Decoupled Knowledge Distillation" (Zhao et al., CVPR 2022). With b = [p_gt, 1 - p_gt] the binary
    (target vs non-target) probabilities of the T-softened distributions and p_hat the distribution over
    the non-target classes (the target class removed and the rest renormalised):

        TCKD = T^2 KL(b_t || b_s),   NCKD = T^2 KL(p_hat_t || p_hat_s).

    mdistiller's ``dkd_loss`` removes the target class by subtracting 1000 from its softened logit (the
    same up to exp(-1000)) and divides both sums by the batch size, which is ``reduction="mean"`` here.
    Its linear warm-up of the DKD weight (20 epochs on CIFAR) is a schedule, not part of the loss.
    Defaults alpha = 1, beta = 8, T = 4 are mdistiller's CIFAR-100 settings (ImageNet uses beta = 0.5,
    T = 1). Rows whose label is < 0 are ignored.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction, labels=labels
    )
    y = rows.labels
    assert y is not None
    zs = soften(rows.student, temperature, standardize)
    zt = soften(rows.teacher, temperature, standardize)
    zs_other = _without_class(zs, y)
    zt_other = _without_class(zt, y)
    tckd = kl_from_log_probs(_binary_log_probs(zt, zt_other, y), _binary_log_probs(zs, zs_other, y))
    nckd = kl_from_log_probs(torch.log_softmax(zt_other, dim=-1), torch.log_softmax(zs_other, dim=-1))
    per_row = temperature**2 * (alpha * tckd + beta * nckd)
    return reduce_rows(per_row, rows, reduction)


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """DIST: T^2 [beta (1 - mean_i rho(p_s_i, p_t_i)) + gamma (1 - mean_c rho(p_s_:c, p_t_:c))].

    From "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022); rho is the Pearson
    correlation (with the official code's ``eps = 1e-8`` in the denominator), the inter-class term
    correlates each row's class probabilities, the intra-class term each class's probabilities over the
    counted rows of the batch. ``inter_weight`` / ``intra_weight`` are the paper's beta / gamma (1 and 1
    in the official code; the paper's ImageNet runs use tau = 1, CIFAR tau = 4).

    The intra-class term is a batch quantity: ``reduction="mean"`` returns the official value,
    ``"none"`` returns each row's inter-class term plus the (shared) intra-class term so that its mean over
    counted rows is the official value, and ``"sum"`` is that per-row vector's sum.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    ps = torch.softmax(rows.student / temperature, dim=-1)
    pt = torch.softmax(rows.teacher / temperature, dim=-1)
    inter = 1.0 - _pearson_rows(ps, pt, eps)
    if ps.shape[0] > 0:
        intra = 1.0 - _pearson_rows(ps.transpose(0, 1), pt.transpose(0, 1), eps).mean()
    else:
        intra = ps.new_zeros(())
    per_row = temperature**2 * (inter_weight * inter + intra_weight * intra)
    return reduce_rows(per_row, rows, reduction)

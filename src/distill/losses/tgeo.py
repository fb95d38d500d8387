"""TGeo-KD's pure parts: the trilateral relation features and the per-sample fused loss.

From "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation" (Hu, Wu, Li, Ma,
Chen, Yan, Wang, Liu; ICLR 2024, arXiv 2312.15112). No official code was published (the authors' page links
none). Per sample i, a small network f_omega maps the relations among the student prediction S_i, the
teacher prediction T_i and the ground truth G_i (intra-sample), and between those and the teacher's average
prediction T-bar over the samples of the class of i (inter-sample), to a fusion ratio alpha_i in (0, 1);
the student minimises

    mean_i  alpha_i KD_i + (1 - alpha_i) CE_i,

alpha_i weighting the teacher's term ("more from the teacher" as it grows). omega is learned on held-out
data by bilevel optimisation; that, the network and T-bar's state live in `distill.objectives.tgeo`.

Relations (`trilateral_relations`): the triangle's edge vectors in probability space, S - T, S - G, T - G,
then S - T-bar, T - T-bar, G - T-bar: (N, 6C). S and T are softmax probabilities at temperature 1, G the
one-hot label. The edge vectors hold the whole triangle (its side lengths and angles follow from them).
Conventions: `distill.losses._common` (float32 compute, masks, labels < 0 mask their row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import flatten_rows, kl_from_log_probs, reduce_rows


def trilateral_relations(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    teacher_class_mean: Tensor,
) -> Tensor:
    """Per row, ``[S - T, S - G, T - G, S - Tbar, T - Tbar, G - Tbar]`` concatenated: shape (N, 6C).

    ``student_logits`` / ``teacher_logits``: (N, C); ``labels``: (N,) class indices in [0, C);
    ``teacher_class_mean``: (N, C), the teacher's average probability vector over the class of each row's
    label (T-bar, one row per sample). Computed in float32 (float64 stays float64), without gradients to
    the logits: the features are the ratio network's inputs, not a training signal.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"logits must be (N, C) and alike, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    n, c = student_logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
    if teacher_class_mean.shape != (n, c):
        shape = tuple(teacher_class_mean.shape)
        raise ValueError(f"teacher_class_mean must be (N, C) = ({n}, {c}), got {shape}")
    if n and bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(f"labels must lie in [0, {c})")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        s = torch.softmax(student_logits.to(dtype), dim=-1)
        t = torch.softmax(teacher_logits.to(dtype), dim=-1)
        g = torch.nn.functional.one_hot(labels.long(), c).to(dtype)
        bar = teacher_class_mean.to(dtype)
        return torch.cat([s - t, s - g, t - g, s - bar, t - bar, g - bar], dim=-1)


def tgeo_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor,
    alpha: Tensor,
    mask: Tensor | None = None,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Per row ``alpha_i * T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha_i) * CE(z_s, y_i)``.

    ``alpha``: the fusion ratio per row, of the logits' leading shape, in [0, 1]; it is used as given
    (detach it for the student's step; the bilevel outer step differentiates through it). The KD term is
    Hinton's (T^2 scaling), the CE term is at temperature 1. Both are built from plain differentiable ops
    (no custom backward), so the outer step's second-order gradient passes through them. Rows with a label
    < 0 or masked out do not count.
    """
    rows = flatten_rows(
        student_logits,
        teacher_logits,
        mask=mask,
        temperature=temperature,
        reduction=reduction,
        extras=[alpha],
        labels=labels,
    )
    (a,) = rows.extras
    assert a is not None and rows.labels is not None
    a = a.to(rows.student.dtype)
    if a.numel() and bool(((a < 0) | (a > 1)).any()):
        raise ValueError("alpha must lie in [0, 1]")
    log_q = torch.log_softmax(rows.student / temperature, dim=-1)
    log_p = torch.log_softmax(rows.teacher / temperature, dim=-1)
    kd = temperature**2 * kl_from_log_probs(log_p, log_q)
    ce = -torch.log_softmax(rows.student, dim=-1).gather(-1, rows.labels[:, None]).squeeze(-1)
    return reduce_rows(a * kd + (1 - a) * ce, rows, reduction)

"""Objectives on a teacher known only by its top-k (a teacher cache): the tail-bucket reduction.

A top-k target gives the teacher's log-probabilities p_1..p_k on k ids at temperature T and the log of the
mass left, r = 1 - sum p_i. Both distributions are collapsed onto the same k + 1 outcomes: the k ids and one
"tail" bucket holding the rest of the vocabulary,

    P = (p_1, ..., p_k, r)        Q = (q_1, ..., q_k, 1 - sum_i q_i),  q = softmax(z / T) of the student.

Any divergence of two distributions is then computed on these k + 1 buckets, unchanged. Bias: collapsing is
a coarse-graining, so by the data-processing inequality every f-divergence (KL either way, JSD, TVD) is
at most its full-vocabulary value, equal when the student spreads its tail like the teacher; the gradient
matches the tail's total mass but not its shape. At k = vocabulary size it is exact.

The reduction hands the loss function bucket "logits" that reproduce P and Q after its own division by T:
teacher T * log P (already normalised), student z_i on the k ids and T * logsumexp_{j not in top-k}(z_j / T)
for the tail. Objectives whose value depends only on the two softened distributions take it (forward and
reverse KL, Hinton KD, JSD, TVD, skew KLs); objectives that read raw logits or classes (DKD, DIST, logit
standardisation, ranking, optimal transport, TAID, AdaKD) or add a student-entropy term (KL mixing's bonus
would see the buckets' entropy) refuse a cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from distill.losses.sparse import SparseTargets


def student_buckets(student_logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """(N, k + 1) bucket logits of the student: its logits on `ids` (N, k), then the tail bucket."""
    z = student_logits.float()
    scaled = z / temperature
    lse_all = torch.logsumexp(scaled, dim=-1)
    top = z.gather(-1, ids)
    lse_top = torch.logsumexp(top / temperature, dim=-1)
    # log(1 - exp(lse_top - lse_all)); the clamp keeps it finite (and its gradient defined) when the top-k
    # holds all the mass.
    gap = (lse_top - lse_all).clamp(max=-1e-12)
    tail = lse_all + torch.log(-torch.expm1(gap))
    return torch.cat([top, (temperature * tail)[:, None]], dim=-1)


def teacher_buckets(targets: SparseTargets, temperature: float) -> Tensor:
    """(N, k + 1) bucket logits of the teacher: T times its log-probabilities and tail log-mass."""
    log_p = torch.cat([targets.logprobs.float(), targets.tail_logmass.float()[:, None]], dim=-1)
    return temperature * log_p


def bucketed(
    student_logits: Tensor, mask: Tensor | None, targets: SparseTargets, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher bucket logits over the counted rows (the rows `targets` holds, in mask order)."""
    rows = student_logits[mask] if mask is not None else student_logits.reshape(-1, student_logits.shape[-1])
    if rows.shape[0] != targets.ids.shape[0]:
        raise ValueError(f"{rows.shape[0]} counted rows but {targets.ids.shape[0]} cached targets")
    ids = targets.ids.to(rows.device).long()
    return student_buckets(rows, ids, temperature), teacher_buckets(targets, temperature).to(rows.device)

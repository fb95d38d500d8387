"""Objectives on a teacher known only by its top-k (a teacher cache): the tail-bucket reduction.

A top-k target gives the teacher's log-probabilities p_1..p_k on k ids at temperature T and the log of the
mass left, r = 1 - sum p_i. Both distributions are collapsed onto the same k + 1 outcomes: the k ids and one
"tail" bucket holding the rest of the vocabulary,

    P = (p_1, ..., p_k, r)        Q = (q_1, ..., q_k, 1 - sum_i q_i),  q = softmax(z / T) of the student.

Any divergence of two distributions is then computed on these k + 1 buckets, unchanged. Bias: collapsing is
a coarse-graining, so by the data-processing inequality every f-divergence (KL either way, JSD, TVD) is
at most its full-vocabulary value, equal when the student spreads its tail like the teacher; the gradient
matches the tail's total mass but not its shape. At k = vocabulary size it is exact.

The reduction (`distill.losses.sparse.bucket_log_probs`, shared with the fused loss) hands the loss
function bucket "logits" T * log P and T * log Q, which reproduce P and Q after its own division by T.
Objectives whose value depends only on the two softened distributions take it (forward and
reverse KL, Hinton KD, JSD, TVD, skew KLs); objectives that read raw logits or classes (DKD, DIST, logit
standardisation, ranking, optimal transport, TAID, AdaKD) or add a student-entropy term (KL mixing's bonus
would see the buckets' entropy) refuse a cache.
"""

from __future__ import annotations

from torch import Tensor

from distill.losses.sparse import SparseTargets, bucket_log_probs


def bucketed(
    student_logits: Tensor, mask: Tensor | None, targets: SparseTargets, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher bucket logits over the counted rows (the rows `targets` holds, in mask order):
    T times the k + 1 bucket log-masses of `distill.losses.sparse.bucket_log_probs`, so that a loss that
    divides by T sees exactly those distributions."""
    student, teacher = bucket_log_probs(student_logits, targets, temperature=temperature, mask=mask)
    return temperature * student, temperature * teacher

"""Sparse top-k teacher targets: the teacher known only by its k most likely tokens per row.

A `SparseTargets` row holds the teacher's top-k ids, their log-probabilities at the distillation temperature
and the log of the mass left outside them. It is what a teacher cache stores and what
`distill.losses.fused_linear_divergence` accepts in place of the teacher's hidden states.

Rows: a target row is one row of logits that counts. Functions here take either one target row per logits row
(all rows, the mask then selects) or one per *counted* row in mask order (what a cache stores); the two
agree when every row counts.

Tail treatments (``tail=``), for a student Q = softmax(z / T) and teacher top-k p_1..p_k with tail mass r:

* ``"bucket"`` (default): both distributions are collapsed onto the same k + 1 outcomes, the k ids and one
  bucket for the rest of the vocabulary: P = (p_1..p_k, r), Q = (q_1..q_k, 1 - sum_i q_i). The divergence of
  these two is exact at k = V. Bias: coarse-graining never increases an f-divergence, so the value is a lower
  bound of the full one; the gradient moves the student's total tail mass towards r but leaves the shape of
  its distribution inside the tail untrained.
* ``"renormalize"``: the teacher's top-k renormalised to sum 1, p^_i = p_i / (1 - r), against the student's
  full softmax (its log-probabilities on the ids, not renormalised): KL(p^ || Q) = sum_i p^_i (log p^_i -
  log q_i). A true KL of two distributions over the vocabulary (the teacher's tail set to 0), exact when
  r = 0. Bias: it treats the teacher's tail as impossible, so it pushes the student's mass outside the top-k
  to zero (an over-confident student) and over-weights the head by 1 / (1 - r). Forward KL only: any
  divergence that weighs by the student's own mass would be infinite on the tail.

Log-masses are floored at ``LOG_TINY`` (float32's smallest normal, about 1e-38): a bucket the top-k leaves
empty (k = V, or a rounding-size tail) then stays finite instead of producing ``-inf - -inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses._common import REDUCTIONS, compute_dtype, xlogy_ratio

TAILS = ("bucket", "renormalize")
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


@dataclass(frozen=True)
class SparseTargets:
    """The teacher's top-k per row, at one temperature.

    * ``ids``: ``(N, k)`` integer token ids (int32 or int64), distinct within a row (a repeated id would count
      its mass twice).
    * ``logprobs``: ``(N, k)`` the teacher's log-probabilities of those ids at the distillation temperature,
      log softmax(z_t / T). ``-inf`` marks an unused slot (probability 0).
    * ``tail_logmass``: ``(N,)`` log of the mass outside the ids, log(1 - sum_i exp(logprobs_i)); ``-inf``
      (or a floor such as `LOG_TINY`) when the ids hold everything.

    The temperature is not stored: the consumer must use the one the log-probabilities were made at.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} must both be (N, k)"
            )
        if self.tail_logmass.shape != self.ids.shape[:1]:
            raise ValueError(
                f"tail_logmass must be (N,) = ({self.ids.shape[0]},), got {tuple(self.tail_logmass.shape)}"
            )
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {self.ids.dtype}")

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: Tensor) -> SparseTargets:
        """The rows ``index`` (an index tensor or boolean mask over rows)."""
        return SparseTargets(self.ids[index], self.logprobs[index], self.tail_logmass[index])


def topk_targets(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    """`SparseTargets` of dense teacher logits ``(..., V)``: one row per logits row (leading dims flattened).

    The tail is the log-sum-exp of the log-probabilities outside the top-k (exact even for tails far below
    float32's rounding of 1 - sum p), floored at `LOG_TINY` so it stays finite when the top-k holds (nearly)
    everything, k = V included.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, {vocab}], got {k}")
    logits = teacher_logits.detach().reshape(-1, vocab)
    log_p = torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, -math.inf)
    tail = (
        torch.logsumexp(rest, dim=-1).clamp_min(LOG_TINY)
        if k < vocab
        else log_p.new_full((len(ids),), LOG_TINY)
    )
    return SparseTargets(ids, logprobs, tail)


def rows_for(targets: SparseTargets, n_rows: int, keep: Tensor | None) -> SparseTargets:
    """The counted rows' targets: ``targets`` holds every row (``n_rows``) or the counted ones."""
    n_counted = n_rows if keep is None else int(keep.sum())
    if len(targets) == n_counted:
        return targets
    if keep is not None and len(targets) == n_rows:
        return targets.select(keep.to(targets.ids.device))
    raise ValueError(
        f"{len(targets)} target rows, but the logits have {n_rows} rows of which {n_counted} count: give one "
        "target row per row or per counted row"
    )


def teacher_bucket_logprobs(targets: SparseTargets, tail: str, dtype: torch.dtype) -> Tensor:
    """``(N, k + 1)`` teacher log-masses on the k ids then the tail bucket (``-inf`` tail for renormalize)."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    head = targets.logprobs.to(dtype)
    if tail == "renormalize":
        head = head - torch.logsumexp(head, dim=-1, keepdim=True)
        rest = head.new_full((head.shape[0], 1), -math.inf)
    else:
        rest = targets.tail_logmass.to(dtype)[:, None].clamp_min(LOG_TINY)
    return torch.cat([head, rest], dim=-1)


def student_bucket_logprobs(scaled_logits: Tensor, ids: Tensor) -> Tensor:
    """``(N, k + 1)`` student log-masses on ``ids`` then on the rest, from logits already divided by T.

    The tail is the log-sum-exp over the non-ids (no cancellation in 1 - sum q), floored at `LOG_TINY`.
    """
    lse = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    head = scaled_logits.gather(-1, ids) - lse
    rest = torch.logsumexp(scaled_logits.scatter(-1, ids, -math.inf), dim=-1, keepdim=True) - lse
    return torch.cat([head, rest.clamp_min(LOG_TINY)], dim=-1)


def bucket_log_probs(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    tail: str = "bucket",
) -> tuple[Tensor, Tensor]:
    """Student and teacher ``(n_counted, k + 1)`` log-masses over the k ids and the tail bucket.

    Any divergence of `distill.losses` applied to them as logits at temperature 1 is that divergence under
    the tail treatment ``tail`` (see the module docstring); `sparse_forward_kl` is the forward KL.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(student_logits.shape[:-1])}")
    rows = student_logits.reshape(-1, vocab)
    keep = mask.reshape(-1).to(device=rows.device, dtype=torch.bool) if mask is not None else None
    targets = rows_for(targets, rows.shape[0], keep)
    if keep is not None:
        rows = rows[keep]
    dtype = compute_dtype(rows, targets.logprobs)
    ids = targets.ids.to(device=rows.device, dtype=torch.long)
    student = student_bucket_logprobs(rows.to(dtype) / temperature, ids)
    return student, teacher_bucket_logprobs(targets, tail, dtype).to(rows.device)


def sparse_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    tail: str = "bucket",
    reduction: str = "mean",
) -> Tensor:
    """Forward KL(teacher || student) against top-k targets: the dense reference of the sparse path.

    ``tail="bucket"``: KL over the k + 1 buckets; ``"renormalize"``: KL(p^ || Q) with the renormalised top-k
    (the module docstring gives both and their bias). Not multiplied by T^2, like `forward_kl`. ``targets``
    hold one row per logits row or one per counted row; ``reduction`` as everywhere in `distill.losses`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    student, teacher = bucket_log_probs(
        student_logits, targets, temperature=temperature, mask=mask, tail=tail
    )
    per_row = xlogy_ratio(teacher.exp(), teacher, student)
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    lead = student_logits.shape[:-1]
    if mask is None:
        return per_row.reshape(lead)
    full = per_row.new_zeros(lead.numel())
    full[mask.reshape(-1).to(per_row.device)] = per_row
    return full.reshape(lead)

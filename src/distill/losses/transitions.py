"""TPA: token-to-token transition probability alignment for causal language models.

From "Beyond Next-Token Alignment: Distilling Multimodal Large Language Models via Token Interactions"
(Chen et al., 2026, arXiv:2602.09483; Align-TI). Align-TI's TPA aligns "the sequential token-to-token
transition probabilities" of teacher and student along the response. The paper's exact equation could not
be read here (only its abstract and overview; the official repository does not hold the training loss), so
the form below is ours, stated in full:

For each pair of consecutive counted positions ``(t-1, t)`` of a sequence, take the teacher's top-k tokens
``A`` at ``t-1`` and ``B`` at ``t``, and the *bucketed* distribution of a model at a position: its
probabilities of the k tokens plus one tail cell holding the rest of the mass (exact, no renormalisation).
The transition distribution over the ``(k + 1)^2`` cells is

    J(a, b) = pbar_{t-1}(a) * pbar_t(b),     a in A + {tail},  b in B + {tail},

the probability that the model emits ``a`` then ``b`` (with teacher forcing, the next-token distribution
at ``t`` is the one given the actual token, so the joint is the product of the two positions'
distributions). The loss at the pair is ``D(J_teacher || J_student)`` on the same cells (the teacher's),
with ``P = softmax(z / T)``:

* ``divergence="kl"``: ``sum_ab J_T (log J_T - log J_S)``. Because J factorises, this equals the sum of
  the two positions' bucketed forward KLs (with ``top_k >= V`` exactly ``KL_{t-1} + KL_t``): under the
  product form, KL-TPA is top-k-bucketed token KD that counts each interior position twice.
* ``divergence="tvd"`` (default): ``1/2 sum_ab |J_T - J_S|``, which does *not* split over positions: an
  error at ``t-1`` is weighed by how far off ``t`` is, so it couples adjacent steps.

Conventions (`distill.losses._common`): logits ``(B, T, V)``; ``mask`` ``(B, T)``, True = the position
counts; a pair counts when both of its positions count, so a masked position changes no value. The value of
the pair ``(t-1, t)`` sits at ``t``: ``reduction="none"`` returns ``(B, T)`` with 0 at ``t = 0`` and at
uncounted pairs, ``"mean"`` averages over counted pairs (0 when none), ``"sum"`` sums them. float32 math
(float64 stays float64); ``-inf`` logits where both models have them give no NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import check_common, compute_dtype, xlogy_ratio

DIVERGENCES = ("tvd", "kl")


def _safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dimension, ``-inf`` for an all ``-inf`` row with a zero (not NaN) gradient."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.logsumexp(torch.where(empty, zero, x), dim=-1)
    return torch.where(empty.squeeze(-1), torch.full_like(out, -torch.inf), out)


def bucketed_log_probs(logits: Tensor, index: Tensor, temperature: float) -> Tensor:
    """``(..., k + 1)`` log-probabilities of softmax(logits / T) at ``index`` (``(..., k)``) plus the tail."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    picked = log_p.gather(-1, index)
    rest = log_p.scatter(-1, index, torch.full_like(picked, -torch.inf))
    return torch.cat([picked, _safe_logsumexp(rest).unsqueeze(-1)], dim=-1)


def transition_log_joint(log_prev: Tensor, log_next: Tensor) -> Tensor:
    """log J(a, b) = log pbar_{t-1}(a) + log pbar_t(b), flattened to ``(..., (k + 1)^2)``."""
    return (log_prev.unsqueeze(-1) + log_next.unsqueeze(-2)).flatten(-2)


def transition_alignment(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    top_k: int = 8,
    divergence: str = "tvd",
) -> Tensor:
    """TPA loss: D(J_teacher || J_student) over consecutive counted positions (see the module docstring)."""
    check_common(student_logits, teacher_logits, mask, temperature, reduction)
    if student_logits.dim() != 3:
        raise ValueError(f"transition_alignment needs (B, T, V) logits, got {tuple(student_logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    batch, length, vocab = student_logits.shape
    if length == 0:
        empty = (student_logits.sum(-1) + teacher_logits.sum(-1)).to(compute_dtype(student_logits)) * 0
        return empty if reduction == "none" else empty.sum()
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    keep = torch.ones(batch, length, dtype=torch.bool, device=s.device)
    if mask is not None:
        keep = mask.to(device=s.device, dtype=torch.bool)
    pairs = keep[:, 1:] & keep[:, :-1]  # (B, T-1): pair (t-1, t) at t
    index = pairs.reshape(-1).nonzero().squeeze(1)
    # Only counted pairs reach the maths: a masked position's logits (even NaN) touch nothing.
    s_prev, s_next = (x.reshape(-1, vocab).index_select(0, index) for x in (s[:, :-1], s[:, 1:]))
    t_prev, t_next = (x.reshape(-1, vocab).index_select(0, index) for x in (t[:, :-1], t[:, 1:]))
    k = min(top_k, vocab)
    with torch.no_grad():  # the cells are the teacher's choice; no gradient through top-k
        cells_prev = t_prev.topk(k, dim=-1).indices
        cells_next = t_next.topk(k, dim=-1).indices
    log_jt = transition_log_joint(
        bucketed_log_probs(t_prev, cells_prev, temperature),
        bucketed_log_probs(t_next, cells_next, temperature),
    )
    log_js = transition_log_joint(
        bucketed_log_probs(s_prev, cells_prev, temperature),
        bucketed_log_probs(s_next, cells_next, temperature),
    )
    if divergence == "kl":
        per_pair = xlogy_ratio(log_jt.exp(), log_jt, log_js)
    else:
        per_pair = 0.5 * (log_jt.exp() - log_js.exp()).abs().sum(-1)
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.sum() / max(per_pair.shape[0], 1)
    full = per_pair.new_zeros(batch * (length - 1)).index_put((index,), per_pair)
    return torch.cat([full.new_zeros(batch, 1), full.reshape(batch, length - 1)], dim=1)

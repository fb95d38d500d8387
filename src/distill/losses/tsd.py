"""TSD-KD's indirect part: the teacher re-ranks the student's own candidates, a preference (list-wise) loss.

"Explain in Your Own Words: Improving Reasoning via Token-Selective Dual Knowledge Distillation" (Kim & Baek,
ICLR 2026). As in the official code, the candidates are the student's top-K next tokens at a position of
its own rollout; the teacher orders them by its logits, and the student is trained with ListMLE
(Plackett-Luce) to rank them that way:

    L_t = - sum_{k=1..K} log( exp(s_{pi(k)}) / sum_{j >= k} exp(s_{pi(j)}) ),

s the student's logits of the candidates, pi the teacher's order. Only the first positions of each
completion count, those that hold the first `entropy_fraction` of the sequence's total student entropy
(the early, decisive tokens; the official code cuts the batch at one such position, here each sequence
has its own cut, and the position that crosses the fraction is included so every sequence has one).
The official code normalises each candidate against the candidates ranked *above* it (a log-cumsum-exp
from the top), which rewards the teacher's lower-ranked tokens; this is the Plackett-Luce likelihood of
the teacher's order, as the paper describes it.
The full method adds the direct part, `token_selective_kd` (relative-confidence-weighted JSD + entropy
regulariser), on the same student rollouts (`student_rollouts`, mix 1): see `recipes/lm_tsd.yaml`.
Registered as the objective `tsd_indirect` in `distill.objectives.onpolicy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import entropy_from_log_probs


def early_entropy_positions(entropy: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """(B, T) bool: per row, the counted positions from the start until their cumulative share of the row's
    entropy reaches `fraction` (the crossing position included)."""
    h = entropy * mask
    total = h.sum(-1, keepdim=True).clamp(min=1e-12)
    before = (torch.cumsum(h, -1) - h) / total  # share held by the earlier positions
    return mask & (before < fraction)


def tsd_indirect(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 10,
    entropy_fraction: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """ListMLE of the student's top-K candidates in the teacher's order, at early high-entropy positions.
    (B, T, V) logits and a (B, T) mask; (N, V) logits are N one-step sequences."""
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2, got {top_k}")
    if not 0.0 < entropy_fraction <= 1.0:
        raise ValueError(f"entropy_fraction must lie in (0, 1], got {entropy_fraction}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.dim() == 2:
        student_logits, teacher_logits = student_logits[:, None], teacher_logits[:, None]
        mask = None if mask is None else mask[:, None]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    if mask is None:
        mask = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
    with torch.no_grad():
        entropy = entropy_from_log_probs(torch.log_softmax(s, -1))
        selected = early_entropy_positions(entropy, mask.bool(), entropy_fraction)
    s, t = s[selected], t[selected]  # (N, V)
    k = min(top_k, s.shape[-1])
    candidates = s.detach().topk(k, dim=-1).indices
    order = t.gather(-1, candidates).argsort(dim=-1, descending=True)
    ranked = s.gather(-1, candidates.gather(-1, order))  # student logits in the teacher's order
    # A masked (-inf) candidate, when k exceeds a row's allowed tokens, takes no part in the ranking.
    valid = torch.isfinite(ranked)
    ranked = torch.where(valid, ranked, torch.full_like(ranked, float("-inf")))
    # log-softmax of each item against itself and everything ranked below it
    tail = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    per_position = -torch.where(valid, ranked - tail, torch.zeros_like(ranked)).sum(-1)
    if reduction == "sum":
        return per_position.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return per_position.sum() / max(per_position.shape[0], 1)

"""Cross-tokenizer logit distillation: teacher and student with different tokenizers and vocabularies.

Two losses, both pure functions of tensors (conventions of `distill.losses._common`, except that student and
teacher logits have their own shapes ``(B, T_s, V_s)`` and ``(B, T_t, V_t)``):

* `uld_loss`, Universal Logit Distillation ("Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs", Boizard et al., 2024). Each distribution's probabilities are sorted in
  descending order, the smaller vocabulary is padded with zeros, and the loss is the sum of absolute
  differences (the closed form of the Wasserstein-1 distance the paper derives, with every transport cost 1
  between ranks)::

      ULD_i = sum_k | sort(p_s,i)_k - sort(p_t,i)_k |

  Positions are paired by their rank among each sequence's counted positions and the longer side is cut to
  the shorter (the paper's truncation to a common length): no vocabulary mapping and no text alignment.

* `aligned_kd_loss`, the aligned form of TRL's GOLD trainer ("Unlocking On-Policy Distillation for Any
  Model Family", Hugging Face 2025; `trl.experimental.gold`, `use_extended_uld=True`,
  `uld_token_merge_strategy="bayesian"`, `uld_use_hybrid_loss=True`). Both tokenizations of one text are cut
  into *groups*: the shortest runs of tokens that end at the same byte on both sides
  (`distill.data.token_alignment`). Each side's group distribution follows the chain rule: the full
  distribution at the group's last token times the probabilities of the actual earlier tokens::

      log q_g(v) = log p(v | prefix, x_1 .. x_{k-1}) + sum_{j < k} log p(x_j | prefix, x_1 .. x_{j-1})

  Vocabulary entries whose strings both tokenizers hold (the matched pairs M, teacher id -> student id) are
  compared directly with the generalized JSD(beta) (TRL's convention: beta = 0 is KL(t || s), beta = 1 is
  KL(s || t)); the rest, the unmatched mass, with ULD's sorted L1::

      L_g = w_m JSD_beta(q_t[M_t], q_s[M_s]) + w_u sum_k | sort(q_s[~M_s])_k - sort(q_t[~M_t])_k |

  with w_m = |M| / V_t and w_u = 1 - w_m unless given (GOLD's adaptive weights). Without matched pairs the
  loss is ULD's sorted L1 over the whole group distributions (GOLD's extended ULD without the hybrid).

Group ids: ``student_groups`` (B, T_s) and ``teacher_groups`` (B, T_t) give each prediction position its
group, -1 where it belongs to none; ids run 0 .. G-1, the positions of one group are contiguous in one row,
and ``labels`` hold the token each position's logits predict (read for all but a group's last position).
Differences from TRL: log-probabilities come from ``log_softmax`` (TRL clamps probabilities at 1e-8 before
its log), and the mean runs over all groups of the batch (TRL averages each sequence, then the sequences).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses._common import REDUCTIONS, compute_dtype


def _check(reduction: str, *temperatures: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for temperature in temperatures:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per-row sum |sort(p) - sort(q)| of two (N, V_p), (N, V_q) non-negative tensors, sorted descending and
    the narrower padded with zeros.

    The wider side's entries beyond the narrower width meet zeros, so they add their sum: only its top
    entries are sorted (`topk`): the same value and gradient at a fraction of a full sort's cost."""
    narrow, wide = (p, q) if p.shape[-1] <= q.shape[-1] else (q, p)
    width = narrow.shape[-1]
    narrow_sorted = narrow.sort(-1, descending=True).values
    if wide.shape[-1] == width:
        return (narrow_sorted - wide.sort(-1, descending=True).values).abs().sum(-1)
    top = wide.topk(width, -1, sorted=True).values
    tail = (wide.sum(-1) - top.sum(-1)).clamp_min(0.0)  # the wide side's mass beyond the top entries
    return (narrow_sorted - top).abs().sum(-1) + tail


def _ranked_rows(mask: Tensor, keep: Tensor) -> Tensor:
    """Flat indices of counted positions whose rank in their row is below that row's `keep` count."""
    rank = mask.long().cumsum(-1) - 1
    chosen = mask & (rank < keep[:, None])
    return chosen.reshape(-1).nonzero().squeeze(1)


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): sorted-probability L1 between positions paired by
    rank (see the module docstring). Logits (N, V_s) / (N, V_t) pair row by row; (B, T_s, V_s) /
    (B, T_t, V_t) pair each sequence's k-th counted position (masks: True = counts) up to the shorter count.

    ``reduction``: mean over compared positions (0 when none), sum, or "none": one value per student position,
    (B, T_s), 0 where nothing was compared."""
    _check(reduction, student_temperature, teacher_temperature)
    if student_logits.dim() != teacher_logits.dim() or student_logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must both be (N, V) or (B, T, V), got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if s.dim() == 2:
        s, t = s[None], t[None]
        student_mask = student_mask[None] if student_mask is not None else None
        teacher_mask = teacher_mask[None] if teacher_mask is not None else None
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher batches differ: {s.shape[0]} and {t.shape[0]} sequences")
    s_mask = (
        torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if student_mask is None else student_mask
    )
    t_mask = (
        torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if teacher_mask is None else teacher_mask
    )
    for name, m, x in (("student", s_mask, s), ("teacher", t_mask, t)):
        if m.shape != x.shape[:2]:
            raise ValueError(f"{name} mask {tuple(m.shape)} does not match its logits {tuple(x.shape[:2])}")
    s_mask, t_mask = (
        s_mask.to(device=s.device, dtype=torch.bool),
        t_mask.to(device=s.device, dtype=torch.bool),
    )
    keep = torch.minimum(s_mask.sum(-1), t_mask.sum(-1))
    s_rows, t_rows = _ranked_rows(s_mask, keep), _ranked_rows(t_mask, keep)
    p_s = torch.softmax(s.reshape(-1, s.shape[-1]).index_select(0, s_rows) / student_temperature, -1)
    p_t = torch.softmax(t.reshape(-1, t.shape[-1]).index_select(0, t_rows) / teacher_temperature, -1)
    per_row = sorted_l1(p_s, p_t)
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    full = per_row.new_zeros(s_mask.numel()).index_put((s_rows,), per_row).reshape(s_mask.shape)
    return full[0] if student_logits.dim() == 2 else full


def group_log_probs(logits: Tensor, labels: Tensor, groups: Tensor, temperature: float = 1.0) -> Tensor:
    """(G, V) chain-rule log-distributions of the groups (module docstring): the log-softmax at each group's
    last position plus the log-probabilities of the actual tokens at its earlier positions."""
    flat_groups = groups.reshape(-1).to(logits.device)
    count = int(flat_groups.max().item()) + 1 if flat_groups.numel() else 0
    log_p = torch.log_softmax(logits.reshape(-1, logits.shape[-1]) / temperature, -1)
    if count == 0:
        return log_p[:0]
    inside = flat_groups >= 0
    following = torch.cat([flat_groups[1:], flat_groups.new_full((1,), -1)])
    last = inside & (following != flat_groups)
    earlier = inside & ~last
    flat_labels = labels.reshape(-1).to(logits.device)
    rows = earlier.nonzero().squeeze(1)
    if bool((flat_labels.index_select(0, rows) < 0).any()):
        raise ValueError("a group's earlier position has no label (-100): its actual token is unknown")
    token = log_p.index_select(0, rows).gather(1, flat_labels.index_select(0, rows)[:, None]).squeeze(1)
    prefix = log_p.new_zeros(count).index_add(0, flat_groups.index_select(0, rows), token)
    last_rows = last.nonzero().squeeze(1)
    order = flat_groups.index_select(0, last_rows)
    if order.numel() != count or not bool((order == torch.arange(count, device=order.device)).all()):
        raise ValueError("group ids must run 0 .. G-1 in order, each group's positions contiguous")
    return log_p.index_select(0, last_rows) + prefix[:, None]


def _plogp_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row sum p (log p - log q), terms with p == 0 exactly 0 (no -inf - -inf reaches the product)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (p * diff).sum(-1)


def matched_jsd(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """Per-row generalized JSD(beta) of (possibly unnormalised) log-probabilities, TRL's convention: beta = 0
    is KL(t || s), beta = 1 is KL(s || t), between them beta KL(t || m) + (1 - beta) KL(s || m) with
    m = beta t + (1 - beta) s."""
    if beta == 0:
        return _plogp_ratio(log_t, log_s)
    if beta == 1:
        return _plogp_ratio(log_s, log_t)
    # Where both sides are -inf, logaddexp's gradient is NaN (exp(-inf - -inf)): give it zeros there, and
    # m its true -inf after.
    empty = torch.isneginf(log_t) & torch.isneginf(log_s)
    zero = torch.zeros((), dtype=log_t.dtype, device=log_t.device)
    log_m = torch.logaddexp(
        torch.where(empty, zero, log_t + math.log(beta)), torch.where(empty, zero, log_s + math.log1p(-beta))
    ).masked_fill(empty, -math.inf)
    return beta * _plogp_ratio(log_t, log_m) + (1 - beta) * _plogp_ratio(log_s, log_m)


def aligned_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    student_labels: Tensor,
    teacher_labels: Tensor,
    student_groups: Tensor,
    teacher_groups: Tensor,
    matched: Tensor | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """GOLD's aligned cross-tokenizer loss (module docstring): chain-rule group distributions on both sides,
    JSD(beta) over the matched vocabulary pairs ``matched`` (M, 2) [teacher id, student id], sorted L1 over
    the unmatched rest; sorted L1 over everything when ``matched`` is None.

    ``reduction``: mean over groups (0 when none), sum, or "none" (one value per group)."""
    _check(reduction, student_temperature, teacher_temperature)
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if student_groups.shape != student_logits.shape[:-1] or teacher_groups.shape != teacher_logits.shape[:-1]:
        raise ValueError("group ids must have the leading shape of their logits")
    dtype = compute_dtype(student_logits, teacher_logits)
    q_s = group_log_probs(student_logits.to(dtype), student_labels, student_groups, student_temperature)
    q_t = group_log_probs(teacher_logits.to(dtype), teacher_labels, teacher_groups, teacher_temperature)
    if q_s.shape[0] != q_t.shape[0]:
        raise ValueError(f"student and teacher have {q_s.shape[0]} and {q_t.shape[0]} groups")
    if matched is None:
        per_group = sorted_l1(q_s.exp(), q_t.exp())
    else:
        matched = matched.to(q_s.device).long()
        t_ids, s_ids = matched[:, 0], matched[:, 1]
        if matched_weight is None and unmatched_weight is None:
            matched_weight = matched.shape[0] / max(q_t.shape[-1], 1)
            unmatched_weight = 1.0 - matched_weight
        elif matched_weight is None or unmatched_weight is None:
            raise ValueError("give both matched_weight and unmatched_weight, or neither (adaptive)")
        t_rest = torch.ones(q_t.shape[-1], dtype=torch.bool, device=q_t.device).index_fill(0, t_ids, False)
        s_rest = torch.ones(q_s.shape[-1], dtype=torch.bool, device=q_s.device).index_fill(0, s_ids, False)
        jsd = matched_jsd(q_t[:, t_ids], q_s[:, s_ids], beta) if matched.shape[0] else q_s.new_zeros(len(q_s))
        rest = (
            sorted_l1(q_s[:, s_rest].exp(), q_t[:, t_rest].exp())
            if bool(s_rest.any()) and bool(t_rest.any())
            else q_s.new_zeros(len(q_s))
        )
        per_group = matched_weight * jsd + unmatched_weight * rest
    if reduction == "sum":
        return per_group.sum()
    if reduction == "mean":
        return per_group.sum() / max(per_group.shape[0], 1)
    return per_group

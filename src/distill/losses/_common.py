"""Shared conventions of every loss in `distill.losses`.

* Logits are ``(N, C)`` (classification) or ``(B, T, V)`` (tokens); the last dimension is the vocabulary.
  Student and teacher logits have the same shape.
* ``mask`` is boolean over the leading dimensions (``(N,)`` or ``(B, T)``), True = the row counts. A masked
  row is dropped before any computation, so masking a row is exactly the same as removing it (batch-wise
  losses such as DIST's inter-class term or Sinkhorn's batch cost never see masked rows).
* ``reduction``: ``"mean"`` averages over counted rows (0 when no row counts, never NaN), ``"sum"`` sums
  them, ``"none"`` returns one value per row with the leading shape (masked rows hold 0).
* Math runs in float32 whatever the input dtype (bf16 / fp16 inputs are upcast; float64 stays float64 so
  that ``torch.autograd.gradcheck`` works).
* ``-inf`` logits (masked vocabulary entries) are allowed where both models have them: a term whose
  teacher probability is 0 contributes exactly 0 to a forward KL, and no NaN reaches values or gradients.
* Labels (where a loss needs them) follow the same leading shape; a label below 0 (``ignore_index=-100``)
  masks its row too.

This module, like the whole of `distill.losses`, imports nothing from the rest of `distill`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class Rows:
    """Logits flattened to ``(n_counted, V)``, with what is needed to undo the flattening."""

    student: Tensor
    teacher: Tensor
    extras: list[Tensor | None]
    labels: Tensor | None
    index: Tensor | None  # flat indices of counted rows, None when every row counts
    lead_shape: torch.Size
    n_total: int


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (for gradcheck), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_common(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be (N, C) or (B, T, V), got shape {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def flatten_rows(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    *,
    mask: Tensor | None,
    temperature: float = 1.0,
    reduction: str = "mean",
    extras: Sequence[Tensor | None] = (),
    labels: Tensor | None = None,
) -> Rows:
    """Validate, flatten to rows, upcast to the compute dtype and drop masked rows.

    ``extras`` are per-row tensors of the leading shape (labels, weights, noise) that are flattened and
    filtered the same way. ``labels`` mask rows where they are < 0 and come back as ``Rows.labels``.
    Logits are *not* divided by the temperature here.
    """
    check_common(student_logits, teacher_logits, mask, temperature, reduction)
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    dtype = compute_dtype(student_logits, *([teacher_logits] if teacher_logits is not None else []))
    s = student_logits.reshape(-1, vocab).to(dtype)
    t = teacher_logits.reshape(-1, vocab).to(dtype) if teacher_logits is not None else None
    keep = mask.reshape(-1).to(device=s.device, dtype=torch.bool) if mask is not None else None
    flat_labels = None
    if labels is not None:
        if labels.shape != lead_shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match the logits' leading shape "
                f"{tuple(lead_shape)}"
            )
        flat_labels = labels.reshape(-1).to(device=s.device, dtype=torch.long)
        if bool((flat_labels >= vocab).any()):
            raise ValueError(f"labels must lie in [0, {vocab}) (or be < 0 to ignore a row)")
        valid = flat_labels >= 0
        keep = valid if keep is None else keep & valid
    flat_extras: list[Tensor | None] = []
    for e in extras:
        if e is None:
            flat_extras.append(None)
            continue
        if e.shape[: len(lead_shape)] != lead_shape:
            raise ValueError(f"per-row tensor of shape {tuple(e.shape)} does not match {tuple(lead_shape)}")
        flat_extras.append(e.reshape(s.shape[0], *e.shape[len(lead_shape) :]))
    index = None
    if keep is not None and not bool(keep.all()):
        index = keep.nonzero().squeeze(1)
        s = s.index_select(0, index)
        t = t.index_select(0, index) if t is not None else None
        flat_extras = [e.index_select(0, index.to(e.device)) if e is not None else None for e in flat_extras]
        flat_labels = flat_labels.index_select(0, index) if flat_labels is not None else None
    return Rows(s, t, flat_extras, flat_labels, index, lead_shape, lead_shape.numel())


def reduce_rows(per_row: Tensor, rows: Rows, reduction: str) -> Tensor:
    """Apply the reduction to per-counted-row values."""
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    if rows.index is None:
        return per_row.reshape(rows.lead_shape)
    full = per_row.new_zeros(rows.n_total)
    full = full.index_put((rows.index,), per_row)
    return full.reshape(rows.lead_shape)


def finite_log_softmax(logits: Tensor) -> Tensor:
    """log_softmax along the last dimension (``-inf`` stays ``-inf``)."""
    return torch.log_softmax(logits, dim=-1)


def xlogy_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``sum_v p (log p - log q)`` with terms where ``p == 0`` exactly 0 (values and gradients).

    The difference is zeroed *before* it is multiplied by ``p``, so ``-inf - -inf`` never reaches a
    product's backward pass.
    """
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (p * diff).sum(-1)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(P || Q) from log-probabilities, 0 where P is 0."""
    return xlogy_ratio(log_p.exp(), log_p, log_q)


def entropy_from_log_probs(log_p: Tensor) -> Tensor:
    """Per-row Shannon entropy ``-sum p log p`` (0 log 0 = 0)."""
    p = log_p.exp()
    safe = torch.where(p > 0, log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return -(p * safe).sum(-1)


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score standardisation of logits along the last dimension: ``(z - mean(z)) / (eps + std(z))``.

    From "Logit Standardization in Knowledge Distillation" (Sun et al., CVPR 2024). As in the paper's code,
    ``std`` is the unbiased (n - 1) standard deviation and ``eps = 1e-7``. ``-inf`` entries (masked
    vocabulary) are left out of the mean and std and stay ``-inf``. The paper then divides by a base
    temperature, which is the ``temperature`` argument of the loss.
    """
    if logits.numel() == 0:
        return logits
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        mean = logits.mean(dim=-1, keepdim=True)
        std = logits.std(dim=-1, keepdim=True)
        return (logits - mean) / (eps + std)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    x = torch.where(finite, logits, zero)
    n = finite.sum(-1, keepdim=True).to(logits.dtype)
    mean = x.sum(-1, keepdim=True) / n.clamp_min(1)
    centred = torch.where(finite, logits - mean, zero)
    var = (centred * centred).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    out = centred / (eps + var.sqrt())
    return torch.where(finite, out, logits)


def soften(logits: Tensor, temperature: float, standardize: bool = False) -> Tensor:
    """Logits divided by the temperature, after optional logit standardisation."""
    if standardize:
        logits = standardize_logits(logits)
    return logits / temperature if temperature != 1.0 else logits


_CHUNK_ELEMENTS = 1 << 20  # rows per chunk * vocabulary: ~4 MB of float32 temporaries per chunk


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _kl_chunk(a: Tensor, b: Tensor, lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log P, P, log Q and the per-row KL(P || Q) for one chunk of (already softened) logits."""
    log_p = a - lse_a[:, None]
    log_q = b - lse_b[:, None]
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=a.dtype, device=a.device))
    return log_p, p, diff, (p * diff).sum(-1)


class _FusedKL(torch.autograd.Function):
    """Per-row KL(softmax(a / T) || softmax(b / T)), computed chunk by chunk over rows.

    Saves only the inputs and two per-row log-normalisers; the backward pass recomputes the probabilities
    chunk by chunk, so peak memory is the inputs plus one chunk of temporaries (the naive composition keeps
    four full (N, V) tensors). Gradients: d/db = (Q - P) / T, d/da = P (log P - log Q - KL) / T.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        n, v = a.shape
        out = a.new_empty(n)
        lse_a = a.new_empty(n)
        lse_b = a.new_empty(n)
        for rows in _chunks(n, v):
            ca, cb = a[rows], b[rows]
            if temperature != 1.0:
                ca, cb = ca / temperature, cb / temperature
            la = torch.logsumexp(ca, dim=-1)
            lb = torch.logsumexp(cb, dim=-1)
            lse_a[rows], lse_b[rows] = la, lb
            if bool(torch.isinf(ca).any()) or bool(torch.isinf(cb).any()):
                out[rows] = _kl_chunk(ca, cb, la, lb)[3]
            else:  # no masked entries: sum P (a - b) + lse_b - lse_a (element-wise, no BLAS call: a BLAS
                # reduction degrades badly when other processes contend for the cores)
                p = torch.exp(ca - la[:, None])
                out[rows] = (p * (ca - cb)).sum(-1) + (lb - la)
        ctx.save_for_backward(a, b, lse_a, lse_b, out)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        a, b, lse_a, lse_b, kl = ctx.saved_tensors
        temperature = ctx.temperature
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.empty_like(b) if need_b else None
        n, v = a.shape
        for rows in _chunks(n, v):
            ca, cb = a[rows], b[rows]
            if temperature != 1.0:
                ca, cb = ca / temperature, cb / temperature
            g = (grad_out[rows] / temperature)[:, None]
            if grad_a is not None:
                _, p, diff, _ = _kl_chunk(ca, cb, lse_a[rows], lse_b[rows])
                grad_a[rows] = g * p * (diff - kl[rows][:, None])
            else:
                p = torch.exp(ca - lse_a[rows][:, None])
            if grad_b is not None:
                q = torch.exp(cb - lse_b[rows][:, None])
                grad_b[rows] = q.sub_(p).mul_(g)
        return grad_a, grad_b, None


def fused_kl(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row KL(softmax(a / T) || softmax(b / T)) for 2-D float logits, memory-lean (see `_FusedKL`).

    Rows whose entries are ``-inf`` in both ``a`` and ``b`` at the same positions are fine (those terms are
    0 with zero gradient); a position where only ``b`` is ``-inf`` gives an infinite KL, as it should.
    """
    if a.shape[0] == 0:
        return (a.sum(-1) + b.sum(-1)) * 0
    return _FusedKL.apply(a, b, float(temperature))

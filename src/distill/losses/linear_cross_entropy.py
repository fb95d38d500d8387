"""Cross-entropy fused with the output layer: the (tokens x vocabulary) logits exist one chunk at a time.

    CE = -1/N sum_{counted n} [(1 - eps) log q_n(y_n) + eps/V sum_v log q_n(v)],  q_n = softmax(h_n W^T + b)

(eps: label smoothing, "Rethinking the Inception Architecture for Computer Vision", Szegedy et al., 2016;
the same value as `torch.nn.functional.cross_entropy`). Only the counted rows are multiplied into the output
layer. Each chunk's gradient with respect to its logits (softmax minus the target distribution) is made in
the forward pass and multiplied at once into d hidden and d weight, so the peak is one chunk's logits and
their gradient, whatever the number of tokens, and the cost the 3 N H V multiply-adds of the three products.
Math in float32 (float64 inputs stay float64), for any input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of float32 chunk buffers (logits, then their gradient)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of counted rows; the gradients are made chunk by chunk in the forward pass
    (3 N H V multiply-adds: logits, d hidden, d weight) and only scaled in the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        label_smoothing: float,
        chunk: int,
    ) -> Tensor:
        compute = _compute_dtype(hidden, weight, bias)
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden, dtype=compute) if needs[0] else None
        grad_weight = torch.zeros_like(w) if needs[1] else None
        grad_bias = torch.zeros_like(b) if b is not None and needs[2] else None
        total = torch.zeros((), dtype=compute, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            h, y = hidden[part].to(compute), labels[part]
            logits = F.linear(h, w, b)
            log_q = torch.log_softmax(logits, dim=-1)
            total += F.nll_loss(log_q, y, reduction="sum") * (1.0 - label_smoothing)
            if label_smoothing:
                total -= log_q.sum() * (label_smoothing / w.shape[0])
            # d CE / d logits = softmax - target, target = (1 - eps) one-hot + eps / V
            grad = log_q.exp_()
            grad[torch.arange(len(y), device=y.device), y] -= 1.0 - label_smoothing
            if label_smoothing:
                grad -= label_smoothing / w.shape[0]
            if grad_hidden is not None:
                torch.mm(grad, w, out=grad_hidden[part])
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads = [
            None if g is None else (g * grad_output).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T + bias` with `labels`, without building them whole.

    Args:
        hidden: ``(..., H)``; weight: ``(V, H)`` (as ``nn.Linear.weight``); labels: the leading shape.
        mask: boolean over the leading shape, True = the row counts; rows labelled `ignore_index` never count.
        chunk_tokens: rows per chunk; by default as many as `memory_budget` bytes of float32 buffers allow
            (two (rows, V) copies: logits and log-probabilities, the latter turned into the gradient).

    Returns:
        The mean over counted rows (0 when none counts), float32 (float64 for float64 inputs).
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    counted = targets != ignore_index
    if mask is not None:
        counted &= mask.reshape(-1)
    keep = counted.nonzero().squeeze(1)
    rows, targets = rows[keep], targets[keep]
    chunk = chunk_tokens or max(1, memory_budget // (2 * 4 * weight.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):
        total = _LinearCrossEntropy.apply(rows, weight, bias, targets, float(label_smoothing), chunk)
    return total / max(1, rows.shape[0])

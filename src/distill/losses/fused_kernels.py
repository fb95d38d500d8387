"""The per-divergence maths of `fused_linear_divergence`, one logits tile at a time.

A kernel turns one tile of the student's and the teacher's log-probabilities into the per-token divergence
terms and the tile of the gradient with respect to the student's (scaled) logits, in place: forward / reverse
KL, TRL's generalised JSD(beta), total variation and DistiLLM's skew KLs. Also here: `_Spec` (one call's
settings), the tile primitives (logits into a preallocated buffer, log-softmax, online log-sum-exp) and the
dense losses of `distill.losses.divergences` each kernel must equal (`_dense_function`), which the sparse
top-k path and `linear_divergence_reference` evaluate. The chunking lives in `distill.losses.fused_chunks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses import divergences as dense


@dataclass(frozen=True)
class _Spec:
    kind: str  # canonical divergence, "zero" for a divergence that is identically 0 (skew alpha = 1)
    beta: float
    alpha: float
    inv_t: float
    tail: str
    sparse: bool
    reduction: str
    memory_budget: int
    chunk_tokens: int | None
    chunk_vocab: int | None


# -------------------------------------------------------------------------------- kernels
# Tiles are vocabulary-major, (tile, rows): the logits come from weight @ hidden^T, which MKL runs markedly
# faster than hidden @ weight^T at these shapes, and per-token vectors (rows,) broadcast along the last dim.
# A kernel gets one tile of student log-probabilities LQ and probabilities Q, the teacher's LP and P, and a
# spare buffer X (all overwritable except Q). It returns the per-token divergence terms of the tile, a tile
# H and either None (H is then the gradient d div / d s itself) or the per-token sum of H: the gradient is
# then H - Q * sum_v H (the softmax Jacobian applied to h = q * dL/dq; any c * Q added to H cancels there,
# which the kernels use to drop constants). ``factor`` scales the gradient.
# Every log is of a mass clamped at float32's smallest normal, so underflowed probabilities give 0 * finite.

_TINY = torch.finfo(torch.float32).tiny


def _kernel_forward_kl(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, x: Tensor, spec: _Spec):
    value = torch.sub(lp, lq, out=x).mul_(p).sum(0)
    return value, torch.sub(q, p, out=lp), None, 1.0


def _kernel_reverse_kl(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor | None, x: Tensor | None, spec: _Spec):
    h = torch.sub(lq, lp, out=lp).mul_(q)  # q (log q - log p)
    value = h.sum(0)
    return value, h, value, 1.0


def _log_mixture_into(x: Tensor, a: Tensor, b: Tensor, weight_a: float) -> None:
    """x = log(w a + (1 - w) b) - log(1 - w) = log(a w / (1 - w) + b): the offset is `_value_offset`."""
    torch.add(b, a, alpha=weight_a / (1.0 - weight_a), out=x).clamp_min_(_TINY).log_()


def _value_offset(spec: _Spec) -> float:
    """Per-row constant the kernels leave out of the value (the log(1 - w) of `_log_mixture_into`)."""
    if spec.kind == "jsd":
        return math.log(spec.beta)
    if spec.kind in ("skew_forward_kl", "skew_reverse_kl"):
        return math.log1p(-spec.alpha)
    return 0.0


def _finish(value: Tensor, spec: _Spec) -> Tensor:
    """Per-row value from the summed kernel terms: the offset, and JSD's cut at 0 (as the dense loss)."""
    offset = _value_offset(spec)
    if offset:
        value = value - offset
    return value.clamp_min_(0.0) if spec.kind == "jsd" else value


def _kernel_jsd(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, x: Tensor, spec: _Spec):
    beta = spec.beta
    # M = beta P + (1 - beta) Q; x = log M - log beta
    _log_mixture_into(x, q, p, 1.0 - beta)
    teacher = lp.sub_(x).mul_(p).sum(0)  # KL(P || M) + log beta
    h = lq.sub_(x).mul_(q)  # q (log q - log M) up to + q log beta, which cancels
    student = h.sum(0)  # KL(Q || M) + log beta
    return beta * teacher + (1.0 - beta) * student, h, student, 1.0 - beta


def _kernel_tvd(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, x: Tensor, spec: _Spec):
    diff = torch.sub(q, p, out=x)
    value = 0.5 * torch.linalg.vector_norm(diff, 1, dim=0)
    h = diff.sign_().mul_(q)  # q sign(q - p): d TVD / d q = sign(q - p) / 2
    return value, h, h.sum(0), 0.5


def _kernel_skew_forward_kl(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, x: Tensor, spec: _Spec):
    # M = alpha P + (1 - alpha) Q; x = log M - log(1 - alpha)
    _log_mixture_into(x, p, q, spec.alpha)
    a = lp.sub_(x)  # log P - log M + log(1 - alpha)
    value = torch.mul(p, a, out=x).sum(0)
    # q dL/dq = -(1 - alpha) P Q / M = -exp(a + log Q)
    h = a.add_(lq).exp_()
    return value, h, h.sum(0), -1.0


def _kernel_skew_reverse_kl(lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, x: Tensor, spec: _Spec):
    alpha = spec.alpha
    # M = alpha Q + (1 - alpha) P; x = log M - log(1 - alpha)
    _log_mixture_into(x, q, p, alpha)
    a = lq.sub_(x)  # log Q - log M + log(1 - alpha)
    value = torch.mul(q, a, out=lp).sum(0)
    # dL/dq = log(Q / M) - alpha Q / M (+ 1); with Q / M = exp(a) / (1 - alpha), constants dropped
    h = a.add_(torch.exp(a, out=x), alpha=-alpha / (1.0 - alpha)).mul_(q)
    return value, h, h.sum(0), 1.0


_KERNELS: dict[str, Callable] = {
    "forward_kl": _kernel_forward_kl,
    "reverse_kl": _kernel_reverse_kl,
    "jsd": _kernel_jsd,
    "tvd": _kernel_tvd,
    "skew_forward_kl": _kernel_skew_forward_kl,
    "skew_reverse_kl": _kernel_skew_reverse_kl,
}


# -------------------------------------------------------------------------------- pieces
def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_t: float) -> Tensor:
    """out (tile, rows) = (weight hidden^T + bias) / T, with the 1/T folded into the matmul."""
    if bias is None:
        return torch.addmm(out, weight, hidden.t(), beta=0.0, alpha=inv_t, out=out)
    out.copy_(bias[:, None].expand_as(out))
    return out.addmm_(weight, hidden.t(), beta=inv_t, alpha=inv_t)


def _log_softmax_(logits: Tensor, probs: Tensor) -> None:
    """Whole-vocabulary tile: logits become log-probabilities in place, probs their exp."""
    logits.sub_(logits.amax(0))
    z = torch.exp(logits, out=probs).sum(0)
    probs.div_(z)
    logits.sub_(z.log_())


def _online_lse(m: Tensor, z: Tensor, tile: Tensor) -> None:
    """Fold a (tile, rows) tile into a running (max, sum exp(x - max)) per token; clobbers the tile."""
    new_m = torch.maximum(m, tile.amax(0))
    safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)  # a token of -inf so far
    z.mul_(torch.exp(m - safe)).add_(tile.sub_(safe).exp_().sum(0))
    m.copy_(new_m)


def _lse(m: Tensor, z: Tensor) -> Tensor:
    return m + torch.log(z)


# -------------------------------------------------------------------------------- dense formulas
_DENSE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": dense.forward_kl,
    "reverse_kl": dense.reverse_kl,
    "jsd": dense.generalized_jsd,
    "tvd": dense.total_variation,
    "skew_forward_kl": dense.skew_forward_kl,
    "skew_reverse_kl": dense.skew_reverse_kl,
}


def _dense_function(spec: _Spec) -> Callable[..., Tensor]:
    fn = _DENSE_FUNCTIONS[spec.kind]
    if spec.kind == "jsd":
        return lambda s, t, **kw: fn(s, t, beta=spec.beta, **kw)
    if spec.kind.startswith("skew"):
        return lambda s, t, **kw: fn(s, t, alpha=spec.alpha, **kw)
    return fn

"""Distillation divergences fused with the output layer: the (tokens x vocabulary) logits never exist whole.

`fused_linear_divergence` takes the student's and the teacher's last hidden states and output-layer weights
and returns the divergence of softmax((h_t W_t^T + b_t) / T) and softmax((h_s W_s^T + b_s) / T), equal to the
dense losses of `distill.losses.divergences` applied to the full logits (`linear_divergence_reference` is that
dense path), without their memory: at a 128k vocabulary the dense path needs several float32 copies of
tokens x vocabulary.

How (see docs/fused_loss.md):

* Tokens are processed in chunks. For a chunk, both models' logits over the whole vocabulary are computed into
  preallocated buffers, the divergence and its gradient with respect to the student's logits are formed in
  place, and that gradient is immediately multiplied into d/d hidden (G W) and accumulated into d/d weight
  (G^T h). Forward and backward happen in the forward call, in one pass: 4 N H V multiply-adds, the matmul
  floor. The autograd backward only scales the stored gradients by the incoming gradient.
* With a vocabulary tile (``chunk_vocab`` < V, or a vocabulary too large for the memory budget) each chunk
  makes up to three passes over the tiles: an online log-sum-exp, then (except for forward KL and sparse
  targets) the per-token sums the gradient needs, then the gradient. Logits are recomputed per pass: up to
  8 N H V.
* Math runs in float32 (float64 inputs stay float64, for gradcheck). bf16 / fp16 weights are upcast once
  (one float32 copy of each weight) and the weight gradient is accumulated in float32.

Temperature: logits are divided by T and the value is *not* multiplied by T^2, like every divergence in
`distill.losses` (multiply by T^2 yourself for Hinton's scaling).

The teacher is a constant: no gradient reaches the teacher's tensors (as in Liger-Kernel and TRL). Logits must
be finite: biases with ``-inf`` (a masked vocabulary) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses import divergences as dense
from distill.losses.sparse import (
    LOG_TINY,
    TAILS,
    SparseTargets,
    bucket_log_probs,
    rows_for,
    teacher_bucket_logprobs,
)

# Public names -> canonical kernel names (the dense function names work too).
DIVERGENCES = {
    "forward_kl": "forward_kl",
    "reverse_kl": "reverse_kl",
    "jsd": "jsd",
    "generalized_jsd": "jsd",
    "tvd": "tvd",
    "total_variation": "tvd",
    "skew_forward_kl": "skew_forward_kl",
    "skew_reverse_kl": "skew_reverse_kl",
}
DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of chunk buffers (logits tiles), whatever N and V
_MIN_ROWS = 32  # below this many rows per chunk the matmuls lose efficiency: tile the vocabulary instead
_BUFFERS = {"dense": 5, "reverse_kl": 4, "sparse": 2}  # (rows x tile) buffers each chunk needs


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


class _Buffers:
    """Flat preallocated storage handed out as contiguous (width, rows) views."""

    def __init__(self, count: int, elements: int, dtype: torch.dtype, device: torch.device) -> None:
        self.flat = [torch.empty(elements, dtype=dtype, device=device) for _ in range(count)]

    def views(self, rows: int, width: int) -> list[Tensor]:
        return [b[: rows * width].view(width, rows) for b in self.flat]


def _online_lse(m: Tensor, z: Tensor, tile: Tensor) -> None:
    """Fold a (tile, rows) tile into a running (max, sum exp(x - max)) per token; clobbers the tile."""
    new_m = torch.maximum(m, tile.amax(0))
    safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)  # a token of -inf so far
    z.mul_(torch.exp(m - safe)).add_(tile.sub_(safe).exp_().sum(0))
    m.copy_(new_m)


def _lse(m: Tensor, z: Tensor) -> Tensor:
    return m + torch.log(z)


@dataclass
class _Grads:
    hidden: Tensor | None  # (n_counted, H) in compute dtype, rows in counted order
    weight: Tensor | None  # (V, H) accumulator, compute dtype
    bias: Tensor | None


class _Problem:
    """Inputs flattened to counted rows and upcast, with the gradient accumulators."""

    def __init__(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher: tuple[Tensor, Tensor, Tensor | None] | SparseTargets,
        mask: Tensor | None,
        need: tuple[bool, bool, bool],
    ) -> None:
        self.dtype = (
            torch.float64
            if student_hidden.dtype == torch.float64 or student_weight.dtype == torch.float64
            else torch.float32
        )
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        self.n_rows = hidden.shape[0]
        self.keep: Tensor | None = None
        self.index: Tensor | None = None
        if mask is not None:
            keep = mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)
            if not bool(keep.all()):
                self.keep = keep
                self.index = keep.nonzero().squeeze(1)
        self.hidden = hidden  # upcast chunk by chunk (the rows may be many)
        self.weight = student_weight.to(self.dtype)
        self.bias = student_bias.to(self.dtype) if student_bias is not None else None
        self.vocab = self.weight.shape[0]
        self.n = self.n_rows if self.index is None else int(self.index.numel())
        if isinstance(teacher, SparseTargets):
            self.targets: SparseTargets | None = rows_for(teacher, self.n_rows, self.keep)
            self.t_hidden = self.t_weight = self.t_bias = None
        else:
            self.targets = None
            t_hidden, t_weight, t_bias = teacher
            self.t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1])
            self.t_weight = t_weight.to(self.dtype)
            self.t_bias = t_bias.to(self.dtype) if t_bias is not None else None
        dev = self.weight.device
        self.grads = _Grads(
            torch.empty(self.n, hidden.shape[1], dtype=self.dtype, device=dev) if need[0] else None,
            torch.zeros(self.vocab, self.weight.shape[1], dtype=self.dtype, device=dev) if need[1] else None,
            torch.zeros(self.vocab, dtype=self.dtype, device=dev)
            if need[2] and student_bias is not None
            else None,
        )

    def rows(self, chunk: slice, hidden: Tensor) -> Tensor:
        part = hidden[chunk] if self.index is None else hidden.index_select(0, self.index[chunk])
        return part.to(self.dtype)

    @property
    def any_grad(self) -> bool:
        g = self.grads
        return g.hidden is not None or g.weight is not None or g.bias is not None


def _plan(problem: _Problem, spec: _Spec) -> tuple[int, int]:
    """(rows per chunk, vocabulary tile width) from the explicit sizes or the memory budget."""
    key = "sparse" if spec.sparse else ("reverse_kl" if spec.kind == "reverse_kl" else "dense")
    per_element = _BUFFERS[key] * torch.finfo(problem.dtype).bits // 8
    vocab = problem.vocab
    width = min(spec.chunk_vocab or vocab, vocab)
    if spec.chunk_tokens is not None:
        return max(1, min(spec.chunk_tokens, problem.n)), width
    rows = spec.memory_budget // (per_element * width)
    if rows < _MIN_ROWS and spec.chunk_vocab is None:  # the vocabulary is too wide for whole rows: tile it
        width = max(1, min(vocab, spec.memory_budget // (per_element * _MIN_ROWS)))
        rows = _MIN_ROWS
    if rows >= problem.n:
        return max(problem.n, 1), width
    return (rows - rows % 8 if rows >= 16 else max(rows, 1)), width


def _apply_grads(
    problem: _Problem, g: Tensor, hs: Tensor, chunk: slice, start: int, end: int, alpha: float, first: bool
) -> None:
    """Multiply one (tile, rows) gradient of the scaled logits into the hidden, weight and bias gradients."""
    grads = problem.grads
    if grads.hidden is not None:
        out = grads.hidden[chunk]
        torch.addmm(out, g.t(), problem.weight[start:end], beta=0.0 if first else 1.0, alpha=alpha, out=out)
    if grads.weight is not None:
        grads.weight[start:end].addmm_(g, hs, alpha=alpha)
    if grads.bias is not None:
        grads.bias[start:end].add_(g.sum(1), alpha=alpha)


# -------------------------------------------------------------------------------- dense teacher
def _dense_chunk_whole(problem: _Problem, spec: _Spec, bufs: _Buffers, chunk: slice, scale: float) -> Tensor:
    """One token chunk against the whole vocabulary in one pass; returns the per-row values."""
    hs = problem.rows(chunk, problem.hidden)
    ht = problem.rows(chunk, problem.t_hidden)
    n, vocab = hs.shape[0], problem.vocab
    views = bufs.views(n, vocab)
    lq, q, lp = views[:3]
    _log_softmax_(_logits_into(lq, hs, problem.weight, problem.bias, spec.inv_t), q)
    _logits_into(lp, ht, problem.t_weight, problem.t_bias, spec.inv_t)
    p, x = views[3], (views[4] if len(views) > 4 else None)  # reverse KL needs no x
    _log_softmax_(lp, p)
    value, h, h_sum, factor = _KERNELS[spec.kind](lq, q, lp, p, x, spec)
    value = _finish(value, spec)
    if problem.any_grad:
        if h_sum is not None:
            h.addcmul_(q, h_sum, value=-1.0)
        _apply_grads(problem, h, hs, chunk, 0, vocab, factor * scale * spec.inv_t, True)
    return value


def _dense_chunk_tiled(
    problem: _Problem, spec: _Spec, bufs: _Buffers, chunk: slice, scale: float, width: int
) -> Tensor:
    """One token chunk, vocabulary in tiles: online log-sum-exp, per-row sums, then the gradient."""
    hs = problem.rows(chunk, problem.hidden)
    ht = problem.rows(chunk, problem.t_hidden)
    n, vocab = hs.shape[0], problem.vocab
    tiles = [(a, min(a + width, vocab)) for a in range(0, vocab, width)]
    stats = [hs.new_full((n,), -math.inf), hs.new_zeros(n), hs.new_full((n,), -math.inf), hs.new_zeros(n)]

    def tile_logits(a: int, b: int) -> list[Tensor]:
        views = bufs.views(n, b - a)
        s_bias = problem.bias[a:b] if problem.bias is not None else None
        t_bias = problem.t_bias[a:b] if problem.t_bias is not None else None
        _logits_into(views[0], hs, problem.weight[a:b], s_bias, spec.inv_t)
        _logits_into(views[2], ht, problem.t_weight[a:b], t_bias, spec.inv_t)
        return views

    for a, b in tiles:
        views = tile_logits(a, b)
        _online_lse(stats[0], stats[1], views[0])
        _online_lse(stats[2], stats[3], views[2])
    lse_s, lse_t = _lse(stats[0], stats[1]), _lse(stats[2], stats[3])

    def tile_terms(a: int, b: int):
        views = tile_logits(a, b)
        lq, q, lp = views[:3]
        torch.exp(lq.sub_(lse_s), out=q)
        lp.sub_(lse_t)
        p, x = (None, None) if spec.kind == "reverse_kl" else (torch.exp(lp, out=views[3]), views[4])
        return q, _KERNELS[spec.kind](lq, q, lp, p, x, spec)

    value = hs.new_zeros(n)
    h_sum = None
    if spec.kind != "forward_kl":  # forward KL's gradient Q - P needs no per-row sum
        h_sum = hs.new_zeros(n)
        for a, b in tiles:
            _, (v, _, hs_tile, _) = tile_terms(a, b)
            value += v
            h_sum += hs_tile
        value = _finish(value, spec)
        if not problem.any_grad:
            return value
    for i, (a, b) in enumerate(tiles):
        q, (v, h, _, factor) = tile_terms(a, b)
        if h_sum is None:
            value += v
        if problem.any_grad:
            if h_sum is not None:
                h.addcmul_(q, h_sum, value=-1.0)
            _apply_grads(problem, h, hs, chunk, a, b, factor * scale * spec.inv_t, i == 0)
    return value if h_sum is not None else _finish(value, spec)


# -------------------------------------------------------------------------------- sparse teacher
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


def _sparse_chunk(
    problem: _Problem, spec: _Spec, bufs: _Buffers, chunk: slice, scale: float, width: int
) -> Tensor:
    """One token chunk against top-k targets: the divergence of the k + 1 buckets (see `sparse`).

    With u the student's bucket log-masses and w = dL/du (from autograd on the small (rows, k + 1) problem),
    dL/ds_j = w_i - q_j W for j = ids_i and (q_j / Q_tail)(w_tail - Q_tail W) elsewhere, W = sum_b w_b.
    """
    targets = problem.targets
    assert targets is not None
    hs = problem.rows(chunk, problem.hidden)
    n, vocab = hs.shape[0], problem.vocab
    ids = targets.ids[chunk].to(device=hs.device, dtype=torch.long)
    k = ids.shape[1]
    tiles = [(a, min(a + width, vocab)) for a in range(0, vocab, width)]
    whole = len(tiles) == 1
    ids_t = ids.t()  # (k, rows), to gather / scatter along the vocabulary dim of a whole tile

    def tile_logits(a: int, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The (tile, rows) logits, a spare buffer, and (row, slot) of the ids inside the tile."""
        s_raw, r = bufs.views(n, b - a)
        bias = problem.bias[a:b] if problem.bias is not None else None
        _logits_into(s_raw, hs, problem.weight[a:b], bias, spec.inv_t)
        rows, slots = ((ids >= a) & (ids < b)).nonzero(as_tuple=True)
        return s_raw, r, rows, slots

    # pass 1: the student's logits on the ids, and the log-sum-exp over the rest
    s_ids = hs.new_empty(n, k)
    m, z = hs.new_full((n,), -math.inf), hs.new_zeros(n)
    for a, b in tiles:
        if whole:  # keep exp(s - max) with the ids at 0: it becomes the gradient below
            s_raw, r = bufs.views(n, vocab)
            _logits_into(s_raw, hs, problem.weight, problem.bias, spec.inv_t)
            s_ids.copy_(s_raw.gather(0, ids_t).t())
            s_raw.scatter_(0, ids_t, -math.inf)
            m = s_raw.amax(0)
            z = torch.sub(s_raw, torch.where(torch.isinf(m), 0.0, m), out=r).exp_().sum(0)
        else:
            s_raw, r, rows, slots = tile_logits(a, b)
            cols = ids[rows, slots] - a
            s_ids[rows, slots] = s_raw[cols, rows]
            s_raw[cols, rows] = -math.inf
            _online_lse(m, z, s_raw)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    lse_tail = m_safe + torch.log(z)  # -inf when the ids cover the vocabulary
    lse_all = torch.logaddexp(lse_tail, torch.logsumexp(s_ids, dim=1))
    u = torch.cat([s_ids - lse_all[:, None], (lse_tail - lse_all)[:, None]], dim=1)
    teacher = teacher_bucket_logprobs(targets.select(chunk), spec.tail, problem.dtype).to(u.device)
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(problem.any_grad)
        student = torch.cat([leaf[:, :k], leaf[:, k:].clamp_min(LOG_TINY)], dim=1)
        total = _dense_function(spec)(student, teacher, reduction="none")
        if problem.any_grad:
            (w,) = torch.autograd.grad(total.sum(), leaf)
    value = total.detach()
    if not problem.any_grad:
        return value
    w_sum = w.sum(1)
    tail_coef = w[:, k] - u[:, k].exp() * w_sum  # times q_j / Q_tail on the non-ids
    head = w[:, :k] - u[:, :k].exp() * w_sum[:, None]
    alpha = scale * spec.inv_t
    if whole:
        g = r.mul_(tail_coef / torch.where(z > 0, z, 1.0))
        g.scatter_(0, ids_t, head.t())
        _apply_grads(problem, g, hs, chunk, 0, vocab, alpha, True)
        return value
    lse_tail_safe = torch.where(torch.isinf(lse_tail), 0.0, lse_tail)
    for i, (a, b) in enumerate(tiles):
        s_raw, r, rows, slots = tile_logits(a, b)
        cols = ids[rows, slots] - a
        s_raw[cols, rows] = -math.inf
        g = torch.sub(s_raw, lse_tail_safe, out=r).exp_().mul_(tail_coef)
        g[cols, rows] = head[rows, slots]
        _apply_grads(problem, g, hs, chunk, a, b, alpha, i == 0)
    return value


# -------------------------------------------------------------------------------- driver
def _run(problem: _Problem, spec: _Spec) -> Tensor:
    """Loss value (0-dim) and, in ``problem.grads``, the gradients of that value."""
    total = torch.zeros((), dtype=torch.float64)
    scale = 1.0 / max(problem.n, 1) if spec.reduction == "mean" else 1.0
    if problem.n > 0 and spec.kind != "zero":
        rows, width = _plan(problem, spec)
        key = "sparse" if spec.sparse else ("reverse_kl" if spec.kind == "reverse_kl" else "dense")
        bufs = _Buffers(_BUFFERS[key], rows * width, problem.dtype, problem.weight.device)
        for start in range(0, problem.n, rows):
            chunk = slice(start, min(start + rows, problem.n))
            if spec.sparse:
                value = _sparse_chunk(problem, spec, bufs, chunk, scale, width)
            elif width >= problem.vocab:
                value = _dense_chunk_whole(problem, spec, bufs, chunk, scale)
            else:
                value = _dense_chunk_tiled(problem, spec, bufs, chunk, scale, width)
            total += value.sum(dtype=torch.float64)
        del bufs
    elif problem.grads.hidden is not None:
        problem.grads.hidden.zero_()
    return (total * scale).to(problem.dtype)


def _forward_and_grads(student_hidden, student_weight, student_bias, teacher, mask, spec, need):
    """The loss and its gradients (compute dtype, the hidden one in the hidden's full shape)."""
    problem = _Problem(student_hidden, student_weight, student_bias, teacher, mask, need)
    loss = _run(problem, spec)
    grads = problem.grads
    grad_hidden = grads.hidden
    if grad_hidden is not None and problem.index is not None:  # back to every row, masked ones at 0
        grad_hidden = grad_hidden.new_zeros(problem.n_rows, grad_hidden.shape[1])
        grad_hidden.index_copy_(0, problem.index, grads.hidden)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(student_hidden.shape)
    return loss, [grad_hidden, grads.weight, grads.bias]


class _FusedLinearDivergence(torch.autograd.Function):
    """Forward computes the value and every gradient; backward scales them by the incoming gradient.

    The gradients are handed to autograd on the first backward and not kept: holding a reference would make
    autograd copy them into ``.grad`` (one more weight-sized tensor). A second backward through the same graph
    (``retain_graph``, gradcheck) recomputes them.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher, mask, spec):  # type: ignore[override]
        ctx.need = tuple(ctx.needs_input_grad[:3])
        loss, ctx.grads = _forward_and_grads(
            student_hidden, student_weight, student_bias, teacher, mask, spec, ctx.need
        )
        ctx.save_for_backward(student_hidden, student_weight, student_bias)
        ctx.teacher, ctx.mask, ctx.spec = teacher, mask, spec
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        inputs = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            grads = _forward_and_grads(*inputs, ctx.teacher, ctx.mask, ctx.spec, ctx.need)[1]
        out = []
        for grad, leaf in zip(grads, inputs, strict=True):
            if grad is not None:
                if bool(grad_output != 1):  # scaled before rounding to a bf16 / fp16 input's dtype
                    grad.mul_(grad_output.to(grad.dtype))
                grad = grad.to(leaf.dtype)
            out.append(grad)
        return out[0], out[1], out[2], None, None, None


def _resolve(divergence: str, beta: float, alpha: float) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    kind = DIVERGENCES[divergence]
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL's convention: the ends are the two KLs
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        if alpha == 0.0:
            return kind.removeprefix("skew_")
        if alpha == 1.0:
            return "zero"
    return kind


def _check(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | SparseTargets,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    mask: Tensor | None,
) -> None:
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and weight {tuple(student_weight.shape)} do not "
            "fit: the weight must be (V, H) with H the hidden size"
        )
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"student bias must be ({vocab},), got {tuple(student_bias.shape)}")
    if mask is not None and mask.shape != lead:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the hidden's leading shape {tuple(lead)}"
        )
    for bias in (student_bias, teacher_bias):
        if bias is not None and not bool(torch.isfinite(bias).all()):
            raise ValueError(
                "biases must be finite (a -inf vocabulary mask is not supported by the fused path)"
            )
    if isinstance(teacher_hidden, SparseTargets):
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("with SparseTargets as the teacher, give no teacher weight or bias")
        if bool((teacher_hidden.ids < 0).any()) or bool((teacher_hidden.ids >= vocab).any()):
            raise ValueError(f"target ids must lie in [0, {vocab})")
        return
    if teacher_weight is None:
        raise ValueError("a dense teacher needs teacher_weight (or pass SparseTargets as the teacher)")
    if teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher weight must be ({vocab}, H_t), got {tuple(teacher_weight.shape)}")
    if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher hidden {tuple(teacher_hidden.shape)} does not fit the student's leading shape "
            f"{tuple(lead)} and the teacher weight {tuple(teacher_weight.shape)}"
        )
    if teacher_bias is not None and teacher_bias.shape != (vocab,):
        raise ValueError(f"teacher bias must be ({vocab},), got {tuple(teacher_bias.shape)}")


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | SparseTargets,
    teacher_weight: Tensor | None = None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tail: str = "bucket",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Divergence between teacher and student next-token distributions, from hidden states and output layers.

    Equals ``dense_fn(h_s W_s^T + b_s, h_t W_t^T + b_t, mask=mask, temperature=T, ...)`` for the dense
    divergence ``divergence`` of `distill.losses` (see `linear_divergence_reference`), without building the
    logits. Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher is a
    constant.

    Args:
        student_hidden: ``(N, H)`` or ``(B, T, H)``.
        student_weight: ``(V, H)``, the student's output layer (as ``nn.Linear.weight``).
        teacher_hidden: ``(..., H_t)`` with the student's leading shape, or `SparseTargets` (then no teacher
            weight or bias): the teacher's top-k, one row per hidden row or one per counted row.
        teacher_weight: ``(V, H_t)``.
        divergence: ``"forward_kl"`` KL(P || Q), ``"reverse_kl"`` KL(Q || P),
            ``"jsd"`` (``"generalized_jsd"``) TRL's generalised JSD(beta) with JSD_0 = forward and
            JSD_1 = reverse KL, ``"tvd"`` (``"total_variation"``), ``"skew_forward_kl"`` /
            ``"skew_reverse_kl"`` (DistiLLM, ``alpha``).
            P is the teacher, Q the student, both softmax(logits / T).
        beta: JSD's weight: M = beta P + (1 - beta) Q (TRL's and Liger's convention).
        alpha: the skew KLs' mixing weight, KL(P || alpha P + (1 - alpha) Q) and mirrored.
        temperature: divides both logits; the value is not multiplied by T^2.
        mask: boolean over the leading shape, True = the row counts.
        tail: with `SparseTargets`: ``"bucket"`` (any divergence over the k + 1 buckets) or
            ``"renormalize"`` (forward KL only); see `distill.losses.sparse` for both and their bias.
        reduction: ``"mean"`` over counted rows (0 when none counts) or ``"sum"``.
        chunk_tokens, chunk_vocab: rows per chunk and vocabulary tile width. By default both come from
            ``memory_budget`` (bytes for the chunk buffers): whole-vocabulary rows (one pass, 4 N H V
            multiply-adds) unless fewer than 32 rows would fit, then vocabulary tiles. ``chunk_tokens``
            alone keeps whole-vocabulary rows.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).
    """
    kind = _resolve(divergence, beta, alpha)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum' (gradients are reduced on the fly), got {reduction!r}"
        )
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    sparse = isinstance(teacher_hidden, SparseTargets)
    if sparse and tail == "renormalize" and kind != "forward_kl":
        raise ValueError("tail='renormalize' supports the forward KL only (the teacher's tail is 0)")
    for name, size in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    _check(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask)
    spec = _Spec(
        kind, float(beta), float(alpha), 1.0 / float(temperature), tail, sparse, reduction,
        int(memory_budget), chunk_tokens, chunk_vocab,
    )  # fmt: skip
    teacher: tuple[Tensor, Tensor, Tensor | None] | SparseTargets = teacher_hidden  # type: ignore[assignment]
    if not sparse:
        assert teacher_weight is not None
        t_bias = teacher_bias.detach() if teacher_bias is not None else None
        teacher = (teacher_hidden.detach(), teacher_weight.detach(), t_bias)  # type: ignore[union-attr]
    tracked = [t for t in (student_hidden, student_weight, student_bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        with torch.no_grad():
            problem = _Problem(
                student_hidden, student_weight, student_bias, teacher, mask, (False, False, False)
            )
            return _run(problem, spec)
    return _FusedLinearDivergence.apply(student_hidden, student_weight, student_bias, teacher, mask, spec)


def linear_divergence_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | SparseTargets,
    teacher_weight: Tensor | None = None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tail: str = "bucket",
    reduction: str = "mean",
) -> Tensor:
    """The dense path `fused_linear_divergence` must equal: full logits, then the dense divergence.

    Logits are computed in the compute dtype (float32, float64 for float64 inputs), so bf16 inputs are
    compared at float32 accumulation. Needs several (N, V) tensors: for tests and benchmarks.
    """
    kind = _resolve(divergence, beta, alpha)
    sparse = isinstance(teacher_hidden, SparseTargets)
    if sparse and tail == "renormalize" and kind != "forward_kl":
        raise ValueError("tail='renormalize' supports the forward KL only (the teacher's tail is 0)")
    dtype = (
        torch.float64
        if student_hidden.dtype == torch.float64 or student_weight.dtype == torch.float64
        else torch.float32
    )
    bias = student_bias.to(dtype) if student_bias is not None else None
    student = torch.nn.functional.linear(student_hidden.to(dtype), student_weight.to(dtype), bias)
    if kind == "zero":
        return (student.sum() * 0).to(dtype)
    spec = _Spec(kind, float(beta), float(alpha), 1.0 / temperature, tail, sparse, reduction, 0, None, None)
    fn = _dense_function(spec)
    if sparse:
        s_buckets, t_buckets = bucket_log_probs(
            student, teacher_hidden, temperature=temperature, mask=mask, tail=tail
        )
        return fn(s_buckets, t_buckets, reduction=reduction)
    assert teacher_weight is not None
    t_bias = teacher_bias.to(dtype) if teacher_bias is not None else None
    with torch.no_grad():
        teacher = torch.nn.functional.linear(teacher_hidden.to(dtype), teacher_weight.to(dtype), t_bias)
    return fn(student, teacher, mask=mask, temperature=temperature, reduction=reduction)

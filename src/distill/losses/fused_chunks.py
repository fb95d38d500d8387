"""The chunked computation behind `fused_linear_divergence`: value and gradients in one forward pass.

`_Problem` flattens the inputs to the counted rows, upcasts them and holds the gradient accumulators; `_plan`
sizes the token chunks and vocabulary tiles from the memory budget; `_run` walks the chunks. A chunk against a
dense teacher is one pass over the whole vocabulary (`_dense_chunk_whole`) or up to three passes over
vocabulary tiles (`_dense_chunk_tiled`: online log-sum-exp, per-token sums, gradient); against `SparseTargets`
(`_sparse_chunk`) it is the divergence of the k + 1 buckets of `distill.losses.sparse`. Each chunk's gradient
with respect to the student's logits is multiplied at once into the hidden, weight and bias gradients
(`_apply_grads`). The per-divergence maths is in `distill.losses.fused_kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses._common import compute_dtype
from distill.losses.fused_kernels import (
    _KERNELS,
    _dense_function,
    _finish,
    _log_softmax_,
    _logits_into,
    _lse,
    _online_lse,
    _Spec,
)
from distill.losses.sparse import LOG_TINY, SparseTargets, rows_for, teacher_bucket_logprobs

_MIN_ROWS = 32  # below this many rows per chunk the matmuls lose efficiency: tile the vocabulary instead
_BUFFERS = {"dense": 5, "reverse_kl": 4, "sparse": 2}  # (rows x tile) buffers each chunk needs


def _buffer_count(spec: _Spec) -> int:
    """How many (rows x tile) buffers a chunk of this divergence needs."""
    return _BUFFERS["sparse" if spec.sparse else ("reverse_kl" if spec.kind == "reverse_kl" else "dense")]


class _Buffers:
    """Flat preallocated storage handed out as contiguous (width, rows) views."""

    def __init__(self, count: int, elements: int, dtype: torch.dtype, device: torch.device) -> None:
        self.flat = [torch.empty(elements, dtype=dtype, device=device) for _ in range(count)]

    def views(self, rows: int, width: int) -> list[Tensor]:
        return [b[: rows * width].view(width, rows) for b in self.flat]


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
        self.dtype = compute_dtype(student_hidden, student_weight)
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
    per_element = _buffer_count(spec) * torch.finfo(problem.dtype).bits // 8
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
        bufs = _Buffers(_buffer_count(spec), rows * width, problem.dtype, problem.weight.device)
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

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

Modules: the per-divergence tile maths is in `distill.losses.fused_kernels`, the chunking in
`distill.losses.fused_chunks`; this one holds the argument checks, the autograd glue and the reference.

The teacher is a constant: no gradient reaches the teacher's tensors (as in Liger-Kernel and TRL). Logits must
be finite: biases with ``-inf`` (a masked vocabulary) are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import compute_dtype
from distill.losses.fused_chunks import _Problem, _run
from distill.losses.fused_kernels import _dense_function, _Spec
from distill.losses.sparse import TAILS, SparseTargets, bucket_log_probs

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


def _check_tail(kind: str, sparse: bool, tail: str) -> None:
    if sparse and tail == "renormalize" and kind != "forward_kl":
        raise ValueError("tail='renormalize' supports the forward KL only (the teacher's tail is 0)")


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
    _check_tail(kind, sparse, tail)
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
    _check_tail(kind, sparse, tail)
    dtype = compute_dtype(student_hidden, student_weight)
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

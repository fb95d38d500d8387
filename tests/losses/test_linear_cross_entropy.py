"""`linear_cross_entropy` against the dense float64 cross-entropy of the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.linear_cross_entropy import linear_cross_entropy


def _problem(n: int = 24, vocab: int = 37, hidden: int = 8, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n // 2, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (2, n // 2), generator=g)
    labels[0, :3] = -100  # ignored rows
    mask = torch.rand(2, n // 2, generator=g) > 0.2
    return h, w, b, labels, mask


def _reference(h, w, b, labels, mask, label_smoothing):
    kept = torch.where(mask, labels, torch.full_like(labels, -100)).flatten()
    logits = F.linear(h, w, b).flatten(0, -2)
    return F.cross_entropy(logits, kept, ignore_index=-100, label_smoothing=label_smoothing)


def _grads(value, tensors):
    return torch.autograd.grad(value, [t for t in tensors if t is not None])


@settings(max_examples=25, deadline=None)
@given(
    chunk=st.integers(1, 30),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_equals_the_dense_cross_entropy_in_value_and_gradients(chunk, label_smoothing, bias, seed) -> None:
    h, w, b, labels, mask = _problem(seed=seed, bias=bias)
    ours = linear_cross_entropy(
        h, w, labels, bias=b, mask=mask, label_smoothing=label_smoothing, chunk_tokens=chunk
    )
    ref = _reference(h, w, b, labels, mask, label_smoothing)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-10)
    for mine, theirs in zip(_grads(ours, (h, w, b)), _grads(ref, (h, w, b)), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)


def test_gradcheck() -> None:
    h, w, b, labels, mask = _problem(n=8, vocab=5, hidden=3)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, mask=mask, chunk_tokens=3), (h, w, b)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype) -> None:
    h, w, _, labels, mask = _problem()
    h_low = h.detach().to(dtype).requires_grad_()
    w_low = w.detach().to(dtype).requires_grad_()
    ours = linear_cross_entropy(h_low, w_low, labels, mask=mask)
    ref = _reference(h_low.double(), w_low.double(), None, labels, mask, 0.0)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5)
    ours.backward()
    assert h_low.grad.dtype == dtype and w_low.grad.dtype == dtype
    assert torch.isfinite(h_low.grad.float()).all() and torch.isfinite(w_low.grad.float()).all()


def test_no_counted_row_gives_zero_and_shapes_are_checked() -> None:
    h, w, b, labels, _ = _problem()
    none = torch.zeros_like(labels, dtype=torch.bool)
    assert linear_cross_entropy(h, w, labels, bias=b, mask=none).item() == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w.T, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, labels, label_smoothing=1.0)

"""Sparse top-k teacher targets: `SparseTargets`, `topk_targets` and the dense `sparse_forward_kl` (both tail
treatments), against float64 maths written out here; their limits (k = V) and their bias."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.losses as L
from distill.losses.sparse import LOG_TINY, bucket_log_probs


def _logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _reference(
    student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float, tail: str
) -> torch.Tensor:
    """Per-row KL written out row by row in float64 from the dense logits."""
    out = []
    for s, t in zip(student.double(), teacher.double(), strict=True):
        p = torch.softmax(t / temperature, -1)
        q = torch.softmax(s / temperature, -1)
        ids = p.argsort(descending=True)[:k]
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[ids] = False
        if tail == "bucket":
            pb = torch.cat([p[ids], p[rest].sum()[None]])
            qb = torch.cat([q[ids], q[rest].sum()[None]])
        else:
            pb, qb = p[ids] / p[ids].sum(), q[ids]
        keep = pb > 0
        out.append((pb[keep] * (pb[keep].log() - qb[keep].log())).sum())
    return torch.stack(out)


def test_sparse_targets_is_a_small_frozen_record() -> None:
    targets = L.SparseTargets(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2), torch.zeros(3))
    assert targets.k == 2 and len(targets) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets.ids = torch.zeros(3, 2)  # type: ignore[misc]
    with pytest.raises(ValueError, match="both be"):
        L.SparseTargets(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="tail_logmass"):
        L.SparseTargets(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="integer"):
        L.SparseTargets(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_targets(temperature: float) -> None:
    logits = _logits(2, 3, 20, seed=1)
    targets = L.topk_targets(logits, 6, temperature)
    log_p = torch.log_softmax(logits.reshape(6, 20) / temperature, -1)
    assert targets.ids.shape == (6, 6)
    torch.testing.assert_close(targets.logprobs, log_p.gather(-1, targets.ids))
    assert bool((targets.logprobs[:, :1] >= log_p.max(-1, keepdim=True).values).all())  # the largest first
    torch.testing.assert_close(targets.tail_logmass, torch.log1p(-targets.logprobs.exp().sum(-1)))


def test_topk_targets_tail_is_finite_and_exact_when_tiny() -> None:
    logits = torch.tensor([[60.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0]])
    targets = L.topk_targets(logits, 1)
    # 1 - p_top rounds to 0 in float32; the log-sum-exp of the rest does not
    want = torch.logsumexp(torch.log_softmax(logits.double(), -1)[0, 1:], -1)
    torch.testing.assert_close(targets.tail_logmass[0].double(), want)
    full = L.topk_targets(logits, 4)  # k = V: no tail, floored to stay finite
    assert bool((full.tail_logmass == LOG_TINY).all())


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_forward_kl_matches_written_out_reference(tail: str, temperature: float) -> None:
    student, teacher = _logits(7, 30, seed=2), _logits(7, 30, seed=3)
    targets = L.topk_targets(teacher, 5, temperature)
    got = L.sparse_forward_kl(student, targets, temperature=temperature, tail=tail, reduction="none")
    torch.testing.assert_close(got, _reference(student, teacher, 5, temperature, tail))
    mean = L.sparse_forward_kl(student, targets, temperature=temperature, tail=tail)
    torch.testing.assert_close(mean, got.mean())


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_vocabulary_is_the_dense_forward_kl(tail: str) -> None:
    student, teacher = _logits(5, 12, seed=4), _logits(5, 12, seed=5)
    targets = L.topk_targets(teacher, 12, 2.0)
    got = L.sparse_forward_kl(student, targets, temperature=2.0, tail=tail, reduction="none")
    torch.testing.assert_close(got, L.forward_kl(student, teacher, temperature=2.0, reduction="none"))


def test_masks_and_target_rows() -> None:
    student, teacher = _logits(2, 5, 16, seed=6), _logits(2, 5, 16, seed=7)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    every, counted = L.topk_targets(teacher, 4), L.topk_targets(teacher[mask], 4)
    a = L.sparse_forward_kl(student, every, mask=mask, reduction="none")
    b = L.sparse_forward_kl(student, counted, mask=mask, reduction="none")
    torch.testing.assert_close(a, b)
    assert bool((a[~mask] == 0).all())
    torch.testing.assert_close(L.sparse_forward_kl(student, counted, mask=mask), a[mask].mean())
    with pytest.raises(ValueError, match="target rows"):
        L.sparse_forward_kl(student, counted.select(slice(0, 1)), mask=mask)


def test_cached_targets_with_empty_slots_and_no_tail() -> None:
    """A cache's tail draws: unused slots at -inf, no tail left (-inf): finite values and gradients."""
    student = _logits(3, 10, seed=8, dtype=torch.float32).requires_grad_()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]] * 3)
    targets = L.SparseTargets(ids, logprobs, torch.full((3,), -math.inf))
    for tail in ("bucket", "renormalize"):
        loss = L.sparse_forward_kl(student, targets, tail=tail)
        (grad,) = torch.autograd.grad(loss, student)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


def test_tail_treatments_and_their_bias() -> None:
    student, teacher = _logits(6, 40, seed=9), _logits(6, 40, seed=10, scale=1.0)  # a flat teacher
    student.requires_grad_()
    targets = L.topk_targets(teacher, 4)
    dense = L.forward_kl(student, teacher, reduction="none")
    bucket = L.sparse_forward_kl(student, targets, reduction="none")
    assert bool((bucket <= dense + 1e-12).all())  # coarse-graining: a lower bound of the full KL
    # renormalize treats the teacher's tail as impossible: its gradient raises every tail logit's loss
    (grad,) = torch.autograd.grad(L.sparse_forward_kl(student, targets, tail="renormalize"), student)
    tail = torch.ones_like(grad, dtype=torch.bool).scatter(-1, targets.ids, False)
    assert bool((grad[tail] > 0).all())
    # the bucket gradient moves the tail mass towards the teacher's: its sign is that of (Q_tail - r)
    (grad,) = torch.autograd.grad(L.sparse_forward_kl(student, targets), student)
    s_buckets, _ = bucket_log_probs(student.detach(), targets)
    excess = s_buckets[:, -1].exp() - targets.tail_logmass.exp()
    row_sign = torch.where(tail, grad, 0.0).sum(-1).sign()
    assert bool((row_sign == excess.sign()).all())


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(2, 30),
    k=st.integers(1, 30),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 10_000),
)
def test_property_bucket_between_zero_and_dense(rows, vocab, k, temperature, scale, seed) -> None:
    k = min(k, vocab)
    student, teacher = (
        _logits(rows, vocab, seed=seed, scale=scale),
        _logits(rows, vocab, seed=seed + 1, scale=scale),
    )
    targets = L.topk_targets(teacher, k, temperature)
    bucket = L.sparse_forward_kl(student, targets, temperature=temperature, reduction="none")
    dense = L.forward_kl(student, teacher, temperature=temperature, reduction="none")
    assert bool(torch.isfinite(bucket).all())
    assert bool((bucket >= -1e-12).all()) and bool((bucket <= dense + 1e-9).all())
    same = L.sparse_forward_kl(
        student, targets, temperature=temperature, reduction="none", tail="renormalize"
    )
    assert bool((same >= -1e-12).all())

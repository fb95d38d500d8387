"""`fused_linear_divergence` against the dense path (full logits, then the dense divergence): values and
gradients for every divergence, temperatures, masks, biases, bf16, large logits, vocabulary tiles, sparse
top-k teachers; float64 references, gradcheck, and the Liger / TRL fused losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.losses as L
from distill.losses.fused_chunks import _plan, _Problem
from distill.losses.fused_kernels import _Spec

# (divergence, extra kwargs): every kernel, and the ends where a divergence becomes another one
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("skew_forward_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.0}),
]
IDS = [f"{d}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for d, kw in CASES]


def _problem(n=23, h=12, ht=9, v=50, *, seed=0, dtype=torch.float32, scale=1.0, lead=None):
    """Student (hidden, weight, bias) leaves and a teacher (hidden, weight, bias); logits' std ~ 2 scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    shape = (n,) if lead is None else lead
    hs = rnd(*shape, h).requires_grad_()
    ws = rnd(v, h, s=2 * scale / math.sqrt(h)).requires_grad_()
    bs = rnd(v, s=0.5).requires_grad_()
    teacher = (rnd(*shape, ht), rnd(v, ht, s=2 * scale / math.sqrt(ht)), rnd(v, s=0.5))
    return (hs, ws, bs), teacher


def _mask(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.3
    m.view(-1)[0] = True
    return m


def _value_and_grads(fn, student, teacher, **kw):
    hs, ws, bs = student
    for t in student:
        t.grad = None
    value = fn(hs, ws, *teacher[:2], student_bias=bs, teacher_bias=teacher[2], **kw)
    (1.7 * value).backward()  # a grad_output other than 1
    return value.detach(), hs.grad.clone(), ws.grad.clone(), bs.grad.clone()


def _assert_all_close(got, want, rtol, atol):
    names = ("value", "d hidden", "d weight", "d bias")[-len(got) :]
    for g, w, name in zip(got, want, names, strict=True):
        torch.testing.assert_close(g.to(w.dtype), w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("chunks", [{}, {"chunk_tokens": 5}, {"chunk_tokens": 7, "chunk_vocab": 16}])
@pytest.mark.parametrize(("divergence", "extra"), CASES, ids=IDS)
def test_matches_dense_path(divergence: str, extra: dict, chunks: dict) -> None:
    student, teacher = _problem()
    kw = dict(divergence=divergence, temperature=2.0, mask=_mask(23), **extra)
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, **chunks)
    want = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    _assert_all_close(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(("divergence", "extra"), CASES, ids=IDS)
def test_float32_matches_float64_reference(divergence: str, extra: dict) -> None:
    """The goal: values to 1e-5 relative, gradients allclose at 1e-4, against dense float64 maths."""
    student, teacher = _problem(n=40, v=300, seed=3)
    kw = dict(divergence=divergence, temperature=0.7, mask=_mask(40, seed=4), **extra)
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, chunk_tokens=16)
    student64 = tuple(t.detach().double().requires_grad_() for t in student)
    teacher64 = tuple(t.double() for t in teacher)
    want = _value_and_grads(L.linear_divergence_reference, student64, teacher64, **kw)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-7)
    _assert_all_close(got[1:], want[1:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl"])
def test_gradcheck_float64(divergence: str) -> None:
    (hs, ws, bs), (ht, wt, bt) = _problem(n=6, h=4, ht=3, v=11, seed=5, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True, False])

    def f(hs, ws, bs):
        return L.fused_linear_divergence(
            hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence=divergence, temperature=1.5,
            mask=mask, chunk_tokens=3, chunk_vocab=4,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (hs, ws, bs))


def test_bf16_inputs_accumulate_in_float32() -> None:
    """bf16 in: the same float32 maths as on the upcast inputs, gradients cast back to bf16 at the end."""
    student, teacher = _problem(n=64, v=120, dtype=torch.bfloat16, seed=6)
    kw = dict(divergence="jsd", temperature=2.0, mask=_mask(64), chunk_tokens=16)
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in got[1:])
    student32 = tuple(t.detach().float().requires_grad_() for t in student)
    teacher32 = tuple(t.float() for t in teacher)
    exact = _value_and_grads(L.fused_linear_divergence, student32, teacher32, **kw)
    torch.testing.assert_close(got[0], exact[0], rtol=0, atol=0)
    for g, e in zip(got[1:], exact[1:], strict=True):
        torch.testing.assert_close(g, e.to(torch.bfloat16), rtol=0, atol=0)
    # and the dense path on the bf16 leaves (it upcasts the same way)
    kw.pop("chunk_tokens")
    want = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    want = (want[0],) + tuple(w.float() for w in want[1:])
    _assert_all_close((got[0],) + tuple(g.float() for g in got[1:]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_reverse_kl"])
def test_large_logits_stay_finite_and_exact(divergence: str) -> None:
    """Logits in the thousands (most probabilities underflow to 0): no NaN, and float64's answer."""
    student, teacher = _problem(n=16, v=200, scale=400.0, seed=7)
    kw = dict(divergence=divergence, mask=_mask(16))
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, chunk_tokens=5, chunk_vocab=64)
    assert all(bool(torch.isfinite(g).all()) for g in got)
    dense32 = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    student64 = tuple(t.detach().double().requires_grad_() for t in student)
    teacher64 = tuple(t.double() for t in teacher)
    want = _value_and_grads(L.linear_divergence_reference, student64, teacher64, **kw)
    # float32 logits of magnitude ~1e3 carry ~1e-4 absolute rounding: ask for the dense float32 accuracy
    for g, d, w in zip(got, dense32, want, strict=True):
        err, dense_err = (g.double() - w).abs().max(), (d.double() - w).abs().max()
        assert err <= 3 * dense_err + 1e-6 * w.abs().max(), (float(err), float(dense_err))


def test_shapes_masks_and_reductions() -> None:
    student, teacher = _problem(lead=(3, 7), seed=8)
    mask = _mask((3, 7))
    kw = dict(divergence="jsd", mask=mask)
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, chunk_tokens=4)
    want = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    _assert_all_close(got, want, rtol=2e-5, atol=1e-7)
    assert bool((got[1][~mask] == 0).all())  # masked rows get no gradient
    # a masked row is exactly a removed row; "sum" is "mean" times the count
    hs, ws, bs = student
    kept = L.fused_linear_divergence(
        hs[mask], ws, teacher[0][mask], teacher[1], student_bias=bs, teacher_bias=teacher[2]
    )
    torch.testing.assert_close(got[0], kept.detach())
    total = L.fused_linear_divergence(
        hs, ws, *teacher[:2], student_bias=bs, teacher_bias=teacher[2], mask=mask, reduction="sum"
    )
    torch.testing.assert_close(total.detach(), got[0] * int(mask.sum()))


def test_nothing_counts_gives_zero_without_nan() -> None:
    (hs, ws, bs), (ht, wt, _) = _problem(seed=9)
    loss = L.fused_linear_divergence(hs, ws, ht, wt, student_bias=bs, mask=torch.zeros(23, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(bool((t.grad == 0).all()) for t in (hs, ws, bs))


def test_no_grad_value_and_frozen_parts() -> None:
    student, teacher = _problem(seed=10)
    hs, ws, bs = student
    with_grad = L.fused_linear_divergence(hs, ws, *teacher[:2], student_bias=bs, divergence="tvd")
    with torch.no_grad():
        without = L.fused_linear_divergence(hs, ws, *teacher[:2], student_bias=bs, divergence="tvd")
    torch.testing.assert_close(with_grad.detach(), without)
    # a frozen output layer: only the hidden states get a gradient
    frozen = ws.detach()
    L.fused_linear_divergence(hs, frozen, *teacher[:2]).backward()
    assert hs.grad is not None and frozen.grad is None


def test_chunk_sizes_and_budget_do_not_change_the_result() -> None:
    student, teacher = _problem(n=30, v=97, seed=11)
    kw = dict(divergence="skew_forward_kl", alpha=0.2, mask=_mask(30))
    ref = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    for chunks in ({"chunk_tokens": 1}, {"chunk_tokens": 30, "chunk_vocab": 1}, {"chunk_vocab": 96}, {}):
        got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, **chunks)
        _assert_all_close(got, ref, rtol=2e-5, atol=1e-7)
    # a budget too small for whole-vocabulary rows makes the plan tile the vocabulary by itself
    hs, ws, bs = student
    spec = _Spec("jsd", 0.5, 0.1, 1.0, "bucket", False, "mean", 5 * 4 * 32 * 40, None, None)
    problem = _Problem(hs, ws, bs, (teacher[0], teacher[1], None), None, (True, True, True))
    assert _plan(problem, spec) == (30, 40)
    got = _value_and_grads(L.fused_linear_divergence, student, teacher, **kw, memory_budget=5 * 4 * 32 * 40)
    _assert_all_close(got, ref, rtol=2e-5, atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 12),
    v=st.integers(2, 40),
    chunk_tokens=st.integers(1, 8),
    chunk_vocab=st.one_of(st.none(), st.integers(1, 16)),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    case=st.sampled_from(CASES),
    seed=st.integers(0, 10_000),
)
def test_property_matches_dense_float64(n, v, chunk_tokens, chunk_vocab, temperature, case, seed) -> None:
    student, teacher = _problem(n=n, h=5, ht=4, v=v, seed=seed, dtype=torch.float64)
    divergence, extra = case
    kw = dict(divergence=divergence, temperature=temperature, mask=_mask(n, seed=seed), **extra)
    got = _value_and_grads(
        L.fused_linear_divergence, student, teacher, **kw, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab
    )
    want = _value_and_grads(L.linear_divergence_reference, student, teacher, **kw)
    _assert_all_close(got, want, rtol=1e-9, atol=1e-12)


def test_refuses_bad_arguments() -> None:
    (hs, ws, bs), (ht, wt, bt) = _problem(seed=12)
    with pytest.raises(ValueError, match="divergence must be one of"):
        L.fused_linear_divergence(hs, ws, ht, wt, divergence="hellinger")
    with pytest.raises(ValueError, match="finite"):
        L.fused_linear_divergence(hs, ws, ht, wt, teacher_bias=bt.masked_fill(bt > 0, -math.inf))
    with pytest.raises(ValueError, match="teacher weight"):
        L.fused_linear_divergence(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="mask shape"):
        L.fused_linear_divergence(hs, ws, ht, wt, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        L.fused_linear_divergence(hs, ws, ht, wt, reduction="none")
    targets = L.topk_targets(ht @ wt.t(), 4)
    with pytest.raises(ValueError, match="renormalize"):
        L.fused_linear_divergence(hs, ws, targets, divergence="jsd", tail="renormalize")
    with pytest.raises(ValueError, match="no teacher weight"):
        L.fused_linear_divergence(hs, ws, targets, wt)


# ----------------------------------------------------------------------------------- sparse teachers
SPARSE_CASES = [(d, kw) for d, kw in CASES if d != "skew_forward_kl" or kw["alpha"] < 1] + [
    ("forward_kl", {})
]
SPARSE_TAILS = ["bucket"] * (len(SPARSE_CASES) - 1) + ["renormalize"]


@pytest.mark.parametrize("chunk_vocab", [None, 13])
@pytest.mark.parametrize(("case", "tail"), list(zip(SPARSE_CASES, SPARSE_TAILS, strict=True)))
def test_sparse_targets_match_dense_buckets(case, tail: str, chunk_vocab: int | None) -> None:
    divergence, extra = case
    (hs, ws, bs), (ht, wt, bt) = _problem(n=20, v=60, seed=13, dtype=torch.float64)
    mask = _mask(20)
    counted = L.topk_targets((ht @ wt.t() + bt)[mask], 7, temperature=2.0)  # one row per counted row
    kw = dict(divergence=divergence, temperature=2.0, mask=mask, student_bias=bs, tail=tail, **extra)

    def run(fn, **more):
        for t in (hs, ws, bs):
            t.grad = None
        value = fn(hs, ws, counted, **kw, **more)
        (1.7 * value).backward()
        return value.detach(), hs.grad.clone(), ws.grad.clone(), bs.grad.clone()

    got = run(L.fused_linear_divergence, chunk_tokens=6, chunk_vocab=chunk_vocab)
    want = run(L.linear_divergence_reference)
    _assert_all_close(got, want, rtol=1e-9, atol=1e-12)
    if divergence == "forward_kl":
        student = torch.nn.functional.linear(hs, ws, bs)
        direct = L.sparse_forward_kl(student, counted, temperature=2.0, mask=mask, tail=tail)
        torch.testing.assert_close(got[0], direct.detach())


def test_sparse_targets_for_every_row_or_counted_rows() -> None:
    (hs, ws, _), (ht, wt, _) = _problem(n=12, v=30, seed=14)
    mask = _mask(12)
    every = L.topk_targets(ht @ wt.t(), 5)
    a = L.fused_linear_divergence(hs, ws, every, divergence="forward_kl", mask=mask)
    b = L.fused_linear_divergence(hs, ws, every.select(mask), divergence="forward_kl", mask=mask)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="target rows"):
        L.fused_linear_divergence(hs, ws, every.select(slice(0, 3)), divergence="forward_kl", mask=mask)


def test_sparse_full_vocabulary_is_the_dense_forward_kl() -> None:
    """k = V: the buckets are the vocabulary, so the sparse path is the exact dense forward KL."""
    (hs, ws, bs), (ht, wt, bt) = _problem(n=10, v=16, seed=15, dtype=torch.float64)
    targets = L.topk_targets(ht @ wt.t() + bt, 16, temperature=1.5)
    sparse = L.fused_linear_divergence(
        hs, ws, targets, divergence="forward_kl", temperature=1.5, student_bias=bs
    )
    dense = L.fused_linear_divergence(
        hs, ws, ht, wt, divergence="forward_kl", temperature=1.5, student_bias=bs, teacher_bias=bt
    )
    torch.testing.assert_close(sparse, dense)


# ----------------------------------------------------------------------------------- peers
def test_matches_liger_fused_linear_jsd() -> None:
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    (hs, ws, _), (ht, wt, _) = _problem(n=24, h=16, ht=16, v=70, seed=16)
    labels = torch.zeros(24, dtype=torch.long)
    labels[::5] = -100
    for beta, temperature in ((0.5, 1.0), (0.3, 2.0)):
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature, compiled=False
        )
        want = liger(hs, ws, ht, wt, labels)
        (want_h, want_w) = torch.autograd.grad(want, (hs, ws))
        got = L.fused_linear_divergence(
            hs, ws, ht, wt, beta=beta, temperature=temperature, mask=labels != -100
        )
        (got_h, got_w) = torch.autograd.grad(got, (hs, ws))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-7)


def test_matches_trl_chunked_divergence() -> None:
    pytest.importorskip("trl")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    (hs, ws, bs), (ht, wt, bt) = _problem(lead=(2, 9), v=40, seed=17)
    mask = _mask((2, 9))
    for beta in (0.0, 0.5, 1.0):
        want = _chunked_divergence_loss(
            hs, ht, ws, wt, mask, beta, student_lm_head_bias=bs, teacher_lm_head_bias=bt
        )[0]
        got = L.fused_linear_divergence(
            hs, ws, ht, wt, beta=beta, mask=mask, student_bias=bs, teacher_bias=bt
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        grads_want = torch.autograd.grad(want, (hs, ws, bs))
        grads_got = torch.autograd.grad(got, (hs, ws, bs))
        for g, w in zip(grads_got, grads_want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)

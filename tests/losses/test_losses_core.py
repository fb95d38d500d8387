"""Forward / reverse KL, Hinton KD and DKD against float64 reference maths and mdistiller's DKD; the
shared conventions (mask, reduction, dtype, -inf logits, shapes) on these four."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from losses_reference import dkd_mdistiller, forward_kl, hinton_kd, reverse_kl

import distill.losses as L


def _logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_reverse_kl_match_reference(temperature: float) -> None:
    s, t = _logits(6, 11, seed=1), _logits(6, 11, seed=2)
    got_f = L.forward_kl(s, t, temperature=temperature, reduction="none")
    got_r = L.reverse_kl(s, t, temperature=temperature, reduction="none")
    torch.testing.assert_close(got_f.double(), forward_kl(s, t, temperature), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_r.double(), reverse_kl(s, t, temperature), rtol=1e-5, atol=1e-6)
    # and the batchmean of PyTorch's kl_div (which takes the arguments the other way round)
    ref = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(L.forward_kl(s, t, temperature=temperature), ref)


def test_forward_kl_is_cross_entropy_minus_teacher_entropy() -> None:
    """torchtune / DistiLLM / TAID report -sum P log Q = KL(P||Q) + H(P); ours is the true KL."""
    s, t = _logits(4, 9, seed=3), _logits(4, 9, seed=4)
    p = torch.softmax(t, -1)
    cross_entropy = -(p * torch.log_softmax(s, -1)).sum(-1)
    teacher_entropy = -(p * torch.log_softmax(t, -1)).sum(-1)
    torch.testing.assert_close(L.forward_kl(s, t, reduction="none"), cross_entropy - teacher_entropy)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_kd_matches_reference_and_t_squared(temperature: float) -> None:
    s, t = _logits(5, 10, seed=5), _logits(5, 10, seed=6)
    got = L.hinton_kd(s, t, temperature=temperature, reduction="none")
    torch.testing.assert_close(got.double(), hinton_kd(s, t, temperature), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        L.hinton_kd(s, t, temperature=temperature),
        temperature**2 * L.forward_kl(s, t, temperature=temperature),
    )


def test_hinton_kd_default_temperature_is_4() -> None:
    s, t = _logits(3, 5, seed=7), _logits(3, 5, seed=8)
    torch.testing.assert_close(L.hinton_kd(s, t), L.hinton_kd(s, t, temperature=4.0))


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.5, 2.0, 2.0)]
)
def test_dkd_matches_mdistiller(alpha: float, beta: float, temperature: float) -> None:
    s, t = _logits(8, 10, seed=9), _logits(8, 10, seed=10)
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    got = L.dkd(s, t, labels=labels, alpha=alpha, beta=beta, temperature=temperature)
    ref = dkd_mdistiller(s, t, labels, alpha, beta, temperature)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_dkd_decomposes_kd() -> None:
    """The paper's identity: KD = TCKD + (1 - p_t^gt) NCKD (all times T^2)."""
    s, t = _logits(6, 7, seed=11), _logits(6, 7, seed=12)
    labels = torch.arange(6) % 7
    T = 2.0
    tckd = L.dkd(s, t, labels=labels, alpha=1.0, beta=0.0, temperature=T, reduction="none")
    nckd = L.dkd(s, t, labels=labels, alpha=0.0, beta=1.0, temperature=T, reduction="none")
    p_gt = torch.softmax(t / T, -1).gather(1, labels[:, None]).squeeze(1)
    kd = L.hinton_kd(s, t, temperature=T, reduction="none")
    torch.testing.assert_close(kd, tckd + (1 - p_gt) * nckd, rtol=1e-5, atol=1e-5)


def test_dkd_ignores_negative_labels() -> None:
    s, t = _logits(5, 6, seed=13), _logits(5, 6, seed=14)
    labels = torch.tensor([1, -100, 2, 3, -100])
    keep = labels >= 0
    got = L.dkd(s, t, labels=labels)
    ref = L.dkd(s[keep], t[keep], labels=labels[keep])
    torch.testing.assert_close(got, ref)
    per_row = L.dkd(s, t, labels=labels, reduction="none")
    assert per_row[~keep].eq(0).all()


def test_dkd_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        L.dkd(torch.zeros(2, 3), torch.zeros(2, 3), labels=torch.tensor([0, 3]))


CORE = {
    "forward_kl": lambda s, t, **kw: L.forward_kl(s, t, **kw),
    "reverse_kl": lambda s, t, **kw: L.reverse_kl(s, t, **kw),
    "hinton_kd": lambda s, t, **kw: L.hinton_kd(s, t, **kw),
    "dkd": lambda s, t, **kw: L.dkd(
        s, t, labels=torch.arange(s.shape[:-1].numel()).reshape(s.shape[:-1]) % 3, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(CORE))
def test_reductions_and_mask(name: str) -> None:
    fn = CORE[name]
    s, t = _logits(2, 3, 5, seed=15), _logits(2, 3, 5, seed=16)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    none = fn(s, t, mask=mask, reduction="none")
    assert none.shape == (2, 3)
    assert none[~mask].eq(0).all()
    torch.testing.assert_close(fn(s, t, mask=mask, reduction="sum"), none.sum())
    torch.testing.assert_close(fn(s, t, mask=mask, reduction="mean"), none.sum() / mask.sum())
    empty = fn(s, t, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0


@pytest.mark.parametrize("name", sorted(CORE))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(name: str, dtype: torch.dtype) -> None:
    fn = CORE[name]
    s, t = _logits(4, 6, seed=17, dtype=dtype), _logits(4, 6, seed=18, dtype=dtype)
    got = fn(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(s.float(), t.float()))


@pytest.mark.parametrize("name", sorted(CORE))
def test_minus_inf_vocabulary_entries_are_finite(name: str) -> None:
    fn = CORE[name]
    s, t = _logits(4, 8, seed=19), _logits(4, 8, seed=20)
    s[:, -2:] = -torch.inf
    t[:, -2:] = -torch.inf
    s.requires_grad_(True)
    value = fn(s, t)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[:, -2:].eq(0).all()
    torch.testing.assert_close(value, fn(s.detach()[:, :-2], t[:, :-2]))


def test_zero_teacher_probability_contributes_zero_to_forward_kl() -> None:
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[0.0, -torch.inf, 1.0]])
    p = torch.softmax(t, -1)
    log_q = torch.log_softmax(s, -1)
    expected = p[0, 0] * (torch.log(p[0, 0]) - log_q[0, 0]) + p[0, 2] * (torch.log(p[0, 2]) - log_q[0, 2])
    torch.testing.assert_close(L.forward_kl(s, t), expected)


@pytest.mark.parametrize("name", sorted(CORE))
def test_gradcheck_float64(name: str) -> None:
    fn = CORE[name]
    s = _logits(3, 5, seed=21, dtype=torch.float64).requires_grad_(True)
    t = _logits(3, 5, seed=22, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=2.0), (s, t))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        L.forward_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        L.forward_kl(torch.zeros(2, 3), torch.zeros(2, 3), reduction="batchmean")
    with pytest.raises(ValueError, match="mask"):
        L.forward_kl(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))

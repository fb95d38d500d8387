"""Issue 17: three logit-loss fixes found in review, each against float64 reference maths written here.

* DBiLD: its adaptive k no longer drops to 2 (one pairwise difference, softmax 1 for both models, loss and
  gradient exactly 0); every row where the models disagree has a positive loss and a gradient.
* AdaKD: by default the gradient flows through the per-token temperatures, as in the official code
  (SassyRong/AdaKD); ``detach_temperature=True`` gives the detached gradient.
* BD-KD: the entropy-gap weighting (kept; see `distill.losses.bdkd`) against reference maths and against the
  cross-entropy form of the only public implementation (the AdaKD authors' baseline).

``python tests/losses/test_logit_fixes.py`` prints the numbers quoted in the issue report.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import distill.losses as L
from distill.losses.ranking import _dbild_rows
from distill.objectives import build_objective

# ----------------------------------------------------------------------------------------- references


def _probs(z: Tensor) -> Tensor:
    z = z.double()
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """sum p log(p / q) per row, 0 log 0 = 0."""
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p)).sum(-1)


def _entropy(p: Tensor) -> Tensor:
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)


def _adakd_official(s: Tensor, t: Tensor, ratio: float, c: float, base: str, detach: bool = False) -> Tensor:
    """AdaKD as the official code computes it (float64, written from reading it): Hellinger difficulty of
    every token, the hardest `ratio` kept, tau = exp(-c tanh(log(clamp(d / median d, 1e-8)))), loss = mean
    over kept tokens of tau^2 KL on logits / tau. Nothing is detached unless `detach`."""
    q, p = _probs(s), _probs(t)
    d = torch.sqrt(((q.sqrt() - p.sqrt()) ** 2).sum(-1)) / math.sqrt(2.0)
    kept = torch.topk(d.detach(), max(1, int(len(d) * ratio))).indices
    dk = d[kept]
    tau = torch.exp(-c * torch.tanh(torch.log(torch.clamp(dk / torch.median(dk), min=1e-8))))
    if detach:
        tau = tau.detach()
    qs, pt = _probs(s[kept] / tau[:, None]), _probs(t[kept] / tau[:, None])
    per_token = _kl(qs, pt) if base == "reverse_kl" else _kl(pt, qs)
    return (per_token * tau**2).mean()


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- DBiLD


def _disagreeing_rows(seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """10-class logit pairs where student != teacher: random rows at several scales, very confident
    teachers (logit gaps 20 and 1e4) against random or equally confident students."""
    g = torch.Generator().manual_seed(seed)
    rows_s, rows_t = [], []
    for scale in (0.5, 1.0, 2.0, 4.0, 8.0):
        rows_s.append(scale * torch.randn(200, 10, generator=g, dtype=torch.float64))
        rows_t.append(scale * torch.randn(200, 10, generator=g, dtype=torch.float64))
    for gap in (20.0, 1e4):
        peaked = torch.randn(200, 10, generator=g, dtype=torch.float64)
        top = torch.randint(0, 10, (200,), generator=g)
        peaked[torch.arange(200), top] += gap
        rows_t += [peaked, peaked]
        rows_s += [2 * torch.randn(200, 10, generator=g, dtype=torch.float64)]  # an unsure student
        rows_s += [peaked + 0.5 * torch.randn(200, 10, generator=g, dtype=torch.float64)]  # as sure
    return torch.cat(rows_s).to(dtype), torch.cat(rows_t).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_dbild_every_disagreeing_row_has_a_loss_and_a_gradient(dtype: torch.dtype, divergence: str) -> None:
    s, t = _disagreeing_rows(0, dtype)
    s.requires_grad_(True)
    per_row = L.dbild(s, t, divergence=divergence, reduction="none")
    assert torch.isfinite(per_row).all()
    assert (per_row > 0).all(), f"{int((per_row <= 0).sum())} of {len(per_row)} rows have no loss"
    per_row.sum().backward()  # rows are independent: row i of the gradient is that of row i's loss
    assert torch.isfinite(s.grad).all()
    assert (s.grad.abs().sum(-1) > 0).all()


def test_dbild_the_old_floor_of_two_zeroes_most_rows() -> None:
    # what the fix removes: with k >= 2 the knee of a confident row gives one difference and exactly 0
    s, t = _disagreeing_rows(1)
    old = _dbild_rows(s, t, k=8, min_k=2, adaptive=True, divergence="reverse_kl", temperature=3.0)
    assert (old == 0).float().mean() > 0.3


def test_dbild_is_zero_at_equal_and_shifted_logits() -> None:
    _, t = _disagreeing_rows(2, torch.float64)
    t.requires_grad_(True)
    value = L.dbild(t, t.detach(), reduction="none")
    assert value.abs().max() < 1e-12
    value.sum().backward()
    assert t.grad.abs().max() < 1e-9
    shift = 5.0 * torch.randn(t.shape[0], 1, generator=torch.Generator().manual_seed(3), dtype=t.dtype)
    assert L.dbild(t.detach() + shift, t.detach(), reduction="none").abs().max() < 1e-9


def test_dbild_refuses_a_floor_below_three() -> None:
    s, t = _disagreeing_rows(4)
    with pytest.raises(ValueError, match="min_k must be at least 3"):
        L.dbild(s, t, min_k=2)
    with pytest.raises(ValueError, match="at least 3 classes"):
        L.dbild(s[:, :2], t[:, :2])
    with pytest.raises(ValueError, match="at least 3 classes"):
        L.dbild(s, t, top_k=2, adaptive=False)
    # 3 classes are enough: two independent differences
    assert (L.dbild(s[:, :3], t[:, :3], reduction="none") > 0).all()


# ----------------------------------------------------------------------------------------------- AdaKD


def _adakd_pair(seed: int, n: int = 24, v: int = 10, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    return s, t


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("base", ["reverse_kl", "forward_kl"])
def test_adakd_default_gradient_is_the_official_one(ratio: float, base: str) -> None:
    s, t = _adakd_pair(10)
    ours = s.clone().requires_grad_(True)
    value = L.adakd(ours, t, base=base, token_ratio=ratio)
    value.backward()
    ref = s.clone().requires_grad_(True)
    expected = _adakd_official(ref, t, ratio, 0.5, base)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_adakd_detach_temperature_gives_the_detached_gradient(ratio: float) -> None:
    s, t = _adakd_pair(11)
    ours = s.clone().requires_grad_(True)
    L.adakd(ours, t, token_ratio=ratio, detach_temperature=True).backward()
    detached = s.clone().requires_grad_(True)
    _adakd_official(detached, t, ratio, 0.5, "reverse_kl", detach=True).backward()
    torch.testing.assert_close(ours.grad, detached.grad, rtol=1e-9, atol=1e-12)
    official = s.clone().requires_grad_(True)
    _adakd_official(official, t, ratio, 0.5, "reverse_kl").backward()
    assert _relative(detached.grad, official.grad) > 0.05  # the two gradients really differ
    # same value either way
    torch.testing.assert_close(
        L.adakd(s, t, token_ratio=ratio, detach_temperature=True), L.adakd(s, t, token_ratio=ratio)
    )


def test_adakd_float32_default_matches_the_float64_official_gradient() -> None:
    s, t = _adakd_pair(12, n=64)
    ours = s.float().requires_grad_(True)
    L.adakd(ours, t.float(), token_ratio=0.5).backward()
    ref = s.clone().requires_grad_(True)
    _adakd_official(ref, t, 0.5, 0.5, "reverse_kl").backward()
    assert ours.grad.dtype == torch.float32
    assert _relative(ours.grad.double(), ref.grad) < 1e-5


def test_adakd_gradcheck_through_the_temperatures() -> None:
    s, t = _adakd_pair(13, n=6, v=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: L.adakd(a, t, token_ratio=0.5), (s,), atol=1e-6)


def test_adakd_gradient_is_finite_at_equality_and_with_masked_vocabulary() -> None:
    s, t = _adakd_pair(14)
    s[:, -3:] = -torch.inf
    t[:, -3:] = -torch.inf
    t[:5] = s[:5]  # five tokens where both models agree: Hellinger distance 0
    leaf = s.clone().requires_grad_(True)
    value = L.adakd(leaf, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(leaf.grad).all()
    assert (leaf.grad[:, -3:] == 0).all()


def test_adakd_objective_passes_detach_temperature() -> None:
    s, t = _adakd_pair(15, n=8)
    outputs = {"student_logits": s.float(), "teacher_logits": t.float()}
    from distill.objectives import StepOutputs

    grads = []
    for detach in (False, True):
        leaf = s.float().requires_grad_(True)
        outputs["student_logits"] = leaf
        build_objective("adakd", {"detach_temperature": detach})(StepOutputs(**outputs)).backward()
        grads.append(leaf.grad)
        expected = s.float().requires_grad_(True)
        L.adakd(expected, t.float(), detach_temperature=detach).backward()
        torch.testing.assert_close(leaf.grad, expected.grad)
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------- BD-KD


def _bdkd_reference(s: Tensor, t: Tensor, balance: float, temperature: float) -> Tensor:
    """Per row: b^[H(P) > H(Q)] KL(P || Q) + b^[H(Q) > H(P)] KL(Q || P) on softened distributions."""
    p, q = _probs(t / temperature), _probs(s / temperature)
    h_p, h_q = _entropy(p), _entropy(q)
    w_f = torch.where(h_p > h_q, balance, 1.0)
    w_r = torch.where(h_q > h_p, balance, 1.0)
    return w_f * _kl(p, q) + w_r * _kl(q, p)


def _bd_pair(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(40, 9, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(40, 9, generator=g, dtype=torch.float64)
    s[:20] *= 0.3  # a flatter student on half the rows: both branches of the weighting occur
    return s, t


@pytest.mark.parametrize("balance", [3.0, 2.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bdkd_reference(balance: float, temperature: float) -> None:
    s, t = _bd_pair(20)
    p, q = _probs(t / temperature), _probs(s / temperature)
    assert (_entropy(q) > _entropy(p)).any() and (_entropy(p) > _entropy(q)).any()
    got = L.bdkd(s, t, balance=balance, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, _bdkd_reference(s, t, balance, temperature))
    # float32 compute for low-precision inputs, same value to float32 accuracy
    got32 = L.bdkd(s.float(), t.float(), balance=balance, temperature=temperature, reduction="none")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=1e-4, atol=1e-5)


def test_bdkd_matches_the_public_baseline_up_to_the_teacher_entropy() -> None:
    """The AdaKD authors' BD-KD baseline (read, re-written here in float64): cross-entropy form of the
    forward term, entropies with +1e-9 inside the log, mean over tokens. Value = ours + mean(w_f H(P)),
    same gradient in the student."""
    s, t = _bd_pair(21)

    def baseline(z_s: Tensor) -> Tensor:
        p, q = _probs(t), torch.softmax(z_s, -1)
        h_s = -(q * torch.log(q + 1e-9)).sum(-1)
        h_t = -(p * torch.log(p + 1e-9)).sum(-1)
        w_student = torch.where(h_s > h_t, 3.0, 1.0)
        w_teacher = torch.where(h_t > h_s, 3.0, 1.0)
        forward_ce = -(p * torch.log_softmax(z_s, -1)).sum(-1)
        reverse = (q * (torch.log_softmax(z_s, -1) - torch.log(p))).sum(-1)
        return (w_teacher * forward_ce + w_student * reverse).mean(), w_teacher

    ref_leaf = s.clone().requires_grad_(True)
    ref_value, w_f = baseline(ref_leaf)
    ref_value.backward()
    leaf = s.clone().requires_grad_(True)
    value = L.bdkd(leaf, t)
    value.backward()
    torch.testing.assert_close(value + (w_f * _entropy(_probs(t))).mean(), ref_value.detach())
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_bdkd_ties_weigh_both_sides_once() -> None:
    s, t = _bd_pair(22)
    same = L.bdkd(t, t, reduction="none")
    assert same.abs().max() < 1e-12
    # two classes swapped: exactly the same entropy (two-term sums commute), so both weights are 1 and the
    # loss is the plain sum of the two KLs
    t2 = t[:, :2]
    swapped = t2.flip(-1)
    torch.testing.assert_close(
        L.bdkd(swapped, t2, reduction="none"),
        _kl(_probs(t2), _probs(swapped)) + _kl(_probs(swapped), _probs(t2)),
    )


# ---------------------------------------------------------------------------------- numbers of the report


def _report() -> None:  # pragma: no cover - run by hand: python tests/losses/test_logit_fixes.py
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("DBiLD, random 10-class logits (20000 rows, student and teacher independent N(0, scale^2)):")
    for scale in (1.0, 2.0, 4.0, 8.0):
        t = scale * torch.randn(20000, 10, generator=g)
        s = (scale * torch.randn(20000, 10, generator=g)).requires_grad_(True)
        before = _dbild_rows(
            s.detach(), t, k=8, min_k=2, adaptive=True, divergence="reverse_kl", temperature=3.0
        )
        after = L.dbild(s, t, reduction="none")
        after.sum().backward()
        print(
            f"  scale {scale:>3}: zero-loss rows before {float((before == 0).float().mean()):.1%}, "
            f"after {float((after == 0).float().mean()):.1%}; zero-gradient rows after "
            f"{float((s.grad.abs().sum(-1) == 0).float().mean()):.1%}"
        )
    s, t = _disagreeing_rows(0)
    zero = int((L.dbild(s, t, reduction="none") <= 0).sum())
    print(f"  the test's rows (incl. confident teachers): {zero} of {len(s)} with zero loss after")
    print("AdaKD, gradient relative difference to the official (float64, through tau) gradient:")
    for v in (10, 1000):
        for scale in (1.0, 4.0):
            for ratio in (1.0, 0.5):
                s, t = _adakd_pair(0, n=256, v=v, scale=scale)
                ref = s.clone().requires_grad_(True)
                _adakd_official(ref, t, ratio, 0.5, "reverse_kl").backward()
                diffs = []
                for detach in (True, False):
                    leaf = s.float().requires_grad_(True)
                    L.adakd(leaf, t.float(), token_ratio=ratio, detach_temperature=detach).backward()
                    diffs.append(_relative(leaf.grad.double(), ref.grad))
                print(
                    f"  {v} classes, scale {scale}, ratio {ratio}: detached (before) {diffs[0]:.1%}, "
                    f"default (after) {diffs[1]:.1e}"
                )
    s, t = _bd_pair(20)
    err = (L.bdkd(s, t, reduction="none") - _bdkd_reference(s, t, 3.0, 1.0)).abs().max()
    print(f"BD-KD: max |ours - float64 reference| = {float(err):.1e}")


if __name__ == "__main__":
    _report()

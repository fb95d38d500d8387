"""Each remaining loss against float64 reference maths written from its paper / official code, the
schedules' update rules, and the gradients of the losses that stop gradients on purpose."""

from __future__ import annotations

import math

import pytest
import torch
from losses_reference import dist_kd, kl, mixture_jsd, probs, total_variation

import distill.losses as L


def _pair(*shape: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(*shape, generator=g, dtype=torch.float64),
        scale * torch.randn(*shape, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_generalized_jsd_reference(beta: float) -> None:
    s, t = _pair(5, 8, seed=1)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=beta, reduction="none"), mixture_jsd(s, t, beta))
    if 0 < beta < 1:
        torch.testing.assert_close(
            L.generalized_jsd(s, t, beta=beta, normalized=True, reduction="none"),
            mixture_jsd(s, t, beta) / (beta * (1 - beta)),
        )


def test_generalized_jsd_half_is_the_jensen_shannon_divergence() -> None:
    s, t = _pair(4, 6, seed=2)
    p, q = probs(t), probs(s)
    m = (p + q) / 2
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=0.5, reduction="none"), (kl(p, m) + kl(q, m)) / 2)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_skew_kls_reference_and_distillm_relation(alpha: float) -> None:
    s, t = _pair(4, 7, seed=3)
    p, q = probs(t), probs(s)
    torch.testing.assert_close(
        L.skew_forward_kl(s, t, alpha=alpha, reduction="none"), kl(p, alpha * p + (1 - alpha) * q)
    )
    torch.testing.assert_close(
        L.skew_reverse_kl(s, t, alpha=alpha, reduction="none"), kl(q, alpha * q + (1 - alpha) * p)
    )
    # DistiLLM's skewed_forward_kl is the cross-entropy form: ours + H(P)
    mix = alpha * p + (1 - alpha) * q
    distillm = -(p * torch.log(mix)).sum(-1)
    entropy_p = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(L.skew_forward_kl(s, t, alpha=alpha, reduction="none") + entropy_p, distillm)


def test_total_variation_and_kl_mixing_reference() -> None:
    s, t = _pair(5, 6, seed=4)
    torch.testing.assert_close(
        L.total_variation(s, t, temperature=2.0, reduction="none"), total_variation(s, t, 2.0)
    )
    p, q = probs(t), probs(s)
    h_q = -(q * torch.log(q)).sum(-1)
    expected = 0.3 * kl(p, q) + 0.7 * kl(q, p) - 0.1 * h_q
    got = L.kl_mixing(s, t, forward_weight=0.3, entropy_weight=0.1, reduction="none")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(L.student_entropy(s, reduction="none"), h_q)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_kd_reference(temperature: float) -> None:
    s, t = _pair(6, 5, seed=5)
    torch.testing.assert_close(L.dist_kd(s, t, temperature=temperature), dist_kd(s, t, temperature))
    torch.testing.assert_close(
        L.dist_kd(s, t, inter_weight=2.0, intra_weight=0.5), dist_kd(s, t, 1.0, beta=2.0, gamma=0.5)
    )
    assert L.dist_kd(t, t).abs() < 1e-6  # several rows: zero at equality


def test_standardize_logits_matches_paper_code_and_handles_minus_inf() -> None:
    z = torch.randn(3, 7, dtype=torch.float64)
    expected = (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))
    torch.testing.assert_close(L.standardize_logits(z), expected)
    padded = torch.cat([z, torch.full((3, 2), -torch.inf, dtype=torch.float64)], -1)
    out = L.standardize_logits(padded)
    torch.testing.assert_close(out[:, :7], expected)
    assert torch.isneginf(out[:, 7:]).all()
    # standardisation makes the KL invariant to scaling the logits too
    s, t = _pair(4, 6, seed=6)
    torch.testing.assert_close(
        L.hinton_kd(3 * s, 0.5 * t, standardize=True, temperature=2.0),
        L.hinton_kd(s, t, standardize=True, temperature=2.0),
    )


# ------------------------------------------------------------------------------------------------ TAID


def test_taid_reference_and_endpoints() -> None:
    s, t = _pair(5, 6, seed=7)
    target = probs(0.4 * s + 0.6 * t)
    torch.testing.assert_close(L.taid(s, t, interpolation=0.6, reduction="none"), kl(target, probs(s)))
    torch.testing.assert_close(L.taid(s, t, interpolation=1.0), L.forward_kl(s, t))
    assert L.taid(s, t, interpolation=0.0).abs() < 1e-12
    torch.testing.assert_close(L.taid(s, t, interpolation=torch.tensor(0.6)), L.taid(s, t, interpolation=0.6))


def test_taid_gradient_treats_the_target_as_constant() -> None:
    s, t = _pair(3, 5, seed=8)
    s1 = s.clone().requires_grad_(True)
    L.taid(s1, t, interpolation=0.3).backward()
    target = probs(0.7 * s + 0.3 * t)  # frozen
    s2 = s.clone().requires_grad_(True)
    (kl(target, torch.softmax(s2, -1))).mean().backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    t1 = t.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: L.taid(s, b, interpolation=0.3), (t1,))


def test_taid_update_follows_the_official_rule() -> None:
    t, prev, m = 0.4, math.inf, 0.0
    t, prev, m = L.taid_update(t, prev, m, 2.0, 0.0)
    assert (t, prev, m) == (0.4, 2.0, 0.0)  # first call only stores the loss
    t2, prev2, m2 = L.taid_update(t, prev, m, 1.0, 0.01)
    rel = (2.0 - 1.0) / (2.0 + 1e-15)
    assert m2 == pytest.approx(0.01 * rel)
    expected = min(1.0, max(0.4 + 0.6 * 0.01, 0.4 + 5e-4 / (1 + math.exp(-m2)) * 0.6))
    assert t2 == pytest.approx(expected)
    assert prev2 == 1.0
    # never decreases, never exceeds t_end, and the linear floor applies
    t3, _, _ = L.taid_update(t2, prev2, m2, 5.0, 0.9)
    assert t3 == pytest.approx(0.4 + 0.6 * 0.9)
    t4, _, _ = L.taid_update(0.999, 1.0, 0.0, 0.5, 1.0)
    assert t4 == 1.0
    t5, _, _ = L.taid_update(0.4, 1.0, 0.0, 0.5, 0.5, adaptive=False)
    assert t5 == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- BD-KD


def test_bdkd_reference() -> None:
    s, t = _pair(8, 6, seed=9)
    s[:4] *= 0.2  # flatter student in the first half
    p, q = probs(t), probs(s)
    h_p, h_q = -(p * p.log()).sum(-1), -(q * q.log()).sum(-1)
    w_f = torch.where(h_p > h_q, 3.0, 1.0)
    w_r = torch.where(h_q > h_p, 3.0, 1.0)
    assert (w_r[:4] == 3).any() and (w_f[4:] == 3).any()
    torch.testing.assert_close(L.bdkd(s, t, reduction="none"), w_f * kl(p, q) + w_r * kl(q, p))
    torch.testing.assert_close(L.bdkd(s, t, balance=1.0), L.forward_kl(s, t) + L.reverse_kl(s, t))


# ---------------------------------------------------------------------------------------------- AdaKD


def _adakd_reference(s, t, ratio, c, base_fn):
    p, q = probs(t), probs(s)
    d = torch.sqrt(0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    n_keep = max(1, int(len(d) * ratio))
    kept = torch.argsort(d, descending=True)[:n_keep]
    dk = d[kept]
    tau = torch.exp(-c * torch.tanh(torch.log(dk / dk.median())))
    values = torch.stack(
        [tau[i] ** 2 * base_fn(s[k : k + 1] / tau[i], t[k : k + 1] / tau[i])[0] for i, k in enumerate(kept)]
    )
    return values.mean(), kept, tau


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.2])
def test_adakd_reference(ratio: float) -> None:
    s, t = _pair(10, 7, seed=10)
    from losses_reference import reverse_kl

    expected, kept, tau = _adakd_reference(s, t, ratio, 0.5, reverse_kl)
    torch.testing.assert_close(L.adakd(s, t, token_ratio=ratio), expected)
    none = L.adakd(s, t, token_ratio=ratio, reduction="none")
    assert (none != 0).sum() == len(kept)
    # inverse difficulty: the hardest kept token gets the lowest temperature
    assert tau[0] == tau.min()


def test_adakd_detached_gradient_treats_selection_and_temperatures_as_constant() -> None:
    # the default back-propagates through the temperatures (official code): tests/losses/test_logit_fixes.py
    s, t = _pair(6, 5, seed=11)
    s1 = s.clone().requires_grad_(True)
    L.adakd(s1, t, base="forward_kl", token_ratio=0.5, detach_temperature=True).backward()
    _, kept, tau = _adakd_reference(s, t, 0.5, 0.5, lambda a, b: kl(probs(b), probs(a)))
    s2 = s.clone().requires_grad_(True)
    vals = [
        tau[i] ** 2 * kl(probs(t[k] / tau[i]), torch.softmax(s2[k] / tau[i], -1)) for i, k in enumerate(kept)
    ]
    torch.stack(vals).mean().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_latf_update_rule() -> None:
    ratio, ema, ref = L.latf_update(1.0, None, None, 2.0, 0.01)
    assert (ratio, ema, ref) == (1.0, 2.0, None)  # during warm-up: no reference yet
    ratio, ema, ref = L.latf_update(ratio, ema, ref, 2.0, 0.1)
    assert ref == 2.0
    # a loss falling past the tolerance shrinks the ratio (and resets the reference)
    ratio2, ema2, ref2 = L.latf_update(1.0, 2.0, 2.0, -100.0, 0.2)
    assert ema2 == pytest.approx(0.99 * 2 + 0.01 * -100)
    assert ratio2 == pytest.approx(0.95) and ref2 == ema2
    # rising past the tolerance grows it (capped at 1), small changes keep it
    assert L.latf_update(0.5, 2.0, 2.0, 100.0, 0.2)[0] == pytest.approx(0.525)
    assert L.latf_update(0.5, 2.0, 2.0, 2.01, 0.2)[0] == 0.5
    assert L.latf_update(0.1, 2.0, 2.0, -100.0, 0.2)[0] == 0.1


# --------------------------------------------------------------------------------------------- TSD-KD


def test_token_selective_kd_reference() -> None:
    s, t = _pair(10, 6, seed=12)
    p, q = probs(t), probs(s)
    h_q, h_p = -(q * q.log()).sum(-1), -(p * p.log()).sum(-1)
    jsd = mixture_jsd(s, t, 0.9)
    w = torch.sigmoid(h_q - h_p)
    sel = h_q >= torch.quantile(h_q, 0.1)
    expected = (w * jsd).mean() + h_q[sel].sum() / sel.sum()
    torch.testing.assert_close(L.token_selective_kd(s, t), expected)
    torch.testing.assert_close(L.token_selective_kd(s, t, entropy_weight=0.0), (w * jsd).mean())
    # the weight carries no gradient
    s1 = s.clone().requires_grad_(True)
    L.token_selective_kd(s1, t, entropy_weight=0.0).backward()
    s2 = s.clone().requires_grad_(True)
    (w * L.generalized_jsd(s2, t, beta=0.9, reduction="none")).mean().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


# -------------------------------------------------------------------------------------------- Swing KD


def test_swing_kd_reference_and_seeded_noise() -> None:
    s, t = _pair(5, 6, seed=13)
    scores = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    tau = 2.0 * (1 + 1.5 * scores)
    expected = tau**2 * kl(probs(t / tau[:, None]), probs(s / tau[:, None]))
    got = L.swing_kd(
        s, t, temperature=2.0, privacy_scores=scores, swing=1.5, noise_scale=0.0, reduction="none"
    )
    torch.testing.assert_close(got, expected)
    a = L.swing_kd(s, t, privacy_scores=scores, noise_scale=0.3, seed=7)
    b = L.swing_kd(s, t, privacy_scores=scores, noise_scale=0.3, seed=7)
    c = L.swing_kd(s, t, privacy_scores=scores, noise_scale=0.3, seed=8)
    assert a == b and a != c
    # with no swing and no noise it is Hinton KD
    torch.testing.assert_close(
        L.swing_kd(s, t, temperature=3.0, privacy_scores=scores, swing=0.0, noise_scale=0.0),
        L.hinton_kd(s, t, temperature=3.0),
    )


# ------------------------------------------------------------------------------------------------- PLD


def test_pld_reference() -> None:
    s, t = _pair(4, 6, seed=14)
    labels = torch.tensor([0, 3, 5, 2])
    total = []
    for i in range(4):
        others = [c for c in torch.argsort(t[i], descending=True).tolist() if c != labels[i]]
        perm = [int(labels[i])] + others
        alpha = probs(t[i] / 2.0)[perm]
        loss = sum(alpha[k] * (torch.logsumexp(s[i, perm[k:]], 0) - s[i, perm[k]]) for k in range(6))
        total.append(loss)
    torch.testing.assert_close(
        L.pld(s, t, labels=labels, temperature=2.0, reduction="none"), torch.stack(total)
    )


def test_pld_first_step_is_weighted_cross_entropy() -> None:
    s, t = _pair(3, 2, seed=15)  # two classes: one ranking step
    labels = torch.tensor([1, 0, 1])
    alpha = probs(t).gather(1, labels[:, None]).squeeze(1)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none")
    torch.testing.assert_close(L.pld(s, t, labels=labels, reduction="none"), alpha * ce)


# ----------------------------------------------------------------------------------------------- DBiLD


def _bild_reference(s, t, k, T):
    out = []
    for lead, follow, teacher_led in ((t, s, True), (s, t, False)):
        idx = torch.topk(lead, k, -1).indices
        i, j = torch.triu_indices(k, k, offset=1)
        lt, ft = lead.gather(1, idx) / T, follow.gather(1, idx) / T
        d_lead, d_follow = lt[:, i] - lt[:, j], ft[:, i] - ft[:, j]
        d_t, d_s = (d_lead, d_follow) if teacher_led else (d_follow, d_lead)
        out.append(kl(torch.softmax(d_t, -1), torch.softmax(d_s, -1)))
    return out[0] + out[1]


def test_dbild_fixed_k_forward_is_bild() -> None:
    s, t = _pair(5, 12, seed=16)
    got = L.dbild(s, t, adaptive=False, divergence="forward_kl", top_k=8, temperature=3.0, reduction="none")
    torch.testing.assert_close(got, _bild_reference(s, t, 8, 3.0))


def test_dbild_adaptive_k_uses_the_knee() -> None:
    # a distribution with two clear heads then a flat tail: the knee keeps 2 (the minimum) or 3 entries
    t = torch.tensor([[8.0, 7.5, 7.0, 0.0, 0.1, -0.2, 0.05, 0.0, -0.1, 0.2]], dtype=torch.float64)
    sizes = L.ranking._knee_sizes(torch.topk(torch.softmax(t, -1), 8, -1).values, 2)
    assert sizes.item() == 3
    s = 0.9 * t + torch.tensor([[0.0, 0.2, -0.1, 0.3, 0.0, 0.1, 0.0, -0.3, 0.2, 0.0]], dtype=torch.float64)
    # when the student's knee is also at 3, the adaptive loss is the reverse-KL BiLD at k = 3
    assert L.ranking._knee_sizes(torch.topk(torch.softmax(s, -1), 8, -1).values, 2).item() == 3
    fixed = L.dbild(s, t, adaptive=False, top_k=3)
    torch.testing.assert_close(L.dbild(s, t), fixed)


# ----------------------------------------------------------------------------------------------- SinKD


def test_sinkhorn_kd_reference_loop() -> None:
    s, t = _pair(5, 4, seed=17)
    ps, pt = probs(s, 2.0), probs(t, 2.0)
    cost = torch.tensor(
        [[float((ps[i] - pt[j]).abs().sum()) for j in range(5)] for i in range(5)], dtype=torch.float64
    )
    k = torch.exp(-cost / 0.1)
    for _ in range(20):  # the official scheme, in the probability domain
        k = k / k.sum(1, keepdim=True)
        k = k / k.sum(0, keepdim=True)
    torch.testing.assert_close(L.sinkhorn_kd(s, t, reduction="sum"), (k * cost).sum())
    torch.testing.assert_close(L.sinkhorn_kd(s, t, reduction="none"), (k * cost).sum(1))


def test_sinkhorn_kd_log_domain_survives_tiny_epsilon() -> None:
    s, t = _pair(6, 5, seed=18)
    value = L.sinkhorn_kd(s.float(), t.float(), epsilon=1e-4)
    assert torch.isfinite(value)

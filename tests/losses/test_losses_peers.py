"""Against public implementations (dev dependencies; skipped when absent):
TRL's generalized_jsd_loss, torchdistill's KDLoss, POT's Sinkhorn."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import distill.losses as L


def _pair(*shape: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype),
        (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype),
    )


@pytest.fixture(scope="module")
def trl_gjsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl_per_token(trl_gjsd, beta: float, temperature: float) -> None:
    """TRL with labels averages over non-ignored tokens: exactly our reduction='mean' with that mask."""
    s, t = _pair(2, 5, 11, seed=1)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, 5, 6, 7, -100]])
    ours = L.generalized_jsd(s, t, beta=beta, temperature=temperature, mask=labels != -100)
    theirs = trl_gjsd(s, t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_trl_without_labels_divides_by_batch_size(trl_gjsd, beta: float) -> None:
    """Without labels TRL's 'batchmean' on (B, T, V) divides the token sum by B, not by B * T."""
    s, t = _pair(3, 4, 7, seed=2)
    theirs = trl_gjsd(s, t, beta=beta)
    torch.testing.assert_close(
        L.generalized_jsd(s, t, beta=beta, reduction="sum") / 3, theirs, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=beta), theirs * 3 / 12, atol=1e-6, rtol=1e-6)


def test_generalized_jsd_normalized_is_continuous_where_trl_jumps(trl_gjsd) -> None:
    s, t = _pair(4, 9, seed=3, dtype=torch.float64)
    eps = 1e-6
    # TRL: jump at both ends
    assert trl_gjsd(s, t, beta=eps) < 1e-3 * trl_gjsd(s, t, beta=0.0)
    # ours, normalized: continuous
    torch.testing.assert_close(
        L.generalized_jsd(s, t, beta=eps, normalized=True), L.forward_kl(s, t), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        L.generalized_jsd(s, t, beta=1 - eps, normalized=True), L.reverse_kl(s, t), rtol=1e-4, atol=1e-6
    )


@pytest.fixture(scope="module")
def kd_loss_cls():
    mid = pytest.importorskip("torchdistill.losses.mid_level")
    return mid.KDLoss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_kd_vs_torchdistill(kd_loss_cls, temperature: float) -> None:
    s, t = _pair(8, 10, seed=4)
    targets = torch.arange(8) % 10
    io_s, io_t = {"fc": {"output": s}}, {"fc": {"output": t}}
    # alpha = 0 (or no targets) returns the soft loss alone, WITHOUT the T^2 factor
    soft_only = kd_loss_cls("fc", "output", "fc", "output", temperature=temperature, alpha=0.0)(
        io_s, io_t, targets
    )
    torch.testing.assert_close(L.hinton_kd(s, t, temperature=temperature), temperature**2 * soft_only)
    # alpha in (0, 1): alpha CE + (1 - alpha) T^2 KL, i.e. alpha CE + (1 - alpha) hinton_kd
    alpha = 0.3
    mixed = kd_loss_cls("fc", "output", "fc", "output", temperature=temperature, alpha=alpha)(
        io_s, io_t, targets
    )
    expected = alpha * F.cross_entropy(s, targets) + (1 - alpha) * L.hinton_kd(s, t, temperature=temperature)
    torch.testing.assert_close(mixed, expected)


def test_sinkhorn_kd_vs_pot() -> None:
    ot = pytest.importorskip("ot")
    s, t = _pair(6, 5, seed=5, dtype=torch.float64)
    T, eps, iters = 2.0, 0.1, 3000
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    cost = torch.cdist(ps, pt, p=1)
    a = torch.full((6,), 1 / 6, dtype=torch.float64)
    pot_value = ot.sinkhorn2(a, a, cost, eps, numItermax=iters, stopThr=1e-14)
    ours = L.sinkhorn_kd(s, t, temperature=T, epsilon=eps, iterations=iters)
    torch.testing.assert_close(ours, torch.as_tensor(pot_value, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    # the plan: ours (rows sum to 1) is n times POT's (marginals 1/n)
    pot_plan = torch.as_tensor(ot.sinkhorn(a, a, cost, eps, numItermax=iters, stopThr=1e-14))
    torch.testing.assert_close(L.sinkhorn_plan(cost, eps, iters), 6 * pot_plan, rtol=1e-5, atol=1e-9)
    # and the official sum-form value is n times that
    torch.testing.assert_close(
        L.sinkhorn_kd(s, t, temperature=T, epsilon=eps, iterations=iters, reduction="sum"), 6 * ours
    )

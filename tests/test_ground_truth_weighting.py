"""Self-distillation with ground-truth weighting (Borup & Andersen, NeurIPS 2021): the kernel ridge maths.

Tolerances: closed form vs repeated solving 1e-10 (float64, RBF kernel on 30 random points); closed-form
optimal alpha vs a numerical optimum 1e-6 (golden-section search to a bracket of 1e-11, and scipy's bounded
Brent with xatol 1e-12 where scipy is installed); infinite-step limit vs 300 iterated steps 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.ground_truth_weighting import (
    alpha_objective,
    distillation_multipliers,
    estimate_alpha,
    infinite_step_limit,
    kernel_ridge_fit,
    optimal_alpha,
    optimal_alpha_from_endpoints,
    self_distillation_fits,
)

F64 = torch.float64
CLOSED_FORM_TOL = 1e-10
ALPHA_TOL = 1e-6
GOLDEN_BRACKET = 1e-11


def rbf(a: torch.Tensor, b: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
    return torch.exp(-gamma * torch.cdist(a, b) ** 2)


def problem(seed: int = 0, n: int = 30, noise: float = 0.5):
    """n noisy samples of sin(2 pi x) on [0, 1], an RBF kernel, and a grid of 101 evaluation points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=F64)
    grid = torch.linspace(0, 1, 101, dtype=F64).unsqueeze(1)
    y = torch.sin(2 * math.pi * x[:, 0]) + noise * torch.randn(n, generator=g, dtype=F64)
    return rbf(x, x), rbf(grid, x), y, torch.sin(2 * math.pi * grid[:, 0])


K, K_EVAL, Y, TRUTH = problem()
LAM = 1e-2


def golden_section(f, lo: float, hi: float, tol: float = GOLDEN_BRACKET) -> float:
    """Minimiser of a unimodal f on [lo, hi], the bracket shrunk below `tol`."""
    inv = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv * (b - a), a + inv * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def refit_error(prev: torch.Tensor, reference: torch.Tensor, k_eval: torch.Tensor | None = K_EVAL):
    """E(alpha) from its definition, independently of the module: the kernel ridge operator
    k_eval (K + lam I)^{-1}, formed once by a linear solve, applied to the mixed targets. (Solving afresh at
    every alpha would add solver round-off, ~cond(K + lam I) * eps, that is not smooth in alpha and blurs the
    flat minimum beyond 1e-6.)"""
    rows = K if k_eval is None else k_eval
    hat = torch.linalg.solve(K + LAM * torch.eye(K.shape[0], dtype=F64), rows.T).T

    def error(alpha: float) -> float:
        fit = hat @ (alpha * Y + (1.0 - alpha) * prev)
        return float(((reference - fit) ** 2).sum())

    return error


# ------------------------------------------------------------------------------------- (a) closed form
@pytest.mark.parametrize(
    "alphas",
    [[0.0] * 6, [1.0] * 4, [0.35] * 8, [0.3, 0.5, 0.0, 1.0, 0.7, 0.2], [0.9, 0.1, 0.6]],
)
@pytest.mark.parametrize("at_grid", [False, True])
def test_closed_form_equals_repeated_solve(alphas, at_grid):
    k_eval = K_EVAL if at_grid else None
    targets = torch.stack([Y, Y**2 - 0.5], dim=1)  # two outputs at once as well
    for y in (Y, targets):
        closed = self_distillation_fits(K, y, LAM, alphas, K_eval=k_eval)
        solved = self_distillation_fits(K, y, LAM, alphas, method="solve", K_eval=k_eval)
        assert closed.shape == solved.shape == (len(alphas) + 1, 101 if at_grid else 30, *y.shape[1:])
        assert (closed - solved).abs().max().item() <= CLOSED_FORM_TOL
        assert torch.allclose(solved[0], kernel_ridge_fit(K, y, LAM, k_eval), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.6, 1.0])
def test_multipliers_match_the_constant_alpha_formula(alpha):
    """b_t = (1 - alpha)^{t-1} a^t + alpha sum_{k=1..t-1} (1 - alpha)^{k-1} a^k, written out here."""
    d = torch.linalg.eigvalsh(K).clamp(min=0)
    a = d / (d + LAM)
    steps = 7
    got = distillation_multipliers(d, LAM, [alpha] * (steps - 1))
    for t in range(1, steps + 1):
        want = (1 - alpha) ** (t - 1) * a**t + alpha * sum((1 - alpha) ** (k - 1) * a**k for k in range(1, t))
        assert torch.allclose(got[t - 1], want, atol=1e-14, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
    lam=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_closed_form_equals_solve_for_any_schedule(alphas, lam, seed):
    k, k_eval, y, _ = problem(seed, n=12)
    for rows in (None, k_eval):
        closed = self_distillation_fits(k, y, lam, alphas, K_eval=rows)
        solved = self_distillation_fits(k, y, lam, alphas, method="solve", K_eval=rows)
        assert (closed - solved).abs().max().item() <= CLOSED_FORM_TOL


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 8), lam=st.floats(1e-3, 1.0), seed=st.integers(0, 2**16))
def test_alpha_one_at_every_step_reproduces_the_first_fit(steps, lam, seed):
    k, _, y, _ = problem(seed, n=15)
    first = kernel_ridge_fit(k, y, lam)
    for method in ("closed_form", "solve"):
        fits = self_distillation_fits(k, y, lam, [1.0] * steps, method=method)
        assert (fits - first).abs().max().item() <= CLOSED_FORM_TOL


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 1.0), lam=st.floats(1e-3, 1.0), seed=st.integers(0, 2**16))
def test_multipliers_shrink_towards_the_limit_small_directions_first(alpha, lam, seed):
    """The paper's regularisation claims: every b_t decreases with t, stays above alpha d/(alpha d + lam), and
    relative to the first fit the small-eigenvalue directions shrink most (b_t / b_1 increases with d)."""
    k, _, _, _ = problem(seed, n=15)
    d = torch.linalg.eigvalsh(k).clamp(min=0)  # ascending
    b = distillation_multipliers(d, lam, [alpha] * 10)
    limit = alpha * d / (alpha * d + lam)
    assert bool((b[1:] <= b[:-1] + 1e-15).all())
    assert bool((b >= limit - 1e-15).all())
    positive = d > 1e-12
    ratio = b[:, positive] / b[0, positive]
    assert bool((ratio[:, 1:] >= ratio[:, :-1] - 1e-12).all())


# ------------------------------------------------------------------------------------ (b) optimal alpha
def previous_fits(alpha: float = 0.5, steps: int = 6) -> torch.Tensor:
    return self_distillation_fits(K, Y, LAM, [alpha] * (steps - 1))


@pytest.mark.parametrize("step", [2, 3, 4, 5, 6])
def test_optimal_alpha_matches_a_numerical_optimum(step):
    prev = previous_fits()[step - 2]  # f_{t-1} at the training inputs
    error = refit_error(prev, TRUTH)
    assert alpha_objective(K, Y, LAM, prev, TRUTH, 0.4, K_EVAL) == pytest.approx(error(0.4), rel=1e-12)
    free = optimal_alpha(K, Y, LAM, prev, TRUTH, K_EVAL, clip=False)
    assert abs(free - golden_section(error, -5.0, 5.0)) <= ALPHA_TOL
    bounded = optimal_alpha(K, Y, LAM, prev, TRUTH, K_EVAL)
    assert 0.0 <= bounded <= 1.0
    assert abs(bounded - golden_section(error, 0.0, 1.0)) <= ALPHA_TOL


def test_optimal_alpha_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    for step in (3, 4, 5):
        prev = previous_fits()[step - 2]
        res = optimize.minimize_scalar(
            refit_error(prev, TRUTH), bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-12}
        )
        assert abs(optimal_alpha(K, Y, LAM, prev, TRUTH, K_EVAL, clip=False) - res.x) <= ALPHA_TOL


def test_optimal_alpha_interior_and_clipped_cases_occur():
    """In this problem (noisy labels, small lam) the first distillation step wants more than pure
    distillation (alpha* < 0, clipped to 0), later steps an interior alpha."""
    fits = previous_fits()
    assert optimal_alpha(K, Y, LAM, fits[0], TRUTH, K_EVAL, clip=False) < 0.0
    assert optimal_alpha(K, Y, LAM, fits[0], TRUTH, K_EVAL) == 0.0
    assert 0.0 < optimal_alpha(K, Y, LAM, fits[1], TRUTH, K_EVAL) < 1.0


@settings(max_examples=40, deadline=None)
@given(
    history=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=5),
    lam=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_optimal_alpha_lies_in_the_unit_interval_and_beats_the_grid(history, lam, seed):
    k, k_eval, y, truth = problem(seed, n=12)
    prev = self_distillation_fits(k, y, lam, history)[-1]
    best = optimal_alpha(k, y, lam, prev, truth, k_eval)
    assert 0.0 <= best <= 1.0
    e_best = alpha_objective(k, y, lam, prev, truth, best, k_eval)
    for alpha in torch.linspace(0, 1, 21).tolist():
        assert e_best <= alpha_objective(k, y, lam, prev, truth, alpha, k_eval) * (1 + 1e-12) + 1e-15


@settings(max_examples=40, deadline=None)
@given(
    history=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=5),
    lam=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_on_the_training_labels_the_optimum_is_never_below_one(history, lam, seed):
    """Why the reference must be held out: 1 - a b >= a (1 - b) in every eigen-direction."""
    k, _, y, _ = problem(seed, n=12)
    prev = self_distillation_fits(k, y, lam, history)[-1]
    assert optimal_alpha(k, y, lam, prev, y, clip=False) >= 1.0 - 1e-9
    assert optimal_alpha(k, y, lam, prev, y) == 1.0


# --------------------------------------------------------------------------------------- (c) the limit
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 1.0])
def test_infinite_step_limit_matches_many_steps(alpha):
    steps = 300  # contraction per step <= (1 - alpha) * max a < 0.8: 0.8^300 ~ 1e-29
    for rows in (None, K_EVAL):
        limit = infinite_step_limit(K, Y, LAM, alpha, rows)
        iterated = self_distillation_fits(K, Y, LAM, [alpha] * steps, method="solve", K_eval=rows)[-1]
        closed = self_distillation_fits(K, Y, LAM, [alpha] * steps, K_eval=rows)[-1]
        assert (limit - iterated).abs().max().item() <= CLOSED_FORM_TOL
        assert (limit - closed).abs().max().item() <= CLOSED_FORM_TOL
    # the amplified regularisation: lam / alpha
    assert torch.allclose(infinite_step_limit(K, Y, LAM, alpha), kernel_ridge_fit(K, Y, LAM / alpha))


def test_pure_self_distillation_collapses_to_zero():
    """alpha = 0 (Mobahi et al.): b_t = a^t, so every direction dies out; the limit is the zero function."""
    assert torch.equal(infinite_step_limit(K, Y, LAM, 0.0), torch.zeros(30, dtype=F64))
    d = torch.linalg.eigvalsh(K).clamp(min=0)
    for lam in (LAM, 1.0):
        a = d / (d + lam)
        b = distillation_multipliers(d, lam, [0.0] * 399)
        assert torch.allclose(b[-1], a**400, atol=1e-15, rtol=1e-12)
    assert b[-1].max().item() < 1e-6  # lam = 1: max a ~ 0.95
    fits = self_distillation_fits(K, Y, 1.0, [0.0] * 399, method="solve")
    assert fits[-1].abs().max().item() < 1e-6


# -------------------------------------------------------------------------------- (d) the deep estimate
def test_estimate_alpha_hand_computed():
    p0 = torch.full((3, 2), 0.5, dtype=F64)
    p1 = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]], dtype=F64)
    labels = torch.tensor([0, 0, 0])
    # <Y - P0, P1 - P0> = 0.4 - 0.4 + 0.4 = 0.4, ||P1 - P0||^2 = 3 * 0.32 = 0.96
    assert estimate_alpha(p0, labels, p1) == pytest.approx(5 / 12, abs=1e-15)
    # rows labelled -100 are ignored
    with_ignored = estimate_alpha(
        torch.cat([p0, p0[:1]]), torch.tensor([0, 0, 0, -100]), torch.cat([p1, p1[1:2]])
    )
    assert with_ignored == pytest.approx(5 / 12, abs=1e-15)
    # outside [0, 1]: clipped unless asked not to
    labels = torch.tensor([0, 1, 0])
    assert estimate_alpha(p0, labels, p1, clip=False) == pytest.approx(1.25, abs=1e-15)
    assert estimate_alpha(p0, labels, p1) == 1.0


@pytest.mark.parametrize("true_alpha", [0.0, 0.3, 0.75, 1.0])
def test_estimate_alpha_recovers_a_known_mixture(true_alpha):
    g = torch.Generator().manual_seed(1)
    logits0 = 2 * torch.randn(64, 10, generator=g, dtype=F64)
    logits1 = 2 * torch.randn(64, 10, generator=g, dtype=F64)
    p0, p1 = logits0.softmax(-1), logits1.softmax(-1)
    soft_labels = true_alpha * p1 + (1 - true_alpha) * p0  # exactly on the segment
    assert estimate_alpha(p0, soft_labels, p1) == pytest.approx(true_alpha, abs=1e-12)
    shift = torch.randn(64, 1, generator=g, dtype=F64)  # logits, each row shifted: same softmax
    assert estimate_alpha(logits0 + shift, soft_labels, logits1 - shift) == pytest.approx(
        true_alpha, abs=1e-12
    )
    assert estimate_alpha(logits0.float(), soft_labels, logits1.float(), from_logits=True) == pytest.approx(
        true_alpha, abs=1e-6
    )


def test_estimate_alpha_is_the_kernel_optimum_for_kernel_models():
    """Given the two endpoint models' outputs, the deep estimate is the kernel closed form."""
    targets = torch.stack([Y, -Y], dim=1)
    reference = torch.stack([TRUTH, -TRUTH], dim=1)
    prev = self_distillation_fits(K, targets, LAM, [0.5])[-1]
    g1 = kernel_ridge_fit(K, targets, LAM, K_EVAL)
    g0 = kernel_ridge_fit(K, prev, LAM, K_EVAL)
    want = optimal_alpha(K, targets, LAM, prev, reference, K_EVAL, clip=False)
    assert estimate_alpha(g0, reference, g1, from_logits=False, clip=False) == pytest.approx(want, abs=1e-12)
    assert optimal_alpha_from_endpoints(g1, g0, reference, clip=False) == pytest.approx(want, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 20), c=st.integers(2, 6))
def test_estimate_alpha_minimises_the_interpolated_error(seed, n, c):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, c, generator=g, dtype=F64).softmax(-1)
    p1 = torch.randn(n, c, generator=g, dtype=F64).softmax(-1)
    labels = torch.randint(0, c, (n,), generator=g)
    one_hot = torch.nn.functional.one_hot(labels, c).to(F64)
    best = estimate_alpha(p0, labels, p1)
    assert 0.0 <= best <= 1.0

    def err(a: float) -> float:
        return float(((one_hot - a * p1 - (1 - a) * p0) ** 2).sum())

    for a in torch.linspace(0, 1, 21).tolist():
        assert err(best) <= err(a) + 1e-12
    assert best == pytest.approx(estimate_alpha(p0, one_hot, p1), abs=1e-12)


def test_degenerate_and_invalid_inputs():
    p = torch.full((4, 3), 1 / 3, dtype=F64)
    assert estimate_alpha(p, torch.tensor([0, 1, 2, 0]), p) == 1.0  # both endpoints equal: labels only
    with pytest.raises(ValueError):
        estimate_alpha(p, torch.tensor([0, 1, 2]), p)
    with pytest.raises(ValueError):
        estimate_alpha(p, torch.tensor([0, 1, 2, 3]), p)
    with pytest.raises(ValueError):
        estimate_alpha(p, torch.tensor([0, 1, 2, 0]), p[:, :2])
    with pytest.raises(ValueError):
        kernel_ridge_fit(K, Y, 0.0)
    with pytest.raises(ValueError):
        kernel_ridge_fit(K[:, :5], Y, LAM)
    with pytest.raises(ValueError):
        self_distillation_fits(K, Y[:5], LAM, [0.5])
    with pytest.raises(ValueError):
        self_distillation_fits(K, Y, LAM, [0.5], method="recursive")
    with pytest.raises(ValueError):
        self_distillation_fits(K, Y, LAM, [float("nan")])
    with pytest.raises(ValueError):
        infinite_step_limit(K, Y, LAM, 1.5)

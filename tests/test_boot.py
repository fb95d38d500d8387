"""BOOT (S15): the bootstrapping loss and the signal-space DDIM step against float64 references, the Frechet
distance against closed forms, the diffusers teacher / student (skipped without the `diffusion` extra), and
the quick benchmark (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.errors import UserError
from distill.losses.boot import (
    boot_loss,
    ddim_signal_step,
    noisy_from_signal,
    signal_step_size,
    terminal_signal,
)
from distill.losses.frechet import (
    frechet_distance,
    frechet_distance_of_features,
    gaussian_statistics,
    per_class_precision,
)

DIFFUSERS = "the diffusion extra: pip install 'distill[diffusion]' (diffusers)"


def _alpha_sigma(alpha_bar: float) -> tuple[float, float]:
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


# ------------------------------------------------------------------------------------- the loss
def reference_boot_loss(
    student_s: np.ndarray, y_t: np.ndarray, f: np.ndarray, delta: np.ndarray, weight: np.ndarray
) -> float:
    """float64, written from the paper's formula: mean_n w_n / delta_n^2 * mean_pixels (g_s - target)^2."""
    n = len(student_s)
    d = delta.reshape(n, 1, 1, 1)
    target = y_t + d * (f - y_t)
    per_sample = ((student_s - target) ** 2).reshape(n, -1).mean(1)
    return float((weight / delta**2 * per_sample).mean())


def test_boot_loss_matches_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    student, y_t, f = (torch.randn(5, 1, 4, 4, generator=g) for _ in range(3))
    delta = torch.rand(5, generator=g) * 0.9 + 0.1
    weight = torch.rand(5, generator=g)
    ours = boot_loss(student, y_t, f, delta, weight=weight)
    expected = reference_boot_loss(*(t.double().numpy() for t in (student, y_t, f, delta, weight)))
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    plain = reference_boot_loss(*(t.double().numpy() for t in (student, y_t, f, delta)), np.ones(5))
    assert boot_loss(student, y_t, f, delta).item() == pytest.approx(plain, rel=1e-5)
    per_sample = boot_loss(student, y_t, f, delta, reduction="none")
    assert per_sample.shape == (5,)
    assert boot_loss(student, y_t, f, delta, reduction="sum").item() == pytest.approx(per_sample.sum().item())
    with pytest.raises(ValueError, match="reduction"):
        boot_loss(student, y_t, f, delta, reduction="max")


def test_boot_loss_computes_in_float32_and_stops_the_gradient_of_its_target() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 1, 4, 4, generator=g).bfloat16().requires_grad_(True)
    y_t = torch.randn(3, 1, 4, 4, generator=g).requires_grad_(True)
    f = torch.randn(3, 1, 4, 4, generator=g).requires_grad_(True)
    loss = boot_loss(student, y_t, f, torch.full((3,), 0.5))
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert y_t.grad is None and f.grad is None  # SG[...]: only g(eps, s) is trained


def test_boot_loss_gradcheck_in_float64() -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    y_t, f = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    delta = torch.tensor([0.3, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: boot_loss(s, y_t, f, delta), (student,))


@settings(max_examples=40, deadline=None)
@given(
    alpha_bar_t=st.floats(1e-4, 0.98),
    ratio=st.floats(1.01, 50.0),
    seed=st.integers(0, 2**16),
)
def test_the_signal_step_is_the_ddim_step(alpha_bar_t: float, ratio: float, seed: int) -> None:
    """On y, `y_t + delta (f - y_t)` is exactly DDIM's
    `x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t`
    (eta 0) mapped through y = (x - sigma eps) / alpha, for any x0 prediction f (float64)."""
    alpha_bar_s = min(alpha_bar_t * ratio, 0.9999)
    a_t, s_t = _alpha_sigma(alpha_bar_t)
    a_s, s_s = _alpha_sigma(alpha_bar_s)
    rng = np.random.default_rng(seed)
    eps, y_t, f = (rng.standard_normal((2, 1, 3, 3)) for _ in range(3))
    x_t = a_t * y_t + s_t * eps
    x_s = a_s * f + s_s * (x_t - a_t * f) / s_t
    expected = (x_s - s_s * eps) / a_s
    delta = signal_step_size(*(torch.tensor(v, dtype=torch.float64) for v in (a_s, s_s, a_t, s_t)))
    assert float(delta) == pytest.approx(1 - np.exp(np.log(s_s / a_s) - np.log(s_t / a_t)), rel=1e-9)
    ours = ddim_signal_step(torch.from_numpy(y_t), torch.from_numpy(f), delta.expand(2))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-8, atol=1e-8)


def test_the_clean_end_takes_the_whole_step_and_the_terminal_signal_gives_pure_noise() -> None:
    assert (
        float(signal_step_size(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.9), torch.tensor(0.4)))
        == 1.0
    )
    eps = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    for alpha_bar in (1e-10, 1e-4, 0.3):
        a, s = (torch.tensor(v, dtype=torch.float64) for v in _alpha_sigma(alpha_bar))
        y_T = terminal_signal(eps, a, s)
        torch.testing.assert_close(noisy_from_signal(y_T, eps, a, s), eps)
        assert torch.isfinite(y_T).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), delta=st.floats(0.01, 1.0))
def test_boot_loss_is_zero_at_its_target_and_nonnegative(seed: int, delta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    y_t, f, other = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    d = torch.full((3,), delta)
    assert boot_loss(ddim_signal_step(y_t, f, d), y_t, f, d).item() == pytest.approx(0.0, abs=1e-10)
    assert boot_loss(other, y_t, f, d).item() >= 0


# ------------------------------------------------------------------------------------- the Frechet distance
def reference_frechet(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """float64, through symmetric square roots: tr (C1 C2)^{1/2} = tr (C1^{1/2} C2 C1^{1/2})^{1/2}."""

    def sym_sqrt(m: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root1 = sym_sqrt(c1)
    cross = np.trace(sym_sqrt(root1 @ c2 @ root1))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])
    ) == pytest.approx(2.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(1, 6))
def test_frechet_distance_matches_a_float64_reference(seed: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((dim, dim)), rng.standard_normal((dim, dim))
    c1, c2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours = frechet_distance(mu1, c1, mu2, c2)
    assert ours == pytest.approx(reference_frechet(mu1, c1, mu2, c2), rel=1e-6, abs=1e-8)
    assert ours == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-6, abs=1e-8)
    assert ours >= -1e-8


def test_gaussian_statistics_and_features() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4))
    mean, cov = gaussian_statistics(torch.from_numpy(x).float())
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)
    # large samples of N(0, I) and N(1, 4 I) in 2-d: FD near ||1||^2 * 2 + 2 * (2 - 1)^2 = 4
    big = np.random.default_rng(4).standard_normal((20000, 2))
    assert frechet_distance_of_features(big[:10000], 1 + 2 * big[10000:]) == pytest.approx(4.0, rel=0.05)
    # a singular covariance (a dead feature) stays finite
    dead = np.c_[x[:, :3], np.zeros(200)]
    assert np.isfinite(frechet_distance_of_features(dead, dead + 0.1))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(x[:1])


def test_frechet_distance_agrees_with_torchmetrics_when_installed() -> None:
    fid = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is not installed")
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    c1, c2 = a @ a.T + np.eye(5), b @ b.T + np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    theirs = fid._compute_fid(*(torch.from_numpy(v) for v in (mu1, c1, mu2, c2)))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(float(theirs), rel=1e-5)


def test_per_class_precision() -> None:
    requested = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 0, 1, 0, 2])
    precision = per_class_precision(predicted, requested, 4)
    assert precision[:3].tolist() == [0.75, 0.5, 1.0]
    assert torch.isnan(precision[3])


# ------------------------------------------------------------------------------------- diffusers models
def test_a_missing_diffusers_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.models.diffusion import class_conditional_unet

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError, match="diffusers") as error:
        class_conditional_unet()
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def tiny_teacher() -> tuple[torch.nn.Module, object, object]:
    pytest.importorskip("diffusers", reason=DIFFUSERS)
    from distill.models.diffusion import class_conditional_unet, ddim_scheduler, noise_scheduler

    torch.manual_seed(0)
    unet = class_conditional_unet(widths=(8, 16, 16)).eval()
    train = noise_scheduler()
    return unet, train, ddim_scheduler(train)


def test_diffusers_ddim_is_the_signal_space_loop(tiny_teacher: tuple) -> None:
    """diffusers' DDIM loop (eta 0, eps re-derived from the clipped x0) and BOOT's signal steps from the
    terminal signal give the same sample: the trajectory the student learns is the teacher's sampler."""
    from distill.models.diffusion import ddim_sample, predict_x0, signal_grid

    unet, train, sampler = tiny_teacher
    noise, labels = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9])
    for steps in (1, 4):
        expected = ddim_sample(unet, sampler, noise, labels, steps)
        grid = signal_grid(sampler, steps)
        assert grid.timesteps[-1] == 999 and grid.alpha[0] == 1 and grid.sigma[0] == 0
        y = terminal_signal(noise, grid.alpha[-1], grid.sigma[-1])
        with torch.no_grad():
            for k in range(steps, 0, -1):
                x_t = noisy_from_signal(y, noise, grid.alpha[k], grid.sigma[k])
                f = predict_x0(unet, train, x_t, grid.timesteps[k].expand(3), labels)
                y = ddim_signal_step(
                    y, f, signal_step_size(grid.alpha[k - 1], grid.sigma[k - 1], grid.alpha[k], grid.sigma[k])
                )
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_a_student_initialised_from_the_teacher_starts_at_its_one_step_sample(tiny_teacher: tuple) -> None:
    from distill.models.diffusion import SignalGenerator, ddim_sample, signal_grid

    unet, _, sampler = tiny_teacher
    grid = signal_grid(sampler, 1)
    student = SignalGenerator(unet, grid.alpha[-1], grid.sigma[-1])
    noise, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with torch.no_grad():
        at_T = student(noise, torch.full((2,), 999.0), labels).clamp(-1, 1)
    torch.testing.assert_close(at_T, ddim_sample(unet, sampler, noise, labels, 1), atol=1e-5, rtol=1e-5)
    assert student.sample(noise, labels).shape == (2, 1, 28, 28)


def test_the_unet_builder_checks_its_widths() -> None:
    pytest.importorskip("diffusers", reason=DIFFUSERS)
    from distill.models.diffusion import class_conditional_unet

    with pytest.raises(UserError, match="norm_groups"):
        class_conditional_unet(widths=(12, 16))


# ------------------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_the_quick_benchmark_writes_its_table(tmp_path: Path) -> None:
    from bench_helpers import load_benchmark
    from data_helpers import require_data

    require_data("images/mnist_t10k")
    pytest.importorskip("diffusers", reason=DIFFUSERS)
    out = tmp_path / "generative.md"
    assert load_benchmark("generative").main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| teacher DDIM 1 |", "| BOOT one-step |", "| real validation |", "goal", "precision"):
        assert row in text
    assert out.with_suffix(".png").is_file()


def test_a_quick_run_refuses_the_full_results_file(capsys: pytest.CaptureFixture[str]) -> None:
    from bench_helpers import BENCHMARKS, load_benchmark

    with pytest.raises(SystemExit) as stop:
        load_benchmark("generative").main(["--quick", "--out", str(BENCHMARKS / "results" / "generative.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err

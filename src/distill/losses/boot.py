"""BOOT: data-free distillation of a diffusion teacher into a one-step generator by bootstrapping.

"BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping" (Gu, Zhai, Zhang, Liu and
Susskind, 2023, arXiv:2306.05544). A student `g(eps, t)` reads pure noise `eps` and a time `t`, and predicts
the *signal* `y_t` of the teacher's deterministic (DDIM) trajectory that starts from `x_T = eps`:

    x_t = alpha_t * y_t + sigma_t * eps          (so y_t = (x_t - sigma_t * eps) / alpha_t, and y_0 = x_0)

Along that trajectory the signal obeys the Signal-ODE `dy/dt = -lambda'_t (f(x_t, t) - y_t)`, with
`lambda_t = -log(alpha_t / sigma_t)` and `f` the teacher's prediction of x_0. One DDIM step from t to s < t,
written on the signal, is exactly

    y_s = y_t + delta * (f(x_t, t) - y_t),    delta = 1 - exp(lambda_s - lambda_t)
                                                    = 1 - (sigma_s * alpha_t) / (alpha_s * sigma_t)

(`delta = 1` when s is the clean end, sigma_s = 0). The bootstrapping loss regresses the student at s onto
that step taken from the student's own prediction at t, with a stop-gradient on the target:

    L_BS = E_{eps, t} [ w_t / delta^2 * || g(eps, s) - SG[ y_t + delta (f(x_t, t) - y_t) ] ||^2 ],
    y_t = g(eps, t),  x_t = alpha_t y_t + sigma_t eps

No training image is needed: every input is noise. `w_t = 1` here (the paper's uniform weighting); dividing
by `delta^2` makes the term a regression of the finite difference `(g(eps, s) - y_t) / delta` onto the
Signal-ODE's direction `f - y_t`. The squared norm is averaged over pixels (a constant rescaling of the sum).

This module holds the maths only (pure tensor functions, float32 whatever the input dtype); the teacher,
the student network and the time grid live in `distill.models.diffusion`, the loop in
`benchmarks/generative.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import REDUCTIONS


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient of shape (N,) (or a scalar) broadcast over the other dimensions of `like`."""
    value = torch.as_tensor(value, dtype=torch.float32 if like.dtype != torch.float64 else like.dtype)
    value = value.to(like.device)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def signal_step_size(alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """`delta = 1 - exp(lambda_s - lambda_t) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)` of one DDIM step
    from t to s < t (1 when sigma_s = 0, the clean end)."""
    alpha_s, sigma_s, alpha_t, sigma_t = (
        _float(torch.as_tensor(v)) for v in (alpha_s, sigma_s, alpha_t, sigma_t)
    )
    return 1.0 - (sigma_s * alpha_t) / (alpha_s * sigma_t)


def noisy_from_signal(signal: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """`x_t = alpha_t y_t + sigma_t eps`: the point of the trajectory whose signal is `y_t`."""
    signal, noise = _float(signal), _float(noise)
    return _per_sample(alpha, signal) * signal + _per_sample(sigma, signal) * noise


def terminal_signal(noise: Tensor, alpha_T: Tensor, sigma_T: Tensor) -> Tensor:
    """The signal at the start of the trajectory, where `x_T = eps`: `y_T = (1 - sigma_T) eps / alpha_T`,
    written `alpha_T / (1 + sigma_T) eps` (alpha^2 + sigma^2 = 1), which stays finite as alpha_T -> 0."""
    noise = _float(noise)
    return _per_sample(alpha_T / (1.0 + torch.as_tensor(sigma_T)), noise) * noise


def ddim_signal_step(signal_t: Tensor, teacher_x0: Tensor, delta: Tensor) -> Tensor:
    """`y_s = y_t + delta (f(x_t, t) - y_t)`: one deterministic DDIM step, on the signal."""
    signal_t, teacher_x0 = _float(signal_t), _float(teacher_x0)
    return signal_t + _per_sample(delta, signal_t) * (teacher_x0 - signal_t)


def boot_loss(
    student_s: Tensor,
    signal_t: Tensor,
    teacher_x0: Tensor,
    delta: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """BOOT's bootstrapping loss (module docstring): `w / delta^2 * mean_pixels (g(eps, s) - SG[target])^2`.

    `student_s` is `g(eps, s)` (gradients flow into it); `signal_t` the student's (or, at the boundary, the
    exact terminal) signal at t; `teacher_x0` the teacher's x_0 prediction at `x_t = alpha_t y_t + sigma_t
    eps`; `delta` the step size of `signal_step_size`, one per sample. `weight` (default 1) multiplies the
    `1 / delta^2` factor. The target is detached (stop-gradient), so only `student_s` is trained.
    `reduction`: "mean" over samples, "sum", or "none" (one value per sample)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    student_s = _float(student_s)
    target = ddim_signal_step(signal_t, teacher_x0, delta).detach()
    per_sample = (student_s - target).pow(2).flatten(1).mean(1)
    delta = _per_sample(delta, per_sample).to(per_sample.dtype)
    scale = 1.0 / delta.pow(2)
    if weight is not None:
        scale = scale * _per_sample(weight, per_sample).to(per_sample.dtype)
    per_sample = per_sample * scale
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()

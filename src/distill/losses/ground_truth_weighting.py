"""Self-distillation with weighted ground-truth targets, in kernel ridge regression and for deep classifiers.

Paper: K. Borup and L. N. Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen
Regularization Imposed by Self-Distillation", NeurIPS 2021 (arXiv 2102.13088). Official code:
github.com/Kennethborup/self_distillation (`toy_example.ipynb`: the kernel recursion and its limit;
`self_distiller.py`: the ResNet / CIFAR-10 runs, an MSE between softmax outputs and one-hot targets).

Setting. Training inputs X (n of them), kernel matrix K = k(X, X) (n x n, symmetric positive
semi-definite), targets y (n, or n x C), l2 regularisation lam > 0. Step 1 is kernel ridge regression on y;
step t >= 2 fits, with the same kernel and lam, the weighted targets

    alpha_t * y + (1 - alpha_t) * f_{t-1}(X),

which is the paper's weighted loss alpha_t ||y - f(X)||^2 + (1 - alpha_t) ||f_{t-1}(X) - f(X)||^2 + lam R(f)
(the two squared errors sum to the squared error against the mixed target plus a constant). alpha_t = 1 is
ordinary training on the labels, alpha_t = 0 pure self-distillation (Mobahi et al., 2020). The paper's
range is alpha in [0, 1]; the formulas below hold for any real alpha.

Closed form (the paper's "every step is a function of the initial fit"). With K = V diag(d) V^T and
a_i = d_i / (d_i + lam) the initial fit is f_1(X) = V diag(a) V^T y, and

    f_t(X) = V diag(b_t) V^T y,    b_1 = a,    b_t = a * (alpha_t + (1 - alpha_t) * b_{t-1}),

explicitly  b_t = sum_{s=1..t} alpha_s * prod_{r=s+1..t} (1 - alpha_r) * a^{t-s+1}  (alpha_1 := 1), which for
a constant alpha is  b_t = (1 - alpha)^{t-1} a^t + alpha * sum_{k=1..t-1} (1 - alpha)^{k-1} a^k.
(The notebook's `Recurser`: B_t = A((1 - alpha) B_{t-1} + alpha I).) At a new input x the fit is
f_t(x) = k(x, X) V diag(q_t / (d + lam)) V^T y with b_t = a * q_t (q_t = the step's target in the
eigenbasis), so no eigenvalue is ever divided by.

Infinite steps with a fixed alpha in (0, 1]: b_t -> alpha d / (alpha d + lam), i.e.

    f_inf = K (K + (lam / alpha) I)^{-1} y,

the original problem with the regularisation amplified from lam to lam / alpha (alpha = 0: the zero
function, Mobahi et al.'s collapse). Each b_t decreases with t towards that limit, the small-eigenvalue
directions fastest (the paper's sparsification, extended from alpha = 0 to alpha in [0, 1]).

Optimal alpha. The step-t fit is affine in alpha_t, at every input (training or new): the target is affine in
alpha_t and the ridge fit is linear in the target, so

    f_t^{alpha} = alpha * g_1 + (1 - alpha) * g_0,   g_1 = the fit to y (= f_1),  g_0 = the fit to f_{t-1}(X).

Against reference targets z at evaluation points (the noiseless function, or held-out labels: never the
training labels y, see below) the squared error  E(alpha) = ||z - f_t^{alpha}||^2  (sum over points and
outputs; the mean has the same minimiser) is a quadratic in alpha, minimised at

    alpha_t* = <z - g_0, g_1 - g_0> / ||g_1 - g_0||^2,

and over the paper's range [0, 1] at alpha_t* clipped to [0, 1] (a convex quadratic on an interval). Chosen
greedily at each step given the previous one. On the training inputs with z = y the unconstrained optimum
is always >= 1 (componentwise 1 - a b_{t-1} >= a (1 - b_{t-1}) since a <= 1): the training error alone
always asks for alpha >= 1, i.e. no distillation, so the reference must be data the fits did not see.

Deep networks (`estimate_alpha`). A network is not linear in its targets, but the same two endpoints give
the estimate: train the step-t student once with alpha = 1 (labels only: that is generation 1, the same at
every step) and once with alpha = 0 (only the previous generation's outputs), take both models' class
probabilities on held-out examples, and put them in the formula above with the held-out one-hot labels as
z. That is two trainings per step instead of one per grid point; the step is then trained with the
estimated alpha. The squared error on softmax outputs is the loss of the official code.

Note: the paper's full text could not be consulted when this module was written (only its abstract and the
official code); the objective and the estimate above are derived from the paper's setting and claims, and
`docs/self_distillation.md` lists what is checked and what is assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "alpha_objective",
    "distillation_multipliers",
    "estimate_alpha",
    "infinite_step_limit",
    "kernel_ridge_fit",
    "optimal_alpha",
    "optimal_alpha_from_endpoints",
    "self_distillation_fits",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------- checks
def _as64(x: Tensor | Sequence[float] | float, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
        t = x.detach().to(_F64)
    else:  # Python numbers straight to float64 (torch.as_tensor would round them through float32)
        t = torch.as_tensor(x, dtype=_F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return t


def _check_kernel(K: Tensor) -> Tensor:
    K = _as64(K, "K")
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"K must be a non-empty square (n, n) matrix, got shape {tuple(K.shape)}")
    scale = float(K.abs().max()) or 1.0
    if not torch.allclose(K, K.T, rtol=0.0, atol=1e-10 * scale):
        raise ValueError("K must be symmetric (a kernel matrix k(X, X))")
    return K


def _check_targets(y: Tensor, n: int, name: str) -> Tensor:
    y = _as64(y, name)
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{name} must have shape (n,) or (n, C) with n = {n}, got {tuple(y.shape)}")
    return y


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not (lam > 0.0 and lam < float("inf")):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    return lam


def _check_eval(K_eval: Tensor | None, n: int) -> Tensor | None:
    if K_eval is None:
        return None
    K_eval = _as64(K_eval, "K_eval")
    if K_eval.ndim != 2 or K_eval.shape[1] != n:
        raise ValueError(f"K_eval must have shape (m, n) with n = {n}, got {tuple(K_eval.shape)}")
    return K_eval


def _check_alphas(alphas: Sequence[float] | Tensor) -> Tensor:
    a = _as64(alphas, "alphas").reshape(-1)
    return a


# ------------------------------------------------------------------------------------------ kernel ridge
def kernel_ridge_fit(K: Tensor, y: Tensor, lam: float, K_eval: Tensor | None = None) -> Tensor:
    """Kernel ridge regression: f = k(., X) (K + lam I)^{-1} y, by one linear solve (float64).

    `K` (n, n) the training kernel matrix, `y` (n,) or (n, C) the targets, `lam` > 0. Returns the fit at the
    training inputs, K (K + lam I)^{-1} y, or at new inputs when `K_eval` = k(X_new, X) (m, n) is given.
    """
    K = _check_kernel(K)
    n = K.shape[0]
    y = _check_targets(y, n, "y").to(K.device)
    lam = _check_lam(lam)
    K_eval = _check_eval(K_eval, n)
    coef = torch.linalg.solve(K + lam * torch.eye(n, dtype=_F64, device=K.device), y)
    return (K if K_eval is None else K_eval.to(K.device)) @ coef


def _step_weights(alphas: Tensor) -> Tensor:
    """(T, T) lower-triangular W, W[t, s] = alpha_s * prod_{r=s+1..t} (1 - alpha_r) (0-based steps,
    alpha_0 := 1): the share of the labels that entered at step s in the target of step t."""
    full = torch.cat([torch.ones(1, dtype=_F64, device=alphas.device), alphas])
    T = full.numel()
    W = torch.zeros(T, T, dtype=_F64, device=alphas.device)
    W[0, 0] = 1.0
    for t in range(1, T):  # scalars only: row t = (1 - alpha_t) * row t-1, plus alpha_t on the diagonal
        W[t, :t] = (1.0 - full[t]) * W[t - 1, :t]
        W[t, t] = full[t]
    return W


def _target_multipliers(a: Tensor, alphas: Tensor) -> Tensor:
    """(T, n) q_t, the step-t target in the eigenbasis relative to V^T y: q_t = sum_s W[t, s] a^{t-s}."""
    W = _step_weights(alphas)
    T = W.shape[0]
    powers = a.unsqueeze(0) ** torch.arange(T, dtype=_F64, device=a.device).unsqueeze(1)  # (T, n): a^k
    # q[t] = sum_{s <= t} W[t, s] a^{t-s}: gather a^{t-s} for every (t, s).
    lag = (torch.arange(T).unsqueeze(1) - torch.arange(T).unsqueeze(0)).clamp(min=0).to(a.device)  # (T, T)
    return torch.einsum("ts,tsn->tn", W, powers[lag])


def distillation_multipliers(
    eigenvalues: Tensor | Sequence[float], lam: float, alphas: Sequence[float] | Tensor
) -> Tensor:
    """The paper's diagonal matrices B_t: f_t(X) = V diag(b_t) V^T y, for the kernel eigenvalues `d`.

    Returns a (T, n) tensor, row t-1 = b_t, T = len(alphas) + 1, computed in closed form (no recursion):
    b_t = sum_{s=1..t} alpha_s prod_{r=s+1..t} (1 - alpha_r) a^{t-s+1} with a = d / (d + lam), alpha_1 = 1.
    `alphas[i]` is the weight of the ground truth at step i + 2. Eigenvalues below 0 (round-off) count as 0.
    """
    d = _as64(eigenvalues, "eigenvalues").reshape(-1).clamp(min=0.0)
    lam = _check_lam(lam)
    a = d / (d + lam)
    return a * _target_multipliers(a, _check_alphas(alphas).to(d.device))


def self_distillation_fits(
    K: Tensor,
    y: Tensor,
    lam: float,
    alphas: Sequence[float] | Tensor,
    *,
    method: Literal["closed_form", "solve"] = "closed_form",
    K_eval: Tensor | None = None,
) -> Tensor:
    """The fits of iterative self-distillation with ground-truth weighting, after every step.

    Step 1 fits `y` by kernel ridge regression with `lam`; step i + 2 fits
    alphas[i] * y + (1 - alphas[i]) * f_{i+1}(X). Returns a (T, n[, C]) float64 tensor, T = len(alphas) + 1,
    row t-1 = f_t at the training inputs (or at the rows of `K_eval` = k(X_new, X), shape (T, m[, C])).

    method="solve": one kernel ridge solve per step (the definition). method="closed_form": the paper's
    closed form from the eigen-decomposition of K (the initial fit's), f_t(X) = V diag(b_t) V^T y, see
    `distillation_multipliers`; at new inputs f_t(x) = k(x, X) V diag(q_t / (d + lam)) V^T y, b_t = a q_t.
    """
    K = _check_kernel(K)
    n = K.shape[0]
    y = _check_targets(y, n, "y").to(K.device)
    lam = _check_lam(lam)
    alph = _check_alphas(alphas).to(K.device)
    K_eval = _check_eval(K_eval, n)
    if K_eval is not None:
        K_eval = K_eval.to(K.device)
    if method == "solve":
        eye = torch.eye(n, dtype=_F64, device=K.device)
        system = K + lam * eye
        fits_train, fits_eval = [], []
        target = y
        for t in range(alph.numel() + 1):
            if t > 0:
                target = alph[t - 1] * y + (1.0 - alph[t - 1]) * fits_train[-1]
            coef = torch.linalg.solve(system, target)
            fits_train.append(K @ coef)
            if K_eval is not None:
                fits_eval.append(K_eval @ coef)
        return torch.stack(fits_eval if K_eval is not None else fits_train)
    if method != "closed_form":
        raise ValueError(f"method must be 'closed_form' or 'solve', got {method!r}")
    d, V = torch.linalg.eigh(K)
    d = d.clamp(min=0.0)
    a = d / (d + lam)
    q = _target_multipliers(a, alph)  # (T, n)
    z = V.T @ y  # y in the eigenbasis: (n,) or (n, C)
    scale = a * q if K_eval is None else q / (d + lam)  # (T, n)
    coeffs = scale.unsqueeze(-1) * z.reshape(n, -1).unsqueeze(0)  # (T, n, C')
    out = torch.einsum("ij,tjc->tic", V if K_eval is None else K_eval @ V, coeffs)
    return out.reshape(out.shape[0], out.shape[1], *y.shape[1:])


def infinite_step_limit(
    K: Tensor, y: Tensor, lam: float, alpha: float, K_eval: Tensor | None = None
) -> Tensor:
    """Infinitely many steps with a fixed `alpha` in [0, 1]: f_inf = k(., X) (K + (lam / alpha) I)^{-1} y.

    The paper's amplified regularisation: the original kernel ridge problem with lam replaced by lam / alpha
    (multipliers b_inf = alpha d / (alpha d + lam)). alpha = 0 gives the zero function. Shape as
    `kernel_ridge_fit`.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1] for the limit, got {alpha}")
    if alpha == 0.0:
        K = _check_kernel(K)
        y = _check_targets(y, K.shape[0], "y")
        _check_lam(lam)
        K_eval = _check_eval(K_eval, K.shape[0])
        m = K.shape[0] if K_eval is None else K_eval.shape[0]
        return torch.zeros(m, *y.shape[1:], dtype=_F64, device=K.device)
    return kernel_ridge_fit(K, y, _check_lam(lam) / alpha, K_eval)


# ------------------------------------------------------------------------------------------ optimal alpha
def optimal_alpha_from_endpoints(
    fit_ground_truth: Tensor, fit_distilled: Tensor, reference: Tensor, *, clip: bool = True
) -> float:
    """argmin_alpha ||reference - (alpha * fit_ground_truth + (1 - alpha) * fit_distilled)||^2, closed form.

    alpha* = <z - g_0, g_1 - g_0> / ||g_1 - g_0||^2 (Frobenius inner product over all points and outputs),
    g_1 = `fit_ground_truth` (trained with alpha = 1), g_0 = `fit_distilled` (trained with alpha = 0),
    z = `reference`, all the same shape. `clip=True` returns the minimiser over the paper's range [0, 1] (the
    unconstrained one clipped: the objective is a convex quadratic). When g_1 == g_0 the objective does not
    depend on alpha and 1.0 (labels only) is returned.
    """
    g1 = _as64(fit_ground_truth, "fit_ground_truth")
    g0 = _as64(fit_distilled, "fit_distilled").to(g1.device)
    z = _as64(reference, "reference").to(g1.device)
    if not (g1.shape == g0.shape == z.shape):
        raise ValueError(
            f"fit_ground_truth, fit_distilled and reference must have one shape, got "
            f"{tuple(g1.shape)}, {tuple(g0.shape)}, {tuple(z.shape)}"
        )
    direction = g1 - g0
    denom = float((direction * direction).sum())
    scale = float(torch.maximum(g1.abs().max(), g0.abs().max())) if g1.numel() else 0.0
    if g1.numel() == 0 or denom <= (1e-15 * max(scale, 1e-300)) ** 2 * g1.numel():
        return 1.0
    alpha = float(((z - g0) * direction).sum()) / denom
    return min(max(alpha, 0.0), 1.0) if clip else alpha


def _endpoint_fits(
    K: Tensor, y: Tensor, lam: float, previous_fit: Tensor, K_eval: Tensor | None
) -> tuple[Tensor, Tensor]:
    K = _check_kernel(K)
    n = K.shape[0]
    y = _check_targets(y, n, "y").to(K.device)
    prev = _check_targets(previous_fit, n, "previous_fit").to(K.device)
    if prev.shape != y.shape:
        raise ValueError(f"previous_fit must have the shape of y {tuple(y.shape)}, got {tuple(prev.shape)}")
    both = torch.stack([y, prev], dim=-1)  # one solve for the two targets
    fits = kernel_ridge_fit(K, both.reshape(n, -1), lam, K_eval).reshape(-1, *both.shape[1:])
    return fits[..., 0], fits[..., 1]


def alpha_objective(
    K: Tensor,
    y: Tensor,
    lam: float,
    previous_fit: Tensor,
    reference: Tensor,
    alpha: float,
    K_eval: Tensor | None = None,
) -> float:
    """E(alpha) = ||reference - f_t^{alpha}||^2, the quantity `optimal_alpha` minimises, by refitting.

    f_t^{alpha} is kernel ridge regression (same K, lam) on the targets alpha y + (1 - alpha) previous_fit,
    evaluated at the training inputs or at the rows of `K_eval`; `reference` holds the targets there.
    """
    K = _check_kernel(K)
    prev = _check_targets(previous_fit, K.shape[0], "previous_fit").to(K.device)
    y = _check_targets(y, K.shape[0], "y").to(K.device)
    fit = kernel_ridge_fit(K, alpha * y + (1.0 - alpha) * prev, lam, K_eval)
    z = _as64(reference, "reference").to(K.device)
    if z.shape != fit.shape:
        raise ValueError(f"reference must have shape {tuple(fit.shape)}, got {tuple(z.shape)}")
    return float(((z - fit) ** 2).sum())


def optimal_alpha(
    K: Tensor,
    y: Tensor,
    lam: float,
    previous_fit: Tensor,
    reference: Tensor,
    K_eval: Tensor | None = None,
    *,
    clip: bool = True,
) -> float:
    """The closed-form optimal ground-truth weight alpha_t for one self-distillation step in kernel ridge.

    Minimises `alpha_objective`: E(alpha) = || z - f_t^{alpha} ||^2 with f_t^{alpha} the kernel ridge fit
    (`K`, `lam`) to alpha * y + (1 - alpha) * f_{t-1}(X), evaluated at the rows of `K_eval` = k(X_eval, X)
    (default: the training inputs), z = `reference` there (noiseless values or held-out targets; with the
    training inputs and z = y the optimum is always >= 1, see the module note). `previous_fit` is f_{t-1}(X)
    at the training inputs (a row of `self_distillation_fits`). Since f_t^{alpha} = alpha g_1 + (1-alpha) g_0,

        alpha_t* = <z - g_0, g_1 - g_0> / ||g_1 - g_0||^2,

    g_1, g_0 the fits to y and to f_{t-1}(X). `clip=True` (default): over [0, 1], the paper's range.
    """
    g1, g0 = _endpoint_fits(K, y, lam, previous_fit, K_eval)
    return optimal_alpha_from_endpoints(g1, g0, reference, clip=clip)


# ------------------------------------------------------------------------------------------ deep networks
def _probabilities(x: Tensor, from_logits: bool | None, name: str) -> Tensor:
    x = _as64(x, name)
    if from_logits is None:
        looks_like_probs = bool(((x >= 0) & (x <= 1)).all()) and bool(
            torch.allclose(x.sum(-1), torch.ones((), dtype=_F64, device=x.device), atol=1e-4)
        )
        from_logits = not looks_like_probs
    return torch.softmax(x, dim=-1) if from_logits else x


def estimate_alpha(
    distilled_predictions: Tensor,
    labels: Tensor,
    ground_truth_predictions: Tensor,
    *,
    from_logits: bool | None = None,
    clip: bool = True,
) -> float:
    """Estimate the ground-truth weight alpha_t of a self-distillation step for a deep classifier.

    The kernel result transferred to networks: the step-t model is taken to be the interpolation
    alpha * P_1 + (1 - alpha) * P_0 of two models of the same architecture, and alpha is chosen to minimise
    the squared error to the one-hot labels Y on held-out examples,

        alpha_t_hat = <Y - P_0, P_1 - P_0> / ||P_1 - P_0||^2   (clipped to [0, 1] by default),

    - `distilled_predictions` P_0 (N, C): the model trained at this step with alpha = 0, i.e. only on the
      previous generation's outputs (not the previous generation itself: at step 2 that would equal P_1);
    - `ground_truth_predictions` P_1 (N, C): the model trained with alpha = 1, on the labels alone (the
      first generation; it is the same model at every step);
    - `labels` Y: (N,) class indices (rows < 0 are ignored, as ignore_index) or (N, C) one-hot / soft targets,
      of examples neither model was trained on (on the training set both models nearly interpolate their
      own targets and the estimate carries no information).

    Predictions are class probabilities or logits (softmax taken); `from_logits=None` decides per tensor
    (rows in [0, 1] summing to 1 are probabilities). `from_logits=False` with arbitrary real outputs gives
    the plain regression estimate (`optimal_alpha_from_endpoints`). Returns a Python float.
    """
    p0 = _probabilities(distilled_predictions, from_logits, "distilled_predictions")
    p1 = _probabilities(ground_truth_predictions, from_logits, "ground_truth_predictions").to(p0.device)
    if p0.ndim != 2 or p0.shape != p1.shape:
        raise ValueError(
            f"distilled_predictions and ground_truth_predictions must both be (N, C), got "
            f"{tuple(p0.shape)} and {tuple(p1.shape)}"
        )
    lab = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    lab = lab.to(p0.device)
    if lab.ndim == 1:
        if lab.is_floating_point() or lab.shape[0] != p0.shape[0]:
            raise ValueError(f"labels must be (N,) class indices with N = {p0.shape[0]}, or (N, C) targets")
        keep = lab >= 0
        if bool((lab[keep] >= p0.shape[1]).any()):
            raise ValueError(f"labels must be class indices below C = {p0.shape[1]}")
        p0, p1, lab = p0[keep], p1[keep], lab[keep]
        target = torch.nn.functional.one_hot(lab.long(), p0.shape[1]).to(_F64)
    else:
        target = _as64(labels, "labels").to(p0.device)
        if target.shape != p0.shape:
            raise ValueError(f"labels must be (N,) or {tuple(p0.shape)}, got {tuple(target.shape)}")
    return optimal_alpha_from_endpoints(p1, p0, target, clip=clip)

"""Seed-paper objectives with adaptive targets, weights or temperatures (pure parts only).

The state of their schedules (TAID's t, AdaKD's token ratio) lives in `distill.objectives`; here are the
pure loss functions and the pure update rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from distill.losses._common import (
    entropy_from_log_probs,
    flatten_rows,
    fused_kl,
    kl_from_log_probs,
    reduce_rows,
    soften,
)
from distill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

# ----------------------------------------------------------------------------------------------- TAID


def taid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    interpolation: float | Tensor = 0.4,
) -> Tensor:
    """TAID: KL(P_t || Q) with the interpolated target P_t = softmax(((1 - t) sg(z_s) + t z_t) / T).

    From "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language
    Models" (Shing et al., ICLR 2025). ``interpolation`` is t in [0, 1] (a float or a 0-dim tensor, e.g. the
    schedule's buffer); t = 1 is the forward KL. The student logits inside the target are detached, as in
    the official code. The official loss is the cross-entropy form ``-sum P_t log Q`` = this value +
    H(P_t); gradients agree. `TAIDSchedule` / `taid_update` give the adaptive t.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    t = interpolation
    if isinstance(t, Tensor):
        t = t.detach().to(device=rows.student.device, dtype=rows.student.dtype)
    zs = rows.student
    target_logits = (1 - t) * zs.detach() + t * rows.teacher
    return reduce_rows(fused_kl(target_logits, zs, temperature), rows, reduction)


def taid_update(
    t: float,
    prev_loss: float,
    momentum: float,
    loss: float,
    progress: float,
    *,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    adaptive: bool = True,
) -> tuple[float, float, float]:
    """One step of TAID's adaptive schedule; returns the new ``(t, prev_loss, momentum)``.

    As in the official code: on the first call (``prev_loss`` infinite) only the loss is stored; then
    m <- beta m + (1 - beta) (prev - loss) / (prev + 1e-15), and
    t <- min(t_end, max(t_start + (t_end - t_start) progress, t + alpha sigmoid(m) (1 - t))),
    so t never falls below the linear schedule and never decreases. ``adaptive=False`` is the linear
    schedule alone. ``progress`` is the fraction of training done.
    """
    if math.isinf(prev_loss):
        return t, loss, momentum
    relative_change = (prev_loss - loss) / (prev_loss + 1e-15)
    momentum = beta * momentum + (1 - beta) * relative_change
    t_target = t_start + (t_end - t_start) * progress
    if adaptive:
        delta = alpha * (1.0 / (1.0 + math.exp(-momentum))) * (1 - t)
        t = min(t_end, max(t_target, t + delta))
    else:
        t = t_target
    return t, loss, momentum


# ---------------------------------------------------------------------------------------------- BD-KD


def _entropy_rows(logits: Tensor, temperature: float) -> Tensor:
    """Per-row entropy of softmax(logits / T), chunked over rows (used without gradient)."""
    out = logits.new_empty(logits.shape[0])
    step = max(1, (1 << 22) // max(logits.shape[-1], 1))
    for i in range(0, logits.shape[0], step):
        out[i : i + step] = entropy_from_log_probs(
            torch.log_softmax(soften(logits[i : i + step], temperature), -1)
        )
    return out


def bdkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    balance: float = 3.0,
) -> Tensor:
    """BD-KD: w_f KL(P || Q) + w_r KL(Q || P) per row, weights set by which side is more uncertain.

    From "BD-KD: Balancing the Divergences for Online Knowledge Distillation" (Amara et al., 2022). With
    H the entropy of the softened distributions (no gradient),

        w_r = b if H(Q) > H(P) else 1,   w_f = b if H(P) > H(Q) else 1   (b = ``balance``; ties: both 1),

    so a sample where the student is less confident than the teacher leans on the mode-seeking reverse KL,
    and one where it is over-confident leans on the mass-covering forward KL. This is the paper's structure
    (sample-wise weighting of forward and reverse KL by the student-teacher entropy gap). Why this exact
    weighting is kept: BD-KD has no official code (no repository by the authors is public), and the paper's
    full text with its weight equations could not be consulted when this was written (only its abstract and
    third-party summaries), so no other weighting could be verified. The only public implementation is the
    BD-KD baseline in the AdaKD authors' code (SassyRong/AdaKD, ``loss/losses.py``, ``bdkd``), which this
    function matches: the same entropy comparison, b = 3, per-token weights, mean over tokens. That code
    writes the forward term in cross-entropy form (-sum P log Q = KL(P || Q) + H(P)): its value is ours plus
    w_f H(P), with the same gradient in the student. ``balance = 1`` is the plain sum of both KLs.

    For online KD the teacher's own term is this function with the roles swapped (the `bdkd` objective's
    ``online=True``). Summaries of the paper describe the teacher's online loss as its usual loss with a
    reverse-KL regulariser, which that option does not claim to reproduce.
    """
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    with torch.no_grad():
        h_s = _entropy_rows(rows.student, temperature)
        h_t = _entropy_rows(rows.teacher, temperature)
        one = torch.ones_like(h_s)
        w_forward = torch.where(h_t > h_s, balance * one, one)
        w_reverse = torch.where(h_s > h_t, balance * one, one)
    forward = fused_kl(rows.teacher, rows.student, temperature)
    reverse = fused_kl(rows.student, rows.teacher, temperature)
    per_row = w_forward * forward + w_reverse * reverse
    return reduce_rows(per_row, rows, reduction)


# ---------------------------------------------------------------------------------------------- AdaKD

BASE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "total_variation": total_variation,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def hellinger_distance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row Hellinger distance sqrt(1/2 sum (sqrt p - sqrt q)^2), in [0, 1].

    Differentiable, with gradient 0 (not NaN) on rows where the two distributions are equal (where the
    square root has an infinite derivative)."""
    diff = torch.exp(0.5 * log_p) - torch.exp(0.5 * log_q)
    half_sq = 0.5 * (diff * diff).sum(-1)
    positive = half_sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, half_sq, 1.0)), 0.0)


def _divide_rows(logits: Tensor, tau: Tensor) -> Tensor:
    """logits / tau per row, leaving -inf entries as they are: dividing them by a tau that carries gradient
    would give a NaN gradient (-inf * 0) in tau."""
    finite = torch.isfinite(logits)
    return torch.where(finite, torch.where(finite, logits, 0.0) / tau[:, None], logits)


def adakd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    base: str = "reverse_kl",
    token_ratio: float | Tensor = 1.0,
    temperature_scale: float = 0.5,
    inverse: bool = True,
    base_params: dict | None = None,
    detach_temperature: bool = False,
) -> Tensor:
    """AdaKD: loss-driven token focusing (LATF) + inverse-difficulty temperature scaling (IDTS).

    From "LLM-Oriented Token-Adaptive Knowledge Distillation" (Xie et al., AAAI 2026), following the
    official code (SassyRong/AdaKD, ``loss/losses.py``: ``calculate_distillation_weight`` and ``AdaKD``):
    each counted token's difficulty d is the Hellinger distance between teacher and student; the
    ``token_ratio`` fraction of hardest tokens is kept (at least one; the ratio is what the LATF schedule
    adapts); for the kept tokens,

        tau_i = T exp(-c tanh(log(d_i / median(d)))),  loss_i = tau_i^2 D(z_s / tau_i, z_t / tau_i)

    (``inverse=False`` flips the sign of the exponent), D the ``base`` divergence (``base_params`` go to it).
    ``reduction="mean"`` averages over kept tokens (the official normalisation); ``"none"`` is 0 on dropped
    tokens. ``temperature_scale`` c = 0.5 is the official script's default.

    Gradient: as in the official code, tau_i is a differentiable function of the student's logits (through
    d_i and the median of the kept d), and the gradient flows through it: into z_s / tau_i, z_t / tau_i and
    the tau_i^2 weight. This keeps a second (n_kept, V) graph for the Hellinger distances.
    ``detach_temperature=True`` treats the temperatures as constants instead (this library's earlier
    default; its gradient differs from the official one by 2-90 % on random logits of 10 to 1000 classes;
    no extra graph is kept). The token selection carries no gradient either way (a top-k of indices).
    """
    if base not in BASE_DIVERGENCES:
        raise ValueError(f"unknown AdaKD base divergence {base!r}; choose from {sorted(BASE_DIVERGENCES)}")
    ratio = float(token_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"token_ratio must lie in (0, 1], got {ratio}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    zs, zt = rows.student, rows.teacher
    n = zs.shape[0]
    per_row = zs.new_zeros(n)
    if n > 0:
        n_keep = max(1, int(n * ratio))
        with torch.no_grad():
            difficulty = hellinger_distance(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
            kept = torch.topk(difficulty, k=n_keep, largest=True).indices
        zs_kept, zt_kept = zs[kept], zt[kept]
        if detach_temperature:
            d = difficulty[kept]
        else:  # the same distances again, now with their graph (only for the kept rows)
            d = hellinger_distance(torch.log_softmax(zt_kept, -1), torch.log_softmax(zs_kept, -1))
        rel = (d / torch.median(d).clamp_min(1e-12)).clamp_min(1e-8)
        sign = -1.0 if inverse else 1.0
        tau = temperature * torch.exp(sign * temperature_scale * torch.tanh(torch.log(rel)))
        fn = BASE_DIVERGENCES[base]
        values = fn(
            _divide_rows(zs_kept, tau),
            _divide_rows(zt_kept, tau),
            temperature=1.0,
            reduction="none",
            **(base_params or {}),
        )
        per_row = per_row.index_put((kept,), values * tau * tau)
        count = n_keep
    else:
        count = 0
    if reduction == "mean":
        return per_row.sum() / max(count, 1)
    return reduce_rows(per_row, rows, reduction)


def latf_update(
    ratio: float,
    ema: float | None,
    reference: float | None,
    loss: float,
    progress: float,
    *,
    decay: float = 0.99,
    tolerance: float = 0.05,
    step: float = 0.05,
    warmup: float = 0.05,
    min_ratio: float = 0.1,
) -> tuple[float, float, float | None]:
    """One step of AdaKD's LATF token-ratio schedule; returns the new ``(ratio, ema, reference)``.

    As in the official training loop: ema <- decay ema + (1 - decay) loss; after ``warmup`` (a fraction of
    training) the current ema becomes the reference; when the ema has risen by more than ``tolerance``
    times the reference (unstable learning) the ratio grows by the factor (1 + step) (at most 1), when it
    has fallen by more than that the ratio shrinks by (1 - step) (at least ``min_ratio``); either change
    resets the reference. Script defaults: tolerance 0.05, step 0.05, decay 0.99, warm-up 5 %.
    """
    ema = loss if ema is None else decay * ema + (1 - decay) * loss
    if reference is None:
        if progress > warmup:
            reference = ema
        return ratio, ema, reference
    delta = reference - ema
    eps = reference * tolerance
    if delta < -eps:
        ratio = min(ratio * (1 + step), 1.0)
        reference = ema
    elif delta > eps:
        ratio = max(ratio * (1 - step), min_ratio)
        reference = ema
    return ratio, ema, reference


# ------------------------------------------------------------------------------------------- TSD-KD


def token_selective_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    beta: float = 0.9,
    entropy_weight: float = 1.0,
    entropy_quantile: float = 0.1,
) -> Tensor:
    """TSD-KD, direct part: sigmoid(H(Q) - H(P)) JSD_beta(P, Q) + lambda H(Q) on high-entropy tokens.

    From "Explain in Your Own Words: Improving Reasoning via Token-Selective Dual Knowledge Distillation"
    (2026), following the official code: each token's generalised JSD (TRL convention, beta = 0.9) is
    weighted by sigmoid of the student-minus-teacher entropy (no gradient), so tokens where the student is
    less confident than the teacher count more; the entropy regulariser adds the mean student entropy over
    tokens whose entropy is at least the ``entropy_quantile`` quantile of counted tokens (sharpening the
    student; ``entropy_weight`` lambda = 1 as in the code, 0 turns it off). Unlike the code, padding
    tokens never enter the regulariser. The indirect (preference re-ranking) part is not included.
    Per row, the regulariser is spread as lambda n / n_sel H_i on selected rows, so the mean over rows
    is the official value.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    rows = flatten_rows(
        student_logits, teacher_logits, mask=mask, temperature=temperature, reduction=reduction
    )
    zs, zt = soften(rows.student, temperature), soften(rows.teacher, temperature)
    log_q = torch.log_softmax(zs, -1)
    log_p = torch.log_softmax(zt, -1)
    h_s = entropy_from_log_probs(log_q)
    with torch.no_grad():
        weight = torch.sigmoid(h_s - entropy_from_log_probs(log_p))
    jsd = generalized_jsd(zs, zt, beta=beta, reduction="none")
    per_row = weight * jsd
    n = zs.shape[0]
    if entropy_weight != 0 and n > 0:
        with torch.no_grad():
            threshold = torch.quantile(h_s.detach(), entropy_quantile)
            selected = h_s.detach() >= threshold
            n_sel = int(selected.sum())
        per_row = per_row + entropy_weight * (n / max(n_sel, 1)) * torch.where(
            selected, h_s, torch.zeros_like(h_s)
        )
    return reduce_rows(per_row, rows, reduction)


# ------------------------------------------------------------------------------------------- Swing KD


def swing_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    privacy_scores: Tensor | None = None,
    swing: float = 1.0,
    noise_scale: float = 0.1,
    seed: int | None = 0,
) -> Tensor:
    """Swing distillation: per-token temperature from a privacy score, seeded noise on the soft targets.

    From "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework" (Li et al., 2022).
    Each counted token i gets tau_i = T (1 + swing * s_i), with s_i in [0, 1] the likelihood that the token
    is private (``privacy_scores``, leading shape; when None the teacher's top-1 probability stands in as a
    memorisation proxy), so likely-private tokens receive flatter, less informative targets. The teacher's
    softened logits get Laplace noise of scale ``noise_scale`` from a generator seeded with ``seed``
    (same seed, same noise; None draws from the global generator), and the loss is
    tau_i^2 KL(softmax(z_t / tau_i + noise) || softmax(z_s / tau_i)). No official code is public: the
    mapping from score to temperature and the noise law are this library's reading of the paper.
    """
    rows = flatten_rows(
        student_logits,
        teacher_logits,
        mask=mask,
        temperature=temperature,
        reduction=reduction,
        extras=[privacy_scores],
    )
    zs, zt = rows.student, rows.teacher
    scores = rows.extras[0]
    if scores is None:
        with torch.no_grad():
            scores = torch.softmax(zt, -1).amax(-1)
    scores = scores.detach().to(device=zs.device, dtype=zs.dtype).clamp(0.0, 1.0)
    tau = temperature * (1.0 + swing * scores)
    zt_soft = zt.detach() / tau[:, None]
    if noise_scale > 0 and zt.numel() > 0:
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        u = torch.rand(zt.shape, generator=generator, dtype=torch.float64) - 0.5
        laplace = -noise_scale * torch.sign(u) * torch.log1p(-2 * u.abs())
        zt_soft = zt_soft + laplace.to(device=zs.device, dtype=zs.dtype)
    log_p = torch.log_softmax(zt_soft, -1)
    log_q = torch.log_softmax(zs / tau[:, None], -1)
    return reduce_rows(tau * tau * kl_from_log_probs(log_p, log_q), rows, reduction)

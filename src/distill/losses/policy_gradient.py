"""Reverse KL on student prefixes as a policy gradient with a dense teacher-student log-ratio reward.

"Decoupling KL and Trajectories: A Unified Perspective for SFT, DAgger, Offline RL, and OPD in LLM
Distillation" (2025): with y sampled from the student q and r_t = log p(y_t | y_<t) - log q(y_t | y_<t)
(p the teacher), the REINFORCE surrogate

    L_PG = -(1/N) sum_t sg(A_t) log q(y_t | y_<t),    A_t = sum_{t' >= t} gamma^(t' - t) r_t'

has the expected gradient
- gamma = 0 (immediate reward): E_y[grad sum_t KL(q(.|y_<t) || p(.|y_<t))], the direct token-level reverse
  KL on student prefixes (the prefixes held fixed, as on-policy distillation trains);
- gamma = 1 (reward to go): grad KL(q(Y) || p(Y)), the sequence-level reverse KL, whose value is
  E_y[sum_t KL(q(.|y_<t) || p(.|y_<t))] (the decomposition the paper starts from).
Both identities are checked exactly in `tests/onpolicy/test_pg.py` by enumerating every sequence of a tiny
vocabulary. The loss's value is the sampled reverse-KL estimate mean_t(-r_t); only its gradient is the
policy gradient. It is unbiased only when y was sampled from q itself (temperature 1, no top-k / top-p):
use it with `student_rollouts` and `mix: 1`.
Registered as the objective `reverse_kl_pg` in `distill.objectives.onpolicy`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) at `labels` (B, T); -100 labels read token 0 (mask them)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision upcast, float64 kept
    log_q = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def rewards_to_go(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """A_t = sum_{t' >= t, counted} gamma^(t' - t) r_t' along the last dimension (positions not counted carry
    nothing and are skipped, so padding between tokens does not discount)."""
    if discount == 0.0:
        return rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        counted = mask[..., t]
        running = torch.where(counted, rewards[..., t] + discount * running, running)
        out[..., t] = torch.where(counted, running, torch.zeros_like(running))
    return out


def reverse_kl_pg(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    discount: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Policy-gradient form of reverse KL with reward r_t = log p_T(y_t|.) - log q_S(y_t|.) (no gradient
    through the reward): value -mean(r), gradient -mean_t sg(A_t) grad log q(y_t). See the module docstring.

    `student_logits`, `teacher_logits`: (B, T, V); `labels` (B, T), the sampled tokens; `discount` gamma in
    [0, 1]; `reduction` "mean" (per counted token) or "sum".
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must lie in [0, 1], got {discount}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.dim() == 2:  # a flat batch of tokens: one step per row
        student_logits, teacher_logits, labels = (
            student_logits[:, None],
            teacher_logits[:, None],
            labels[:, None],
        )
        mask = None if mask is None else mask[:, None]
    if mask is None:
        mask = labels != -100
    mask = mask & (labels != -100)
    log_q = token_log_probs(student_logits, labels, temperature)
    with torch.no_grad():
        log_p = token_log_probs(teacher_logits, labels, temperature)
        reward = (log_p - log_q) * mask
        advantage = rewards_to_go(reward, mask, discount)
    # value: the sampled KL estimate; gradient: the score-function term only (log_q - sg(log_q) is 0).
    per_token = -reward - advantage * (log_q - log_q.detach())
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / mask.sum().clamp(min=1)

"""SODA's loss ("SODA: Semi On-Policy Black-Box Distillation for Large Language Models", Chen et al., 2026):
SFT on the teacher's responses plus a DPO term preferring them over a static snapshot of the student's own
outputs, whose reference is the initial student:

    L = w_sft * (-(1/N_c) sum_{t in chosen} log q(y_t^T | .))
        + (1/P) sum_pairs -log sigmoid( beta [ (log q(y^T) - log q0(y^T)) - (log q(y^S) - log q0(y^S)) ] ),

y^T the teacher's response, y^S the snapshot, q0 the frozen initial student, log q(y) a sequence's summed
token log-probabilities. Rows come in (chosen, rejected) pairs: rows 2i (teacher) and 2i + 1 (snapshot); the
frozen reference's logits arrive as `teacher_logits`. Registered as the objective `soda` in
`distill.objectives.onpolicy`; the source that builds the pairs is `distill.sources.soda`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.policy_gradient import token_log_probs


def sequence_log_probs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Per row, the summed log-probability of its counted label tokens."""
    return (token_log_probs(logits, labels, temperature) * mask).sum(-1)


def soda_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """SFT on the chosen (even) rows + DPO of chosen over rejected (odd) rows; `teacher_logits` are the frozen
    reference's. (B, T, V) logits with (B, T) labels, or (B, V) logits as one-token sequences."""
    if beta <= 0 or sft_weight < 0:
        raise ValueError(f"soda needs beta > 0 and sft_weight >= 0, got {beta}, {sft_weight}")
    if reduction != "mean":
        raise ValueError("soda supports reduction 'mean' only")
    if student_logits.dim() == 2:
        student_logits, teacher_logits, labels = (
            student_logits[:, None],
            teacher_logits[:, None],
            labels[:, None],
        )
        mask = None if mask is None else mask[:, None]
    if student_logits.shape[0] % 2:
        raise ValueError("soda needs (chosen, rejected) row pairs: an even number of rows")
    mask = (labels != -100) if mask is None else mask & (labels != -100)
    policy = sequence_log_probs(student_logits, labels, mask, temperature)
    with torch.no_grad():
        reference = sequence_log_probs(teacher_logits, labels, mask, temperature)
    ratio = policy - reference
    dpo = -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2])).mean()
    chosen_tokens = mask[0::2].sum().clamp(min=1)
    sft = -policy[0::2].sum() / chosen_tokens
    return sft_weight * sft + dpo

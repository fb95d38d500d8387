"""The teacher's targets as a cache stores them: top-k log-probabilities with the tail's mass, or the top-k
plus draws from the tail; and how many slots of each a cache keeps by default."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.sparse import LOG_TINY, topk_targets


def topk_rows(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids and log-probabilities at `temperature`, and the log of the mass outside them (-inf when the
    top-k holds all of it): `distill.losses.sparse.topk_targets`, with the cache's -inf for an empty tail."""
    targets = topk_targets(logits.float(), min(k, logits.shape[-1]), temperature)
    empty = targets.tail_logmass <= LOG_TINY
    tail = targets.tail_logmass.masked_fill(empty, float("-inf"))
    return targets.ids, targets.logprobs, tail


def rows_with_tail_draws(
    logits: Tensor, k: int, draws: int, temperature: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-k, then the tail mass r carried by `draws` tokens drawn (with replacement) from the tail
    itself: slot log-probability log(r * count / draws), unused slots -inf, no tail bucket left. Exact on the
    head and unbiased on the tail: the stored distribution's expectation is the teacher's, so a forward-KL
    gradient against it is unbiased. k = 0 is plain sampling, as in "Sparse Logit Sampling: Accelerating
    Knowledge Distillation in LLMs" (Anshumann et al., ACL 2025)."""
    ids, logprobs, tail = topk_rows(logits, k, temperature) if k else (None, None, None)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    tail_log = torch.zeros(len(logits)) if tail is None else tail
    if ids is not None:
        probs = probs.scatter(-1, ids, 0.0)
    empty = probs.sum(-1, keepdim=True) <= 0  # the head holds everything: draws carry no mass
    picked = torch.multinomial(
        torch.where(empty, torch.ones_like(probs), probs), draws, True, generator=generator
    )
    counts = torch.zeros_like(probs).scatter_add_(1, picked, torch.ones_like(picked, dtype=probs.dtype))
    if ids is not None:
        counts = counts.scatter(-1, ids, -1.0)  # never pick a head id again (a duplicate would count twice)
    kept, drawn = counts.topk(min(draws, counts.shape[-1] - k), dim=-1)
    drawn_log = tail_log[:, None] + torch.log(kept.clamp(min=0.0) / draws)
    none = torch.full((len(logits),), float("-inf"))
    if ids is None:
        return drawn, drawn_log, none
    return torch.cat([ids, drawn], -1), torch.cat([logprobs, drawn_log], -1), none


def default_slots(kind: str, k: int | None, vocab: int, tail_draws: int | None) -> tuple[int, int]:
    """(exact top ids, tail draws) per row. Without `tail_draws`, a language model's k slots are split
    into k - k // 2 exact ids and k // 2 draws from the tail: on lm_shakespeare a plain top-32 bucket
    costs 16 % perplexity against the live teacher, top-16 + 16 draws none
    (benchmarks/results/teacher_cache.md). Classifiers keep the plain top-k."""
    if k is None or k >= vocab:
        return vocab, 0
    if tail_draws is None:
        tail_draws = k // 2 if kind == "lm" else 0
        k -= tail_draws
    return k, min(tail_draws, vocab - k)

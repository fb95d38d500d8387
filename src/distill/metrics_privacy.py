"""Canary exposure: how much a language model memorised a secret it saw in training.

From "The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural Networks" (Carlini, Liu,
Erlingsson, Kos & Song, USENIX Security 2019). A canary is a prefix followed by a secret drawn uniformly from
a randomness space R (here: strings of `length` digits). The model ranks every candidate secret by its
log-perplexity, -log2 P(secret | prefix); the canary's exposure is

    exposure = log2 |R| - log2 rank(canary),    rank 1 = the most likely candidate,

so 0 bits (the canary ranks last) .. log2 |R| bits (it ranks first). When R is too large to enumerate,
Carlini et al. sample candidates, fit a skew-normal to their log-perplexities and read the fraction of R that
ranks at or above the canary from its CDF: exposure ~ -log2 CDF(canary's log-perplexity).

Pure maths (`exposure_from_rank`, `exposure_by_enumeration`, `exposure_by_extrapolation`) and one model
scorer (`digit_candidate_log_perplexities`) that gives every candidate's log-perplexity in one pass over
the 10^(length-1) shorter prefixes (the last digit's 10 values are read from the same forward pass).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def exposure_from_rank(rank: float, space_size: float) -> float:
    """log2 |R| - log2 rank (rank counted from 1; a tie's mean rank may be fractional)."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank {rank} must lie in [1, {space_size}]")
    return math.log2(space_size) - math.log2(rank)


def rank_among(canary_score: float, scores: np.ndarray) -> float:
    """The canary's rank (1 = most likely) among `scores`, every candidate's log-perplexity, the canary's own
    included: 1 + the candidates strictly more likely, + half of the others that tie with it (the mean rank
    over the tie's orders, so a model that scores every candidate alike gets about 1 bit, not log2 |R|)."""
    scores = np.asarray(scores, dtype=np.float64)
    below = int(np.count_nonzero(scores < canary_score))
    ties = int(np.count_nonzero(scores == canary_score))
    return 1 + below + max(0, ties - 1) / 2


def exposure_by_enumeration(canary_score: float, scores: np.ndarray) -> float:
    """Exposure from the log-perplexities of the whole randomness space (the canary's included)."""
    scores = np.asarray(scores, dtype=np.float64)
    return exposure_from_rank(rank_among(canary_score, scores), scores.size)


def digit_unigram_exposure(secret: str, digit_counts: Sequence[float]) -> float:
    """The exposure of `secret` under a model that knows only how often each digit occurs (`digit_counts`,
    ten counts, + 0.5 each) and draws the digits independently: what a student learns from digit frequencies
    alone, without memorising any sequence. When the secrets are the only digits in the text, this is the
    floor below which exposure cannot go without forgetting the frequencies too."""
    counts = np.asarray(digit_counts, dtype=np.float64) + 0.5
    log_p = np.log2(counts / counts.sum())
    grid = np.meshgrid(*([-log_p] * len(secret)), indexing="ij")
    scores = np.sum(grid, axis=0).reshape(-1)  # index = the digit string read as a number
    return exposure_by_enumeration(float(scores[int(secret)]), scores)


def exposure_by_extrapolation(canary_score: float, sample_scores: np.ndarray) -> float:
    """Carlini et al.'s estimate from sampled candidates: fit a skew-normal to their log-perplexities and
    return -log2 CDF(canary's log-perplexity) (its tail in log space, finite far into the tail)."""
    from scipy import stats

    sample = np.asarray(sample_scores, dtype=np.float64)
    if sample.size < 3:
        raise ValueError("the skew-normal fit needs at least 3 sampled candidates")
    shape, loc, scale = stats.skewnorm.fit(sample)
    log_cdf = float(stats.skewnorm.logcdf(canary_score, shape, loc=loc, scale=scale))
    return max(0.0, -log_cdf / math.log(2))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out).double()  # ranks turn on small differences


@torch.inference_mode()
def digit_candidate_log_perplexities(
    model: nn.Module, prefix_ids: list[int], digit_ids: list[int], length: int, batch_size: int = 1000
) -> np.ndarray:
    """-log2 P(d_1..d_length | prefix) for every digit string, index = the string read as a base-10 number.

    `digit_ids[k]` is the token of digit k (a tokenizer that writes each digit as one token, as the BPE
    trained here does). The model sees the prefix and the first length-1 digits of each candidate; the log
    probabilities are those of the full vocabulary (the model may put mass outside the ten digits)."""
    if length < 1 or len(digit_ids) != 10 or not prefix_ids:
        raise ValueError("need length >= 1, ten digit tokens and a non-empty prefix")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    digits = torch.tensor(digit_ids, dtype=torch.long)
    heads = torch.tensor(list(itertools.product(range(10), repeat=length - 1)), dtype=torch.long)
    heads = heads.reshape(-1, length - 1)  # (10^(length-1), length-1); one empty row when length is 1
    prefix = torch.tensor(prefix_ids, dtype=torch.long)
    start = len(prefix_ids) - 1  # the position whose output predicts the first digit
    totals = []
    try:
        for chunk in heads.split(batch_size):
            ids = torch.cat([prefix.expand(len(chunk), -1), digits[chunk]], dim=1).to(device)
            log_probs = torch.log_softmax(_logits(model, ids)[:, start:], dim=-1).cpu()
            seen = log_probs[:, : length - 1].gather(2, digits[chunk].unsqueeze(2)).squeeze(2).sum(1)
            last = log_probs[:, length - 1, digits]  # (chunk, 10): the last digit's ten values
            totals.append(seen[:, None] + last)
    finally:
        model.train(was_training)
    return (-torch.cat(totals).reshape(-1) / math.log(2)).numpy()


def digit_token_ids(tokenizer: Any) -> list[int]:
    """The ten digit tokens of a tokenizer that writes each digit as one token (ValueError otherwise)."""
    ids = [tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("canary exposure needs a tokenizer that writes each digit as one token")
    return [i[0] for i in ids]


def canary_exposures(
    model: nn.Module, tokenizer: Any, canaries: Sequence[Any], context: str = "\n"
) -> list[float]:
    """Each canary's exposure (bits) by enumerating its whole randomness space: canaries have `prefix` and
    a digit string `secret` (`distill.data.canaries.Canary`); the model reads `context` + prefix."""
    digits = digit_token_ids(tokenizer)
    exposures = []
    for canary in canaries:
        prefix = tokenizer(context + canary.prefix, add_special_tokens=False)["input_ids"]
        scores = digit_candidate_log_perplexities(model, prefix, digits, len(canary.secret))
        exposures.append(exposure_by_enumeration(float(scores[int(canary.secret)]), scores))
    return exposures

"""Sparse top-k teacher targets (placeholder until the fused-loss work lands its full module)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SparseTargets:
    """The teacher's top-k: `ids` (N, k), `logprobs` (N, k) at the temperature, `tail_logmass` (N,) =
    log(1 - sum(exp(logprobs)))."""

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor

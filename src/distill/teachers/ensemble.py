"""Several teachers as one: an ensemble with per-teacher score normalisation, and a router that weighs the
teachers per sample.

Both are `nn.Module`s whose forward returns logits, so they serve as the model of a `FrozenTeacher` (an
ensemble) or a `CoTrainedTeacher` (a router, whose gate learns while its teachers stay frozen).

Aggregation. Each teacher i gives logits z_i (..., C) and has a weight w_i (normalised to sum to 1).
- `combine="probabilities"`: p = sum_i w_i softmax(z_i / T_i); the ensemble's logits are log p.
- `combine="logits"`: z = sum_i w_i n(z_i), after the normalisation n of each teacher's scores:
  `none` (as they are), `standard` (zero mean, unit standard deviation over the classes of each row), or
  `minmax` (each row scaled to [0, 1]). Teachers with different score scales (a BM25 scorer beside a dense
  encoder, S11's normalise-then-aggregate) must be normalised before they are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of

Normalisation = Literal["none", "standard", "minmax"]
Combination = Literal["logits", "probabilities"]


def normalise_scores(logits: Tensor, how: Normalisation) -> Tensor:
    """One teacher's scores on a common scale, row by row over the last dimension (float32)."""
    z = logits.float()
    if how == "standard":
        return (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)
    if how == "minmax":
        low, high = z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
        return (z - low) / (high - low).clamp_min(1e-6)
    return z


def aggregate(
    logits: Sequence[Tensor],
    weights: Tensor,
    *,
    combine: Combination = "probabilities",
    normalise: Normalisation = "none",
    temperatures: Sequence[float] | None = None,
) -> Tensor:
    """Combined logits of several teachers; `weights` is (n,) for the whole batch or (..., n) per sample."""
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise UserError(f"ensemble: the teachers' outputs differ in shape ({sorted(shapes)})")
    stacked_w = weights.float() / weights.float().sum(-1, keepdim=True)
    temps = list(temperatures) if temperatures is not None else [1.0] * len(logits)
    if combine == "probabilities":
        probs = torch.stack(
            [torch.softmax(z.float() / t, -1) for z, t in zip(logits, temps, strict=True)], -1
        )
        mixed = (probs * stacked_w.unsqueeze(-2)).sum(-1)
        return mixed.clamp_min(torch.finfo(torch.float32).tiny).log()
    scores = torch.stack([normalise_scores(z / t, normalise) for z, t in zip(logits, temps, strict=True)], -1)
    return (scores * stacked_w.unsqueeze(-2)).sum(-1)


class Ensemble(nn.Module):
    """Fixed per-teacher weights (default: equal)."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        *,
        combine: Combination = "probabilities",
        normalise: Normalisation = "none",
        temperatures: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise UserError("ensemble: give at least two teachers")
        weights = list(weights) if weights is not None else [1.0] * len(teachers)
        if len(weights) != len(teachers) or min(weights) < 0 or sum(weights) <= 0:
            raise UserError("ensemble: one non-negative weight per teacher, not all zero")
        if combine == "probabilities" and normalise != "none":
            raise UserError("ensemble: normalise applies to combine: logits (probabilities are on one scale)")
        self.members = nn.ModuleList(teachers)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.combine, self.normalise = combine, normalise
        self.temperatures = list(temperatures) if temperatures is not None else None

    def forward(self, inputs: Any = None, **kwargs: Any) -> Tensor:
        batch = kwargs if inputs is None else inputs
        member_logits = [logits_of(call_model(m, batch)) for m in self.members]
        return aggregate(
            member_logits,
            self.weights,
            combine=self.combine,
            normalise=self.normalise,
            temperatures=self.temperatures,
        )


class Router(nn.Module):
    """Per-sample weights over frozen teachers from a learned gate: w = softmax(gate(x)). The gate reads the
    flattened input (a classifier's image or features); its logits are mixed like `Ensemble`'s."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        input_features: int,
        *,
        combine: Combination = "probabilities",
        normalise: Normalisation = "none",
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise UserError("router: give at least two teachers")
        self.members = nn.ModuleList(teachers).requires_grad_(False)
        self.gate = nn.Sequential(
            nn.Flatten(), nn.Linear(input_features, hidden), nn.ReLU(), nn.Linear(hidden, len(teachers))
        )
        self.combine, self.normalise = combine, normalise

    def train(self, mode: bool = True) -> Router:
        super().train(mode)
        self.members.eval()  # the teachers never leave eval mode; only the gate trains
        return self

    def forward(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            member_logits = [logits_of(m(inputs)).float() for m in self.members]
        weights = torch.softmax(self.gate(inputs.float()), -1)
        return aggregate(member_logits, weights, combine=self.combine, normalise=self.normalise)

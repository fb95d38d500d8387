"""Probes on internal activations: where in depth a model separates the classes (or true from false).

Three parts, each usable alone:

- `probe_layers` / `capture_features`: the outputs of a model's blocks on a data loader, read through
  `FeatureHooks` (no change to `forward`), pooled per example (images: global average pool) or kept as
  bags of token activations (text / LM: one bag per sequence, padding dropped).
- `fit_linear_probe` (multinomial logistic regression on standardised features) and `fit_mil_probe`, a
  multiple-instance probe over bags in the spirit of sAwMIL ("The Trilemma of Truth in Large Language
  Models", Savcisens & Eliassi-Rad, 2025): one linear instance scorer per class, bag score = smooth
  maximum of its instances' scores, so a statement is called true / false / neither from its most telling
  tokens rather than from the last token alone. Deviations from the paper's sparse-aware MIL SVM are
  listed in docs/probes.md.
- Split conformal prediction (`conformal_threshold`, `prediction_sets`) with the LAC score
  s(x, y) = 1 - p_y(x) or the APS score s(x, y) = sum of the probabilities ranked at or above y
  (Vovk et al. 2005; Sadinle et al. 2019; Romano et al. 2020): with n exchangeable calibration examples,
  P(y in C(x)) >= 1 - alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.models.hooks import FeatureHooks

SCORES = ("lac", "aps")


def probe_layers(model: nn.Module) -> list[str]:
    """Paths of the model's blocks, shallow to deep: its `feature_layers()` when it declares them (the taps
    feature objectives use), otherwise the children of its longest `nn.ModuleList` (a transformer's
    layers, e.g. `model.layers.0` .. `model.layers.N-1`)."""
    declared = getattr(model, "feature_layers", None)
    if callable(declared):
        return list(declared())
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__} declares no feature_layers() and has no list of blocks")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(blocks))]


def _pool(output: Tensor, mask: Tensor | None, pool: str) -> Tensor | list[Tensor]:
    """One row per example: images (B, C, H, W) -> mean over H, W; tokens (B, T, D) -> mean over the unmasked
    tokens, the last unmasked token, or a list of (T_i, D) bags; (B, D) unchanged."""
    output = output.float()
    if output.dim() == 2:
        return output
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() != 3:
        raise UserError(f"cannot pool an activation of shape {tuple(output.shape)}")
    # a model may cut right padding beyond its longest text (distill's text encoders do): trim the mask too
    keep = (
        torch.ones(output.shape[:2], dtype=torch.bool) if mask is None else mask[:, : output.shape[1]].bool()
    )
    if pool == "bags":
        return [row[k] for row, k in zip(output, keep, strict=True)]
    if pool == "last":
        last = keep.long().cumsum(1).argmax(1)  # the position of the last kept token
        return output[torch.arange(len(output)), last]
    weights = keep.unsqueeze(-1).float()
    return (output * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.no_grad()
def capture_features(
    model: nn.Module,
    layers: Sequence[str],
    batches: Iterable[tuple[Tensor, ...]],
    *,
    pool: str = "mean",
    forward: Callable[[nn.Module, tuple[Tensor, ...]], object] | None = None,
) -> tuple[dict[str, Tensor | list[Tensor]], Tensor]:
    """Per-layer activations of `model` over `batches` and the labels.

    Each batch is `(inputs, labels)` or `(inputs, attention_mask, labels)` (token models; the mask drops
    padding from pools and bags). `pool` is "mean", "last" (last unmasked token) or "bags" (one (T_i, D)
    tensor per sequence; images and flat outputs are returned pooled whatever `pool` says). `forward(model,
    batch)` overrides how a batch is fed (default `model(inputs)`, or `model(input_ids=..,
    attention_mask=..)` when a mask is given)."""
    if pool not in ("mean", "last", "bags"):
        raise UserError(f"pool must be mean, last or bags, got {pool!r}")
    was_training = model.training
    model.eval()
    rows: dict[str, list] = {name: [] for name in layers}
    bagged: set[str] = set()  # layers whose rows are bags (token outputs under pool="bags")
    labels: list[Tensor] = []
    try:
        with FeatureHooks(model, layers, detach=True) as hooks:
            for batch in batches:
                mask = batch[1] if len(batch) == 3 else None
                if forward is not None:
                    forward(model, batch)
                elif mask is None:
                    model(batch[0])
                else:
                    model(input_ids=batch[0], attention_mask=mask)
                for name in layers:
                    pooled = _pool(hooks.features[name], mask, pool)
                    if isinstance(pooled, list):
                        bagged.add(name)
                        rows[name].extend(pooled)
                    else:
                        rows[name].append(pooled)
                labels.append(batch[-1])
                hooks.clear()
    finally:
        model.train(was_training)
    out = {name: chunks if name in bagged else torch.cat(chunks) for name, chunks in rows.items()}
    return out, torch.cat(labels)


# --- probes -------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A fitted probe: `predict_proba(features) -> (N, K)` class probabilities as a numpy array."""

    predict_proba: Callable[[object], np.ndarray]
    num_classes: int


def _fit_softmax(
    logits_of: Callable[[Tensor, Tensor], Tensor], dim: int, y: Tensor, l2: float, steps: int
) -> tuple[Tensor, Tensor]:
    """(W, b) minimising mean softmax cross-entropy of `logits_of(W, b)` + l2 * |W|^2, by L-BFGS in float64
    from zero (the objective is convex for a linear probe)."""
    if l2 < 0:
        raise UserError(f"l2 must be >= 0, got {l2}")
    k = int(y.max()) + 1
    weight = torch.zeros(k, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    targets = y.long()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits_of(weight, bias), targets) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(x: Tensor, y: Tensor, *, l2: float = 1e-3, steps: int = 200) -> Probe:
    """Multinomial logistic regression (L2 penalty `l2 * |W|^2` on the mean cross-entropy) on features
    standardised with the training rows' mean and standard deviation."""
    x = x.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    weight, bias = _fit_softmax(lambda w, b: z @ w.T + b, x.shape[1], y, l2, steps)

    def predict_proba(features: object) -> np.ndarray:
        assert isinstance(features, Tensor)
        return torch.softmax(((features.double() - mean) / std) @ weight.T + bias, -1).numpy()

    return Probe(predict_proba, len(bias))


def _pad_bags(bags: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(N, T_max, D) instances and an (N, T_max) mask of real ones."""
    longest = max(len(b) for b in bags)
    dim = bags[0].shape[-1]
    x = torch.zeros(len(bags), longest, dim, dtype=torch.float64)
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag.double()
        mask[i, : len(bag)] = True
    return x, mask


def mil_bag_scores(instances: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, sharpness: float) -> Tensor:
    """Bag scores (N, K): for each class, a smooth maximum over the bag's real instances of w_k . x_t + b_k,
    (1/s) log mean_t exp(s (w_k . x_t + b_k)); s -> inf gives the max (standard MIL: a bag is positive when
    its best instance is), s -> 0 the mean score (a mean-pooled linear probe)."""
    scores = instances @ weight.T + bias  # (N, T, K)
    scores = scores.masked_fill(~mask.unsqueeze(-1), -math.inf)
    counts = mask.sum(1, keepdim=True).to(scores.dtype)
    return (torch.logsumexp(sharpness * scores, dim=1) - counts.log()) / sharpness


def fit_mil_probe(
    bags: Sequence[Tensor], y: Tensor, *, l2: float = 1e-3, sharpness: float = 4.0, steps: int = 200
) -> Probe:
    """A multiple-instance probe: one linear instance scorer per class, bag logit = smooth max of its
    instances' scores (`mil_bag_scores`), fitted with softmax cross-entropy over the bag logits plus an L2
    penalty `l2 * |W|^2` by L-BFGS in float64, on instances standardised with the training bags'
    statistics."""
    x, mask = _pad_bags(bags)
    real = x[mask]
    mean, std = real.mean(0), real.std(0) + 1e-6
    x = (x - mean) / std * mask.unsqueeze(-1)
    weight, bias = _fit_softmax(
        lambda w, b: mil_bag_scores(x, mask, w, b, sharpness), x.shape[-1], y, l2, steps
    )

    def predict_proba(features: object) -> np.ndarray:
        new_x, new_mask = _pad_bags(features)  # type: ignore[arg-type]
        new_x = (new_x - mean) / std * new_mask.unsqueeze(-1)
        return torch.softmax(mil_bag_scores(new_x, new_mask, weight, bias, sharpness), -1).numpy()

    return Probe(predict_proba, len(bias))


# --- split conformal prediction -------------------------------------------------------------------------


def conformity_scores(proba: np.ndarray, labels: np.ndarray | None, score: str = "lac") -> np.ndarray:
    """Non-conformity of each class (labels None: an (N, K) array) or of the true class ((N,) array).

    LAC: 1 - p_y. APS (deterministic): the total probability of the classes ranked at or above y."""
    if score not in SCORES:
        raise UserError(f"conformal score must be one of {', '.join(SCORES)}, got {score!r}")
    proba = np.asarray(proba, dtype=np.float64)
    if score == "lac":
        every = 1.0 - proba
    else:
        order = np.argsort(-proba, axis=1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(proba, order, axis=1), axis=1)
        every = np.empty_like(proba)
        np.put_along_axis(every, order, cumulative, axis=1)
    if labels is None:
        return every
    return every[np.arange(len(every)), np.asarray(labels)]


def conformal_threshold(calibration_scores: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha)) / n empirical quantile of n calibration scores (+inf when that rank
    exceeds n: every class is then in every set)."""
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must lie in (0, 1), got {alpha}")
    n = len(calibration_scores)
    rank = math.ceil((n + 1) * (1.0 - alpha))
    if rank > n:
        return math.inf
    return float(np.sort(calibration_scores)[rank - 1])


def prediction_sets(proba: np.ndarray, threshold: float, score: str = "lac") -> np.ndarray:
    """(N, K) boolean membership: class y is in the set of x when its score is at most the threshold."""
    return conformity_scores(proba, None, score) <= threshold + 1e-12


@dataclass
class ConformalReport:
    coverage: float
    mean_set_size: float


def split_conformal(
    calibration_proba: np.ndarray,
    calibration_labels: np.ndarray,
    test_proba: np.ndarray,
    test_labels: np.ndarray,
    *,
    alpha: float = 0.1,
    score: str = "lac",
) -> ConformalReport:
    """Calibrate on one split, measure empirical coverage and mean set size on another."""
    threshold = conformal_threshold(conformity_scores(calibration_proba, calibration_labels, score), alpha)
    sets = prediction_sets(test_proba, threshold, score)
    covered = sets[np.arange(len(sets)), np.asarray(test_labels)]
    return ConformalReport(float(covered.mean()), float(sets.sum(1).mean()))

"""Float64 reference maths for the loss tests: written from the papers' formulas, as plainly as possible
(probabilities, not log-probabilities; no masking tricks), so that they check the library's stable code."""

from __future__ import annotations

import torch
from torch import Tensor


def probs(z: Tensor, temperature: float = 1.0) -> Tensor:
    z = z.double() / temperature
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kl(p: Tensor, q: Tensor) -> Tensor:
    """sum p log(p / q) per row, 0 log 0 = 0."""
    terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    return terms.sum(-1)


def forward_kl(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    return kl(probs(t, temperature), probs(s, temperature))


def reverse_kl(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    return kl(probs(s, temperature), probs(t, temperature))


def hinton_kd(s: Tensor, t: Tensor, temperature: float = 4.0) -> Tensor:
    return temperature**2 * forward_kl(s, t, temperature)


def dkd_mdistiller(
    s: Tensor, t: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """Decoupled KD the way mdistiller computes it (batch-summed and divided by the batch size):
    binary probabilities by summing masked softmax, the target class pushed away by -1000."""
    s, t = s.double(), t.double()
    gt = torch.zeros_like(s).scatter_(1, labels.unsqueeze(1), 1.0)
    ps, pt = probs(s, temperature), probs(t, temperature)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (torch.log(bt) - torch.log(bs))).sum() * temperature**2 / s.shape[0]
    pt2 = torch.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_ps2 = torch.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd_terms = torch.where(pt2 > 0, pt2 * (torch.log(pt2) - log_ps2), torch.zeros_like(pt2))
    nckd = nckd_terms.sum() * temperature**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def mixture_jsd(s: Tensor, t: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    p, q = probs(t, temperature), probs(s, temperature)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def total_variation(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    return 0.5 * (probs(t, temperature) - probs(s, temperature)).abs().sum(-1)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_kd(s: Tensor, t: Tensor, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> Tensor:
    ps, pt = probs(s, temperature), probs(t, temperature)
    inter = 1 - pearson(ps, pt).mean()
    intra = 1 - pearson(ps.T, pt.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)

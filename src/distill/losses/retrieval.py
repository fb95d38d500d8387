"""Retrieval distillation: score normalisation and aggregation of heterogeneous teachers, listwise and
margin losses on candidate scores, the FLOPS regulariser and its IDF-aware form.

From "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers" (Geng et al., 2024,
arXiv 2411.04403) and SPLADE ("SPLADE v2", Formal et al., 2021), whose FLOPS regulariser is from "Minimizing
FLOPs to Learn Efficient Sparse Representations" (Paria et al., ICLR 2020).

Shapes: a batch of B queries, each with K candidate passages; scores are ``(B, K)``; ``mask`` (``(B, K)``,
True = a real candidate) marks padded candidate slots, which count nowhere. Sparse representations are
``(N, V)`` non-negative term weights. Math runs in float32 whatever the input dtype (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distill.losses._common import compute_dtype

NORMALISATIONS = ("minmax", "zscore", "none")


def _masked(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(scores)
    x = scores.to(dtype)
    if mask is None:
        return x, torch.ones_like(x, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from scores {tuple(scores.shape)}")
    return x, mask.to(torch.bool)


def normalise_query_scores(
    scores: Tensor, how: str = "minmax", mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """One teacher's scores on a common scale, per query over its candidates (the last dimension).

    - ``minmax`` (the paper's and its official code's choice): ``(s - min_k s) / (max_k s - min_k s + eps)``,
      in [0, 1] per query;
    - ``zscore``: ``(s - mean_k s) / (std_k s + eps)`` (population std);
    - ``none``: unchanged.
    Masked candidates are left out of the statistics and come back as 0.
    """
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    x, keep = _masked(scores, mask)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if how == "none":
        return torch.where(keep, x, zero)
    if how == "minmax":
        high = torch.where(keep, x, torch.full_like(x, -torch.inf)).amax(-1, keepdim=True)
        low = torch.where(keep, x, torch.full_like(x, torch.inf)).amin(-1, keepdim=True)
        high, low = torch.where(torch.isfinite(high), high, zero), torch.where(torch.isfinite(low), low, zero)
        return torch.where(keep, (x - low) / (high - low + eps), zero)
    count = keep.sum(-1, keepdim=True).clamp_min(1).to(x.dtype)
    mean = torch.where(keep, x, zero).sum(-1, keepdim=True) / count
    centred = torch.where(keep, x - mean, zero)
    std = ((centred * centred).sum(-1, keepdim=True) / count).sqrt()
    return torch.where(keep, centred / (std + eps), zero)


def aggregate_teacher_scores(
    scores: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    how: str = "minmax",
    mask: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Normalise then aggregate: ``scale * sum_i w_i n(s_i)`` with the weights normalised to sum to 1.

    The paper (and its code, with ``scale = 30``) averages min-max normalised scores of a dense and a sparse
    teacher; ``weights`` generalise the mean (equal weights) to a weighted sum chosen on validation queries.
    """
    if not scores:
        raise ValueError("aggregate_teacher_scores needs at least one teacher's scores")
    w = [1.0] * len(scores) if weights is None else [float(v) for v in weights]
    if len(w) != len(scores) or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be {len(scores)} non-negative numbers with a positive sum, got {w}")
    total = sum(w)
    out = sum(v / total * normalise_query_scores(s, how, mask) for v, s in zip(w, scores, strict=True))
    return scale * out  # type: ignore[return-value]


def listwise_kl(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Mean over queries of KL(softmax(t / T) || softmax(s / T)) over each query's candidates.

    The listwise distillation loss of the paper's code (``KLDivLoss``) and of SPLADE++ ("From Distillation to
    Hard Negative Sampling", Formal et al., SIGIR 2022). Masked candidates get probability 0 in both."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student {tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)} differ"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_scores, teacher_scores)
    s, keep = _masked(student_scores.to(dtype), mask)
    t = teacher_scores.to(dtype)
    neg_inf = torch.full((), -torch.inf, dtype=dtype, device=s.device)
    log_q = torch.log_softmax(torch.where(keep, s / temperature, neg_inf), -1)
    log_p = torch.log_softmax(torch.where(keep, t / temperature, neg_inf), -1)
    p = log_p.exp()
    zero = torch.zeros((), dtype=dtype, device=s.device)
    per_query = (p * torch.where(keep, log_p - log_q, zero)).sum(-1)
    return per_query.mean() if per_query.numel() else per_query.sum()


def margin_mse(student_scores: Tensor, teacher_scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Margin-MSE ("Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation",
    Hofstätter et al., 2020), generalised to K candidates: the first candidate is the anchor, and
    ``mean_{b, k>0} ((s_b0 - s_bk) - (t_b0 - t_bk))^2`` over real candidates."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student {tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)} differ"
        )
    dtype = compute_dtype(student_scores, teacher_scores)
    s, keep = _masked(student_scores.to(dtype), mask)
    t = teacher_scores.to(dtype)
    diff = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    counted = keep[:, 1:] & keep[:, :1]
    zero = torch.zeros((), dtype=dtype, device=s.device)
    squared = torch.where(counted, diff * diff, zero)
    return squared.sum() / counted.sum().clamp_min(1)


def flops_regulariser(
    weights: Tensor, term_weights: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """FLOPS: ``sum_j c_j (1/N sum_i |w_ij|)^2`` over the vocabulary j of a batch of N representations.

    Paria et al. (2020): a smooth relaxation of the expected number of floating-point operations of a sparse
    dot product, minimised when few terms are active across the batch. SPLADE uses it with ``c_j = 1``.
    ``term_weights`` ``c`` (``(V,)``) weighs terms (the IDF-aware form, `idf_aware_flops`); ``mask``
    (``(N,)``) leaves representations out (N counts only the kept ones)."""
    if weights.dim() != 2:
        raise ValueError(f"weights must be (N, V), got shape {tuple(weights.shape)}")
    dtype = compute_dtype(weights)
    w = weights.to(dtype).abs()
    if mask is not None:
        w = w[mask.to(torch.bool)]
    if w.shape[0] == 0:
        return w.sum()
    per_term = w.mean(0) ** 2
    if term_weights is not None:
        if term_weights.shape != (weights.shape[1],):
            raise ValueError(f"term_weights must be ({weights.shape[1]},), got {tuple(term_weights.shape)}")
        per_term = per_term * term_weights.to(dtype)
    return per_term.sum()


def idf_weighted_scores(query_weights: Tensor, doc_weights: Tensor, idf: Tensor) -> Tensor:
    """The IDF-aware matching function ``s(q, d) = sum_t idf_t q_t d_t`` (Geng et al., 2024).

    ``query_weights`` is ``(B, V)``, ``doc_weights`` ``(B, K, V)`` (each query's candidates) or ``(M, V)``
    (every query against every passage); the result is ``(B, K)`` or ``(B, M)``."""
    dtype = compute_dtype(query_weights, doc_weights)
    q = query_weights.to(dtype) * idf.to(dtype)
    d = doc_weights.to(dtype)
    if d.dim() == 3:
        return torch.einsum("bv,bkv->bk", q, d)
    return q @ d.T


def idf_aware_flops(weights: Tensor, idf: Tensor, mask: Tensor | None = None) -> Tensor:
    """The IDF-aware FLOPS penalty on the weights the matching function actually uses.

    With the matching ``s = sum_t idf_t q_t d_t`` (`idf_weighted_scores`) and the plain FLOPS on the encoder's
    weights w (what the paper's code does), the terms' effective weights are ``u_t = idf_t w_t`` and the
    penalty is ``sum_t (mean_i u_it)^2 / idf_t^2``: a low-IDF (frequent) term pays more per unit of score it
    contributes, a rare term less. This function takes the effective weights ``u`` and returns that penalty;
    ``idf_aware_flops(idf * w, idf) == flops_regulariser(w)``. ``idf`` must be > 0."""
    if bool((idf <= 0).any()):
        raise ValueError("idf must be > 0 for every term")
    dtype = compute_dtype(weights)
    return flops_regulariser(weights, idf.to(dtype) ** -2, mask)


def bm25_idf(document_frequency: Tensor, n_docs: int) -> Tensor:
    """``log(1 + (N - df + 0.5) / (df + 0.5))``, the BM25 IDF the paper's code computes per token (> 0)."""
    df = document_frequency.to(torch.float64 if document_frequency.dtype == torch.float64 else torch.float32)
    return torch.log1p((n_docs - df + 0.5) / (df + 0.5))

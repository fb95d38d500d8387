"""Feature-map and token losses: FitNets hints, attention transfer, FSP, and TRG's token losses.

Pure functions of tensors (student first, teacher second). Conventions beyond `distill.losses._common`:

* Features are ``(N, C, H, W)`` maps, ``(N, D)`` vectors or ``(B, T, D)`` token sequences. A 3-D tensor is
  always read as a token sequence; the sample ("row") dimensions are ``(N,)`` for maps and vectors and
  ``(B, T)`` for tokens, and ``mask`` has that shape (True = the row counts; a masked row is dropped before
  any computation, so masking equals removing).
* Teacher features are targets but are *not* detached here unless the paper's code does so (it says where);
  a frozen teacher run under ``torch.no_grad`` needs nothing more.
* Any student-side regressor / projection (FitNets' regressor, TRG's linear projection) is a module of the
  objective: these functions take the already-projected tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses._common import REDUCTIONS, Rows, compute_dtype, reduce_rows

BATCH_REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed} for this loss, got {reduction!r}")


def keep_index(mask: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor | None:
    """Flat indices of the counted rows, or None when every row counts (or there is no mask)."""
    if mask is None:
        return None
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the rows' shape {tuple(lead_shape)}")
    keep = mask.reshape(-1).to(device=device, dtype=torch.bool)
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def select_rows(x: Tensor, lead_ndim: int, index: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``x`` with its ``lead_ndim`` leading dimensions flattened, masked rows dropped, in ``dtype``."""
    x = x.reshape(-1, *x.shape[lead_ndim:])
    if index is not None:
        x = x.index_select(0, index)
    return x.to(dtype)


def feature_rows(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    *,
    lead_ndim: int = 1,
    same_shape: bool = True,
    min_ndim: int = 2,
    name: str = "features",
) -> tuple[Tensor, Tensor, Rows]:
    """Validate a student / teacher pair, flatten the row dimensions, drop masked rows, upcast.

    Returns the two ``(n_counted, ...)`` tensors and a `Rows` record for `reduce_rows`.
    """
    if student.dim() < min_ndim or teacher.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if same_shape and student.shape != teacher.shape:
        raise ValueError(
            f"student {name} {tuple(student.shape)} and teacher {name} {tuple(teacher.shape)} differ"
        )
    lead_shape = student.shape[:lead_ndim]
    if teacher.shape[:lead_ndim] != lead_shape:
        raise ValueError(
            f"student {name} {tuple(student.shape)} and teacher {name} {tuple(teacher.shape)} differ in "
            "their leading (sample) dimensions"
        )
    dtype = compute_dtype(student, teacher)
    index = keep_index(mask, lead_shape, student.device)
    s = select_rows(student, lead_ndim, index, dtype)
    t = select_rows(teacher, lead_ndim, index, dtype)
    return s, t, Rows(s, t, [], None, index, lead_shape, lead_shape.numel())


def hint_mse(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """FitNets hint loss: per row, mean_j (s_j - t_j)^2 over the non-sample dimensions.

    From "FitNets: Hints for Thin Deep Nets" (Romero et al., ICLR 2015): the student's guided layer, after a
    regressor that maps it to the teacher's hint shape, is pulled to the hint by a squared L2 distance. The
    per-row value is a *mean* over the feature elements (C*H*W, D, or D per token), so that
    ``reduction="mean"`` equals ``nn.MSELoss()(student, teacher)``, which is RepDistiller's ``HintLoss``
    (torchdistill has no FitNets loss of its own: its configurations wrap ``nn.MSELoss``). The paper's 1/2
    factor is left to the weight.
    Works on ``(N, C, H, W)``, ``(N, D)`` (mask ``(N,)``) and ``(B, T, D)`` (mask ``(B, T)``).
    """
    check_reduction(reduction)
    lead = 2 if student.dim() == 3 else 1
    s, t, rows = feature_rows(student, teacher, mask, lead_ndim=lead, name="hint features")
    per_row = (s - t).pow(2).flatten(1).mean(-1)
    return reduce_rows(per_row, rows, reduction)


def _pool_to(x: Tensor, size: tuple[int, int], pool: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.adaptive_max_pool2d(x, size) if pool == "max" else F.adaptive_avg_pool2d(x, size)


def _common_size(a: Tensor, b: Tensor) -> tuple[int, int]:
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def _check_maps(*maps: Tensor) -> None:
    for x in maps:
        if x.dim() != 4:
            raise ValueError(f"feature maps must be (N, C, H, W), got shape {tuple(x.shape)}")


def attention_transfer(
    student: Tensor,
    teacher: Tensor,
    *,
    p: float = 2.0,
    mode: str = "code",
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Activation-based attention transfer between two feature maps.

    From "Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via
    Attention Transfer" (Zagoruyko & Komodakis, ICLR 2017). The spatial attention map of A in (C, H, W) is
    Q = vec(sum_c |A_c|^p) normalised to unit L2 norm (channel counts may differ between the models).

    * ``mode="code"`` (default, the authors' ``at_loss`` and RepDistiller's ``Attention``): per row,
      mean_j (Q_s,j - Q_t,j)^2 with Q built from the channel *mean* (the same after normalisation); the
      batch mean equals ``(at(s) - at(t)).pow(2).mean()``.
    * ``mode="paper"`` (Eq. 2): per row, ||Q_s - Q_t||_2 (not squared); the beta / 2 factor is the weight.

    The official code raises A to p without the absolute value; here |A|^p is used as in the paper, the same
    for even p (the default p = 2). When the spatial sizes differ, the larger map is adaptive-average-pooled
    to the smaller one first, as RepDistiller does (torchdistill's ``ATLoss`` requires equal sizes). The
    authors weight the loss by beta = 1000 (RepDistiller) per attention pair.
    """
    check_reduction(reduction)
    if mode not in ("code", "paper"):
        raise ValueError(f"mode must be 'code' or 'paper', got {mode!r}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1 (|A|^p has no finite gradient at 0 below), got {p}")
    _check_maps(student, teacher)
    s, t, rows = feature_rows(student, teacher, mask, same_shape=False, name="feature maps")
    size = _common_size(s, t)
    s, t = _pool_to(s, size, "avg"), _pool_to(t, size, "avg")

    def attention(x: Tensor) -> Tensor:
        q = x.abs().pow(p)
        q = q.mean(1) if mode == "code" else q.sum(1)
        return F.normalize(q.flatten(1), dim=1)

    diff = attention(s) - attention(t)
    per_row = diff.pow(2).mean(-1) if mode == "code" else diff.norm(dim=-1)
    return reduce_rows(per_row, rows, reduction)


def fsp_matrix(first: Tensor, second: Tensor, *, pool: str = "max") -> Tensor:
    """FSP ("flow of solution procedure") matrix G = F1 F2^T / (h w), per sample: ``(N, C1, C2)``.

    When the two maps differ in spatial size, the larger is adaptively pooled to the smaller one in each
    dimension (``pool="max"`` as torchdistill's ``FSPLoss``, ``"avg"`` as RepDistiller's ``FSP``).
    """
    _check_maps(first, second)
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"FSP maps differ in batch size: {tuple(first.shape)} and {tuple(second.shape)}")
    size = _common_size(first, second)
    a = _pool_to(first, size, pool).flatten(2)
    b = _pool_to(second, size, pool).flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


FSP_DISTANCES = ("squared", "mean_squared", "column_norm")


def fsp(
    student_first: Tensor,
    student_second: Tensor,
    teacher_first: Tensor,
    teacher_second: Tensor,
    *,
    distance: str = "squared",
    pool: str = "max",
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """FSP loss for one pair of layers: per row, a distance between the student's and teacher's FSP matrices.

    From "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning"
    (Yim et al., CVPR 2017); G = F1 F2^T / (h w) (`fsp_matrix`), and the paper's loss is
    1/N sum_x ||G_t(x) - G_s(x)||_2^2, i.e. ``distance="squared"`` (sum of squared entries per row) with
    ``reduction="mean"``. The implementations differ from the paper and from each other:

    * ``distance="column_norm"``: per row, sum_j ||G_s[:, j] - G_t[:, j]||_2 (torchdistill's ``FSPLoss``
      for a single pair of weight 1: ``norm(dim=1).sum() / N``);
    * ``distance="mean_squared"``: per row, the mean of the squared entries (RepDistiller's ``FSP``).

    The student's and teacher's matrices must have the same shape (C1, C2); spatial sizes may differ
    between the models and between a model's two maps (``pool``, see `fsp_matrix`).
    """
    check_reduction(reduction)
    if distance not in FSP_DISTANCES:
        raise ValueError(f"distance must be one of {FSP_DISTANCES}, got {distance!r}")
    _check_maps(student_first, student_second, teacher_first, teacher_second)
    n = student_first.shape[0]
    if any(x.shape[0] != n for x in (student_second, teacher_first, teacher_second)):
        raise ValueError("the four FSP feature maps must have the same batch size")
    dtype = compute_dtype(student_first, student_second, teacher_first, teacher_second)
    lead = student_first.shape[:1]
    index = keep_index(mask, lead, student_first.device)
    g_s = fsp_matrix(*(select_rows(x, 1, index, dtype) for x in (student_first, student_second)), pool=pool)
    g_t = fsp_matrix(*(select_rows(x, 1, index, dtype) for x in (teacher_first, teacher_second)), pool=pool)
    if g_s.shape[1:] != g_t.shape[1:]:
        raise ValueError(
            f"student FSP matrix {tuple(g_s.shape[1:])} and teacher FSP matrix {tuple(g_t.shape[1:])} "
            "differ: the channel counts of the two pairs must match"
        )
    diff = g_s - g_t
    if distance == "squared":
        per_row = diff.pow(2).sum((1, 2))
    elif distance == "mean_squared":
        per_row = diff.pow(2).mean((1, 2))
    else:
        per_row = diff.norm(dim=1).sum(-1)
    return reduce_rows(per_row, Rows(g_s, g_t, [], None, index, lead, n), reduction)


def _check_tokens(student_tokens: Tensor, teacher_tokens: Tensor, mask: Tensor | None) -> None:
    if student_tokens.dim() != 3 or teacher_tokens.dim() != 3:
        raise ValueError(
            f"tokens must be (B, T, D), got {tuple(student_tokens.shape)} and {tuple(teacher_tokens.shape)}"
        )
    if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
        raise ValueError(
            f"student tokens {tuple(student_tokens.shape)} and teacher tokens {tuple(teacher_tokens.shape)} "
            "differ in (B, T)"
        )
    if mask is not None and mask.shape != student_tokens.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the tokens' (B, T) = "
            f"{tuple(student_tokens.shape[:2])}"
        )


def token_contextual(
    student_tokens: Tensor,
    teacher_tokens: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """TRG's token-wise contextual loss: per sample, MSE between the two models' token-similarity maps.

    From "Knowledge Distillation via Token-level Relationship Graph" (Zhang, Liu & He, 2023, arXiv
    2306.12442), the inner-instance term: for one sample with tokens F in (T, D),
    CS = softmax(F F^T / sqrt(D)) (row-wise), and L_inner = MSE(CS_t, CS_s). Each model uses its own D, so
    the widths may differ. Per sample the value is the mean of the squared differences over its counted
    (query, key) pairs; ``mask`` (B, T) removes tokens from their sample (keys and queries), exactly as if
    they were not in the sequence. ``reduction`` is over samples: ``"none"`` gives ``(B,)`` (0 for a sample
    with no counted token), ``"mean"`` averages over samples with at least one counted token. No official
    code was available; the formula is from the paper's description (tokens are not L2-normalised there).
    """
    check_reduction(reduction)
    _check_tokens(student_tokens, teacher_tokens, mask)
    dtype = compute_dtype(student_tokens, teacher_tokens)
    s, t = student_tokens.to(dtype), teacher_tokens.to(dtype)
    b, n_tokens = s.shape[:2]
    keep = (
        torch.ones(b, n_tokens, dtype=torch.bool, device=s.device)
        if mask is None
        else mask.to(device=s.device, dtype=torch.bool)
    )
    counts = keep.sum(1)
    # a sample with no counted token keeps all its keys (finite softmax), then weighs 0
    keys = keep | (counts == 0)[:, None]
    pairs = (keep[:, :, None] & keep[:, None, :]).to(dtype)

    def context(x: Tensor) -> Tensor:
        scores = torch.bmm(x, x.transpose(1, 2)) / math.sqrt(x.shape[-1])
        return torch.softmax(scores.masked_fill(~keys[:, None, :], -torch.inf), dim=-1)

    per_sample = ((context(s) - context(t)).pow(2) * pairs).sum((1, 2)) / counts.clamp_min(1).to(dtype) ** 2
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(int((counts > 0).sum()), 1)


def token_relation_graph(
    student_tokens: Tensor,
    teacher_tokens: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 0.1,
    k: int = 8,
    sigma: float = 1.0,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """TRG's token-level relationship-graph loss: local (k-NN structure) plus global (InfoNCE) terms.

    From "Knowledge Distillation via Token-level Relationship Graph" (Zhang, Liu & He, 2023, arXiv
    2306.12442). The graph's nodes are all counted tokens of the batch, ``(B, T, D)`` with a ``(B, T)`` mask
    or already gathered ``(M, D)`` with an ``(M,)`` mask, so edges join tokens within and across samples.
    The paper samples a few tokens per image to keep the graph small: do that with the mask or a gather
    (memory and time grow as M^2).

    * Local preserving term, per node i: N(i) = the k nearest other nodes in the *teacher's* space
      (Euclidean), edge weights A_ij = exp(-||x_i - x_j||^2 / (2 sigma)) in each model's own space, and
      L_local,i = KL(softmax_{j in N(i)} A^S_ij || softmax_{j in N(i)} A^T_ij).
    * Global term, per node i (InfoNCE, the same token in the other model is the positive):
      L_global,i = -log exp(cos(s_i, t_i) / tau) / sum_j exp(cos(s_i, t_j) / tau), over all nodes j.
      It needs equal widths: project the student tokens first (the paper's linear projection).

    Value: ``local_weight * L_local + global_weight * L_global`` (the paper's beta and gamma), averaged
    (``"mean"``) or summed (``"sum"``, the paper's sums) over nodes; a batch relation, so no ``"none"``.
    ``temperature`` is the paper's tau_g, which it anneals from coarse (high) to fine (low) during training:
    that schedule belongs to the objective.

    Deviations, where the paper (no official code found) is ambiguous: (1) the k-NN graph is built on the
    teacher's tokens and shared by both models, so that the two softmaxes have the same support (the paper
    builds "the" graph and writes softmax over j in T); (2) the KL direction is the paper's, student first
    (as in the local-structure-preserving loss it follows); (3) SIM is cosine similarity; (4) defaults
    k = 8, sigma = 1, tau = 0.1 are ours. Nothing is detached (the k-NN selection has no gradient).
    """
    check_reduction(reduction, BATCH_REDUCTIONS)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if student_tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must be (B, T, D) or (M, D), got shape {tuple(student_tokens.shape)}")
    lead = student_tokens.dim() - 1
    s, t, _ = feature_rows(
        student_tokens,
        teacher_tokens,
        mask,
        lead_ndim=lead,
        same_shape=False,
        min_ndim=lead + 1,
        name="tokens",
    )
    if global_weight != 0 and s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"the global term needs equal token widths (project the student): got {s.shape[-1]} and "
            f"{t.shape[-1]}"
        )
    m = s.shape[0]
    per_node = s.new_zeros(m)
    if local_weight != 0 and m >= 2:
        with torch.no_grad():
            d_t = torch.cdist(t, t)
            d_t.fill_diagonal_(torch.inf)
            neighbours = d_t.topk(min(k, m - 1), dim=1, largest=False).indices

        def log_structure(x: Tensor) -> Tensor:
            d2 = (x[:, None, :] - x[neighbours]).pow(2).sum(-1)
            return torch.log_softmax(torch.exp(-d2 / (2 * sigma)), dim=-1)

        log_p_s, log_p_t = log_structure(s), log_structure(t)
        per_node = per_node + local_weight * (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if global_weight != 0 and m >= 1:
        logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).transpose(0, 1) / temperature
        per_node = per_node + global_weight * (torch.logsumexp(logits, dim=-1) - logits.diagonal())
    return per_node.sum() if reduction == "sum" else per_node.sum() / max(m, 1)


__all__ = ["attention_transfer", "fsp", "hint_mse", "token_contextual", "token_relation_graph"]

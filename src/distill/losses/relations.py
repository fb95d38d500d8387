"""Batch-relation losses: similarity-preserving, PKT, RKD, and CRD's contrastive (NCE) loss.

Pure functions of tensors (student first, teacher second); the conventions are those of
`distill.losses.features`. Features of any shape ``(N, ...)`` are flattened to ``(N, D)`` rows; student and
teacher widths may differ. These losses compare relations *between* the rows of a batch, so a per-row value
is not defined: ``reduction`` is ``"mean"`` (the official normalisation) or ``"sum"`` only, and a masked row
is removed before the relations are computed (masking equals removing). CRD is the exception: its loss is a
per-sample sum given the memory-bank samples, so it has ``"none"`` too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses._common import Rows, reduce_rows
from distill.losses.features import BATCH_REDUCTIONS, check_reduction, feature_rows, keep_index, select_rows


def _batch_rows(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    s, t, _ = feature_rows(student, teacher, mask, same_shape=False, name="features")
    return s.flatten(1), t.flatten(1)


def _batch_reduce(total: Tensor, count: int, reduction: str) -> Tensor:
    return total if reduction == "sum" else total / max(count, 1)


def similarity_preserving(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Similarity-preserving KD: ||G_s - G_t||_F^2 / N^2 with G = row-normalise(F F^T).

    From "Similarity-Preserving Knowledge Distillation" (Tung & Mori, ICCV 2019). F is the ``(N, D)``
    flattened activation of a batch, G its Gram matrix with each row L2-normalised. ``"mean"`` divides by
    N^2 (the paper and RepDistiller's ``Similarity``), ``"sum"`` is the squared Frobenius norm itself.
    torchdistill's ``SPKDLoss`` (1.1) differs: it calls ``normalize(G, 1)``, whose positional 1 is p, so it
    normalises the rows in L1, not L2 norm (its ``batchmean`` / other reductions are our mean / sum). The
    paper's gamma (3000 on CIFAR) is the weight.
    """
    check_reduction(reduction, BATCH_REDUCTIONS)
    s, t = _batch_rows(student, teacher, mask)

    def gram(x: Tensor) -> Tensor:
        return F.normalize(x @ x.transpose(0, 1), dim=1)

    total = (gram(s) - gram(t)).pow(2).sum()
    return _batch_reduce(total, s.shape[0] ** 2, reduction)


def pkt(
    student: Tensor,
    teacher: Tensor,
    *,
    eps: float = 1e-7,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Probabilistic knowledge transfer: KL between the batch's cosine-kernel conditional probabilities.

    From "Learning Deep Representations with Probabilistic Knowledge Transfer" (Passalis & Tefas, ECCV
    2018). Rows are normalised to unit length (x / (||x|| + eps)), the cosine kernel K_ij = (cos_ij + 1) / 2
    is turned into conditional probabilities P_ij = K_ij / sum_l K_il for each model, and the loss is
    sum_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)) (the self-pairs j = i included, as in the official
    code). ``"mean"`` divides that sum by N^2 (``torch.mean`` over the matrix, the official ``cosine_
    similarity_loss`` and torchdistill's ``PKTLoss``); ``"sum"`` is the sum, i.e. sum_i KL(P^t_i || P^s_i).
    """
    check_reduction(reduction, BATCH_REDUCTIONS)
    s, t = _batch_rows(student, teacher, mask)

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        kernel = (x @ x.transpose(0, 1) + 1.0) / 2.0
        return kernel / kernel.sum(1, keepdim=True)

    p_s, p_t = conditional(s), conditional(t)
    total = (p_t * torch.log((p_t + eps) / (p_s + eps))).sum()
    return _batch_reduce(total, s.shape[0] ** 2, reduction)


def _pairwise_distances(x: Tensor, eps: float) -> Tensor:
    """Euclidean distances, squared distances clamped at ``eps`` before the root, zero diagonal."""
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * (x @ x.transpose(0, 1))).clamp_min(eps).sqrt()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def _mean_normalised(d: Tensor) -> Tensor:
    """Distances divided by their mean over the positive entries (left as they are when none is)."""
    count = (d > 0).sum()
    mean = d.sum() / count.clamp_min(1)
    return d / torch.where(count > 0, mean, torch.ones_like(mean))


def _smooth_l1(a: Tensor, b: Tensor, reduction: str) -> Tensor:
    return F.smooth_l1_loss(a, b, reduction=reduction, beta=1.0) if a.numel() else a.sum() * 0


def rkd_distance(
    student: Tensor,
    teacher: Tensor,
    *,
    eps: float = 1e-12,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """RKD distance-wise loss: Huber(d_s / mu_s, d_t / mu_t) over all ordered pairs of the batch.

    From "Relational Knowledge Distillation" (Park, Kim, Lu & Cho, CVPR 2019). d are Euclidean distances
    between rows (the squared distance clamped at ``eps`` before the square root, the diagonal set to 0) and
    mu the mean of the positive distances. The Huber loss is ``smooth_l1`` with delta = 1, averaged over the
    N^2 entries (diagonal included) for ``"mean"`` or summed for ``"sum"``, as in the official code and
    torchdistill's ``RKDLoss``. As there, the teacher side is detached (computed under ``no_grad``).
    """
    check_reduction(reduction, BATCH_REDUCTIONS)
    s, t = _batch_rows(student, teacher, mask)
    with torch.no_grad():
        d_t = _mean_normalised(_pairwise_distances(t.detach(), eps))
    d_s = _mean_normalised(_pairwise_distances(s, eps))
    return _smooth_l1(d_s, d_t, reduction)


def _angles(x: Tensor) -> Tensor:
    diff = x[None, :, :] - x[:, None, :]  # diff[i, j] = x_j - x_i
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)  # cos of the angle (x_j, x_i, x_k)


def rkd_angle(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """RKD angle-wise loss: Huber(cos angle_s(i, j, k), cos angle_t(i, j, k)) over all N^3 triplets.

    From "Relational Knowledge Distillation" (Park et al., CVPR 2019): cos angle(i, j, k) =
    <e_ij, e_ik> with e_ij the unit vector from x_i to x_j (zero for j = i). ``"mean"`` averages the
    smooth-L1 (delta = 1) over the N^3 entries, ``"sum"`` sums them (official code, torchdistill). The
    teacher side is detached. Memory is O(N^2 D + N^3).
    """
    check_reduction(reduction, BATCH_REDUCTIONS)
    s, t = _batch_rows(student, teacher, mask)
    with torch.no_grad():
        a_t = _angles(t.detach())
    return _smooth_l1(_angles(s), a_t, reduction)


def rkd(
    student: Tensor,
    teacher: Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    eps: float = 1e-12,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """RKD: ``distance_weight * rkd_distance + angle_weight * rkd_angle`` (a term of weight 0 is skipped).

    From "Relational Knowledge Distillation" (Park et al., CVPR 2019). The default weights 25 and 50 are
    RepDistiller's ``RKDLoss`` (CIFAR-100); the paper's metric-learning runs use 1 and 2, which is also
    torchdistill's example configuration (its ``RKDLoss`` has no defaults). Features are flattened to rows.
    """
    total = student.new_zeros((), dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)
    if distance_weight != 0:
        total = total + distance_weight * rkd_distance(
            student, teacher, eps=eps, mask=mask, reduction=reduction
        )
    if angle_weight != 0:
        total = total + angle_weight * rkd_angle(student, teacher, mask=mask, reduction=reduction)
    if distance_weight == 0 and angle_weight == 0:
        check_reduction(reduction, BATCH_REDUCTIONS)
    return total


def _check_crd(embed: Tensor, samples: Tensor, positive: Tensor | None, name: str) -> None:
    if embed.dim() != 2:
        raise ValueError(f"{name} embedding must be (N, D), got shape {tuple(embed.shape)}")
    n, d = embed.shape
    if samples.dim() != 3 or samples.shape[0] != n or samples.shape[2] != d:
        raise ValueError(
            f"memory-bank samples contrasted with the {name} embedding must be (N, K, D) = ({n}, K, {d}), "
            f"got {tuple(samples.shape)}"
        )
    if positive is not None and positive.shape != embed.shape:
        raise ValueError(
            f"positive for the {name} embedding must be {tuple(embed.shape)}, got {tuple(positive.shape)}"
        )


def _crd_scores(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Dot products / T of each anchor with its positive (column 0) and its K negatives: ``(N, K + 1)``."""
    bank = torch.cat([positive[:, None, :], negatives], dim=1)
    return torch.einsum("nkd,nd->nk", bank, anchor) / temperature


def crd_normalizers(
    student_embed: Tensor,
    teacher_embed: Tensor,
    student_negatives: Tensor,
    teacher_negatives: Tensor,
    *,
    n_data: int,
    temperature: float = 0.07,
    student_positive: Tensor | None = None,
    teacher_positive: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CRD's normalisation constants (Z_student, Z_teacher) estimated as the official code does once.

    Z = n_data * mean over the batch's (N, K + 1) scores of exp(<v, anchor> / T): Z_student for the term
    anchored at the student embedding (contrasted with teacher-bank rows, the official ``z_v1``), Z_teacher
    for the other (``z_v2``). The official code sets them from its first batch and keeps them fixed; an
    objective holding the memory banks should do the same. Arguments as `crd_nce`; detached.
    """
    with torch.no_grad():
        pos_t = teacher_positive if teacher_positive is not None else teacher_embed
        pos_s = student_positive if student_positive is not None else student_embed
        dtype = torch.float64 if student_embed.dtype == torch.float64 else torch.float32
        z_s = _crd_scores(student_embed.to(dtype), pos_t.to(dtype), teacher_negatives.to(dtype), temperature)
        z_t = _crd_scores(teacher_embed.to(dtype), pos_s.to(dtype), student_negatives.to(dtype), temperature)
        return z_s.exp().mean() * n_data, z_t.exp().mean() * n_data


def crd_nce(
    student_embed: Tensor,
    teacher_embed: Tensor,
    student_negatives: Tensor,
    teacher_negatives: Tensor,
    *,
    n_data: int,
    student_normalizer: float | Tensor,
    teacher_normalizer: float | Tensor,
    temperature: float = 0.07,
    student_positive: Tensor | None = None,
    teacher_positive: Tensor | None = None,
    eps: float = 1e-7,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """CRD's NCE loss given projected, L2-normalised embeddings and memory-bank samples.

    From "Contrastive Representation Distillation" (Tian, Krishnan & Isola, ICLR 2020), in the form of the
    official code (RepDistiller ``NCECriterion``, torchdistill ``CRDLoss``). Two symmetric terms, each
    anchored at one model's embedding a_i and contrasted with rows v of the *other* model's memory bank:
    P_j = exp(<v_j, a_i> / T) / Z, with j = 0 the positive (the bank row of sample i itself) and K
    negatives, and with the noise prior P_n = 1 / n_data (uniform over the dataset),

        loss_i = -log(P_0 / (P_0 + K P_n + eps)) - sum_k log(K P_n / (P_k + K P_n + eps)).

    The value per sample is loss_i(student anchor) + loss_i(teacher anchor); ``"mean"`` over samples is the
    official value. Arguments:

    * ``student_negatives`` ``(N, K, D)``: K rows drawn from the *student* memory bank for each sample,
      contrasted with ``teacher_embed``; ``teacher_negatives``: from the teacher bank, with ``student_embed``.
    * ``student_positive`` / ``teacher_positive`` ``(N, D)``: the student / teacher bank row of each sample
      (the official positives, read *before* the bank update). Left as None, the current embedding is used
      (the paper's pair (T(x_i), S(x_i)) without a bank; it then carries gradient).
    * ``student_normalizer`` / ``teacher_normalizer``: Z of the student-anchored / teacher-anchored term.
      The official code estimates them once from its first batch (`crd_normalizers`) and then keeps them:
      they are explicit here so that the objective owns that state.
    * ``n_data``: the dataset size (number of memory-bank rows).

    Bank rows get no gradient (the official code detaches them; pass ``.detach()``-ed rows); the embeddings
    do. Update the banks after the step with `crd_memory_update` (momentum 0.5 in the official code).
    """
    check_reduction(reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    _check_crd(student_embed, teacher_negatives, student_positive, "student")
    _check_crd(teacher_embed, student_negatives, teacher_positive, "teacher")
    if student_embed.shape[0] != teacher_embed.shape[0]:
        raise ValueError(
            f"student and teacher embeddings differ in batch size: {student_embed.shape[0]} and "
            f"{teacher_embed.shape[0]}"
        )
    if student_negatives.shape[1] != teacher_negatives.shape[1]:
        raise ValueError("both sides must draw the same number K of negatives")
    tensors = [student_embed, teacher_embed, student_negatives, teacher_negatives]
    tensors += [x for x in (student_positive, teacher_positive) if x is not None]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    n = student_embed.shape[0]
    lead = student_embed.shape[:1]
    index = keep_index(mask, lead, student_embed.device)

    def rows(x: Tensor | None) -> Tensor | None:
        return None if x is None else select_rows(x, 1, index, dtype)

    s, t, s_neg, t_neg = (rows(x) for x in tensors[:4])
    s_pos = rows(student_positive) if student_positive is not None else s
    t_pos = rows(teacher_positive) if teacher_positive is not None else t
    k = s_neg.shape[1]
    noise = k / n_data
    log_c = math.log(noise + eps)

    def term(anchor: Tensor, positive: Tensor, negatives: Tensor, z: float | Tensor) -> Tensor:
        log_z = torch.log(torch.as_tensor(z, dtype=dtype, device=anchor.device))
        log_p = _crd_scores(anchor, positive, negatives, temperature) - log_z
        log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_c))
        log_d1 = log_p[:, 0] - log_denominator[:, 0]
        log_d0 = (math.log(noise) if k > 0 else 0.0) - log_denominator[:, 1:]
        return -(log_d1 + log_d0.sum(1))

    per_row = term(s, t_pos, t_neg, student_normalizer) + term(t, s_pos, s_neg, teacher_normalizer)
    return reduce_rows(per_row, Rows(s, t, [], None, index, lead, n), reduction)


def crd_memory_update(bank: Tensor, index: Tensor, embed: Tensor, momentum: float = 0.5) -> Tensor:
    """New memory-bank rows for ``index``: normalise(momentum * bank[index] + (1 - momentum) * embed).

    The official CRD update (``momentum = 0.5``), returned instead of written: ``bank`` is not modified;
    write the rows with ``bank.index_copy_(0, index, rows)`` after the loss is computed. ``embed`` is
    detached (the update is not differentiated); the rows come back in the bank's dtype.
    """
    if bank.dim() != 2 or embed.dim() != 2 or embed.shape[1] != bank.shape[1]:
        raise ValueError(
            f"bank (n_data, D) and embed (N, D) expected, got {tuple(bank.shape)} and {tuple(embed.shape)}"
        )
    if index.shape != embed.shape[:1]:
        raise ValueError(f"index must be (N,) = {tuple(embed.shape[:1])}, got {tuple(index.shape)}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        old = bank.index_select(0, index.to(device=bank.device, dtype=torch.long)).to(dtype)
        new = momentum * old + (1 - momentum) * embed.detach().to(device=bank.device, dtype=dtype)
        return F.normalize(new, dim=1).to(bank.dtype)


__all__ = [
    "crd_memory_update",
    "crd_nce",
    "crd_normalizers",
    "pkt",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
]

"""Pseudo-subclass distillation: LELP's subspaces of the teacher's embedding space and its loss.

From "Linear Projections of Teacher Embeddings for Few-Class Distillation" (Loo, Iliopoulos, Hu & Vee, 2024,
arXiv:2409.20449), the method it calls LELP (Learning Embedding Linear Projections). With few classes the
teacher's C probabilities say little; LELP splits every class into S pseudo-subclasses read off linear
projections of the teacher's final-layer embedding h, and the student learns the S x C distribution:

1. subspaces, once, from the training set's teacher embeddings of each class c (`fit_class_subspaces`):
   the class covariance Sigma_c is projected onto the null space of the teacher's output layer W (the
   directions the teacher's logits W h already carry are left to plain KD: P = I - W^+ W, Sigma_c <- P
   Sigma_c P), its top S principal directions V_c (D x S) are turned by a random orthonormal S x S matrix
   Q_c (so that the S directions have equal variance in expectation, not one dominant one), and
   u_{c,s} = (V_c Q_c)_{:, s};
2. projections z_{c,s}(h) = u_{c,s} . (h - mu_c) / sigma_c (`subclass_projections`), mu_c the class mean;
3. the teacher's pseudo-subclass distribution p_{c,s} = p_c softmax_s(z_{c, .} / beta)_s with
   p_c = softmax(teacher_logits / T)_c, and the loss T^2 KL(p || q) over the S x C pseudo-subclasses
   (`lelp_kd`).

sigma_c (`standardize`) is ours: the root mean variance of class c's S directions, so that the subclass
temperature beta is unitless (the paper tunes beta per teacher). Centring at the class mean (PCA
coordinates) is ours too: the sources read do not say whether the paper centres; uncentred projections
would add a per-subclass offset u_{c,s} . mu_c that favours some pseudo-subclasses for every input.

The student's distribution q is given here in factorised form, q_{c,s} = softmax(student_logits / T)_c
softmax(student_subclass_logits_{c, .})_s: every distribution over S x C outcomes can be written so (q_c its
class marginal, the second factor its within-class conditional), and this form keeps the student's own
C-way classifier as the class marginal (see `distill.objectives.lelp`). By that factorisation the loss is
exactly T^2 [KL(p_C || q_C) + sum_c p_c KL(p_{S|c} || q_{S|c})]: plain KD plus the subclass term.

Conventions are those of `distill.losses._common`: ``(N, C)`` logits with ``(N, C, S)`` subclass tensors
(or ``(B, T, C)`` with ``(B, T, C, S)``), a boolean ``mask`` over the leading dimensions, float32 compute
(float64 kept), ``reduction`` "mean" / "sum" / "none". The subspace fit runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import flatten_rows, kl_from_log_probs, reduce_rows

__all__ = ["fit_class_subspaces", "haar_rotations", "lelp_kd", "subclass_projections"]


def haar_rotations(count: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` random orthonormal ``size x size`` matrices, uniform (Haar) over the orthogonal group:
    the QR factorisation of a Gaussian matrix with the signs of R's diagonal moved into Q. float64."""
    gaussian = torch.randn(count, size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[:, None, :]


def _null_space(weight: Tensor) -> Tensor:
    """An orthonormal basis (D, D - r) of the null space of ``weight`` (C', D) of rank r."""
    _, singular, vh = torch.linalg.svd(weight, full_matrices=True)
    tolerance = (singular.max() if singular.numel() else weight.new_zeros(())) * max(weight.shape)
    rank = int((singular > tolerance * torch.finfo(weight.dtype).eps).sum())
    return vh[rank:].transpose(0, 1)


def fit_class_subspaces(
    count: Tensor,
    total: Tensor,
    outer: Tensor,
    *,
    subclasses: int,
    rotations: Tensor,
    output_weight: Tensor | None = None,
    standardize: bool = True,
) -> tuple[Tensor, Tensor]:
    """LELP's pseudo-subclass directions from per-class moments of the teacher's embeddings.

    ``count`` (C,), ``total`` (C, D) and ``outer`` (C, D, D) are each class's number of embeddings, their sum
    and the sum of their outer products h h^T; ``rotations`` (C, S, S) the random orthonormal matrices Q_c;
    ``output_weight`` (C', D) the teacher's output layer W, whose row space is projected out before the PCA
    (None: no projection). Returns ``directions`` (C, S, D) and ``offsets`` (C, S) such that the projections
    of the module docstring are z_{c,s}(h) = directions_{c,s} . h - offsets_{c,s}. A class with fewer than
    two embeddings, or with no variance left, gets zero directions: its subclasses stay uniform.
    """
    if subclasses < 1:
        raise ValueError(f"subclasses must be >= 1, got {subclasses}")
    if total.dim() != 2 or outer.shape != (*total.shape, total.shape[1]) or count.shape != total.shape[:1]:
        raise ValueError(
            f"moments must be count (C,), total (C, D) and outer (C, D, D); got {tuple(count.shape)}, "
            f"{tuple(total.shape)} and {tuple(outer.shape)}"
        )
    classes, dim = total.shape
    if rotations.shape != (classes, subclasses, subclasses):
        raise ValueError(
            f"rotations must be ({classes}, {subclasses}, {subclasses}), got {tuple(rotations.shape)}"
        )
    f64 = torch.float64
    count, total, outer, rotations = (t.to(f64) for t in (count, total, outer, rotations))
    if output_weight is not None:  # the PCA runs in the null space of W, so every direction stays in it
        basis = _null_space(output_weight.to(device=total.device, dtype=f64))
    else:
        basis = torch.eye(dim, dtype=f64, device=total.device)
    if subclasses > basis.shape[1]:
        raise ValueError(
            f"{subclasses} subclasses need as many directions, but the embedding has {basis.shape[1]} "
            "outside the teacher's output layer"
        )
    directions = total.new_zeros(classes, subclasses, dim)
    offsets = total.new_zeros(classes, subclasses)
    for c in range(classes):
        n = float(count[c])
        if n < 2:
            continue
        mean = total[c] / n
        covariance = outer[c] / n - torch.outer(mean, mean)
        covariance = basis.transpose(0, 1) @ ((covariance + covariance.transpose(0, 1)) / 2) @ basis
        values, vectors = torch.linalg.eigh(covariance)  # ascending, in null-space coordinates
        top_values = values[-subclasses:].flip(0).clamp_min(0.0)
        top = basis @ vectors[:, -subclasses:].flip(1)  # (D, S), largest variance first
        variance = top_values.mean()
        if not bool(variance > torch.finfo(f64).eps * max(float(values.abs().max()), 1.0)):
            continue  # no spread left in this class: its subclasses stay uniform
        rotated = (top @ rotations[c]).transpose(0, 1)  # (S, D): rows u_{c,s}
        if standardize:
            rotated = rotated / variance.sqrt()
        directions[c] = rotated
        offsets[c] = rotated @ mean
    return directions, offsets


def subclass_projections(embeddings: Tensor, directions: Tensor, offsets: Tensor) -> Tensor:
    """z_{c,s}(h) = directions_{c,s} . h - offsets_{c,s} for embeddings ``(..., D)``: ``(..., C, S)``, in
    float32 (float64 kept)."""
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    h = embeddings.to(dtype)
    return torch.einsum("...d,csd->...cs", h, directions.to(device=h.device, dtype=dtype)) - offsets.to(
        device=h.device, dtype=dtype
    )


def lelp_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_subclass_logits: Tensor,
    teacher_projections: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """LELP's loss: T^2 KL(p || q) over the S x C pseudo-subclasses, per row.

    p_{c,s} = softmax(teacher_logits / T)_c softmax(teacher_projections_{c, .} / beta)_s (the paper's
    teacher pseudo-subclass probabilities, beta = ``subclass_temperature``);
    q_{c,s} = softmax(student_logits / T)_c softmax(student_subclass_logits_{c, .})_s (the student's S x C
    distribution, factorised: see the module docstring). ``student_subclass_logits`` and
    ``teacher_projections`` are ``(..., C, S)`` over the logits' leading shape. The T^2 factor is Hinton's.
    """
    if not subclass_temperature > 0:
        raise ValueError(f"subclass_temperature must be > 0, got {subclass_temperature}")
    classes = student_logits.shape[-1]
    for name, tensor in (
        ("student_subclass_logits", student_subclass_logits),
        ("teacher_projections", teacher_projections),
    ):
        if tensor.dim() != student_logits.dim() + 1 or tensor.shape[:-1] != student_logits.shape:
            raise ValueError(
                f"{name} must be (..., {classes}, S) over logits {tuple(student_logits.shape)}, got "
                f"{tuple(tensor.shape)}"
            )
    if student_subclass_logits.shape != teacher_projections.shape:
        raise ValueError(
            f"student_subclass_logits {tuple(student_subclass_logits.shape)} and teacher_projections "
            f"{tuple(teacher_projections.shape)} differ in shape"
        )
    rows = flatten_rows(
        student_logits,
        teacher_logits,
        mask=mask,
        temperature=temperature,
        reduction=reduction,
        extras=[student_subclass_logits, teacher_projections],
    )
    dtype = rows.student.dtype
    student_sub, teacher_proj = (e.to(dtype) for e in rows.extras if e is not None)
    log_q = torch.log_softmax(rows.student / temperature, dim=-1)[..., None] + torch.log_softmax(
        student_sub, dim=-1
    )
    log_p = torch.log_softmax(rows.teacher / temperature, dim=-1)[..., None] + torch.log_softmax(
        teacher_proj / subclass_temperature, dim=-1
    )
    kl = kl_from_log_probs(log_p.flatten(1), log_q.flatten(1))
    return reduce_rows(temperature**2 * kl, rows, reduction)

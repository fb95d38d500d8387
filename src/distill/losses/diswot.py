"""DisWOT's training-free score of a student architecture for a given teacher (S18).

From "DisWOT: Student Architecture Search for Distillation WithOut Training" (Dong, Li & Wei, CVPR 2023).
Teacher and candidate student, both at random initialisation (or a trained teacher), see one mini-batch;
two distances between them are measured and the score is minus their sum (higher = a better student):

* relation distance ``M_r = ||G(A_s) - G(A_t)||_F^2 / N^2`` with ``G(A) = row-normalise(A A^T)``: the
  sample-to-sample Gram matrices of the ``(N, ...)`` feature maps before global pooling, flattened per
  sample (each row of the Gram L2-normalised). This is the similarity-preserving KD loss
  (`distill.losses.relations.similarity_preserving`) on the two models' last feature maps.
* semantic distance ``M_s = ||G(W_s) - G(W_t)||_F^2 / C^2``, the same comparison on the Grad-CAM-style
  class weights ``W = dCE/dW_fc`` of each model's linear classifier on this batch, a ``(C, D)`` matrix
  (class c's row is the batch's cross-entropy gradient with respect to class c's classifier weights, the
  channel importance Grad-CAM pools); ``G(W) = row-normalise(W W^T)`` is then the ``(C, C)`` inter-class
  correlation of the two models' class activation vectors.
* ``score = -(M_s + M_r)``.

Differences from the official code (github.com/lilujunai/DisWOT-CVPR2023, `index.md`'s core code): its
semantic term forms, per class, the ``(D, D)`` outer product of the gradient row and compares those between
teacher and student, which is defined only when both classifiers have the same width ``D`` (its ResNet
search space); candidates of any width are compared here through the ``(C, C)`` class Gram instead, and
divided by ``C^2`` where the official code divides by ``C D``. The two terms are summed unweighted, as there.
Each matrix is divided by its largest absolute value before the Gram is formed: the row-normalised Gram
does not change, but N(0, 1)-initialised networks without normalisation layers cannot overflow float32.

Pure functions of tensors; float32 maths for any input dtype (float64 stays float64); labels below 0
(``ignore_index=-100``) drop their row, exactly as removing it would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.relations import similarity_preserving


def _float(x: Tensor) -> Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _rescaled(x: Tensor) -> Tensor:
    """`x` flattened to rows and divided by its largest |value| (the row-normalised Gram is unchanged)."""
    x = _float(x).flatten(1)
    scale = x.abs().amax() if x.numel() else x.new_tensor(0.0)
    return x / scale if bool(scale > 0) and bool(torch.isfinite(scale)) else x


def _kept(labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    keep = labels.to(device) >= 0
    return None if bool(keep.all()) else keep


def linear_classifier_gradient(features: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``dCE/dW`` of a linear classifier ``logits = features W^T + b`` on this batch: ``(C, D)``.

    ``(softmax(logits) - onehot(labels))^T features / n`` with n the counted rows (mean cross-entropy); the
    same matrix autograd leaves in the classifier's ``weight.grad``, without a backward pass. `features`
    ``(N, D)`` (or ``(N, ...)``, flattened) is the classifier's input, `logits` ``(N, C)``, `labels` ``(N,)``
    (below 0: row ignored). ``-inf`` logits are allowed (probability 0). No counted row: zeros.
    """
    if logits.dim() != 2 or features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"features (N, D) and logits (N, C) must share N, got {tuple(features.shape)} and "
            f"{tuple(logits.shape)}"
        )
    x, z = _float(features).flatten(1), _float(logits)
    if x.dtype != z.dtype:
        x, z = x.to(torch.float64), z.to(torch.float64)
    keep = _kept(labels, z.shape[0], z.device)
    y = labels.to(z.device).long()
    if keep is not None:
        x, z, y = x[keep], z[keep], y[keep]
    if z.shape[0] == 0:
        return z.new_zeros(z.shape[1], x.shape[1])
    if bool((y >= z.shape[1]).any()):
        raise ValueError(f"labels must be below the {z.shape[1]} classes")
    residual = torch.softmax(z, dim=1)
    residual = residual.scatter_add(1, y[:, None], residual.new_full((len(y), 1), -1.0))
    return residual.transpose(0, 1) @ x / z.shape[0]


def diswot_relation(
    student_features: Tensor, teacher_features: Tensor, labels: Tensor | None = None
) -> Tensor:
    """``M_r``: similarity-preserving distance between the ``(N, N)`` sample Gram matrices of the two
    models' feature maps (any shapes ``(N, ...)``; widths may differ). Rows whose label is below 0 are
    dropped when `labels` is given."""
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError("student and teacher features must have the same number of rows")
    keep = _kept(labels, student_features.shape[0], student_features.device)
    return similarity_preserving(_rescaled(student_features), _rescaled(teacher_features), mask=keep)


def diswot_semantic(student_gradient: Tensor, teacher_gradient: Tensor) -> Tensor:
    """``M_s``: similarity-preserving distance between the ``(C, C)`` class Gram matrices of the two
    classifiers' gradients ``(C, D_s)`` and ``(C, D_t)`` (`linear_classifier_gradient`)."""
    if student_gradient.dim() != 2 or student_gradient.shape[0] != teacher_gradient.shape[0]:
        raise ValueError(
            f"class gradients must be (C, D) with the same C, got {tuple(student_gradient.shape)} and "
            f"{tuple(teacher_gradient.shape)}"
        )
    return similarity_preserving(_rescaled(student_gradient), _rescaled(teacher_gradient))


def diswot_score(semantic: Tensor, relation: Tensor) -> Tensor:
    """DisWOT's score, ``-(M_s + M_r)``: higher predicts a better distilled student."""
    return -(semantic + relation)


__all__ = ["diswot_relation", "diswot_score", "diswot_semantic", "linear_classifier_gradient"]

"""Distillation losses for DETR-style detectors (S27).

"CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs" (Lan and Tian, 2025)
distils two things from a DETR teacher:

1. **Location-and-context-aware memory distillation**: the transformer encoder's output (the *memory*, a
   `(B, H*W, D)` grid of tokens that already mixes global context) rather than the backbone's features,
   enriched with location: the tokens carry their spatial position embedding, and the squared error at
   each token is weighted by where the ground-truth objects are (`location_weights`, foreground tokens
   weighted by `alpha` over the area of their box, background tokens by `beta` over the background's
   area, as in FGD's focal masks):

       L_mem = (1 / B) sum_b sum_p w_bp (1 / D) || A^T_bp - f(A^S_bp) ||^2

   where `A = memory + position` and `f` a learned linear map from the student's width to the teacher's.

2. **Target-aware consistent logit distillation**: queries built from the ground truth (each object's
   label embedding as content, its box as position) are decoded by *both* decoders, so the student's and
   the teacher's predictions on a query look at the same object and can be compared one to one:

       L_logit = (1 / K) sum_k [ T^2 KL(p^T_k(T) || p^S_k(T))
                                 + l1 |b^S_k - b^T_k|_1 + g (1 - GIoU(b^S_k, b^T_k)) ]

   over the K target-aware queries (`paired_query_kd` with every pair weighted 1).

The logit-only baseline (`paired_query_kd` on Hungarian-matched pairs) is the standard DETR logit KD
(DETRDistill's "Hungarian-matching logits distillation", Chang et al., ICCV 2023): each student query is
paired with the teacher query of least matching cost (class probability, L1 and GIoU of the boxes), the
class distributions are compared by KL over every pair, and the box terms are weighted by the teacher's
probability that its query holds an object (so that pairs of background queries do not pull boxes).

Conventions: boxes are DETR's `(cx, cy, w, h)` in [0, 1]; class logits include the last "no object" class;
math runs in float32 for any input dtype (float64 stays float64 for references); -inf logits are allowed
where both models have them. Nothing of the rest of `distill` is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from distill.losses._common import compute_dtype


def box_corners(boxes: Tensor) -> Tensor:
    """`(cx, cy, w, h)` to `(x0, y0, x1, y1)` over the last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def paired_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of boxes `a[i]` and `b[i]` (both `(..., 4)`, cx-cy-w-h), shape `(...)`.

    "Generalized Intersection over Union" (Rezatofighi et al., CVPR 2019): IoU - |C \\ (A u B)| / |C|, C the
    smallest box enclosing both."""
    a, b = box_corners(a), box_corners(b)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a + area_b - inter
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / (union + eps) - (hull - union) / (hull + eps)


def location_weights(
    boxes: Sequence[Tensor], height: int, width: int, alpha: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Per-token weights `(B, height * width)` of the memory loss from each image's ground-truth boxes.

    A token (its cell's centre) inside one or more boxes is foreground, weighted `alpha / (cells of the
    smallest box holding it)`, so that a small object counts as much as a large one (a box that holds no
    cell centre takes the cell of its own centre); every other token is
    background, weighted `beta / (background cells)`. An image without boxes is all background. (FGD,
    "Focal and Global Knowledge Distillation for Detectors", Yang et al., CVPR 2022, uses the same scale
    mask; CLoCKDistill applies ground-truth location to the DETR memory.)"""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    rows = []
    for image_boxes in boxes:
        scale = torch.zeros(height, width)
        for box in box_corners(image_boxes.float().reshape(-1, 4)):
            inside = (grid_x >= box[0]) & (grid_x <= box[2]) & (grid_y >= box[1]) & (grid_y <= box[3])
            if not bool(inside.any()):  # a box smaller than a cell holds no centre: take its centre's cell
                row = min(int((box[1] + box[3]) / 2 * height), height - 1)
                col = min(int((box[0] + box[2]) / 2 * width), width - 1)
                inside = torch.zeros_like(inside)
                inside[row, col] = True
            cells = int(inside.sum())
            scale = torch.where(inside, torch.maximum(scale, torch.full_like(scale, 1.0 / cells)), scale)
        foreground = scale > 0
        background = int((~foreground).sum())
        weights = torch.where(foreground, alpha * scale, torch.full_like(scale, beta / max(background, 1)))
        rows.append(weights.flatten())
    return torch.stack(rows)


def memory_distillation_loss(student_memory: Tensor, teacher_memory: Tensor, weights: Tensor) -> Tensor:
    """CLoCKDistill's location-aware memory loss: (1 / B) sum_b sum_p w_bp (1 / D) ||A^T_bp - A^S_bp||^2.

    `student_memory` (already mapped to the teacher's width) and `teacher_memory` are `(B, P, D)` (P tokens
    of the encoder's output plus their position embedding), `weights` `(B, P)` from `location_weights`.
    The squared error is averaged over the D channels (not summed) so that the weight of the term does
    not depend on the teacher's width. Float32 compute; returns a scalar."""
    if student_memory.shape != teacher_memory.shape:
        raise ValueError(
            f"student memory {tuple(student_memory.shape)} and teacher memory {tuple(teacher_memory.shape)} "
            "must have the same shape (map the student's width to the teacher's first)"
        )
    if weights.shape != student_memory.shape[:2]:
        raise ValueError(
            f"weights must be (B, P) = {tuple(student_memory.shape[:2])}, got {tuple(weights.shape)}"
        )
    dtype = compute_dtype(student_memory, teacher_memory, weights)
    squared = (teacher_memory.to(dtype) - student_memory.to(dtype)).pow(2).mean(-1)
    return (weights.to(dtype) * squared).sum() / student_memory.shape[0]


def paired_query_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_boxes: Tensor,
    teacher_boxes: Tensor,
    box_weights: Tensor | None = None,
    temperature: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> Tensor:
    """Logit distillation over K paired queries (the student's query k against the teacher's query k):

        (1 / K) sum_k [ T^2 KL(softmax(z^T_k / T) || softmax(z^S_k / T))
                        + m_k (l1_weight |b^S_k - b^T_k|_1 + giou_weight (1 - GIoU(b^S_k, b^T_k))) ]

    `*_logits` `(K, C + 1)` (the classes and "no object"), `*_boxes` `(K, 4)` (cx, cy, w, h), `box_weights`
    m `(K,)` (None: all 1; for Hungarian-matched pairs, the teacher's object probability). The pairing is
    the caller's: target-aware queries (CLoCKDistill) or Hungarian matching (the logit KD baseline).
    Float32 compute; K = 0 gives 0; finite with -inf logits shared by both models."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logits must both be (K, C), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    count = student_logits.shape[0]
    if student_boxes.shape != (count, 4) or teacher_boxes.shape != (count, 4):
        raise ValueError(
            f"boxes must be ({count}, 4), got {tuple(student_boxes.shape)}, {tuple(teacher_boxes.shape)}"
        )
    dtype = compute_dtype(student_logits, teacher_logits, student_boxes, teacher_boxes)
    if count == 0:
        return student_logits.sum().to(dtype) * 0.0
    student_log = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    teacher_prob = teacher_log.exp()
    # where the teacher gives 0 probability the term is 0 (also when both logits are -inf)
    kl_terms = torch.where(
        teacher_prob > 0, teacher_prob * (teacher_log - student_log), torch.zeros_like(teacher_prob)
    )
    kl = kl_terms.sum(-1) * temperature**2
    s_box, t_box = student_boxes.to(dtype), teacher_boxes.to(dtype)
    box = l1_weight * (s_box - t_box).abs().sum(-1) + giou_weight * (1.0 - paired_giou(s_box, t_box))
    weights = (
        torch.ones(count, dtype=dtype, device=box.device) if box_weights is None else box_weights.to(dtype)
    )
    return (kl + weights * box).mean()


def matching_cost(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    class_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> Tensor:
    """Cost `(Q_s, Q_t)` of pairing student query i with teacher query j, for Hungarian matching in the
    logit KD baseline: class_weight * (-sum_c p^S_ic p^T_jc) + l1_weight |b^S_i - b^T_j|_1 + giou_weight *
    (-GIoU), DETR's matching cost with the teacher's distribution in place of a one-hot label."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s_prob = student_logits.to(dtype).softmax(-1)
    t_prob = teacher_logits.to(dtype).softmax(-1)
    s_box, t_box = student_boxes.to(dtype), teacher_boxes.to(dtype)
    l1 = torch.cdist(s_box, t_box, p=1)
    giou = paired_giou(
        s_box[:, None, :].expand(-1, len(t_box), -1), t_box[None, :, :].expand(len(s_box), -1, -1)
    )
    return -class_weight * (s_prob @ t_prob.T) + l1_weight * l1 - giou_weight * giou

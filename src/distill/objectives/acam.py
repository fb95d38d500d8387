"""S32 ACAM-KD (Lan & Tian, ICCV 2025, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge
Distillation", arXiv 2503.06307): feature distillation under spatial and channel masks that are generated,
at every step, from a cross-attention fusion of the teacher's and the student's feature maps, so that what
is distilled follows the student's learning state.

No official code was found (paper notes say "code: N/A"), and the stored arXiv text
(arxiv.org/html/2503.06307v1) could be read only up to its introduction: the formulas below are the method
section as reported by two paper notes (en.papernotes.org, ICCV 2025 / autonomous driving, both ACAM-KD
pages) and emergentmind's "adaptive masking strategies" page (the channel loss with HW sum_k M^c in the
denominator); the masked distance and the Dice diversity are computed as in MasKD's official code
(github.com/hunto/MasKD, `mmrazor/mmrazor/models/losses/maskd.py`), the method ACAM-KD builds on and
whose formulas match. With F_T (C, H, W) the teacher's map and F_S the student's:

* **STCA-FF** (student-teacher cross-attention feature fusion): Q = W_q F_T, K = W_k F_S, V = W_v F_S
  (1x1 projections; W_q, W_k to C_q = C / 2 channels, W_v to C), A = softmax(Q^T K / sqrt(C_q)) over the
  HW student positions for each of the HW teacher positions, F_fused = V A^T (C, HW). The teacher queries,
  the student gives keys and values (the paper's Table 9: better than the reverse by 0.2 mAP).
* **ASCM** (adaptive spatial-channel masking), M masks of each kind from learnable selection units:
  channel masks M^c = sigmoid(m_c v) with m_c (M, 1) and v (1, C) = F_fused averaged over positions, so
  M^c is (M, C); spatial masks M^s = sigmoid(m_s z) with m_s (M, C) and z = F_fused (C, HW), so M^s is
  (M, HW). Units start at N(0, 0.01^2), as MasKD's mask tokens (every mask starts near 0.5).
* **Masked distances**, D = F_T - f_align(F_S):
  L^c = 1/M sum_m sum_{k,p} (M^c_{m,k} D_{k,p})^2 / (HW sum_k M^c_{m,k}),
  L^s = 1/M sum_m sum_{k,p} (M^s_{m,p} D_{k,p})^2 / (C sum_p M^s_{m,p})
  (MasKD's normalisation: the squared masked error over the mask's mass, averaged over the other axis).
* **Diversity**: the Dice coefficient between every pair of masks of one kind,
  2 <M_i, M_j> / (|M_i|^2 + |M_j|^2), averaged over the M (M - 1) ordered pairs i != j (MasKD's
  `dice_coeff`, eps 1e-12 in each norm); minimised so that the masks cover different things.
* **Total** (this objective's value, before the recipe weight): alpha (L^c + L^s) + lambda L_div with the
  paper's alpha = 1 and lambda = 1 (`channel_weight`, `spatial_weight`, `diversity_weight`); averaged over
  the batch's counted samples. M = 6 is the paper's detection value (19, the class count, on Cityscapes).

Everything is learned jointly, as the paper's single total loss says: the alignment, W_q / W_k / W_v and
the selection units get the gradient of the whole value; the student gets the gradient of the distances.

Choices and deviations (the paper distils FPN levels of equal width and size; ours are CNN stages):

* Alignment: f_align is a 1x1 convolution (with bias) from the student's width to the teacher's, always
  (the paper writes f_align unconditionally; MasKD's configs align 256 -> 256 with a conv too). A student
  map of another spatial size is first average-pooled (larger) or bilinearly interpolated (smaller) to the
  teacher's size; the teacher's map is the target and is never resized.
* K and V read the (resized) student map F_S itself, not f_align(F_S), as the paper writes them: W_k maps
  C_s to C_q and W_v maps C_s to C (the paper has C_s = C). W_q / W_k / W_v have no bias, as written.
  C_q = max(1, C // 2).
* The student's map enters the fusion **detached** by default (`student_grad_through_masks=False`): the
  masks still change with every change of the student (they are recomputed from its current features each
  step), but the student cannot lower the loss by reshaping the masks instead of matching the teacher
  (MasKD likewise computes the student's masks under `no_grad`). The paper does not say; set the option
  to let that gradient through.
* L_div is the sum of the spatial masks' and the channel masks' Dice terms (the paper writes one L_div
  "between masks"); with M = 1 it is 0. Note that the paper's channel units are one scalar per mask
  (m_c is (M, 1)), so the M channel masks are sigmoid(a_m v): they can differ only in scale and sign.
* Losses are computed in float32 (float64 for float64 inputs) whatever the features' dtype; the mask
  denominators carry eps 1e-12 so that saturated all-zero masks give 0, not 0/0.
* No "inheritance" (initialising the student's detection head from the teacher's: detection only).
* Cost: the attention is (HW)^2 per sample: fine at the last CIFAR stage (8x8 = 64 positions), heavy on
  large maps (a 56x56 map is 9.8M attention entries per sample).

Scale and behaviour: with masks near 0.5 at the start, L^c + L^s is about the per-element MSE between the
aligned student and the teacher maps (each mask-normalised term is ~0.5 x MSE) and L_div starts near 2
(1 per kind). In a synthetic probe (8x8 maps, student 8 -> teacher 16 channels, SGD lr 0.05, momentum
0.9) the diversity term drives the masks to saturation within ~200 steps: the spatial masks become
near-binary and disjoint (a partition of the positions, mean 1/M) and the channel masks 0 / 1 by the sign
of their unit; the distance then is the mean of region-wise MSEs, and which positions fall in which mask
still follows the current fused features.

Recipe weight: the paper's alpha = 1 next to a task loss of weight 1; MasKD's detection configs weight
their (same-normalised) masked loss 7, RepDistiller's FitNets (per-element MSE) 100.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError
from distill.objectives.base import StepOutputs, number_in, whole_number
from distill.objectives.features import FeatureObjective, layer_ref, register_feature_objective, sample_mask

EPS = 1e-12
UNIT_STD = 0.01  # MasKD's mask-token initialisation


# ------------------------------------------------------------------------------------------ pure maths


def _channel_masked_distance(diff: Tensor, masks: Tensor) -> Tensor:
    """Per sample: 1/M sum_m sum_{k,p} (M_{m,k} D_{k,p})^2 / (HW sum_k M_{m,k}).
    `diff` (N, C, H, W), `masks` (N, M, C); returns (N,)."""
    positions = diff.shape[-1] * diff.shape[-2]
    energy = diff.square().flatten(2).sum(-1)  # (N, C): sum_p D_{k,p}^2
    numerator = (masks.square() * energy[:, None, :]).sum(-1)  # (N, M)
    return (numerator / (positions * masks.sum(-1) + EPS)).mean(-1)


def _spatial_masked_distance(diff: Tensor, masks: Tensor) -> Tensor:
    """Per sample: 1/M sum_m sum_{k,p} (M_{m,p} D_{k,p})^2 / (C sum_p M_{m,p}).
    `diff` (N, C, H, W), `masks` (N, M, H*W); returns (N,)."""
    channels = diff.shape[1]
    energy = diff.square().sum(1).flatten(1)  # (N, HW): sum_k D_{k,p}^2
    numerator = (masks.square() * energy[:, None, :]).sum(-1)  # (N, M)
    return (numerator / (channels * masks.sum(-1) + EPS)).mean(-1)


def _dice_diversity(masks: Tensor) -> Tensor:
    """Per sample: the mean over ordered pairs i != j of 2 <M_i, M_j> / (|M_i|^2 + |M_j|^2) (MasKD's
    `dice_coeff`, eps in each squared norm). `masks` (N, M, L); returns (N,), zeros when M = 1."""
    n, m, _ = masks.shape
    if m < 2:
        return masks.new_zeros(n)
    inner = masks @ masks.transpose(1, 2)  # (N, M, M)
    norms = inner.diagonal(dim1=1, dim2=2) + EPS  # (N, M)
    dice = 2 * inner / (norms[:, :, None] + norms[:, None, :])
    off = ~torch.eye(m, dtype=torch.bool, device=masks.device)
    return dice[:, off].mean(-1)


def _resized(student: Tensor, size: tuple[int, int]) -> Tensor:
    """The student's map at the teacher's spatial size: average-pooled down, bilinearly interpolated up."""
    if tuple(student.shape[-2:]) == size:
        return student
    if student.shape[-2] >= size[0] and student.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student, size)
    return F.interpolate(student, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------ modules


class CrossAttentionFusion(nn.Module):
    """STCA-FF: queries from the teacher's map, keys and values from the student's; F_fused = V A^T."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.query_channels = max(1, teacher_channels // 2)
        self.query = nn.Conv2d(teacher_channels, self.query_channels, 1, bias=False)
        self.key = nn.Conv2d(student_channels, self.query_channels, 1, bias=False)
        self.value = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """(N, C, HW) fused features, from same-size maps."""
        q = self.query(teacher).flatten(2)  # (N, Cq, HW)
        k = self.key(student).flatten(2)
        v = self.value(student).flatten(2)  # (N, C, HW)
        scores = q.transpose(1, 2) @ k / math.sqrt(self.query_channels)  # (N, HW_teacher, HW_student)
        attention = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return v @ attention.transpose(1, 2)


class ACAMKD(FeatureObjective):
    """ACAM-KD: masked feature distance between the aligned student map and the teacher map, under M
    spatial and M channel masks generated from the student-teacher cross-attention fusion, plus the masks'
    Dice diversity (the module docstring has every formula, constant and deviation). Defaults: the last
    stage (tap -2) on both sides, M = 6, alpha = lambda = 1 (the paper's); recipe weight 1 alone with
    cross-entropy, or with KD."""

    def __init__(
        self,
        *,
        student_layer: Any = -2,
        teacher_layer: Any = -2,
        num_masks: int = 6,
        channel_weight: float = 1.0,
        spatial_weight: float = 1.0,
        diversity_weight: float = 1.0,
        student_grad_through_masks: bool = False,
    ) -> None:
        super().__init__("acam_kd")
        name = self.loss_name
        self.student_refs = [layer_ref(name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]
        self.num_masks = whole_number(name, "num_masks", num_masks, 1, 1024)
        self.channel_weight = number_in(name, "channel_weight", channel_weight, 0.0)
        self.spatial_weight = number_in(name, "spatial_weight", spatial_weight, 0.0)
        self.diversity_weight = number_in(name, "diversity_weight", diversity_weight, 0.0)
        if not isinstance(student_grad_through_masks, bool):
            raise UserError(
                f"objective '{name}': student_grad_through_masks must be true or false, "
                f"got {student_grad_through_masks!r}"
            )
        self.student_grad_through_masks = student_grad_through_masks
        self.align: nn.Module = nn.Identity()
        self.fusion: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        s, t = student_shapes[0], teacher_shapes[0]
        if len(s) != 4 or len(t) != 4:
            raise UserError(
                f"objective 'acam_kd' distils CNN feature maps (N, C, H, W); '{self.student_layers[0]}' "
                f"gives {tuple(s[1:])} and '{self.teacher_layers[0]}' gives {tuple(t[1:])} per sample; "
                "choose convolutional stages"
            )
        cs, ct = int(s[1]), int(t[1])
        self.align = nn.Conv2d(cs, ct, 1)
        self.fusion = CrossAttentionFusion(cs, ct)
        self.channel_units = nn.Parameter(torch.randn(self.num_masks, 1) * UNIT_STD)
        self.spatial_units = nn.Parameter(torch.randn(self.num_masks, ct) * UNIT_STD)
        super().build(student_shapes, teacher_shapes, n_data)

    def parts(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The aligned student map (N, C, H, W), the channel masks (N, M, C) and the spatial masks
        (N, M, H*W), all in the objective's parameter dtype."""
        dtype = self.spatial_units.dtype
        teacher = teacher.to(dtype)
        student = _resized(student.to(dtype), (teacher.shape[-2], teacher.shape[-1]))
        aligned = self.align(student)
        keys = student if self.student_grad_through_masks else student.detach()
        fused = self.fusion(keys, teacher).to(dtype)  # (N, C, HW)
        channel = torch.sigmoid(self.channel_units[None] * fused.mean(-1)[:, None, :])  # (N, M, C)
        spatial = torch.sigmoid(self.spatial_units @ fused)  # (N, M, HW)
        return aligned, channel, spatial

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        aligned, channel, spatial = self.parts(student, teacher)
        dtype = torch.float64 if aligned.dtype == torch.float64 else torch.float32
        diff = teacher.to(dtype) - aligned.to(dtype)
        channel, spatial = channel.to(dtype), spatial.to(dtype)
        per_sample = (
            self.channel_weight * _channel_masked_distance(diff, channel)
            + self.spatial_weight * _spatial_masked_distance(diff, spatial)
            + self.diversity_weight * (_dice_diversity(spatial) + _dice_diversity(channel))
        )
        keep = sample_mask(teacher, outputs.mask)
        if keep is None:
            return per_sample.mean()
        weights = keep.to(device=per_sample.device, dtype=dtype)
        return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


register_feature_objective(
    "acam_kd",
    ACAMKD,
    summary="masked feature distance under adaptive spatial + channel masks from student-teacher "
    "cross-attention, + Dice mask diversity (weight 1)",
    paper="Lan & Tian, 2025, ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge "
    "Distillation (S32)",
)

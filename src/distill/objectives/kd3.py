"""KD^3's alignment terms (seed paper S35: "Distribution Shift Matters for Knowledge Distillation with Webly
Collected Images", Jialiang Tang, Shuo Chen, Gang Niu, Masashi Sugiyama, Chen Gong; ICCV 2023, pp.
17470-17480; arXiv 2307.11469; no official code found). See docs/kd3.md.

KD^3 ("Knowledge Distillation between Different Distributions") has three parts: a teacher-student dynamic
selection of the transfer instances (the source `kd3`, `distill.sources.kd3`), an alignment of "the weighted
features and classifier parameters of the two networks for knowledge memorization" (this objective,
`kd3_align`), and a MixDistribution contrastive block (not implemented; docs/kd3.md, deviations). The paper's
equations could not be read here (only its abstract and summaries); the forms below are this
implementation's reading of the abstract, and the constants are its own choices, named as such:

- the combined prediction of a row: r = (1 - s) softmax(z_T) + s softmax(z_S), the student's share
  s = `student_share` x the fraction of training done (0 at the start, when the student knows nothing;
  0.5 at the end): the teacher's and the student's predictions combined, the student's weight growing as
  it learns ("dynamic"). The source selects by it; here its top probability w = max_c r(c) weighs each row;
- weighted feature alignment: w_i x mean_d (P f_S,i - f_T,i)^2, f the features the classifiers read
  (tap -1), P a learned linear projector (student width -> teacher width);
- classifier alignment (the student's projected features must be read right by the teacher's own
  classifier (W_T, b_T), frozen; the classifiers are aligned in what they compute, the student's features
  brought into the space the teacher's classifier parameters were fitted to):
  w_i x T^2 KL(softmax(z_T,i / T) || softmax((W_T P f_S,i + b_T) / T));
- each term a mean over the counted rows (the source's selection is the step's mask), `feature_weight` x
  the first + `classifier_weight` x the second (both 1.0), T = 1.

Everything is computed in float32 whatever the models' dtype; w is detached (a weight, not a target). With
the classifier term the teacher's logits, when the step holds none (no other term reads them), are its
classifier applied to the teacher features read here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserError
from distill.objectives.base import StepOutputs, number_in, positive_number
from distill.objectives.features import (
    FeatureObjective,
    layer_ref,
    project,
    register_feature_objective,
    sample_mask,
)

PAPER = (
    "Distribution Shift Matters for Knowledge Distillation with Webly Collected Images "
    "(Tang et al., ICCV 2023)"
)
STUDENT_SHARE = 0.5  # the student's share of the combined prediction at the end of training (this code's)

# ----------------------------------------------------------------------------------------- the maths


def student_share(fraction: float, share: float = STUDENT_SHARE) -> float:
    """s = `share` x the fraction of training done (clipped to [0, 1])."""
    return float(share) * min(1.0, max(0.0, float(fraction)))


def combined_prediction(teacher_logits: Tensor, student_logits: Tensor, share: float) -> Tensor:
    """r = (1 - s) softmax(z_T) + s softmax(z_S), (N, C) float32; the student's side detached."""
    teacher = torch.softmax(teacher_logits.float(), dim=-1)
    student = torch.softmax(student_logits.detach().float(), dim=-1)
    return (1.0 - share) * teacher + share * student


def _weighted_mean(values: Tensor, weights: Tensor, mask: Tensor | None) -> Tensor:
    """sum_i m_i w_i v_i / sum_i m_i (0 when no row counts)."""
    if mask is not None:
        weights = weights * mask.to(weights.dtype)
        count = mask.sum()
    else:
        count = torch.tensor(float(len(values)), device=values.device)
    return (weights * values).sum() / count.clamp_min(1)


def weighted_feature_alignment(
    projected: Tensor, teacher_features: Tensor, weights: Tensor, *, mask: Tensor | None = None
) -> Tensor:
    """mean over counted rows of w_i x mean_d (projected_i,d - teacher_i,d)^2 (float32)."""
    diff = projected.float().flatten(1) - teacher_features.float().flatten(1)
    return _weighted_mean(diff.pow(2).mean(1), weights.float(), mask)


def classifier_alignment(
    projected: Tensor,
    teacher_logits: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weights: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """mean over counted rows of w_i x T^2 KL(softmax(z_T / T) || softmax((W P f_S + b) / T)), the teacher's
    classifier (W, b) frozen (float32)."""
    logits = projected.float() @ weight.detach().float().T
    if bias is not None:
        logits = logits + bias.detach().float()
    target = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    kl = (target.exp() * (target - log_student)).sum(-1)
    return _weighted_mean(kl, weights.float(), mask) * temperature**2


# ----------------------------------------------------------------------------------------- the objective


def teacher_classifier(teacher: nn.Module) -> nn.Linear | None:
    """The teacher's classifier: the module its `classifier_name` names (the CIFAR zoo's `fc`), its
    `get_output_embeddings()`, or else its last `nn.Linear`."""
    name = getattr(teacher, "classifier_name", None)
    layer = getattr(teacher, name, None) if isinstance(name, str) else None
    if isinstance(layer, nn.Linear):
        return layer
    getter = getattr(teacher, "get_output_embeddings", None)
    layer = getter() if callable(getter) else None
    if isinstance(layer, nn.Linear):
        return layer
    linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class KD3Align(FeatureObjective):
    """`feature_weight` x weighted feature alignment + `classifier_weight` x classifier alignment between
    the student's layer `student_layer` (projected) and the teacher's `teacher_layer` (default -1 on both
    sides: the vectors the classifiers read), rows weighted by the combined prediction's top probability."""

    def __init__(
        self,
        *,
        student_layer: Any = -1,
        teacher_layer: Any = -1,
        feature_weight: float = 1.0,
        classifier_weight: float = 1.0,
        student_share: float = STUDENT_SHARE,
        temperature: float = 1.0,
    ) -> None:
        super().__init__("kd3_align")
        name = self.loss_name
        self.student_refs = [layer_ref(name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]
        self.feature_weight = number_in(name, "feature_weight", feature_weight, 0.0)
        self.classifier_weight = number_in(name, "classifier_weight", classifier_weight, 0.0)
        self.student_share = number_in(name, "student_share", student_share, 0.0, 1.0)
        self.temperature = positive_number(name, "temperature", temperature)
        if self.feature_weight == 0 and self.classifier_weight == 0:
            raise UserError(f"objective '{name}': feature_weight and classifier_weight are both 0 (no term)")
        # With the classifier term the teacher's logits are its classifier applied to the features read
        # here (when the step holds none); without it they come from the step.
        self.needs_teacher_logits = self.classifier_weight == 0
        self.projector: nn.Module | None = None
        self._classifier: tuple[nn.Linear, ...] = ()  # a tuple: the teacher's layer is no submodule here

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Finds the teacher's classifier (for the classifier term), then lets the layer refs resolve."""
        if self.classifier_weight > 0:
            layer = teacher_classifier(teacher) if teacher is not None else None
            if layer is None:
                what = "a teacher cache holds no model" if teacher is None else "the teacher has no nn.Linear"
                raise UserError(
                    f"objective '{self.loss_name}': the classifier term reads the teacher's classifier, but "
                    f"{what}; set classifier_weight: 0"
                )
            self._classifier = (layer,)
        return None

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        (student,), (teacher,) = student_shapes, teacher_shapes
        if len(student) != 2 or len(teacher) != 2:
            raise UserError(
                f"objective '{self.loss_name}' aligns feature vectors (N, D); the layers give "
                f"{tuple(student[1:])} and {tuple(teacher[1:])} per sample: name the layers the classifiers "
                "read (-1)"
            )
        if self._classifier and self._classifier[0].in_features != teacher[1]:
            raise UserError(
                f"objective '{self.loss_name}': the teacher's classifier reads "
                f"{self._classifier[0].in_features} features but teacher_layer gives {teacher[1]}; name the "
                "layer the classifier reads (-1)"
            )
        self.projector = nn.Linear(student[1], teacher[1])
        self.built = True

    def forward(self, outputs: StepOutputs) -> Tensor:
        if self.projector is None:
            raise UserError(f"objective '{self.loss_name}' was not built (no probe of the feature shapes)")
        (student,), (teacher,) = self.features(outputs)
        teacher_logits = self._teacher_logits(outputs, teacher)
        mask = sample_mask(student, outputs.mask)
        share = student_share(outputs.progress.fraction, self.student_share)
        weights = combined_prediction(teacher_logits, outputs.student_logits, share).amax(-1)
        projected = project(self.projector, student).float()
        loss = projected.new_zeros(())
        if self.feature_weight > 0:
            loss = loss + self.feature_weight * weighted_feature_alignment(
                projected, teacher, weights, mask=mask
            )
        if self.classifier_weight > 0:
            layer = self._classifier[0]
            loss = loss + self.classifier_weight * classifier_alignment(
                projected,
                teacher_logits,
                layer.weight,
                layer.bias,
                weights,
                mask=mask,
                temperature=self.temperature,
            )
        return loss

    def _teacher_logits(self, outputs: StepOutputs, teacher: Tensor) -> Tensor:
        """The step's teacher logits, else the teacher's classifier on the teacher features read here (the
        features it reads: `build` checked the width), in float32."""
        if outputs.teacher_logits is not None:
            return outputs.teacher_logits.float()
        if self._classifier:
            layer = self._classifier[0]
            bias = None if layer.bias is None else layer.bias.detach().float()
            return F.linear(teacher.detach().float(), layer.weight.detach().float(), bias)
        what = "not a top-k cache" if outputs.teacher_topk is not None else "but the step has none"
        raise UserError(f"objective '{self.loss_name}' needs the teacher's full logits, {what}")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, feature_weight={self.feature_weight:g}, "
            f"classifier_weight={self.classifier_weight:g}, student_share={self.student_share:g}"
        )


register_feature_objective(
    "kd3_align",
    KD3Align,
    paper=PAPER,
    summary="KD^3's weighted feature + teacher-classifier alignment, rows weighted by T-S confidence",
)

"""S13 TRG ("Knowledge Distillation via Token-level Relationship Graph", Zhang, Liu & He, 2023): the
token-level relationship graph loss plus the token-wise contextual loss, on any token sequence (ViT patch
tokens, a language model's hidden states) or on a CNN feature map read as tokens (one per position).

The losses are `distill.losses.features.token_relation_graph` and `token_contextual`; this objective owns
what the paper adds around them: a linear projection of the student's tokens to the teacher's width (the
graph's global term compares tokens across models), sampling of a few tokens per sample (the graph grows as
the square of its nodes), and the temperature annealed from coarse to fine over training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError
from distill.losses.features import token_contextual, token_relation_graph
from distill.objectives.base import (
    StepOutputs,
    number_in,
    positive_number,
    whole_number,
)
from distill.objectives.features import (
    FeatureObjective,
    layer_ref,
    project,
    register_feature_objective,
    sample_mask,
)


def as_tokens(feature: Tensor) -> Tensor:
    """(B, T, D) as is; a feature map (N, C, H, W) as (N, H*W, C), one token per position."""
    if feature.dim() == 3:
        return feature
    if feature.dim() == 4:
        return feature.flatten(2).transpose(1, 2)
    raise UserError(
        f"objective 'trg' reads token sequences (B, T, D) or feature maps, got {tuple(feature.shape)}"
    )


def matched_maps(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Feature maps of different sizes pooled to the smaller one, so both give the same tokens."""
    if student.dim() == 4 and teacher.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


class TokenRelationGraph(FeatureObjective):
    """TRG: `graph_weight` x relationship-graph loss (local k-NN structure + global InfoNCE, the paper's beta
    and gamma inside) + `contextual_weight` x token-wise contextual loss. The graph's temperature goes
    linearly from `start_temperature` to `temperature` over training (the paper anneals coarse to fine;
    the linear schedule and every default are ours: no official code was found)."""

    def __init__(
        self,
        *,
        student_layer: Any = -2,
        teacher_layer: Any = -2,
        tokens_per_sample: int = 16,
        k: int = 8,
        sigma: float = 1.0,
        temperature: float = 0.1,
        start_temperature: float = 0.5,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        graph_weight: float = 1.0,
        contextual_weight: float = 1.0,
    ) -> None:
        super().__init__("trg")
        name = self.loss_name
        self.student_refs = [layer_ref(name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]
        self.tokens_per_sample = whole_number(name, "tokens_per_sample", tokens_per_sample, 1, 1 << 16)
        self.k = whole_number(name, "k", k, 1, 1 << 16)
        self.sigma = positive_number(name, "sigma", sigma)
        self.temperature = positive_number(name, "temperature", temperature)
        self.start_temperature = positive_number(name, "start_temperature", start_temperature)
        self.local_weight = number_in(name, "local_weight", local_weight, 0.0)
        self.global_weight = number_in(name, "global_weight", global_weight, 0.0)
        self.graph_weight = number_in(name, "graph_weight", graph_weight, 0.0)
        self.contextual_weight = number_in(name, "contextual_weight", contextual_weight, 0.0)
        self.projector: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        width = {4: 1, 3: -1}
        s, t = student_shapes[0], teacher_shapes[0]
        if len(s) not in width or len(t) not in width:
            raise UserError(
                f"objective 'trg' reads token sequences or feature maps; '{self.student_layers[0]}' gives "
                f"{tuple(s[1:])} per sample"
            )
        self.projector = nn.Linear(s[width[len(s)]], t[width[len(t)]])
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        mask = sample_mask(teacher, outputs.mask) if teacher.dim() == 3 else None
        student, teacher = matched_maps(student, teacher)
        s, t = as_tokens(student), as_tokens(teacher)
        if s.shape[1] != t.shape[1]:
            raise UserError(
                f"objective 'trg': the student gives {s.shape[1]} tokens per sample, the teacher {t.shape[1]}"
            )
        if s.shape[1] > self.tokens_per_sample:  # the same random positions in both models
            keep = torch.rand(s.shape[:2], device=s.device).argsort(1)[:, : self.tokens_per_sample]
            s, t = (x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])) for x in (s, t))
            mask = None if mask is None else mask.gather(1, keep)
        fraction = outputs.progress.fraction
        temperature = self.start_temperature + (self.temperature - self.start_temperature) * fraction
        graph = token_relation_graph(
            project(self.projector, s),
            t,
            mask=mask,
            temperature=temperature,
            k=self.k,
            sigma=self.sigma,
            local_weight=self.local_weight,
            global_weight=self.global_weight,
        )
        context = token_contextual(s, t, mask=mask)
        return self.graph_weight * graph + self.contextual_weight * context


register_feature_objective(
    "trg",
    TokenRelationGraph,
    summary="token relationship graph (k-NN + InfoNCE over tokens) + token-wise contextual loss",
    paper="Zhang, Liu & He, 2023, Knowledge Distillation via Token-level Relationship Graph (S13)",
)

"""The classic feature and relation objectives of the CIFAR-100 tables (RepDistiller, torchdistill):
FitNets, AT, SP, PKT, RKD, FSP and CRD, each a thin owner of layers and projectors around a pure loss of
`distill.losses.features`.

Default layers follow RepDistiller's choices, written as feature-tap indices so that they fit any model with
taps `[stem, stage 1, ..., stage k, pooled]`: FitNets' hint at tap -3 (RepDistiller's `hint_layer=2` on
three-stage CIFAR nets), AT and FSP on every stage, SP on the last stage (-2), PKT, RKD and CRD on the pooled
vector (-1). The recipe weights RepDistiller used on CIFAR-100 are in each summary (`-b`): the loss
functions carry no weight of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.losses.features import attention_transfer, fsp, hint_mse
from distill.losses.relations import (
    crd_memory_update,
    crd_nce,
    crd_normalizers,
    pkt,
    rkd,
    similarity_preserving,
)
from distill.objectives.base import (
    ParamError,
    StepOutputs,
    number_in,
    positive_number,
    shown,
    whole_number,
)
from distill.objectives.features import (
    STAGES,
    Embed,
    FeatureObjective,
    flat_size,
    layer_ref,
    layer_refs,
    project,
    register_feature_objective,
    regressor,
    sample_mask,
)


def _pair(objective: FeatureObjective, student_layer: Any, teacher_layer: Any) -> None:
    name = objective.loss_name
    objective.student_refs = [layer_ref(name, "student_layer", student_layer)]
    objective.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]


def choice(objective: str, key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ParamError(objective, key, f"must be one of {', '.join(valid)}, got {shown(value)}")
    return value


def _pooled(feature: Tensor) -> Tensor:
    """A per-sample vector: feature maps and token sequences flattened (RepDistiller flattens as well)."""
    return feature if feature.dim() == 2 else feature.flatten(1)


class FitNet(FeatureObjective):
    """FitNets' hint (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets"): the MSE between a learned
    regression of the student's hint layer and the teacher's guided layer, trained with the task loss
    throughout (RepDistiller's single-stage variant, weight 100)."""

    def __init__(self, *, student_layer: Any = -3, teacher_layer: Any = -3) -> None:
        super().__init__("fitnet")
        _pair(self, student_layer, teacher_layer)
        self.regressor: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        self.regressor = regressor(self.loss_name, student_shapes[0], teacher_shapes[0])
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        return hint_mse(project(self.regressor, student), teacher, mask=sample_mask(teacher, outputs.mask))


class AttentionTransfer(FeatureObjective):
    """Attention transfer (Zagoruyko & Komodakis, 2017, "Paying More Attention to Attention"): the sum over
    layer pairs of the distance between normalised spatial attention maps sum_c |A_c|^p."""

    def __init__(self, *, student_layers: Any = STAGES, teacher_layers: Any = STAGES, p: float = 2.0) -> None:
        super().__init__("attention_transfer")
        self.student_refs = layer_refs(self.loss_name, "student_layers", student_layers)
        self.teacher_refs = layer_refs(self.loss_name, "teacher_layers", teacher_layers)
        self.p = positive_number(self.loss_name, "p", p)

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, teachers = self.features(outputs)
        return sum(
            (attention_transfer(s, t, p=self.p) for s, t in zip(students, teachers, strict=True)),
            start=torch.zeros((), device=students[0].device),
        )


class SimilarityPreserving(FeatureObjective):
    """Similarity-preserving KD (Tung & Mori, 2019): the batch's sample-similarity matrices of student and
    teacher, row-normalised, compared in squared Frobenius norm / N^2 (a batch relation)."""

    def __init__(self, *, student_layer: Any = -2, teacher_layer: Any = -2) -> None:
        super().__init__("similarity_preserving")
        _pair(self, student_layer, teacher_layer)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        return similarity_preserving(student, teacher, mask=sample_mask(teacher, outputs.mask))


class PKT(FeatureObjective):
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018): KL between the teacher's and the student's
    cosine-kernel conditional distributions over the batch."""

    def __init__(self, *, student_layer: Any = -1, teacher_layer: Any = -1) -> None:
        super().__init__("pkt")
        _pair(self, student_layer, teacher_layer)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        return pkt(_pooled(student), _pooled(teacher))


class RKD(FeatureObjective):
    """Relational KD (Park et al., 2019): distance-wise and angle-wise relations of the batch's embeddings,
    Huber distance. Weights 25 (distance) and 50 (angle) are RepDistiller's CIFAR defaults; the paper's
    metric-learning experiments use 1 and 2."""

    def __init__(
        self,
        *,
        student_layer: Any = -1,
        teacher_layer: Any = -1,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__("rkd")
        _pair(self, student_layer, teacher_layer)
        self.distance_weight = number_in(self.loss_name, "distance_weight", distance_weight, 0.0)
        self.angle_weight = number_in(self.loss_name, "angle_weight", angle_weight, 0.0)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        return rkd(
            _pooled(student),
            _pooled(teacher),
            distance_weight=self.distance_weight,
            angle_weight=self.angle_weight,
        )


class FSP(FeatureObjective):
    """Flow of solution procedure (Yim et al., 2017, "A Gift from Knowledge Distillation"): the Gram
    matrices between consecutive layers' feature maps (the "flow"), matched in squared distance. Consecutive
    pairs of the named layers; their channel counts must agree between student and teacher. `distance`:
    "squared" (the paper's squared Frobenius norm), "mean_squared" (RepDistiller's, for which its weight 50
    was tuned) or "column_norm" (torchdistill's); `pool` ("max" or "avg", RepDistiller's) brings the larger
    map of a pair to the smaller's size."""

    def __init__(
        self,
        *,
        student_layers: Any = STAGES,
        teacher_layers: Any = STAGES,
        distance: str = "squared",
        pool: str = "max",
    ) -> None:
        super().__init__("fsp")
        self.student_refs = layer_refs(self.loss_name, "student_layers", student_layers)
        self.teacher_refs = layer_refs(self.loss_name, "teacher_layers", teacher_layers)
        self.distance = choice(
            self.loss_name, "distance", distance, ("squared", "mean_squared", "column_norm")
        )
        self.pool = choice(self.loss_name, "pool", pool, ("max", "avg"))

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        if len(student_shapes) < 2:
            raise UserError("objective 'fsp' needs at least two layers on each side (a flow between them)")
        for s, t, path in zip(student_shapes, teacher_shapes, self.student_layers, strict=True):
            if len(s) != 4 or len(t) != 4 or s[1] != t[1]:
                raise UserError(
                    f"objective 'fsp': student layer '{path}' gives {tuple(s[1:])} but its teacher layer "
                    f"gives {tuple(t[1:])}; FSP needs feature maps with equal channel counts"
                )
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, teachers = self.features(outputs)
        total = torch.zeros((), device=students[0].device)
        for i in range(len(students) - 1):
            pair = (students[i], students[i + 1], teachers[i], teachers[i + 1])
            total = total + fsp(*pair, distance=self.distance, pool=self.pool)
        return total


class CRD(FeatureObjective):
    """Contrastive representation distillation (Tian et al., 2020): student and teacher embeddings (learned
    linear heads to `feat_dim`, L2-normalised) contrasted against `negatives` samples drawn from two memory
    banks of every training sample's embedding (momentum updates), with the NCE loss of the paper. The
    normalising constants Z are estimated on the first batch, as the official code does, and kept in the
    checkpoint. RepDistiller's weight: 0.8 (with cross-entropy 1, alone or with KD 1)."""

    needs_index = True

    def __init__(
        self,
        *,
        student_layer: Any = -1,
        teacher_layer: Any = -1,
        feat_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__("crd")
        _pair(self, student_layer, teacher_layer)
        self.feat_dim = whole_number(self.loss_name, "feat_dim", feat_dim, 1, 1 << 16)
        self.negatives = whole_number(self.loss_name, "negatives", negatives, 1, 1 << 24)
        self.temperature = positive_number(self.loss_name, "temperature", temperature)
        self.momentum = number_in(self.loss_name, "momentum", momentum, 0.0, 1.0, high_open=True)
        self.embed_student: nn.Module = nn.Identity()
        self.embed_teacher: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        if n_data < 2:
            raise UserError("objective 'crd' needs at least two training samples (negatives)")
        self.embed_student = Embed(flat_size(student_shapes[0]), self.feat_dim)
        self.embed_teacher = Embed(flat_size(teacher_shapes[0]), self.feat_dim)
        # Uniform in [-s, s], s = 1 / sqrt(dim / 3): rows of unit expected norm (the official initialisation).
        bound = 1.0 / (self.feat_dim / 3) ** 0.5
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(n_data, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student and teacher sides; -1: unset
        self.n_data = n_data
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.index is None:
            raise UserError(
                "objective 'crd' needs each sample's id (the trainer adds them; a custom loader must)"
            )
        (student,), (teacher,) = self.features(outputs)
        index = outputs.index.to(student.device)
        student_embed = project(self.embed_student, student)
        teacher_embed = project(self.embed_teacher, teacher)
        k = min(self.negatives, self.n_data - 1)
        # Negatives: uniform over the other samples (shifting draws past the positive keeps them uniform).
        draws = torch.randint(0, self.n_data - 1, (len(index), k), device=index.device)
        negatives = draws + (draws >= index[:, None]).long()
        banks = {
            "student_negatives": self.memory_student[negatives],
            "teacher_negatives": self.memory_teacher[negatives],
            "student_positive": self.memory_student[index],
            "teacher_positive": self.memory_teacher[index],
        }
        if float(self.z[0]) < 0:  # the first batch estimates the normalising constants (official code)
            z = crd_normalizers(
                student_embed.detach(), teacher_embed.detach(), **banks, n_data=self.n_data,
                temperature=self.temperature,
            )  # fmt: skip
            self.z.copy_(torch.stack([torch.as_tensor(v, dtype=self.z.dtype) for v in z]))
        loss = crd_nce(
            student_embed,
            teacher_embed,
            **banks,
            n_data=self.n_data,
            student_normalizer=self.z[0],
            teacher_normalizer=self.z[1],
            temperature=self.temperature,
        )
        with torch.no_grad():
            self._update_memory(index, student_embed.detach(), teacher_embed.detach())
        return loss

    def _update_memory(self, index: Tensor, student: Tensor, teacher: Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process keeps the same banks: each writes every process's rows.
            index, student, teacher = (_gather(t) for t in (index, student, teacher))
        self.memory_student.index_copy_(
            0, index, crd_memory_update(self.memory_student, index, student, self.momentum)
        )
        self.memory_teacher.index_copy_(
            0, index, crd_memory_update(self.memory_teacher, index, teacher, self.momentum)
        )


def _gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


register_feature_objective(
    "fitnet",
    FitNet,
    paper="Romero et al., 2015, FitNets: Hints for Thin Deep Nets",
    summary="MSE between a learned regression of a student layer and a teacher layer (weight 100)",
)
register_feature_objective(
    "attention_transfer",
    AttentionTransfer,
    paper="Zagoruyko & Komodakis, 2017, Paying More Attention to Attention",
    summary="distance between normalised spatial attention maps of every stage (weight 1000)",
)
register_feature_objective(
    "similarity_preserving",
    SimilarityPreserving,
    paper="Tung & Mori, 2019, Similarity-Preserving Knowledge Distillation",
    summary="batch similarity matrices of the last stage matched (weight 3000)",
)
register_feature_objective(
    "pkt",
    PKT,
    paper="Passalis & Tefas, 2018, Learning Deep Representations with Probabilistic Knowledge Transfer",
    summary="KL between cosine-kernel conditional distributions of the embeddings (weight 30000)",
)
register_feature_objective(
    "rkd",
    RKD,
    paper="Park et al., 2019, Relational Knowledge Distillation",
    summary="distance- and angle-wise relations of the batch's embeddings (weight 1)",
)
register_feature_objective(
    "fsp",
    FSP,
    paper="Yim et al., 2017, A Gift from Knowledge Distillation",
    summary="Gram matrices between consecutive stages (flow of solution procedure) matched (weight 50)",
)
register_feature_objective(
    "crd",
    CRD,
    paper="Tian et al., 2020, Contrastive Representation Distillation",
    summary="contrastive embeddings against memory-bank negatives, NCE (weight 0.8)",
)

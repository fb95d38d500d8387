"""Feature objectives: terms that compare what student and teacher modules output, not their logits.

A feature objective names its layers in the recipe, by module path (`layer2.0.conv1`) or by index into the
model's feature taps (`[stem, stage 1, ..., stage k, pooled]`, see `distill.models.cifar.feature_layers_of`;
-2 is the last stage, -1 the pooled vector). Its life has three steps, all driven by the trainer:

1. built from the recipe's parameters (types and ranges checked, no model needed);
2. `bind_layers`: the layer specs resolved against the student and teacher (`distill.train.feature_taps`),
   so that the hooks know which modules to read;
3. `build`: one dry forward pass probes the shapes of those outputs, and the objective makes the projectors /
   regressors it needs. They are submodules of the objective: the optimizer trains them and checkpoints keep
   them, like every other objective state.

Then `forward` reads `StepOutputs.student_features` / `teacher_features` by path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.objectives.base import OBJECTIVES, Objective, ParamError, StepOutputs, check_params, shown

LayerRef = int | str
# The taps between the stem and the pooled vector (AT's and FSP's default: every stage).
STAGES = "stages"


def layer_ref(objective: str, key: str, value: Any) -> LayerRef:
    """One layer reference of a recipe: a module path or an index into the model's feature taps."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ParamError(objective, key, f"must be a module path or a feature-tap index, got {shown(value)}")
    return value


def layer_refs(objective: str, key: str, value: Any) -> list[LayerRef] | str:
    """A list of layer references, or "stages"."""
    if value == STAGES:
        return STAGES
    if not isinstance(value, list | tuple) or not value:
        raise ParamError(
            objective,
            key,
            f"must be '{STAGES}' or a non-empty list of module paths / indices, got {shown(value)}",
        )
    return [layer_ref(objective, f"{key}[{i}]", v) for i, v in enumerate(value)]


class FeatureObjective(Objective):
    """Base class. Subclasses set `student_refs` / `teacher_refs` in `__init__`, may override `build`, and
    implement `forward` with `self.features(outputs)`."""

    needs_teacher = True
    needs_teacher_logits = False
    # Needs each sample's position in the training set (`StepOutputs.index`): CRD's memory banks.
    needs_index = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.loss_name = name
        self.student_refs: list[LayerRef] | str = []
        self.teacher_refs: list[LayerRef] | str = []
        self.built = False

    def bind_layers(self, student_layers: Sequence[str], teacher_layers: Sequence[str]) -> None:
        """The module paths the refs resolved to (as many on each side)."""
        if len(student_layers) != len(teacher_layers):
            raise UserError(
                f"objective '{self.loss_name}': {len(student_layers)} student layer(s) but "
                f"{len(teacher_layers)} teacher layer(s); name as many on each side"
            )
        self.student_layers = tuple(student_layers)
        self.teacher_layers = tuple(teacher_layers)

    def resolve_paths(
        self, student: nn.Module, teacher: nn.Module | None
    ) -> tuple[list[str], list[str]] | None:
        """Module paths to read, for an objective that derives them from the models themselves (e.g. an
        encoder's attention projections); None (the default) resolves `student_refs` / `teacher_refs`.
        `teacher` is None for a cached teacher."""
        return None

    def wants_teacher_pass(self) -> bool:
        """Whether the objective fits statistics of the teacher over the whole training set before training
        (LELP's per-class PCA); the trainer then calls `observe_teacher` on every batch and
        `finish_teacher_pass` once (`distill.train.feature_taps.teacher_pass`)."""
        return False

    def observe_teacher(
        self, features: dict[str, Tensor], logits: Tensor | None, labels: Tensor | None
    ) -> None:
        """One batch of the pre-training pass: the teacher's features (by path), logits and the labels."""

    def finish_teacher_pass(self) -> None:
        """After the pass: fit what was gathered."""

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        """Make the projectors the probed shapes call for (none by default)."""
        self.built = True

    def features(self, outputs: StepOutputs) -> tuple[list[Tensor], list[Tensor]]:
        """The student's and the teacher's features, in layer order."""
        missing = [p for p in self.teacher_layers if p not in outputs.teacher_features]
        if missing:
            raise UserError(
                f"objective '{self.loss_name}' needs the teacher's '{missing[0]}' output; the step has none"
            )
        student = [outputs.student_features[p] for p in self.student_layers]
        teacher = [outputs.teacher_features[p] for p in self.teacher_layers]
        return student, teacher

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for s, t in zip(self.student_layers, self.teacher_layers, strict=True))
        return f"{self.loss_name}({pairs or 'unbound'})"


def register_feature_objective(name: str, cls: type[FeatureObjective], *, paper: str, summary: str) -> None:
    """Register a feature objective class (kind "feature": the bench runs it as a feature row, the numerics
    sweep builds it on real models' taps); unknown parameters are refused naming the nearest one."""

    def factory(**params: Any) -> FeatureObjective:
        check_params(name, cls.__init__, params, reserved=set())
        return cls(**params)

    OBJECTIVES.add(name, factory, summary=summary, paper=paper, kind="feature")


def is_feature_objective(name: str) -> bool:
    """Whether the registered objective `name` reads module outputs (registered by
    `register_feature_objective`)."""
    return OBJECTIVES.entry(name).extra.get("kind") == "feature"


def sample_mask(feature: Tensor, mask: Tensor | None) -> Tensor | None:
    """The step's mask where it fits a feature's leading shape ((N,) over samples, (B, T) over a token
    sequence's positions), else None: a pooled feature of a token batch has no positions to mask."""
    if mask is None or feature.shape[: mask.dim()] != mask.shape:
        return None
    return mask


# ------------------------------------------------------------------------------------------ projectors


class ConvRegressor(nn.Module):
    """FitNets' regressor from a student feature map to the teacher's shape (RepDistiller's `ConvReg`):
    a stride-2 3x3 convolution when the student map is twice as large, a stride-2 4x4 transposed convolution
    when it is half as large, otherwise a valid convolution of kernel (1 + Hs - Ht, 1 + Ws - Wt); then
    batch norm and ReLU."""

    def __init__(self, student: torch.Size, teacher: torch.Size) -> None:
        super().__init__()
        (_, cs, hs, ws), (_, ct, ht, wt) = student, teacher
        if hs == 2 * ht and ws == 2 * wt:
            self.conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise UserError(
                f"FitNets regressor: a {hs}x{ws} student map cannot be regressed onto a {ht}x{wt} teacher "
                "map (it must be at least as large, or exactly half as large); choose another layer pair"
            )
        self.bn = nn.BatchNorm2d(ct)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def regressor(objective: str, student: torch.Size, teacher: torch.Size) -> nn.Module:
    """A learned map from a student feature's shape to the teacher's: `ConvRegressor` for feature maps
    (N, C, H, W), a linear layer over the last dimension for vectors (N, D) and token sequences (B, T, D)."""
    if len(student) == 4 and len(teacher) == 4:
        return ConvRegressor(student, teacher)
    if len(student) == len(teacher) and len(student) in (2, 3) and student[:-1] == teacher[:-1]:
        return nn.Linear(student[-1], teacher[-1])
    raise UserError(
        f"objective '{objective}': cannot map a student feature of shape {tuple(student[1:])} onto a "
        f"teacher feature of shape {tuple(teacher[1:])} (per sample); choose layers of matching kind"
    )


class Embed(nn.Module):
    """A linear projection to `dim` followed by L2 normalisation (CRD's embedding head); feature maps are
    flattened first."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.linear(x.flatten(1)).float(), dim=1)


def project(module: nn.Module, feature: Tensor) -> Tensor:
    """`module(feature)` with the feature cast to the projector's own dtype: a bf16 / fp16 model's features
    meet a float32 projector (autocast, where active, still picks the compute dtype)."""
    weight = next(module.parameters(), None)
    return module(feature if weight is None else feature.to(weight.dtype))


def flat_size(shape: torch.Size) -> int:
    """Elements per sample."""
    size = 1
    for d in shape[1:]:
        size *= int(d)
    return size

"""S06 DHO: a `dual_head` student's CE head learns the labels, its KD head the teacher.

"Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head
Optimization" (Kang et al., 2025; arXiv 2505.07675; code github.com/erjui/DHO). The loss and its constants
are `distill.losses.dho` (lambda = 0.5, T = 2); the student is `distill.models.dual_head` (its `forward`
is the inference mixture, alpha = 0.5, beta = 1). The objective reads the two heads' raw logits through the
feature hooks (module paths `ce_head`, `kd_head`) and the teacher's logits; it refuses, in one line and before
anything trains, a student that is not a `dual_head` model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.errors import UserError
from distill.losses.dho import dho_loss
from distill.models.dual_head import CE_HEAD, KD_HEAD, NAME, PAPER, DualHead
from distill.objectives.base import StepOutputs, number_in, positive_number
from distill.objectives.features import FeatureObjective, register_feature_objective


class DHO(FeatureObjective):
    """`ce_weight` x CE(CE head, labelled rows) + (1 - `ce_weight`) x T^2 KL(teacher || KD head) on every
    row (`distill.losses.dho.dho_loss`; the paper's lambda is `ce_weight`)."""

    needs_labels = True
    needs_teacher_logits = True

    def __init__(self, *, ce_weight: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__("dho")
        self.ce_weight = number_in(self.loss_name, "ce_weight", ce_weight, 0.0, 1.0)
        self.temperature = positive_number(self.loss_name, "temperature", temperature)

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        if not isinstance(student, DualHead):
            raise UserError(
                f"objective '{self.loss_name}' needs a {NAME} student (a CE head and a KD head), not "
                f"{type(student).__name__}: write student: {{name: {NAME}, params: {{base: <model>}}}}"
            )
        return [CE_HEAD, KD_HEAD], []

    def bind_layers(self, student_layers: Sequence[str], teacher_layers: Sequence[str]) -> None:
        """The two heads of the student; no teacher layer (the teacher's logits are enough)."""
        self.student_layers = tuple(student_layers)
        self.teacher_layers = tuple(teacher_layers)

    def forward(self, outputs: StepOutputs) -> Tensor:
        name = self.loss_name
        heads = [outputs.student_features.get(path) for path in (CE_HEAD, KD_HEAD)]
        if heads[0] is None or heads[1] is None:
            raise UserError(
                f"objective '{name}' reads the student's '{CE_HEAD}' and '{KD_HEAD}' outputs, but the step "
                f"has none: the student must be a {NAME} model"
            )
        if outputs.teacher_logits is None:
            what = "not a top-k cache" if outputs.teacher_topk is not None else "but the step has none"
            raise UserError(f"objective '{name}' needs the teacher's full logits, {what}")
        labels = outputs.labels
        if labels is None:
            raise UserError(f"objective '{name}' needs labels, but the data has none")
        if labels.is_floating_point():
            raise UserError(f"objective '{name}' needs class indices, not soft (mixed) labels")
        return dho_loss(
            heads[0],
            heads[1],
            outputs.teacher_logits,
            labels,
            mask=outputs.mask,
            ce_weight=self.ce_weight,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        return f"{self.loss_name}(ce_weight={self.ce_weight:g}, temperature={self.temperature:g})"


register_feature_objective(
    "dho",
    DHO,
    paper=PAPER,
    summary="S06 DHO: CE on a dual_head student's CE head (labelled rows), T^2 KL on its KD head (every row)",
)

"""Supervised terms on ground-truth labels (no teacher)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import UserError
from distill.losses.linear_cross_entropy import linear_cross_entropy
from distill.objectives.base import OBJECTIVES, Objective, StepOutputs, number_in, shown, whole_number


class CrossEntropy(Objective):
    """Cross-entropy with the labels, mean over counted rows; `label_smoothing` as in
    "Rethinking the Inception Architecture for Computer Vision" (Szegedy et al., 2016).

    Rows count when `mask` is True (if given) and their label is not `ignore_index` (-100).

    Labels may also be class distributions: float labels shaped like the logits ((N, C); a mixup / cutmix
    source's mixed labels) give the soft-target cross-entropy -sum_c q_c log p_c, q = (1 - eps) y + eps / C
    with eps the `label_smoothing` (what smoothing does to a one-hot label), mean over the rows `mask` counts.
    On one-hot labels it equals the loss on their class indices."""

    needs_teacher = False
    needs_labels = True
    fused_capable = True

    def __init__(self, *, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        label_smoothing = number_in("cross_entropy", "label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(
                f"objective 'cross_entropy': label_smoothing must lie in [0, 1), got {shown(label_smoothing)}"
            )
        ignore_index = whole_number("cross_entropy", "ignore_index", ignore_index, -(2**63), 2**63 - 1)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.labels is None:
            raise UserError("objective 'cross_entropy' needs labels, but the data has none")
        if outputs.labels.is_floating_point():
            return self._soft(outputs)
        if outputs.student_head is not None:
            head = outputs.student_head
            return linear_cross_entropy(
                head.hidden,
                head.weight,
                outputs.labels,
                bias=head.bias,
                mask=outputs.mask,
                label_smoothing=self.label_smoothing,
                ignore_index=self.ignore_index,
            )
        logits = outputs.student_logits.float().flatten(0, -2)
        labels = outputs.labels.flatten()
        if outputs.mask is not None:
            labels = torch.where(outputs.mask.flatten(), labels, torch.full_like(labels, self.ignore_index))
        counted = (labels != self.ignore_index).sum()
        total = F.cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        return total / counted.clamp(min=1)

    def _soft(self, outputs: StepOutputs) -> Tensor:
        """Soft-target cross-entropy on (N, C) class distributions (see the class docstring)."""
        labels, logits = outputs.labels, outputs.student_logits
        assert labels is not None
        if outputs.student_head is not None:
            raise UserError(
                "objective 'cross_entropy': soft labels need the dense logits, not the fused path"
            )
        if labels.shape != logits.shape:
            raise UserError(
                f"objective 'cross_entropy': float labels must be class distributions shaped like the logits "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        classes = logits.shape[-1]
        targets = labels.float().flatten(0, -2)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        rows = -(targets * F.log_softmax(logits.float().flatten(0, -2), dim=-1)).sum(-1)
        if outputs.mask is None:
            return rows.sum() / max(1, rows.numel())
        counted = outputs.mask.flatten().to(rows.device).bool()
        return rows[counted].sum() / counted.sum().clamp(min=1)


OBJECTIVES.add(
    "cross_entropy",
    CrossEntropy,
    summary="cross-entropy with the ground-truth labels (optional label smoothing)",
    paper="-",
)

"""KD^3's teacher-student dynamic instance selection as a classification source `kd3` (seed paper S35:
"Distribution Shift Matters for Knowledge Distillation with Webly Collected Images", Tang et al., ICCV
2023, arXiv 2307.11469). See docs/kd3.md.

The student learns from a transfer set whose distribution differs from the teacher's training data (the
paper's webly collected images; `distill.data.shift` here). KD^3 "dynamically select[s] useful training
instances from the webly collected data according to the combined predictions of teacher network and student
network" (the abstract; the paper's equations could not be read here, the rule below is this
implementation's reading of it, and its constants are this code's choices). On every training micro-batch,
with z_T, z_S the teacher's and the student's logits (the student in eval mode, without gradients):

- the combined prediction r = (1 - s) softmax(z_T) + s softmax(z_S), the student's share s growing with
  training, s = `student_share` x the fraction of training done (0.5 at the end): early on the teacher
  alone decides, later the student's own view of the row counts as well (`distill.objectives.kd3`
  computes r; its alignment terms weigh rows by the same max_c r(c));
- row i is kept when max_c r_i(c) >= tau (`threshold`, 0.5: the top class holds at least half of the
  combined mass; docs/kd3.md says how it was chosen): rows where the teacher is unsure (an image
  of no class, a style it never saw), or where teacher and student disagree (the mixture then spreads its
  mass), leave the batch's mask, so no term reads them;
- a kept row is labelled with argmax_c r_i(c) (`pseudo_labels`), for a label term (cross_entropy) that
  would learn it; the transfer set's own labels are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of
from distill.objectives.kd3 import STUDENT_SHARE, combined_prediction, student_share
from distill.sources.settings import require

THRESHOLD = 0.5  # tau: the combined prediction's top probability a kept row reaches (this code's choice)


@dataclass(frozen=True)
class KD3Settings:
    """`source: {name: kd3, params: ...}`."""

    threshold: float = THRESHOLD  # tau
    student_share: float = STUDENT_SHARE  # the student's share of r at the end of training
    pseudo_labels: bool = True  # a kept row is labelled with argmax r

    def check(self) -> None:
        for key in ("threshold", "student_share"):
            value = getattr(self, key)
            require(
                isinstance(value, int | float) and not isinstance(value, bool),
                f"{key} must be a number, got {value!r}",
            )
            require(0.0 <= value <= 1.0, f"{key} must lie in [0, 1], got {value}")
        require(
            isinstance(self.pseudo_labels, bool),
            f"pseudo_labels must be true or false, not {self.pseudo_labels!r}",
        )


@dataclass(frozen=True)
class KD3Selection:
    keep: Tensor  # (N,) bool
    labels: Tensor  # (N,) argmax of the combined prediction
    confidence: Tensor  # (N,) its top probability


def kd3_select(
    teacher_logits: Tensor, student_logits: Tensor, share: float, threshold: float
) -> KD3Selection:
    """KD^3's rule on (N, C) logits: keep the rows whose combined prediction's top probability reaches
    `threshold` (float32 throughout)."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
        raise UserError(
            "source 'kd3' combines (N, C) teacher and student logits, got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    confidence, labels = combined_prediction(teacher_logits, student_logits, share).max(dim=-1)
    return KD3Selection(confidence >= threshold, labels, confidence)


def _logits(model: nn.Module, inputs: Any) -> Tensor:
    """A model's float32 logits in eval mode without gradients (no dropout, no batch-norm update)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return logits_of(call_model(model, inputs)).float()
    finally:
        model.train(was_training)


class KD3Batches:
    """The batch transform `(batch, student, progress) -> batch` for dict batches with `inputs`, `labels`,
    `index` (an `IndexedDataset`) and perhaps `mask`: the rows KD^3 drops leave the mask; kept rows get the
    pseudo-label. `outlier` ((N,) bool by sample id, when the transfer set knows its outliers) lets `report`
    say how the selection treated them."""

    def __init__(self, settings: KD3Settings, teacher: nn.Module, size: int, outlier: Tensor | None = None):
        self.settings = settings
        self.teacher = teacher
        self.outlier = None if outlier is None else outlier.bool().cpu()
        self.used = torch.zeros(size, dtype=torch.bool)  # rows ever kept, by sample id
        self.met = torch.zeros(2, dtype=torch.long)  # rows met: real, outlier
        self.kept = torch.zeros(2, dtype=torch.long)

    def __call__(self, batch: Any, student: nn.Module, progress: Any) -> Any:
        if not isinstance(batch, dict) or "index" not in batch or "inputs" not in batch:
            raise UserError("source 'kd3' reads (inputs, labels) batches with sample ids (an IndexedDataset)")
        inputs, labels, index, mask = batch["inputs"], batch.get("labels"), batch["index"], batch.get("mask")
        if labels is not None and (labels.is_floating_point() or labels.dim() != 1):
            raise UserError("source 'kd3' needs one class index per row, not soft or per-token labels")
        share = student_share(progress.fraction, self.settings.student_share)
        selection = kd3_select(
            _logits(self.teacher, inputs), _logits(student, inputs), share, self.settings.threshold
        )
        before = torch.ones_like(selection.keep) if mask is None else mask.bool()
        counted = before & selection.keep
        if self.settings.pseudo_labels:
            old = labels if labels is not None else torch.full_like(selection.labels, -100)
            labels = torch.where(counted, selection.labels.to(old.dtype), old)
        self._count(index.cpu(), before.cpu(), counted.cpu())
        return dict(batch) | {"labels": labels, "mask": counted}

    def _count(self, index: Tensor, before: Tensor, counted: Tensor) -> None:
        self.used[index[counted]] = True
        kind = self.outlier[index].long() if self.outlier is not None else torch.zeros_like(index)
        self.met += torch.bincount(kind[before], minlength=2)
        self.kept += torch.bincount(kind[counted], minlength=2)

    def report(self) -> dict[str, float]:
        """`kd3_kept_rate` (rows kept / rows met, over every batch), `kd3_used` (the share of the transfer set
        ever kept) and, when the transfer set marks its outliers, the kept rate of its real rows and of its
        outliers."""
        out = {
            "kd3_kept_rate": float(self.kept.sum()) / max(1, int(self.met.sum())),
            "kd3_used": float(self.used.float().mean()) if len(self.used) else 0.0,
        }
        if self.outlier is not None:
            out["kd3_real_kept_rate"] = float(self.kept[0]) / max(1, int(self.met[0]))
            out["kd3_outlier_kept_rate"] = float(self.kept[1]) / max(1, int(self.met[1]))
        return out

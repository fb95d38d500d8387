"""One micro-batch's forward passes: the student's (dense logits, or the fused path's output-layer inputs)
and the teacher's outputs, assembled into the `StepOutputs` every objective reads.

The fused large-vocabulary path (`distill.heads`) is decided once: objectives that all allow it, models
whose output layer is a plain `nn.Linear`, and a probe on the first batch showing that the logits are that
layer's output unchanged."""

from __future__ import annotations

import warnings
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn

from distill.errors import UserError
from distill.heads import call_model, head_inputs, hidden_only, logits_come_from_layer, output_layer
from distill.models.adapters import logits_of
from distill.models.hooks import FeatureHooks
from distill.objectives import Objective, StepOutputs
from distill.objectives import Progress as TrainProgress
from distill.teachers import Teacher, TeacherRequest
from distill.train.batches import MODEL_INPUT_KEYS

# Batch-dict keys that are not per-row data for the objectives (`row_data_of`).
NOT_ROW_DATA = frozenset({*MODEL_INPUT_KEYS, "inputs", "labels", "mask", "index"})


def row_data_of(batch: Any) -> dict[str, Tensor]:
    """The tensors a data set adds to a dict batch beside its inputs, labels, mask and index (e.g. per-token
    `privacy` scores), which reach every objective as `StepOutputs.row_data`; {} for other batches."""
    if not isinstance(batch, dict):
        return {}
    return {k: v for k, v in batch.items() if k not in NOT_ROW_DATA and isinstance(v, Tensor)}


class StepAssembler:
    def __init__(
        self,
        accelerator: Accelerator,
        student: nn.Module,
        teacher: Teacher | None,
        objectives: list[Objective],
        term_names: list[str],
        fused_loss: str,
    ) -> None:
        self.accelerator = accelerator
        self.student = student  # as prepared by Accelerate (possibly DDP-wrapped)
        self.teacher = teacher
        self.objectives = objectives
        self.term_names = term_names
        self.fused_loss = fused_loss
        self.needs_teacher = any(o.needs_teacher for o in objectives)
        # Hooks go on the unwrapped model: module paths are the user's, not DDP's `module.` ones.
        self.student_hooks = FeatureHooks(
            accelerator.unwrap_model(student), sorted({p for o in objectives for p in o.student_layers})
        )
        self.teacher_layers = sorted({p for o in objectives for p in o.teacher_layers})
        # None until the first step has probed the models (`fused_layers`); then the output layers or False.
        self._fused: tuple[nn.Linear, nn.Linear | None] | bool | None = None
        self.loss_path = "dense"
        refusal = self._fused_refusal() if fused_loss != "off" else "trainer.fused_loss is 'off'"
        if refusal is not None and fused_loss == "on":
            raise UserError(f"trainer.fused_loss is 'on' but {refusal}")
        if refusal is not None:
            self._fused = False

    def _live_teacher(self) -> Teacher | None:
        """The teacher whose forward the fused path must run (a model, not a cache), if the step needs it."""
        if self.teacher is None or not self.needs_teacher or self.teacher.module is None:
            return None
        return self.teacher

    def _fused_refusal(self) -> str | None:
        """Why the fused path cannot serve this run, or None when it may (the first batch probes models)."""
        dense = [n for n, o in zip(self.term_names, self.objectives, strict=True) if not o.fused_capable]
        if dense:
            many = len(dense) > 1
            return f"objective{'s' * many} {', '.join(dense)} need{'s' * (not many)} the full logits"
        if output_layer(self.accelerator.unwrap_model(self.student)) is None:
            return "the student has no plain linear output layer (get_output_embeddings)"
        live = self._live_teacher()
        if self.needs_teacher and self.teacher is None:
            return "the teacher has no plain linear output layer (get_output_embeddings)"
        if live is not None and (live.trainable or live.output_layer() is None):
            return "the teacher has no plain linear output layer (get_output_embeddings)"
        return None

    def fused_layers(self, inputs: Any) -> tuple[nn.Linear, nn.Linear | None] | None:
        """The student's and teacher's output layers when this step takes the fused path, else None.

        The first call probes each model on one sequence of `inputs`: its logits must be its output layer's
        output, unchanged (`distill.heads.logits_come_from_layer`)."""
        if self._fused is False:
            return None
        if self._fused is None:
            student = self.accelerator.unwrap_model(self.student)
            live = self._live_teacher()
            models = [("student", student, output_layer(student))]
            if live is not None:
                models.append(("teacher", live.module, live.output_layer()))
            # In eval mode: the probe is no training pass (no dropout draws, so a resumed run that probes
            # again keeps the random stream of an uninterrupted one; pass counters skip it).
            student.eval()
            try:
                failed = [
                    role
                    for role, model, layer in models
                    if layer is None or not logits_come_from_layer(model, layer, inputs)
                ]
            finally:
                student.train()
            if failed:
                reason = (
                    f"the {' and '.join(failed)} logits are not its output layer's output (post-processed)"
                )
                if self.fused_loss == "on":
                    raise UserError(f"trainer.fused_loss is 'on' but {reason}")
                warnings.warn(f"{reason}: the loss uses the dense logits", stacklevel=2)
                self._fused = False
            else:
                layers = [layer for _, _, layer in models if layer is not None]
                self._fused = (layers[0], layers[1] if len(layers) > 1 else None)
                self.loss_path = "fused"
        return self._fused or None

    def __call__(
        self,
        inputs: Any,
        labels: Tensor | None,
        mask: Tensor | None,
        progress: TrainProgress,
        index: Tensor | None = None,
        row_data: dict[str, Tensor] | None = None,
    ) -> StepOutputs:
        layers = self.fused_layers(inputs)
        teacher = None
        if self.teacher is not None and self.needs_teacher:
            head_layer = layers[1] if layers is not None else None
            teacher = self.teacher.outputs(TeacherRequest(inputs, index, mask, head_layer))
        student_head = None
        with self.accelerator.autocast():
            if layers is None:
                student_logits = logits_of(call_model(self.student, inputs))
            else:  # the logits come back empty; the losses read the output layer's input instead
                with hidden_only(layers[0]) as kept:
                    student_logits = logits_of(call_model(self.student, inputs))
                student = self.accelerator.unwrap_model(self.student)
                student_head = head_inputs(student, layers[0], kept, detach=False)
        features = dict(self.student_hooks.features)
        self.student_hooks.clear()
        return StepOutputs(
            student_logits=student_logits,
            teacher_logits=teacher.logits if teacher is not None else None,
            labels=labels,
            mask=mask,
            student_features=features,
            teacher_features=teacher.features if teacher is not None else {},
            progress=progress,
            teacher_topk=teacher.topk if teacher is not None else None,
            student_head=student_head,
            teacher_head=teacher.head if teacher is not None else None,
            index=index,
            row_data=row_data or {},
        )

    def remove_hooks(self) -> None:
        self.student_hooks.remove()
        if self.teacher is not None:
            self.teacher.detach()

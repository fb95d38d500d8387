"""A frozen teacher with its own tokenizer: it reads the student batch's text in its own tokens.

Each micro-batch's student token ids are turned back into text, tokenized by the teacher's tokenizer and
run through the teacher (`distill.data.token_alignment.Retokenizer`). The outputs hold the teacher's logits
over its own positions and vocabulary, (B, T_t, V_t), and, as features under `cross_tokenizer.*`, what the
cross-tokenizer objectives read: the teacher's labels and counted positions, the byte-aligned groups of both
sides and the vocabulary entries both tokenizers hold. Because the text is rebuilt from the student's ids,
any source works the same (the data set, or sequences generated during training).

Only cross-tokenizer objectives (`uld`, `aligned_kd`; `cross_tokenizer = True`) can read these outputs:
`check_objectives` refuses the others in one line. `module` is None, so that evaluations that compare the
teacher's logits with the student's token by token (KL, agreement) are not run across vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from distill.data.token_alignment import Retokenizer
from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest


class CrossTokenizerTeacher(Teacher):
    kind = "cross_tokenizer"

    def __init__(self, model: nn.Module, retokenizer: Retokenizer) -> None:
        self.model = model.eval().requires_grad_(False)
        self.retokenizer = retokenizer
        self._autocast: Callable[[], AbstractContextManager[Any]] = nullcontext

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        if layers:
            raise UserError(
                "a teacher with its own tokenizer serves logit objectives only (uld, aligned_kd), not "
                f"features of layers {', '.join(layers)}"
            )
        self.model.to(device).eval().requires_grad_(False)
        self._autocast = autocast

    def check_objectives(self, names: list[str], objectives: Sequence[Any]) -> None:
        for name, objective in zip(names, objectives, strict=True):
            if getattr(objective, "needs_teacher", False) and not getattr(
                objective, "cross_tokenizer", False
            ):
                raise UserError(
                    f"objective '{name}' compares logits over one shared vocabulary, but the teacher has its "
                    "own tokenizer; use a cross-tokenizer objective (uld, aligned_kd)"
                )

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        inputs = request.inputs
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise UserError("a teacher with its own tokenizer needs language-model batches (input_ids)")
        batch = self.retokenizer(inputs["input_ids"], inputs.get("attention_mask"), request.mask)
        with torch.inference_mode(), self._autocast():
            logits = logits_of(
                call_model(self.model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
            )
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        return TeacherOutputs(logits=logits.clone(), features=batch.features())

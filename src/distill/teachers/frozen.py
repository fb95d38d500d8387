"""A frozen model as teacher: eval mode, no gradients, run under `torch.inference_mode()`, never in DDP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from distill.heads import call_model, head_inputs, hidden_only, output_layer
from distill.models.adapters import logits_of
from distill.models.hooks import FeatureHooks, FeaturesComplete
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest


class FrozenTeacher(Teacher):
    kind = "frozen"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model.eval().requires_grad_(False)
        self._autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
        self._hooks: FeatureHooks | None = None
        self._features_only = False

    @property
    def module(self) -> nn.Module:
        return self.model

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        self.model.to(device).eval().requires_grad_(False)
        self._autocast = autocast
        self._hooks = FeatureHooks(self.model, list(layers), detach=True)

    def output_layer(self) -> nn.Linear | None:
        return output_layer(self.model)

    def skip_logits(self) -> None:
        self._features_only = self._hooks is not None and bool(self._hooks.paths)

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if request.head_layer is not None:
            with torch.inference_mode(), self._autocast(), hidden_only(request.head_layer) as kept:
                call_model(self.model, request.inputs)
            self._clear_hooks()
            return TeacherOutputs(head=head_inputs(self.model, request.head_layer, kept, detach=True))
        # Outputs recorded outside `outputs` (the evaluation runs the teacher with its hooks on) are stale.
        self._clear_hooks()
        if self._features_only:
            assert self._hooks is not None
            self._hooks.stop_when_complete = True
            try:
                with torch.inference_mode(), self._autocast():
                    call_model(self.model, request.inputs)
            except FeaturesComplete:
                pass
            finally:
                self._hooks.stop_when_complete = False
            return TeacherOutputs(features=self._take_features())
        with torch.inference_mode(), self._autocast():
            logits = logits_of(call_model(self.model, request.inputs))
        return TeacherOutputs(logits=logits.clone(), features=self._take_features())

    def _take_features(self) -> dict[str, torch.Tensor]:
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        features = {k: v.clone() for k, v in self._hooks.features.items()} if self._hooks else {}
        self._clear_hooks()
        return features

    def _clear_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.clear()

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

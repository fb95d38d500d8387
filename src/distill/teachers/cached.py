"""A teacher cache (`distill cache`) as teacher: top-k targets and stored layer outputs read by sample id."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from torch import Tensor

from distill.cache.indexed import rows_per_sample
from distill.errors import UserError
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest

if TYPE_CHECKING:
    from distill.cache.store import TeacherCache


class CachedTeacher(Teacher):
    kind = "cache"

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.layers: list[str] = []
        self.device: Any = "cpu"

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        self.device, self.layers = device, list(layers)

    def check_objectives(self, names: list[str], objectives: Sequence[Any]) -> None:
        self.cache.check_objectives(names, list(objectives))

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if request.index is None:
            raise UserError("a teacher cache needs batches with sample ids (IndexedDataset)")
        rows = rows_per_sample(request.mask, len(request.index))
        topk = self.cache.targets(request.index.cpu(), rows)
        features = self._features(request.index, rows, request.mask) if self.layers else {}
        return TeacherOutputs(topk=topk, features=features)

    def _features(self, index: Tensor, rows: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        """The layers' outputs shaped as the live teacher's: a language model's counted-token rows go back to
        their (batch, time) places (zeros elsewhere, which the mask skips)."""
        cached = self.cache.features(index.cpu(), self.layers, rows)
        features = {}
        for layer, value in cached.items():
            if mask is not None:
                full = value.new_zeros((*mask.shape, *value.shape[1:]))
                full[mask.cpu()] = value
                value = full
            features[layer] = value.to(self.device)
        return features

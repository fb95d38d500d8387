"""Counters for what on-policy training costs: forward passes of a model (a teacher scoring, a model
generating: every decoding step is one pass) and the tokens they read, kept by a forward hook so the
model itself is untouched."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn


class CallCounter:
    """Counts the forward passes of `model` until `remove()`; with `while_training`, only those made while
    that module is in training mode (the trainer's teacher passes, not the evaluation's)."""

    def __init__(self, model: nn.Module, while_training: nn.Module | None = None) -> None:
        self.calls = 0
        self.tokens = 0
        self.while_training = while_training
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.while_training is not None and not self.while_training.training:
            return
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and hasattr(ids, "numel"):
            self.tokens += int(ids.numel())

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class GenerationStats:
    """What a source generated: sequences, new tokens, seconds (tokens per second follows)."""

    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, completions: list[list[int]], started: float) -> None:
        self.sequences += len(completions)
        self.tokens += sum(len(c) for c in completions)
        self.seconds += time.perf_counter() - started

    def as_metrics(self, prefix: str) -> dict[str, float]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return {
            f"{prefix}_sequences": float(self.sequences),
            f"{prefix}_tokens": float(self.tokens),
            f"{prefix}_seconds": self.seconds,
            f"{prefix}_tokens_per_second": rate,
            f"{prefix}_mean_length": self.tokens / self.sequences if self.sequences else 0.0,
        }

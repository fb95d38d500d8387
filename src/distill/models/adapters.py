"""Uniform access to logits: plain modules return a tensor, Hugging Face models an output with `.logits`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distill.errors import UserError


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, an object with `.logits`, a dict, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise UserError(f"cannot find logits in a model output of type {type(output).__name__}")

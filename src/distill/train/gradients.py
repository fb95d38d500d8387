"""What the optimizer step needs beyond the student's own DDP: objectives' gradients averaged over
processes, and the line that names a non-finite objective."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn


def sync_objective_gradients(objectives: nn.Module, accelerator: Accelerator) -> None:
    """Average the gradients of objectives' own parameters (projectors) over processes, as DDP does for the
    student's: the objectives live outside DDP, so nothing else would."""
    params = [p for p in objectives.parameters() if p.requires_grad]
    if not params or accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for param, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = grad.view_as(param).clone()


def nonfinite_message(values: Tensor, names: list[str], step: int, student: nn.Module) -> str | None:
    """None when every objective's value is finite; else one line naming the step and the first bad term,
    with the usual cause when the student's weights are stored in half precision."""
    bad = ~torch.isfinite(values)
    if not bad.any():
        return None
    message = f"step {step}: objective '{names[int(bad.nonzero()[0])]}' is {values[bad][0].item()}"
    half = {p.dtype for p in student.parameters()} & {torch.float16, torch.bfloat16}
    if half:  # they overflow or underflow (AdamW's eps)
        kind = str(half.pop()).removeprefix("torch.")
        message += f"; the student's weights are {kind}: keep them float32, set trainer.mixed_precision"
    return message

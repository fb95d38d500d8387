"""What produces targets: one interface for every kind of teacher.

The trainer asks a `Teacher` for the outputs one micro-batch needs (`TeacherRequest`) and gets the same
`TeacherOutputs` from every kind: a frozen model, a cache of its outputs, an ensemble or a router over
several models, a co-trained peer, or the student itself (an EMA copy). Only a teacher whose `trainable` is
True ever receives gradients: it hands its parameters to the optimizer (`trainable_parameters`) and adds its
own loss to the step (`loss`). Every other kind stays frozen, in eval mode, under inference mode, and
outside DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from distill.objectives import HeadInputs, StepOutputs


@dataclass
class TeacherRequest:
    """What one micro-batch needs from the teacher."""

    inputs: Any  # the model inputs (a tensor, or a dict of a language model's keyword inputs)
    index: Tensor | None = None  # sample ids, when the data set adds them (`IndexedDataset`): caches
    mask: Tensor | None = None  # counted rows (tokens) of the batch
    head_layer: nn.Linear | None = None  # fused path: the teacher's output layer whose inputs to return


@dataclass
class TeacherOutputs:
    """Targets in whichever form the teacher has them: logits, cached top-k, output-layer inputs (fused
    path), and the outputs of the teacher modules the objectives named (`features`)."""

    logits: Tensor | None = None
    topk: Any = None  # `distill.losses.sparse.SparseTargets`, one row per counted row
    features: dict[str, Tensor] = field(default_factory=dict)
    head: HeadInputs | None = None


class Teacher:
    """The interface. Subclasses implement `outputs`; the rest has safe defaults for a frozen teacher."""

    trainable: bool = False  # True only for a co-trained teacher (its parameters join the optimizer)
    static: bool = True  # its predictions never change during training (False: EMA, co-trained)
    kind: str = "teacher"

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        """Move to `device` and prepare to return the outputs of modules `layers` (before the first step)."""

    def skip_logits(self) -> None:
        """No objective reads the teacher's logits: a model may stop its forward pass as soon as the layers
        `attach` named have run (S38's saving: the teacher runs only up to the deepest layer needed)."""

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        raise NotImplementedError

    @property
    def module(self) -> nn.Module | None:
        """A model whose forward gives the teacher's logits (evaluation, agreement metrics, latency), or
        None when there is no model (a cache)."""
        return None

    def output_layer(self) -> nn.Linear | None:
        """The plain linear output layer the fused path may read, or None (then the dense logits are used)."""
        return None

    def check_objectives(self, names: list[str], objectives: Sequence[Any]) -> None:
        """Refuse objectives this teacher cannot serve (one line)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def optimizer_options(self) -> dict[str, Any]:
        """Settings of the teacher's own parameter group (learning rate, weight decay), when trainable."""
        return {}

    def loss(self, step: StepOutputs) -> Tensor | None:
        """A co-trained teacher's own loss for the micro-batch, given the student's outputs (else None)."""
        return None

    def after_optimizer_step(self, student: nn.Module) -> None:
        """Called after every optimizer step (an EMA teacher follows the student here)."""

    def state_module(self) -> nn.Module | None:
        """The module whose state a checkpoint must keep (an EMA or co-trained teacher's weights)."""
        return None

    def detach(self) -> None:
        """Remove hooks at the end of training."""

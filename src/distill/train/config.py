"""The trainer's settings (`TrainerConfig`) and what a run returns (`FitResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class TrainerConfig:
    epochs: int = 10
    # The run's length in optimizer steps in place of epochs (the schedule spans it), and a budget of counted
    # tokens that ends it early (language models); `distill.train.length`.
    max_steps: int | None = None
    max_tokens: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 512
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: float | None = None
    checkpoint_every: int = (
        0  # optimizer steps between checkpoints; 0 = at the end of every epoch (always at the end)
    )
    keep_checkpoints: int = 2
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps
    nonfinite: Literal["stop", "skip"] = "stop"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    # Experiment trackers through Accelerate (`distill.train.trackers`): "wandb", "mlflow", or Accelerate
    # `GeneralTracker` objects, and the project they log to (each fit is a run there, named by its label).
    trackers: Sequence[Any] = ()
    tracker_project: str = "distill"
    stop_after_steps: int | None = None  # end early (tests of resume, smoke runs); None = train to the end
    # "auto": hidden states and output layers in place of logits when the models and every objective allow
    # it (`distill.heads`); "on": that or an error saying why not; "off": always the dense logits.
    fused_loss: Literal["auto", "on", "off"] = "auto"


@dataclass
class FitResult:
    final: dict[str, float]  # metrics at the last epoch
    best: dict[str, float]  # metrics at the epoch of best accuracy
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    train_seconds: float = 0.0
    steps: int = 0
    tokens: int = 0  # counted rows trained on, over every process: tokens for language models, else samples
    completed: bool = True
    run_dir: Path | None = None
    loss_path: str = "dense"  # "fused" when the step never built the logits (`distill.heads`)


def allow_mixed_precision(mixed_precision: str) -> None:
    """Accelerate keeps one mixed-precision setting per process and refuses an Accelerator with another; a
    run trains its teacher in float32 and may then train students in bf16, so the per-process accelerator
    state (not the process group) is dropped when the setting changes."""
    from accelerate.state import AcceleratorState

    # Private Accelerate API (stable since 0.2x); without it the Accelerator's own error stands.
    shared = getattr(AcceleratorState, "_shared_state", None)
    reset = getattr(AcceleratorState, "_reset_state", None)
    if shared and reset and str(shared.get("_mixed_precision", mixed_precision)) != mixed_precision:
        reset()

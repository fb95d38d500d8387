"""Experiment trackers (Weights & Biases, MLflow) through Accelerate's own tracking API.

The trainer's `Accelerator` is built with `log_with=[...]`; each run calls `init_trackers` (project: the
recipe's name, run: the method and seed, config: the trainer, optimizer and schedule settings), logs every
`metrics.jsonl` row with `accelerator.log` at its optimizer step, and finishes its trackers at the end, also
when it stops early. Trackers are named (`"wandb"`, `"mlflow"`, configured by their own environment
variables: `WANDB_PROJECT`, `MLFLOW_TRACKING_URI`, ...) or given as Accelerate `GeneralTracker` objects
(Python API). A named tracker that is not installed is refused in one line: Accelerate would drop it
silently. A resumed run is a new run in its trackers, logging from its checkpoint's step on. TensorBoard
stays with `output.tensorboard` (`distill.train.logs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from distill.errors import UserError

TRACKERS = ("wandb", "mlflow")  # the trackers a recipe may name (`output.trackers`)


def available_trackers() -> set[str]:
    """The trackers Accelerate found installed (the list its `log_with` filter keeps; the rest it drops)."""
    from accelerate.tracking import get_available_trackers

    return {str(tracker) for tracker in get_available_trackers()}


def missing_trackers(names: Sequence[Any]) -> list[str]:
    """The named trackers whose package is not installed."""
    available = available_trackers()
    return [n for n in names if isinstance(n, str) and n not in available]


def refuse_unusable_trackers(names: Sequence[Any], where: str = "") -> None:
    """One line (after `where: `) for a tracker distill does not know, or one asked for but not installed."""
    prefix = f"{where}: " if where else ""
    for name in names:
        if isinstance(name, str) and name not in TRACKERS:
            raise UserError(f"{prefix}unknown tracker '{name}' (one of: {', '.join(TRACKERS)})")
    missing = missing_trackers(names)
    if missing:
        raise UserError(
            f"{prefix}{', '.join(missing)} asked for but not installed (pip install {' '.join(missing)})"
        )


def flat_settings(sections: dict[str, Any]) -> dict[str, Any]:
    """Settings dataclasses' scalars as `section.name` -> value (what trackers store as a run's config);
    lists become text, objects (a tracker itself) are left out."""
    out: dict[str, Any] = {}
    for prefix, settings in sections.items():
        if not is_dataclass(settings):
            continue
        for field in fields(settings):
            value = getattr(settings, field.name)
            if value is None or isinstance(value, bool | int | float | str):
                out[f"{prefix}.{field.name}"] = value
            elif isinstance(value, list | tuple) and all(isinstance(v, int | float | str) for v in value):
                out[f"{prefix}.{field.name}"] = str(list(value))
    return out


class Tracking:
    """The run's trackers on its accelerator; does nothing when none is asked for."""

    def __init__(self, accelerator: Any, trackers: Sequence[Any], project: str, run_name: str) -> None:
        self.accelerator = accelerator
        self.active = bool(trackers)
        self.project = project
        self.run_name = run_name
        self.started = False

    def start(self, settings: dict[str, Any], run_dir: Path | None, *, total_steps: int) -> None:
        """Open this run in every tracker; `settings`: section name -> settings dataclass (its config)."""
        if not self.active or self.started:
            return
        config = {**flat_settings(settings), "trainer.total_steps": total_steps}
        wandb: dict[str, Any] = {"name": self.run_name}
        if run_dir is not None:
            wandb["dir"] = str(run_dir)
        self.accelerator.init_trackers(
            self.project,
            config=config,
            init_kwargs={"wandb": wandb, "mlflow": {"run_name": self.run_name}},
        )
        self.started = True

    def log(self, row: dict[str, Any]) -> None:
        """A log row's numbers as `kind/key` (`train/loss`, `eval/perplexity`) at its optimizer step."""
        if not self.started:
            return
        values = {
            f"{row['kind']}/{key}": value
            for key, value in row.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in {"step", "kind"}
        }
        self.accelerator.log(values, step=row["step"])

    def finish(self) -> None:
        """Close this run's trackers. Not `accelerator.end_training()`: that also ends the process group,
        which the next method or seed of a multi-process run still needs."""
        if not self.started:
            return
        try:
            for tracker in self.accelerator.trackers:
                tracker.finish()  # Accelerate's trackers finish on the main process only
        finally:
            self.accelerator.trackers = []
            self.started = False

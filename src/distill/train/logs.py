"""A training run's logs: `metrics.jsonl` (one row per log step and evaluation), `metrics.csv`, `final.json`
and TensorBoard when it is installed. Only the main process writes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distill.io import atomic_write_json, atomic_write_text

LINE_SECONDS = 30.0  # off a terminal: one progress line at most this often (a short run prints none)


def warn(message: str) -> None:
    """One warning line on stderr (a damaged file set aside, a fallback taken): never a traceback, never a
    wrapped paragraph."""
    print("warning: " + " ".join(message.split()), file=sys.stderr, flush=True)


def progress_bar(enabled: bool, console: Console | None = None) -> Progress | LineProgress:
    """The training bar on stderr: steps done of all, the epoch's running loss, elapsed time and the time
    left; gone when done. Off a terminal (a log file, a pipe, CI), where rich draws nothing, plain lines
    (`LineProgress`) say the same, so that a long teacher does not train in silence."""
    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        return LineProgress(stream=console.file)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def clock_text(seconds: float) -> str:
    """`h:mm:ss`, as rich's time columns write it."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started_at: float  # when the bar began
    started_from: float  # steps already done then (a resumed run)
    printed_at: float
    printed: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class LineProgress:
    """The training bar's stand-in off a terminal, with the calls the trainer makes of rich's `Progress`
    (`add_task`, `update`, a `with` block): one plain line at most every `every` seconds, e.g.
    `teacher: step 120/1,000 (12%), epoch 1/3 loss 2.3456, elapsed 0:00:30, ETA 0:03:40`, and a last line
    when a run that printed any ends. A run shorter than `every` (`LINE_SECONDS`) prints nothing."""

    def __init__(
        self,
        every: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = LINE_SECONDS if every is None else every
        self.stream = stream
        self.clock = clock
        self._tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        now = self.clock()
        self._tasks.append(_Task(description, total, completed, now, completed, now, fields=fields))
        return len(self._tasks) - 1

    def update(
        self, task_id: int, *, advance: float = 0, completed: float | None = None, **fields: Any
    ) -> None:
        task = self._tasks[task_id]
        task.completed = (task.completed if completed is None else completed) + advance
        task.fields.update(fields)
        now = self.clock()
        done = task.total is not None and task.completed >= task.total
        if now - task.printed_at >= self.every or (done and task.printed):
            self._print(task, now)

    def line(self, task: _Task, now: float) -> str:
        """The task's progress in one line."""
        elapsed = now - task.started_at
        parts = [f"step {task.completed:,.0f}"]
        if task.total:
            parts[0] += f"/{task.total:,.0f} ({100 * task.completed / task.total:.0f}%)"
        status = str(task.fields.get("status") or "")
        if status:
            parts.append(status)
        parts.append(f"elapsed {clock_text(elapsed)}")
        ran = task.completed - task.started_from
        if task.total is not None and task.completed >= task.total:
            parts.append("done")
        elif task.total is not None and ran > 0:
            parts.append(f"ETA {clock_text(elapsed / ran * (task.total - task.completed))}")
        return f"{task.description}: " + ", ".join(parts)

    def _print(self, task: _Task, now: float) -> None:
        print(self.line(task, now), file=self.stream or sys.stderr, flush=True)
        task.printed_at, task.printed = now, True


def _row(line: str) -> dict[str, Any] | None:
    """A `metrics.jsonl` line's row, or None for anything else (a torn line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, int) and not isinstance(step, bool) else None


class RunLog:
    def __init__(self, run_dir: Path | None, *, main_process: bool, tensorboard: bool) -> None:
        self.run_dir = run_dir if main_process else None
        self.tensorboard = tensorboard
        self._writer: Any = None

    def open(self, resumed_step: int | None) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "metrics.jsonl"
        if resumed_step is not None and log.exists():
            # Drop what was logged after the checkpoint: those steps are about to run again. A line that is
            # not a log row (the torn last line of a killed run) is dropped with one warning.
            kept, torn = [], 0
            for line in log.read_text(errors="replace").splitlines():
                row = _row(line)
                if row is None:
                    torn += bool(line.strip())
                elif row["step"] <= resumed_step:
                    kept.append(line)
            if torn:
                warn(f"{log}: dropped {torn} unreadable line(s) (a write cut short) while resuming")
            atomic_write_text(log, "".join(line + "\n" for line in kept))
        elif resumed_step is None:
            atomic_write_text(log, "")
        if self.tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            prefix = row["kind"]
            for key, value in row.items():
                if isinstance(value, int | float) and key not in {"step", "kind"}:
                    self._writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def summary(self, result: Any) -> None:
        """`metrics.csv` from the evaluation history; `final.json` once the run completed."""
        if self.run_dir is None:
            return
        rows = result.history
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())
        if result.completed:
            summary = asdict(result)
            summary["run_dir"] = str(self.run_dir)
            atomic_write_json(self.run_dir / "final.json", summary)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

"""A training run's logs: `metrics.jsonl` (one row per log step and evaluation), `metrics.csv`, `final.json`
and TensorBoard when it is installed. Only the main process writes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distill.io import atomic_write_json, atomic_write_text


def warn(message: str) -> None:
    """One warning line on stderr (a damaged file set aside, a fallback taken): never a traceback, never a
    wrapped paragraph."""
    print("warning: " + " ".join(message.split()), file=sys.stderr, flush=True)


def progress_bar(enabled: bool) -> Progress:
    """The training bar: steps done of all, the epoch's running loss, elapsed time; gone when done."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


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

"""What a person reads after a run: each task writes its report (report.md, metrics.json, learning curves)
and prints its table (`distill.tasks.Task.write_report`, `print_table`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distill.tasks import ExperimentResult, task_named


def write_report(result: ExperimentResult) -> Path:
    """Write the run's report files into its folder; return the report's path."""
    return task_named(result.task).write_report(result)


def print_table(result: ExperimentResult, console: Console) -> None:
    task_named(result.task).print_table(result, console)

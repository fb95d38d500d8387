"""The classification task's report: accuracy (last and best epoch), agreement, KL to the teacher, ECE and
time per method, each method against the first (better, worse or within noise), latency."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distill.io import atomic_write_json, atomic_write_text
from distill.tables import markdown_table, objective_text, pm, rich_table
from distill.tasks.regime_report import regime_sections, regime_text
from distill.tasks.report_common import (
    MethodSummary,
    gain_lines,
    metrics_document,
    plot_learning_curves,
    teacher_line,
    teacher_time_cell,
    teacher_time_note,
)
from distill.tasks.results import ExperimentResult

HEADERS = ["method", "params", "acc % (last)", "acc % (best ep.)", "agree %", "KL(T‖S)", "ECE %", "train s"]
F1_HEADER = "F1 % (macro)"


def headers(f1: bool) -> list[str]:
    """The table's columns; tasks with imbalanced labels (text) add macro F1 after accuracy."""
    return [*HEADERS[:4], F1_HEADER, *HEADERS[4:]] if f1 else list(HEADERS)


def summary_rows(result: ExperimentResult, f1: bool = False) -> list[list[str]]:
    rows = summary_rows_without_f1(result)
    if not f1:
        return rows
    cells = []
    if result.teacher is not None and result.teacher.metrics:
        cells.append(f"{100 * result.teacher.metrics.get('f1', float('nan')):.2f}")
    cells += [pm(MethodSummary.of(runs).f1, 100) for runs in result.methods]
    return [[*row[:4], cell, *row[4:]] for row, cell in zip(rows, cells, strict=True)]


def summary_rows_without_f1(result: ExperimentResult) -> list[list[str]]:
    rows = []
    if result.teacher is not None and result.teacher.metrics:
        m = result.teacher.metrics
        rows.append(
            [
                "teacher",
                f"{result.teacher.parameters:,}",
                f"{100 * m['accuracy']:.2f}",
                "-",
                "-",
                "-",
                f"{100 * m['ece']:.2f}",
                teacher_time_cell(result.teacher),
            ]
        )
    for runs in result.methods:
        s = MethodSummary.of(runs)
        rows.append(
            [
                s.name,
                f"{result.student_parameters:,}",
                pm(s.accuracy, 100),
                pm(s.best_accuracy, 100),
                pm(s.agreement, 100) if s.agreement else "-",
                pm(s.teacher_kl, 1, 3) if s.teacher_kl else "-",
                pm(s.ece, 100),
                pm(s.seconds, 1, 1),
            ]
        )
    return rows


def _gain_sentence(result: ExperimentResult, f1: bool) -> str:
    """How each method compares with the first one (the baseline): better, worse or within the seed spread."""
    if f1:
        return gain_lines(result, "f1", "points of macro F1", scale=100)
    return gain_lines(result, "accuracy", "points of accuracy", scale=100)


def latency_lines(latency: dict[str, float]) -> str:
    """One line per measured batch size: `student` / `teacher` at `batch`, and `student_b1` / `teacher_b1`
    at batch 1 when the task measured it."""
    lines = ""
    for suffix, batch in (("_b1", 1.0), ("", latency.get("batch", 0.0))):
        if f"student{suffix}" not in latency:
            continue
        student = latency[f"student{suffix}"]
        line = f"- Latency per batch of {int(batch)} on the CPU: student {1e3 * student:.2f} ms"
        if f"teacher{suffix}" in latency:
            teacher = latency[f"teacher{suffix}"]
            line += f", teacher {1e3 * teacher:.2f} ms ({teacher / student:.1f}x faster)"
        lines += line + ".\n"
    return lines


def _table_note(result: ExperimentResult) -> str:
    """Why the teacher row has no time of this run, when it has none (a line under the table)."""
    note = teacher_time_note(result.teacher) if result.teacher is not None and result.teacher.metrics else ""
    return f"\n{note[0].upper()}{note[1:]}.\n" if note else ""


def write_classification_report(result: ExperimentResult, *, f1: bool = False) -> Path:
    """Write report.md, metrics.json and learning_curves.png into the run folder; return the report path.
    With `f1`, the table has a macro-F1 column and the gains are in macro F1 (imbalanced labels)."""
    recipe = result.recipe
    out = result.out_dir
    plot = plot_learning_curves(result, out / "learning_curves.png")
    latency_line = latency_lines(result.latency)
    teacher = teacher_line(result)
    text = (
        f"# {recipe.name}\n\n{recipe.description}\n\n"
        f"- Data: {result.data.description}.\n"
        f"{teacher}"
        f"- Student: `{recipe.student.name}` {recipe.student.params}, "
        f"{result.student_parameters:,} parameters.\n"
        f"- Seeds: {', '.join(map(str, recipe.seeds))}; every cell is mean ± standard deviation over seeds, "
        f"measured on the test split. 'last' is the final epoch (the headline rule: "
        f"{recipe.evaluation.rule}); 'best epoch' picks the epoch of best test accuracy and is optimistic.\n"
        f"{latency_line}"
        f"- Wall time of the whole run: {result.wall_seconds:.1f} s.\n\n"
        + markdown_table(headers(f1), summary_rows(result, f1))
        + _table_note(result)
        + "\n"
        + _gain_sentence(result, f1)
        + "\nObjectives per method:\n\n"
        + "".join(
            f"- {m.name}{regime_text(m)}: " + ", ".join(objective_text(o) for o in m.objectives) + "\n"
            for m in result.methods
        )
        + regime_sections(result)
        + (f"\n![learning curves]({plot.name})\n" if plot else "")
    )
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "metrics.json", metrics_document(result))
    return out / "report.md"


def print_classification_table(result: ExperimentResult, console: Console, *, f1: bool = False) -> None:
    console.print(
        rich_table(
            f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, test split",
            headers(f1),
            summary_rows(result, f1),
        )
    )
    note = _table_note(result).strip()
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)

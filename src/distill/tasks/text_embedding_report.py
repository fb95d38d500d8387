"""The text-embedding task's report: per method the last epoch's cosine to the teacher, Spearman's rho of
pair similarities, k-NN and linear-probe macro F1 (mean ± std over seeds); the teacher's row; each method
against the first; and the CPU latency of student and teacher at batch 1 and batch 64."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distill.io import atomic_write_json, atomic_write_text
from distill.tables import markdown_table, objective_text, pm, rich_table
from distill.tasks.report_common import gain_lines, method_values, metrics_document
from distill.tasks.results import ExperimentResult, MethodRuns

COLUMNS = [  # (header, metric key, scale)
    ("cos to teacher", "teacher_cosine", 1.0),
    ("Spearman", "spearman", 1.0),
    ("k-NN F1 %", "knn_f1", 100.0),
    ("probe F1 %", "probe_f1", 100.0),
    ("k-NN acc %", "knn_accuracy", 100.0),
]
HEADERS = ["method", "params", *(c[0] for c in COLUMNS), "train s"]


def cell(values: list[float], scale: float) -> str:
    return pm(values, scale, 2 if scale > 1 else 4) if values else "-"


def teacher_row(result: ExperimentResult) -> list[str]:
    info = result.teacher
    metrics = info.metrics if info is not None else {}
    name = result.recipe.teacher.name if result.recipe.teacher is not None else None
    cells = [f"teacher ({name})" if name else "teacher", f"{info.parameters:,}" if info else "-"]
    cells += [cell([metrics[key]] if key in metrics else [], scale) for _, key, scale in COLUMNS]
    return [*cells, "-"]


def method_row(result: ExperimentResult, runs: MethodRuns) -> list[str]:
    cells = [runs.name, f"{result.student_parameters:,}"]
    cells += [cell(method_values(runs, key), scale) for _, key, scale in COLUMNS]
    return [*cells, pm([r.result.train_seconds for r in runs.runs], 1, 1)]


def summary_rows(result: ExperimentResult) -> list[list[str]]:
    return [teacher_row(result)] + [method_row(result, runs) for runs in result.methods]


def latency_line(latency: dict[str, float]) -> str:
    if "student" not in latency:
        return ""

    def ms(key: str) -> str:
        return f"{1e3 * latency[key]:.2f} ms"

    line = f"- CPU latency per forward pass: student {ms('student_b1')} (batch 1), {ms('student')} (batch 64)"
    if "teacher" in latency:
        line += (
            f"; teacher {ms('teacher_b1')} ({latency['teacher_b1'] / latency['student_b1']:.1f}x), "
            f"{ms('teacher')} ({latency['teacher'] / latency['student']:.1f}x)"
        )
    return line + ".\n"


def write_embedding_report(result: ExperimentResult) -> Path:
    """report.md and metrics.json in the run folder; returns the report's path."""
    recipe, out = result.recipe, result.out_dir
    text = (
        f"# {recipe.name}\n\n{recipe.description}\n\n"
        f"- Data: {result.data.description}.\n"
        f"- Teacher: used as it is (no fine-tuning); embedding width {result.extra.get('width')}.\n"
        f"- Student: `{recipe.student.name}` {recipe.student.params}, {result.student_parameters:,} "
        "parameters.\n"
        f"- Seeds: {', '.join(map(str, recipe.seeds))}; cells are mean ± std over seeds, last epoch. Cosine "
        "and Spearman are measured against the teacher's embeddings of the held-out texts; k-NN (k 10, "
        "cosine) and the logistic-regression probe classify them from the training texts' embeddings and "
        "labels (never trained on).\n"
        f"{latency_line(result.latency)}"
        f"- Wall time of the whole run: {result.wall_seconds:.1f} s.\n\n"
        + markdown_table(HEADERS, summary_rows(result))
        + "\n"
        + gain_lines(result, "teacher_cosine", "hundredths of cosine to the teacher", scale=100.0)
        + "\nObjectives per method:\n\n"
        + "".join(
            f"- {m.name}: " + ", ".join(objective_text(o) for o in m.objectives) + "\n"
            for m in result.methods
        )
    )
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "metrics.json", metrics_document(result) | {"width": result.extra.get("width")})
    return out / "report.md"


def print_embedding_table(result: ExperimentResult, console: Console) -> None:
    title = f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, last epoch"
    console.print(rich_table(title, HEADERS, summary_rows(result)))

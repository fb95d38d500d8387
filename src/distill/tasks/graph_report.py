"""The graph task's report: per method the test accuracy at the epoch of best validation accuracy (the
headline, the papers' protocol), at the last epoch, the validation accuracy, agreement with the teacher and
time; the GNN teachers' row (one teacher per seed); each method against the first and against the teacher;
and the CPU latency of the MLP student against the GNN teacher on the same nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from distill.io import atomic_write_json, atomic_write_text
from distill.tables import gain_and_spread, markdown_table, noise_verdict, objective_text, pm, rich_table
from distill.tasks.report_common import gain_lines, method_values, metrics_document, teacher_line
from distill.tasks.results import ExperimentResult, MethodRuns

HEADERS = ["method", "params", "test % (best val ep.)", "test % (last)", "val %", "agree %", "train s"]
INDUCTIVE = "observed test % (last)"


def headers(result: ExperimentResult) -> list[str]:
    inductive = result.extra.get("setting") == "inductive"
    return HEADERS[:-1] + ([INDUCTIVE] if inductive else []) + HEADERS[-1:]


def teacher_values(result: ExperimentResult, key: str) -> list[float]:
    teachers: dict[Any, dict[str, Any]] = result.extra.get("teachers", {})
    return [t["metrics"][key] for t in teachers.values() if key in t["metrics"]]


def teacher_row(result: ExperimentResult) -> list[str]:
    info = result.teacher
    seconds = sum(t["seconds"] for t in result.extra.get("teachers", {}).values())
    cells = [
        f"teacher ({result.recipe.teacher.name})" if result.recipe.teacher else "teacher",
        f"{info.parameters:,}" if info else "-",
        pm(teacher_values(result, "accuracy"), 100),
        "-",
        pm(teacher_values(result, "val_accuracy"), 100),
        "-",
    ]
    if result.extra.get("setting") == "inductive":
        cells.append(pm(teacher_values(result, "observed_test_accuracy"), 100))
    cells.append(
        f"{seconds:.1f}" if info is not None and info.source == "trained" else (info.source if info else "-")
    )
    return cells


def method_row(result: ExperimentResult, runs: MethodRuns) -> list[str]:
    cells = [
        runs.name,
        f"{result.student_parameters:,}",
        pm(method_values(runs, "selected_accuracy"), 100),
        pm(method_values(runs, "accuracy"), 100),
        pm(method_values(runs, "selected_val_accuracy"), 100),
        pm(method_values(runs, "agreement"), 100),
    ]
    if result.extra.get("setting") == "inductive":
        cells.append(pm(method_values(runs, "observed_test_accuracy"), 100))
    cells.append(pm([r.result.train_seconds for r in runs.runs], 1, 1))
    return cells


def summary_rows(result: ExperimentResult) -> list[list[str]]:
    return [teacher_row(result)] + [method_row(result, runs) for runs in result.methods]


def against_teacher(result: ExperimentResult) -> str:
    """Each method's headline accuracy against the teachers' test accuracy (gain, spread, verdict)."""
    teacher = teacher_values(result, "accuracy")
    lines = []
    for runs in result.methods:
        values = method_values(runs, "selected_accuracy")
        if not values or not teacher:
            continue
        gain, spread = gain_and_spread(values, teacher, 100)
        lines.append(
            f"- {runs.name} vs the teacher: {gain:+.2f} points, spread {spread:.2f}: "
            f"{noise_verdict(gain, spread)}."
        )
    return "".join(line + "\n" for line in lines)


def latency_lines(latency: dict[str, float]) -> str:
    if "student" not in latency:
        return ""
    batch = int(latency["batch"])

    def ms(key: str) -> str:
        return f"{1e3 * latency[key]:.3f} ms"

    def ratio(slow: str, fast: str) -> str:
        return f"{latency[slow] / latency[fast]:.1f}x"

    return (
        f"- CPU latency, the {batch} test nodes: MLP {ms('student')}; GNN with their neighbourhood extracted "
        f"{ms('teacher')} ({ratio('teacher', 'student')} the MLP), GNN over the whole graph "
        f"{ms('teacher_whole_graph')} ({ratio('teacher_whole_graph', 'student')}); one node: "
        f"MLP {ms('student_one')}, GNN {ms('teacher_one')} ({ratio('teacher_one', 'student_one')}).\n"
    )


def write_graph_report(result: ExperimentResult) -> Path:
    """report.md and metrics.json in the run folder; returns the report's path."""
    recipe, out = result.recipe, result.out_dir
    sources = sorted({t["source"] for t in result.extra.get("teachers", {}).values()})
    text = (
        f"# {recipe.name}\n\n{recipe.description}\n\n"
        f"- Data: {result.data.description}.\n"
        f"{teacher_line(result)}"
        f"- Teachers: one per seed ({', '.join(sources)}); their row is mean ± std over the seeds.\n"
        f"- Student: `{recipe.student.name}` {recipe.student.params}, {result.student_parameters:,} "
        "parameters; it reads node features only.\n"
        f"- Seeds: {', '.join(map(str, recipe.seeds))}; cells are mean ± std over seeds. 'best val ep.' is "
        "the test accuracy at the epoch of best validation accuracy (GLNN's and FF-G2M's protocol); 'last' "
        "the final epoch.\n"
        f"{latency_lines(result.latency)}"
        f"- Wall time of the whole run: {result.wall_seconds:.1f} s.\n\n"
        + markdown_table(headers(result), summary_rows(result))
        + "\n"
        + gain_lines(
            result, "selected_accuracy", "points of test accuracy (best validation epoch)", scale=100
        )
        + against_teacher(result)
        + "\nObjectives per method:\n\n"
        + "".join(
            f"- {m.name}: " + ", ".join(objective_text(o) for o in m.objectives) + "\n"
            for m in result.methods
        )
    )
    atomic_write_text(out / "report.md", text)
    document = metrics_document(result) | {"setting": result.extra.get("setting")}
    document["teachers"] = {str(seed): t for seed, t in result.extra.get("teachers", {}).items()}
    atomic_write_json(out / "metrics.json", document)
    return out / "report.md"


def print_graph_table(result: ExperimentResult, console: Console) -> None:
    setting = result.extra.get("setting", "")
    title = f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, {setting} test nodes"
    console.print(rich_table(title, headers(result), summary_rows(result)))

"""What a person reads after a run: a markdown report, metrics.json, learning curves, a terminal table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.experiment import ExperimentResult, MethodRuns
from distill.io import atomic_write_json, atomic_write_text


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class MethodSummary:
    name: str
    accuracy: list[float]  # last epoch, one per seed
    best_accuracy: list[float]
    agreement: list[float]
    teacher_kl: list[float]
    ece: list[float]
    seconds: list[float]

    @classmethod
    def of(cls, runs: MethodRuns) -> MethodSummary:
        def column(key: str, best: bool = False) -> list[float]:
            rows = [r.result.best if best else r.result.final for r in runs.runs]
            return [row[key] for row in rows if key in row]

        return cls(
            runs.name,
            column("accuracy"),
            column("accuracy", best=True),
            column("agreement"),
            column("teacher_kl"),
            column("ece"),
            [r.result.train_seconds for r in runs.runs],
        )


HEADERS = ["method", "params", "acc % (last)", "acc % (best ep.)", "agree %", "KL(T‖S)", "ECE %", "train s"]


def summary_rows(result: ExperimentResult) -> list[list[str]]:
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
                f"{result.teacher.train_seconds:.1f}",
            ]
        )
    for runs in result.methods:
        s = MethodSummary.of(runs)
        rows.append(
            [
                s.name,
                f"{result.student_parameters:,}",
                _pm(s.accuracy, 100),
                _pm(s.best_accuracy, 100),
                _pm(s.agreement, 100) if s.agreement else "-",
                _pm(s.teacher_kl, 1, 3) if s.teacher_kl else "-",
                _pm(s.ece, 100),
                _pm(s.seconds, 1, 1),
            ]
        )
    return rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _gain_sentence(result: ExperimentResult) -> str:
    """How each method compares with the first one (the baseline), in standard deviations."""
    if len(result.methods) < 2:
        return ""
    base = MethodSummary.of(result.methods[0])
    base_mean, base_std = mean_std(base.accuracy)
    lines = []
    for runs in result.methods[1:]:
        s = MethodSummary.of(runs)
        mean, std = mean_std(s.accuracy)
        gain = 100 * (mean - base_mean)
        spread = 100 * (std + base_std)
        verdict = "larger than" if abs(gain) > spread else "within"
        lines.append(
            f"- {s.name} vs {base.name}: {gain:+.2f} points of accuracy; the combined standard deviation is "
            f"{spread:.2f}, so the difference is {verdict} the seed-to-seed spread."
        )
    return "\n".join(lines) + "\n"


TEACHER_SOURCES = {
    "trained": "trained in this run",
    "cache": "taken from the run cache (its training time is from when it was trained)",
    "checkpoint": "loaded from its checkpoint",
    "offline": "not loaded: the students learnt from its cached top-k targets",
}


def teacher_line(result: ExperimentResult) -> str:
    """The report's line on the teacher: what it is and where it came from."""
    spec, info = result.recipe.teacher, result.teacher
    if spec is None or info is None:
        return ""
    what = f"`{spec.name}` {spec.params}, " if spec.name is not None else ""
    cache = f" (`{spec.cache}`)" if info.source == "offline" else ""
    return f"- Teacher: {what}{info.parameters:,} parameters, {TEACHER_SOURCES[info.source]}{cache}.\n"


def _objective_text(objective: dict[str, Any]) -> str:
    text = f"{objective['weight']} x {objective['name']}{objective['params'] or ''}"
    if objective.get("warmup_epochs"):
        text += f" (weight ramped up over {objective['warmup_epochs']:g} epochs)"
    return text


def write_report(result: ExperimentResult) -> Path:
    """Write report.md, metrics.json and learning_curves.png into the run folder; return the report path."""
    if result.task == "lm":
        from distill.lm.report import write_lm_report

        return write_lm_report(result)
    recipe = result.recipe
    out = result.out_dir
    plot = plot_learning_curves(result, out / "learning_curves.png")
    latency = result.latency
    latency_line = ""
    if "student" in latency:
        batch, student_ms = int(latency["batch"]), 1e3 * latency["student"]
        latency_line = f"- Latency per batch of {batch} on the CPU: student {student_ms:.2f} ms"
        if "teacher" in latency:
            speedup = latency["teacher"] / latency["student"]
            latency_line += f", teacher {1e3 * latency['teacher']:.2f} ms ({speedup:.1f}x faster)"
        latency_line += ".\n"
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
        + markdown_table(HEADERS, summary_rows(result))
        + "\n"
        + _gain_sentence(result)
        + "\nObjectives per method:\n\n"
        + "".join(
            f"- {m.name}: " + ", ".join(_objective_text(o) for o in m.objectives) + "\n"
            for m in result.methods
        )
        + (f"\n![learning curves]({plot.name})\n" if plot else "")
    )
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "metrics.json", metrics_document(result))
    return out / "report.md"


def metrics_document(result: ExperimentResult) -> dict[str, Any]:
    return {
        "recipe": result.recipe.name,
        "data": result.data.description,
        "teacher": None
        if result.teacher is None
        else {
            "parameters": result.teacher.parameters,
            "source": result.teacher.source,
            "metrics": result.teacher.metrics,
            "train_seconds": result.teacher.train_seconds,
        },
        "student_parameters": result.student_parameters,
        "latency_seconds": result.latency,
        "wall_seconds": result.wall_seconds,
        "methods": [
            {
                "name": m.name,
                "objectives": m.objectives,
                "summary": {
                    key: dict(zip(("mean", "std"), mean_std(values), strict=True))
                    for key, values in vars(MethodSummary.of(m)).items()
                    if key != "name"
                },
                "seeds": [
                    {
                        "seed": r.seed,
                        "final": r.result.final,
                        "best": r.result.best,
                        "train_seconds": r.result.train_seconds,
                        "history": r.result.history,
                    }
                    for r in m.runs
                ],
            }
            for m in result.methods
        ],
    }


def plot_learning_curves(result: ExperimentResult, path: Path) -> Path | None:
    """Test accuracy and training loss per epoch: mean over seeds with a band of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for runs in result.methods:
        curves = [[row for row in r.result.history if "accuracy" in row] for r in runs.runs]
        if not curves or not curves[0]:
            continue
        length = min(len(c) for c in curves)
        epochs = np.array([row["epoch"] for row in curves[0][:length]])
        acc = 100 * np.array([[row["accuracy"] for row in c[:length]] for c in curves])
        loss = np.array([[row["train_loss"] for row in c[:length]] for c in curves])
        for ax, values in ((ax_acc, acc), (ax_loss, loss)):
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(epochs, mean, label=runs.name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if result.teacher is not None and "accuracy" in result.teacher.metrics:
        ax_acc.axhline(
            100 * result.teacher.metrics["accuracy"], color="black", ls="--", lw=1, label="teacher"
        )
    ax_acc.set(
        xlabel="epoch", ylabel="test accuracy (%)", title="Student test accuracy (mean ± std over seeds)"
    )
    ax_loss.set(xlabel="epoch", ylabel="training objective", title="Training objective (weighted sum)")
    ax_loss.set_yscale("log")
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_acc.set_ylim(top=100)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def print_table(result: ExperimentResult, console: Console) -> None:
    if result.task == "lm":
        from distill.lm.report import print_lm_table

        return print_lm_table(result, console)
    console.print(
        rich_table(
            f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, test split",
            HEADERS,
            summary_rows(result),
        )
    )


def rich_table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    """A terminal table: the method column left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in rows:
        table.add_row(*row)
    return table

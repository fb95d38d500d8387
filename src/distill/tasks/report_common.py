"""What every task's report shares: the teacher line and the teacher's time, each method against the first
(gain against the seed-to-seed spread), metrics.json, the run's log rows, and learning curves (PNG)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.tables import gain_and_spread, mean_std, noise_verdict
from distill.tasks.regime_report import regime_document
from distill.tasks.results import ExperimentResult, MethodRuns, TeacherInfo


@dataclass
class MethodSummary:
    name: str
    accuracy: list[float]  # last epoch, one per seed
    best_accuracy: list[float]
    agreement: list[float]
    teacher_kl: list[float]
    ece: list[float]
    seconds: list[float]
    f1: list[float] = field(default_factory=list)  # macro F1, last epoch

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
            column("f1"),
        )


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


# The teacher's "train s" cell when it was not trained in this run, and the note under the table saying why.
TEACHER_TIME_CELLS = {"cache": "cached", "offline": "cached", "checkpoint": "loaded"}


def teacher_time_cell(info: TeacherInfo) -> str:
    """Seconds when the teacher trained in this run; else what it was instead (never a bare 0.0)."""
    if info.source == "trained":
        return f"{info.train_seconds:.1f}"
    return TEACHER_TIME_CELLS.get(info.source, "-")


def teacher_time_note(info: TeacherInfo | None) -> str:
    """Why the teacher row shows no time of this run (empty when it trained in this run)."""
    if info is None or info.source == "trained":
        return ""
    if info.source == "cache":
        return (
            f"teacher: cached (trained in an earlier run, {info.train_seconds:.1f} s then; from the run "
            "cache): no teacher training in this run"
        )
    if info.source == "offline":
        return (
            "teacher: cached (its top-k targets were written by `distill cache` in an earlier run): "
            "the teacher was not run here"
        )
    return "teacher: loaded from its checkpoint, not trained in this run"


def method_values(runs: MethodRuns, key: str) -> list[float]:
    """One metric at the last evaluation, one value per seed that has it."""
    return [r.result.final[key] for r in runs.runs if key in r.result.final]


def gain_lines(
    result: ExperimentResult, key: str, what: str, *, scale: float = 1.0, lower_is_better: bool = False
) -> str:
    """Each method against the first one (the baseline) on one metric: the difference of the means, the
    spread (the sum of the two standard deviations over seeds) and the verdict (better, worse or within
    noise; a drop is the gain when lower is better). Empty with one method, or a metric no run has."""
    if len(result.methods) < 2:
        return ""
    base = result.methods[0]
    lines = []
    for runs in result.methods[1:]:
        values, base_values = method_values(runs, key), method_values(base, key)
        if not values or not base_values:
            continue
        gain, spread = gain_and_spread(values, base_values, scale)
        verdict = noise_verdict(-gain if lower_is_better else gain, spread)
        lines.append(
            f"- {runs.name} vs {base.name}: {gain:+.2f} {what}, spread {spread:.2f} (the sum of the two "
            f"standard deviations over seeds): {verdict}."
        )
    return "".join(line + "\n" for line in lines)


def logged_rows(run_dir: Path | None) -> list[dict[str, Any]]:
    """A run's `metrics.jsonl` rows (a torn line skipped); none without a log."""
    path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


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
                **regime_document(m),
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
    lowest = float("inf")
    for runs in result.methods:
        curves = [[row for row in r.result.history if "accuracy" in row] for r in runs.runs]
        if not curves or not curves[0]:
            continue
        length = min(len(c) for c in curves)
        epochs = np.array([row["epoch"] for row in curves[0][:length]])
        acc = 100 * np.array([[row["accuracy"] for row in c[:length]] for c in curves])
        loss = np.array([[row["train_loss"] for row in c[:length]] for c in curves])
        lowest = min(lowest, float(loss.min()))
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
    # Log scale while every objective is positive; some (policy-gradient, preference) go below zero.
    ax_loss.set_yscale("log" if lowest > 0 else "symlog")
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

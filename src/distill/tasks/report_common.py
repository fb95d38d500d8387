"""What every task's report shares: the teacher line, metrics.json, and learning curves (PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.tables import mean_std
from distill.tasks.results import ExperimentResult, MethodRuns


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

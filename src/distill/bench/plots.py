"""The vision benchmark's plots: last-epoch accuracy per method (`accuracy.png`) and test accuracy per epoch
(`learning_curves.png`), one panel per data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.bench.results import BenchResult, dataset_rows
from distill.tables import mean_std


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _colors(count: int) -> list[Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")  # distinct hues; the curves plot adds line styles past ten methods
    return [cmap(i % 10) for i in range(count)]


def plot_accuracy(result: BenchResult, path: Path) -> Path:
    """Last-epoch test accuracy per method (mean, error bar one std over seeds), one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(result.datasets))
    methods = max((len(d.experiment.methods) for d in result.datasets), default=1)
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count, 1.2 + 0.34 * methods), squeeze=False)
    for ax, dataset in zip(axes[0], result.datasets, strict=False):
        rows = dataset_rows(dataset)
        labels = [r.label for r in rows]
        stats = [mean_std([100 * a for a in r.accuracy]) for r in rows]
        y = list(range(len(rows)))[::-1]
        colors = _colors(len(rows))
        for yi, (mean, std), color in zip(y, stats, colors, strict=True):
            ax.errorbar(mean, yi, xerr=std, fmt="o", color=color, ecolor=color, capsize=4, ms=6, lw=1.5)
            ax.annotate(
                f"{mean:.1f} ± {std:.1f}",
                (mean + std, yi),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="dimgrey",
            )
        notes = []
        if stats:
            base = stats[0][0]
            ax.axvline(base, color="grey", ls=":", lw=1)
            notes.append(f"student alone {base:.1f} (dotted)")
        teacher = dataset.experiment.teacher
        if teacher is not None and "accuracy" in teacher.metrics:
            acc = 100 * teacher.metrics["accuracy"]
            ax.axvline(acc, color="black", ls="--", lw=1)
            notes.append(f"teacher {acc:.1f} (dashed)")
        ax.set_yticks(y, labels)
        ax.set_xlabel("test top-1 accuracy, last epoch (%)")
        ax.margins(x=0.12)
        seeds = len(dataset.recipe.seeds)
        ax.set_title(
            f"{dataset.recipe.name}: mean ± std over {seeds} seed{'s' if seeds > 1 else ''}\n"
            + ", ".join(notes),
            fontsize=9,
        )
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_curves(result: BenchResult, path: Path) -> Path:
    """Test accuracy per epoch (mean over seeds) for every method, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    count = max(1, len(result.datasets))
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count + 2.4, 4.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, dataset in zip(axes[0], result.datasets, strict=False):
        runs_list = dataset.experiment.methods
        colors = _colors(len(runs_list))
        styles = ["-", "--", "-.", ":"]
        for index, (runs, color) in enumerate(zip(runs_list, colors, strict=True)):
            curves = [[row for row in r.result.history if "accuracy" in row] for r in runs.runs]
            if not curves or not all(curves):
                continue
            length = min(len(c) for c in curves)
            epochs = np.array([row["epoch"] for row in curves[0][:length]])
            acc = 100 * np.array([[row["accuracy"] for row in c[:length]] for c in curves])
            (line,) = ax.plot(
                epochs,
                acc.mean(0),
                color=color,
                ls=styles[(index // 10) % len(styles)],
                lw=2.4 if index == 0 else 1.3,
                marker="o" if len(epochs) < 12 else None,
                ms=3,
            )
            handles.setdefault(runs.name, line)
        teacher = dataset.experiment.teacher
        title = dataset.recipe.name
        if teacher is not None and "accuracy" in teacher.metrics:
            line = ax.axhline(100 * teacher.metrics["accuracy"], color="black", ls="--", lw=1)
            handles.setdefault("teacher", line)
            title += f" (teacher {100 * teacher.metrics['accuracy']:.1f}%)"
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        lows = []
        for runs in runs_list:
            for r in runs.runs:
                evaluated = [row for row in r.result.history if "accuracy" in row]
                skip = len(evaluated) // 4 if len(evaluated) >= 6 else 0  # zoom past the first quarter
                lows += [100 * row["accuracy"] for row in evaluated[skip:]]
        if lows:  # where the methods differ (the teacher's line shows only when it falls in range)
            ax.set_ylim(max(0.0, min(lows) - 2), min(100.5, max(lows) + 2))
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        title="mean over seeds",
    )
    fig.tight_layout()
    _save(fig, path)
    return path

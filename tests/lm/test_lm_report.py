"""The language-model report: learning curves by optimizer step (a one-epoch run has one evaluation, and
still a curve), each method against the first (gain against the seed spread), and a teacher that was not
trained in this run said so, never shown as 0.0 s. Built from hand-made results: nothing trains here."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from distill.recipe.load import recipe_from_dict
from distill.tasks.causal_lm_report import _band, _eval_points, _train_points, print_lm_table, write_lm_report
from distill.tasks.report_common import teacher_time_cell
from distill.tasks.results import ExperimentResult, MethodRuns, SeedRun, TeacherInfo
from distill.train import FitResult

TEACHER_METRICS = {"perplexity": 4.0, "loss": 1.386, "accuracy": 0.5}


def _fit(run_dir: Path, perplexity: float, losses: list[float]) -> FitResult:
    """A one-epoch run of len(losses) optimizer steps, logged every step, evaluated once at its end."""
    run_dir.mkdir(parents=True)
    rows = [{"kind": "train", "step": i + 1, "epoch": 0, "loss": loss} for i, loss in enumerate(losses)]
    final = {
        "kind": "eval",
        "step": len(losses),
        "epoch": 1,
        "train_loss": sum(losses) / len(losses),
        "perplexity": perplexity,
        "loss": 1.0,
        "accuracy": 0.4,
        "teacher_kl": 0.2,
        "agreement": 0.6,
        "tokens_per_second": 900.0,
    }
    lines = [json.dumps(row) for row in [*rows, final]] + ['{"torn']  # a torn last line is skipped
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return FitResult(
        final=final, best=final, history=[final], train_seconds=2.0, steps=len(losses), run_dir=run_dir
    )


def _result(tmp_path: Path, teacher_source: str = "trained") -> ExperimentResult:
    recipe = recipe_from_dict(
        {
            "name": "lm-report",
            "data": {"name": "jsonl"},
            "teacher": {"name": "hf"},
            "student": {"name": "hf"},
            "methods": [
                {"name": "forward KL", "objectives": [{"name": "forward_kl"}]},
                {"name": "reverse KL", "objectives": [{"name": "reverse_kl"}]},
            ],
            "seeds": [0, 1],
        }
    )
    perplexities = {"forward KL": (9.0, 9.2), "reverse KL": (6.0, 6.1)}
    methods = []
    for name, values in perplexities.items():
        runs = [
            SeedRun(seed, _fit(tmp_path / name / str(seed), ppl, [3.0, 2.5, 2.2, 2.0 + seed / 10]))
            for seed, ppl in enumerate(values)
        ]
        methods.append(MethodRuns(name, [{"name": name.replace(" ", "_").lower(), "weight": 1.0}], runs))
    seconds = 0.0 if teacher_source == "offline" else 97.0
    return ExperimentResult(
        recipe=recipe,
        out_dir=tmp_path,
        data=SimpleNamespace(description="tiny additions"),
        teacher=TeacherInfo(teacher_source, 1000, TEACHER_METRICS, seconds, []),
        student_parameters=100,
        methods=methods,
        latency={},
        wall_seconds=5.0,
        task="causal_lm",
    )


def test_curves_are_drawn_by_optimizer_step_even_for_one_epoch(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = _result(tmp_path)
    fits = [run.result for run in result.methods[0].runs]
    assert _train_points(fits[0]) == [(1, 3.0), (2, 2.5), (3, 2.2), (4, 2.0)]
    assert _eval_points(fits[0], "perplexity") == [(4, 9.0)]
    fig, ax = plt.subplots()
    _band(ax, [_train_points(fit) for fit in fits], "loss")
    _band(ax, [_eval_points(fit, "perplexity") for fit in fits], "perplexity")
    loss, ppl = ax.lines
    assert list(loss.get_xdata()) == [1, 2, 3, 4] and loss.get_ydata()[-1] == pytest.approx(2.05)
    assert list(ppl.get_xdata()) == [4] and ppl.get_marker() == "o"  # one evaluation: a visible point
    plt.close(fig)
    # A run too short to log a training row: its epochs' means, at their steps.
    bare = FitResult(final={}, best={}, history=[{"step": 4, "train_loss": 2.5}], run_dir=None)
    assert _train_points(bare) == [(4, 2.5)]


def test_the_report_compares_methods_and_writes_the_curves(tmp_path: Path) -> None:
    report = write_lm_report(_result(tmp_path)).read_text()
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    assert (
        "- reverse KL vs forward KL: -3.05 perplexity (lower is better), spread 0.21 (the sum of the two "
        "standard deviations over seeds): better." in report
    )
    assert "| teacher | 1,000 | 4.00 | 1.386 | 50.00 | - | - | - | 97.0 |" in report
    assert "'-': measured for students" in report and "cached" not in report


@pytest.mark.parametrize(
    ("source", "cell", "said"),
    [
        ("cache", "cached", "cached (trained in an earlier run, 97.0 s then"),
        ("offline", "cached", "top-k targets were written by `distill cache` in an earlier run"),
    ],
)
def test_a_teacher_not_trained_here_says_so(tmp_path: Path, source: str, cell: str, said: str) -> None:
    result = _result(tmp_path, source)
    assert teacher_time_cell(result.teacher) == cell
    report = write_lm_report(result).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| teacher |"))
    assert row.endswith(f"| - | - | - | {cell} |") and said in report  # never 0.0 s
    console = Console(record=True, width=200)
    print_lm_table(result, console)
    assert said in console.export_text()

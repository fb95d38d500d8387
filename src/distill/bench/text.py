"""`distill bench text`: text-classification distillation with encoders over methods x seeds.

A suite is a list of packaged recipes (`distill/recipes/bench_text_*.yaml`); unlike the vision bench, each
recipe names its own methods (the encoder objectives need per-method parameters). Each runs through
`run_recipe` (the path of `distill run`, so each data set gets its report.md in a sub-folder; the frozen
teacher's logits are memoised for methods without feature objectives), then `results.md` / `results.json`
gather every data set: macro F1 (the headline: labels are imbalanced), accuracy, agreement, ECE, each
method against the student alone and against KD (better, worse or within noise), the latency of student and
teacher at batch 1 and 64, and the issue's goals answered from the numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.bench.memo import MemoizedTeacher
from distill.bench.runner import check_bench_folder, run_bench_recipe
from distill.errors import UserError
from distill.io import atomic_write_json, atomic_write_text
from distill.recipe.check import check_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.overrides import merge
from distill.recipe.schema import Recipe
from distill.registry import nearest
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, rich_table
from distill.tasks.classification_report import headers, latency_lines, summary_rows
from distill.tasks.report_common import method_values, metrics_document
from distill.tasks.results import ExperimentResult

TEXT_SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("bench_text_quick",),
    "standard": ("bench_text_sms_spam", "bench_text_fortunes"),
}
BASELINE, KD = "student alone", "KD"
KEEP_F1, SPEED_UP = 0.97, 3.0  # the goals: >= 97% of the teacher's F1, >= 3x faster


@dataclass
class TextBench:
    suite: str
    out_dir: Path
    command: str
    results: list[ExperimentResult]
    wall_seconds: float


def text_suite_recipes(
    suite: str,
    *,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
    only: list[str] | None = None,
) -> list[Recipe]:
    """The suite's recipes (or `only` those of these packaged names), with `seeds` 0..N-1 and `overrides`."""
    if suite not in TEXT_SUITES:
        hint = nearest(suite, list(TEXT_SUITES))
        raise UserError(
            f"--suite: unknown suite '{suite}'"
            + (f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(TEXT_SUITES)}")
        )
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds: need at least 1, got {seeds}")
    unknown = sorted(set(only or []) - set(TEXT_SUITES[suite]))
    if unknown:
        raise UserError(
            f"suite '{suite}' has no recipe '{unknown[0]}'; it has {', '.join(TEXT_SUITES[suite])}"
        )
    recipes = []
    for name in TEXT_SUITES[suite]:
        if only is not None and name not in only:
            continue
        data = merge(parse_yaml(builtin_recipe_text(name), name), overrides or {})
        if seeds is not None:
            data["seeds"] = list(range(seeds))
        recipe = recipe_from_dict(data, name)
        check_recipe(recipe, name)
        recipes.append(recipe)
    return recipes


def run_text_bench(
    suite: str = "quick",
    *,
    out: Path | None = None,
    seeds: int | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    console: Console | None = None,
    command: str = "",
    only: list[str] | None = None,
) -> TextBench:
    """Run every recipe of `suite` and write `results.md` / `results.json` into `out`."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    recipes = text_suite_recipes(suite, seeds=seeds, overrides=overrides, only=only)
    out_dir = Path(out) if out is not None else default_out(suite)
    check_bench_folder(out_dir, [r.name for r in recipes], resume)
    results = []
    for recipe in recipes:
        results.append(run_bench_recipe(recipe, out_dir, resume, progress, console, MemoizedTeacher))
    bench = TextBench(
        suite,
        out_dir,
        command or f"distill bench text --suite {suite}",
        results,
        time.perf_counter() - started,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results_document(bench))
    atomic_write_text(out_dir / "results.md", results_markdown(bench))
    return bench


def default_out(suite: str) -> Path:
    return Path("runs") / f"bench-text-{suite}" / datetime.now().strftime("%Y%m%d-%H%M%S")


def method_f1(result: ExperimentResult, name: str) -> list[float]:
    runs = next((m for m in result.methods if m.name == name), None)
    return method_values(runs, "f1") if runs is not None else []


def gain_cell(values: list[float], base: list[float]) -> str:
    if not values or not base:
        return "-"
    gain, spread = gain_and_spread(values, base, 100)
    return f"{gain:+.2f} ({noise_verdict(gain, spread)}; spread {spread:.2f})"


GAIN_HEADERS = ["method", "F1 % (macro)", "vs student alone", "vs KD"]


def gain_rows(result: ExperimentResult) -> list[list[str]]:
    base, kd = method_f1(result, BASELINE), method_f1(result, KD)
    rows = []
    for runs in result.methods:
        values = method_values(runs, "f1")
        mean, std = mean_std(values)
        rows.append(
            [
                runs.name,
                f"{100 * mean:.2f} ± {100 * std:.2f}",
                gain_cell(values, base) if runs.name != BASELINE else "-",
                gain_cell(values, kd) if runs.name not in {BASELINE, KD} else "-",
            ]
        )
    return rows


def goal_lines(result: ExperimentResult) -> list[str]:
    """The issue's goals for this data set, answered from the numbers."""
    lines = []
    teacher = result.teacher.metrics.get("f1") if result.teacher is not None else None
    means = {m.name: mean_std(method_values(m, "f1"))[0] for m in result.methods}
    if teacher and means:
        best = max(means, key=lambda name: means[name])
        kept = means[best] / teacher
        lines.append(
            f"- F1 kept: the best method ({best}) reaches {100 * means[best]:.2f} against the teacher's "
            f"{100 * teacher:.2f}, {100 * kept:.1f}% of it: the >= {100 * KEEP_F1:.0f}% goal is "
            f"{'met' if kept >= KEEP_F1 else 'not met'}."
        )
    latency = result.latency
    if "teacher" in latency and "teacher_b1" in latency:
        at_batch = latency["teacher"] / latency["student"]
        at_one = latency["teacher_b1"] / latency["student_b1"]
        met = "met" if min(at_batch, at_one) >= SPEED_UP else "not met"
        lines.append(
            f"- Speed: the student is {at_one:.1f}x faster than the teacher at batch 1 and {at_batch:.1f}x "
            f"at batch {int(latency['batch'])} (CPU, median of 20 calls): the >= {SPEED_UP:.0f}x goal is "
            f"{met}; "
            f"{result.teacher.parameters / result.student_parameters:.1f}x fewer parameters."
            if result.teacher is not None
            else ""
        )
    lelp, kd = method_f1(result, "LELP"), method_f1(result, KD)
    if lelp and kd:
        gain, spread = gain_and_spread(lelp, kd, 100)
        verdict = noise_verdict(gain, spread)
        claim = {"better": "reproduced", "within noise": "within noise", "worse": "not reproduced"}.get(
            verdict, "-"
        )
        lines.append(
            f"- S17 (LELP >= KD on few-class tasks): LELP - KD = {gain:+.2f} points of macro F1 (spread "
            f"{spread:.2f}): {verdict}; the claim is {claim} here."
        )
    return [line for line in lines if line]


def dataset_section(result: ExperimentResult) -> str:
    recipe = result.recipe
    teacher = result.teacher
    return (
        f"## {recipe.name}\n\n{recipe.description}\n\n"
        f"- Data: {result.data.description}.\n"
        + (
            f"- Teacher: `{recipe.teacher.name}` {recipe.teacher.params}, {teacher.parameters:,} parameters "
            f"({teacher.source}).\n"
            if recipe.teacher is not None and teacher is not None
            else ""
        )
        + f"- Student: `{recipe.student.name}` {recipe.student.params}, {result.student_parameters:,} "
        f"parameters. Seeds {recipe.seeds}; cells are mean ± std over seeds on the test split, last epoch.\n"
        + latency_lines(result.latency)
        + "\n"
        + markdown_table(headers(True), summary_rows(result, True))
        + "\nMacro F1 against the student alone and against KD (points; better / worse when the gain is "
        "beyond the spread, the sum of the two standard deviations over seeds, else within noise):\n\n"
        + markdown_table(GAIN_HEADERS, gain_rows(result))
        + "\n"
        + "".join(line + "\n" for line in goal_lines(result))
    )


def results_markdown(bench: TextBench) -> str:
    return (
        f"# Text classification benchmark ({bench.suite})\n\n"
        f"`{bench.command}`, {datetime.now():%Y-%m-%d}, {bench.wall_seconds / 60:.1f} min in all.\n\n"
        + "\n".join(dataset_section(result) for result in bench.results)
    )


def results_document(bench: TextBench) -> dict[str, Any]:
    return {
        "suite": bench.suite,
        "command": bench.command,
        "wall_seconds": bench.wall_seconds,
        "datasets": {r.recipe.name: metrics_document(r) for r in bench.results},
    }


def print_text_results(bench: TextBench, console: Console) -> None:
    for result in bench.results:
        title = f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, test split"
        console.print(rich_table(title, headers(True), summary_rows(result, True)))
    console.print(f"results: {bench.out_dir / 'results.md'} ({bench.wall_seconds / 60:.1f} min)")

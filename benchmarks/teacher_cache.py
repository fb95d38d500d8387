"""Teacher cache benchmark: bytes per sample / token for k in {1, 8, 32, 128, full}, student quality from the
cache vs the live teacher (forward KL, mean ± std over seeds), and training step time with each.

Tasks: the vision quickstart (digits: 10 classes, so any k >= 10 is the full distribution) and the
`lm_shakespeare` language-model task (vocabulary 1,024). Every student run of a task uses the same teacher,
data, seeds and budget; only where the teacher's targets come from differs.

    python benchmarks/teacher_cache.py            # lm_shakespeare as packaged, 3 seeds
    python benchmarks/teacher_cache.py --quick    # small LM, 2 seeds (CI smoke)

A full run writes benchmarks/results/teacher_cache.md; --quick writes teacher_cache_quick.md and a subset of
--tasks or another number of --seeds teacher_cache_partial.md, never over the full run's file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.build_cache import make_cache
from distill.cache import TeacherCache
from distill.experiment import ExperimentResult, run_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.tables import markdown_table, pm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)
from lm import QUICK, merged  # noqa: E402  (the LM benchmark's quick overrides)

# (top-k, tail draws): k None is the full distribution; draws replace the tail bucket by samples of the tail
CACHES: tuple[tuple[int | None, int], ...] = ((1, 0), (8, 0), (32, 0), (128, 0), (None, 0), (16, 16))
TRAINED = ((8, 0), (32, 0), (128, 0), (16, 16))  # students trained from these caches (and the live teacher)


def label(k: int | None, draws: int) -> str:
    return ("full" if k is None else f"top-{k}") + (f" + {draws} tail draws" if draws else "")


def recipe_dict(task: str, quick: bool, seeds: list[int], out: Path) -> dict[str, Any]:
    name = "quickstart" if task == "vision" else "lm_shakespeare"
    data = parse_yaml(builtin_recipe_text(name), name)
    if quick and task == "lm":
        data = merged(data, QUICK["shakespeare"])
    data["methods"] = [{"name": "forward KL", "objectives": [{"name": "forward_kl"}]}]
    data["seeds"] = seeds
    data["evaluation"] = {"latency": False}
    data["output"] = {"dir": str(out), "tensorboard": False}
    return data


def with_cache(data: dict[str, Any], cache: Path, out: Path) -> dict[str, Any]:
    return data | {"teacher": {"cache": str(cache)}, "output": {"dir": str(out), "tensorboard": False}}


def seconds_per_step(result: ExperimentResult) -> list[float]:
    return [run.result.train_seconds / max(1, run.result.steps) for run in result.methods[0].runs]


def quality(result: ExperimentResult, task: str) -> list[float]:
    key = "accuracy" if task == "vision" else "perplexity"
    scale = 100.0 if task == "vision" else 1.0
    return [scale * run.result.final[key] for run in result.methods[0].runs]


def run_task(task: str, quick: bool, seeds: list[int], tmp: Path, console: Console) -> str:
    base = recipe_dict(task, quick, seeds, tmp / f"{task}-live")
    live_recipe = recipe_from_dict(base)
    unit = "sample" if task == "vision" else "token"
    size_rows, caches = [], {}
    for k, draws in CACHES:
        folder = tmp / f"{task}-cache-{k or 'full'}-{draws}"
        started = time.perf_counter()
        manifest = make_cache(live_recipe, folder, k=k, tail_draws=draws, progress=False, console=console)
        seconds = time.perf_counter() - started
        rows = sum(s["rows"] for s in manifest["shards"])
        logit_bytes = sum((folder / s["file"]).stat().st_size for s in manifest["shards"])
        caches[k, draws] = folder
        size_rows.append(
            [
                label(k, draws),
                str(manifest["k"]),
                f"{rows:,}",
                f"{logit_bytes / rows:,.1f}",
                f"{6 * manifest['k'] + 8:,}",
                f"{logit_bytes / 2**10:,.1f}",
                f"{seconds:.1f}",
            ]
        )
    live = run_recipe(live_recipe, progress=False, console=console)
    live_q, live_step = quality(live, task), seconds_per_step(live)
    metric = "accuracy %" if task == "vision" else "val perplexity"
    digits = 2
    quality_rows = [["live teacher", pm(live_q, digits=digits), "-", pm(live_step, 1e3), "1.00"]]
    trained: set[str] = set()
    full = TeacherCache(caches[None, 0]).k
    for k, draws in TRAINED:
        cache = TeacherCache(caches[k, draws])
        if cache.manifest["targets"] in trained:  # k beyond the class count is the same cache again
            continue
        trained.add(cache.manifest["targets"])
        cached = run_recipe(
            recipe_from_dict(with_cache(base, caches[k, draws], tmp / f"{task}-from-{k}-{draws}")),
            progress=False,
            console=console,
        )
        q, step = quality(cached, task), seconds_per_step(cached)
        gap = statistics.mean(q) - statistics.mean(live_q)
        gap_text = (
            f"{gap:+.2f} points" if task == "vision" else f"{100 * gap / statistics.mean(live_q):+.2f} %"
        )
        quality_rows.append(
            [
                f"cache {label(min(k, full), draws)}" + (" (= full)" if k >= full else ""),
                pm(q, digits=digits),
                gap_text,
                pm(step, 1e3),
                f"{statistics.mean(live_step) / statistics.mean(step):.2f}",
            ]
        )
    teacher = live.teacher
    notes = [
        f"- Recipe: `{'quickstart' if task == 'vision' else 'lm_shakespeare'}`"
        + (" with the LM benchmark's --quick overrides" if quick and task == "lm" else "")
        + f", one method (forward KL), seeds {seeds}; {live.data.description}.",
        f"- Teacher: {teacher.parameters:,} parameters ({teacher.source})." if teacher else "",
        f"- Logit bytes per {unit}: the shard files (ids int32, log-probs float16, tail float32, offsets) "
        "over the rows they hold; the goal is at most 6 k + 8 (k = the slots stored).",
        "- cache s: writing the cache, the teacher's forward passes included (the first row also trains "
        "the teacher once, unless $DISTILL_CACHE already holds it).",
        "- Step time: training seconds per optimizer step (evaluation excluded); speed-up = live / cache.",
    ]
    return (
        f"## {task}\n\n"
        + "\n".join(n for n in notes if n)
        + "\n\n"
        + markdown_table(
            ["cache", "slots stored", f"rows ({unit}s)", f"bytes / {unit}", "goal 6k+8", "KiB", "cache s"],
            size_rows,
        )
        + "\n\n"
        + markdown_table(["targets", metric, "vs live", "ms / step", "speed-up"], quality_rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small LM and 2 seeds")
    parser.add_argument("--tasks", default="vision,lm")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("teacher_cache"))
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    seeds, out = seeds_and_file(parser, args, "teacher_cache", args.tasks, ("vision", "lm"))
    load_start, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-bench-cache-") as tmp:
        sections = [run_task(task, args.quick, seeds, Path(tmp), console) for task in args.tasks.split(",")]
    total = time.perf_counter() - started
    command = command_line("teacher_cache", argv)
    text = (
        "# Teacher cache benchmark\n\n"
        f"Command: `{command}` ({os.cpu_count()} CPU cores); total wall time {total:.0f} s; 1-minute load "
        f"average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above 2: the cores "
        "were shared, times are noisier).\n\n" + "\n\n".join(sections) + "\n"
    )
    write_results(out, text)
    console.print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

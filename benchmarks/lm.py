"""Language-model distillation benchmark: two tasks, seven ways to train the same small student.

- `shakespeare`: tiny-shakespeare (../shared/data/text), a byte-level BPE trained on its training split,
  a Llama-style teacher trained on it (cached in $DISTILL_CACHE, its one-off time reported), a student about
  10x smaller. Metrics per held-out token: perplexity, KL(teacher || student), top-1 agreement.
- `arithmetic`: synthetic multi-digit additions with a digit-by-digit scratchpad; exact match of the
  student's greedy answer.

Rows: the student from scratch (CE), forward KL, reverse KL, JSD(0.5), TAID, AdaKD over forward KL,
sequence-level KD (CE on the teacher's completions). Every row trains on the same number of counted tokens
(same sequences, same epochs; the teacher's completions have the length of the originals). Cells are
mean ± std over seeds at the last epoch.

    python benchmarks/lm.py            # the default run (3 seeds) -> benchmarks/results/lm.md
    python benchmarks/lm.py --quick    # CI: smaller models and data, 2 seeds, under 3 minutes on 2 cores
                                       # -> benchmarks/results/lm_quick.md (never over lm.md)

A subset of --tasks or another number of --seeds writes lm_partial.md (`benchmarks/_results.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.experiment import run_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.schema import Recipe
from distill.tables import markdown_table
from distill.tasks.causal_lm_report import headers, summary_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

# The default runs are the packaged recipes `lm_shakespeare` and `lm_arithmetic`; `--quick` shrinks models,
# data and epochs with these overrides (merged key by key into the recipe).
TASKS = {"shakespeare": "lm_shakespeare", "arithmetic": "lm_arithmetic"}
QUICK_STUDENT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}
QUICK: dict[str, dict[str, Any]] = {
    "shakespeare": {
        "data": {
            "params": {
                "tokenizer": {"bpe": {"vocab_size": 512}},
                "max_length": 64,
                "prompt_tokens": 16,
                "max_train_examples": 300,
                "max_test_examples": 40,
            }
        },
        "teacher": {
            "params": {
                "config": {
                    "hidden_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 256,
                    "max_position_embeddings": 64,
                }
            },
            "train": {"epochs": 4},
        },
        "student": {"params": {"config": QUICK_STUDENT | {"max_position_embeddings": 64}}},
        "trainer": {"epochs": 2},
    },
    "arithmetic": {
        "data": {"params": {"digits": 2, "train_examples": 1500, "test_examples": 100}},
        "teacher": {
            "params": {"config": {"hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 192}},
            "train": {"epochs": 6},
        },
        "student": {"params": {"config": QUICK_STUDENT}},
        "trainer": {"epochs": 3},
    },
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, mapping by mapping (a non-mapping value replaces)."""
    out = dict(base)
    for key, value in changes.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_maps else value
    return out


def task_recipe(task: str, quick: bool, seeds: list[int]) -> Recipe:
    data = parse_yaml(builtin_recipe_text(TASKS[task]), TASKS[task])
    if quick:
        data = merged(data, QUICK[task] | {"name": data["name"] + "-quick"})
    return recipe_from_dict(data | {"seeds": seeds}, TASKS[task])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models and data, 2 seeds (CI)")
    parser.add_argument("--tasks", default="shakespeare,arithmetic")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("lm"))
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    seeds, out = seeds_and_file(parser, args, "lm", args.tasks, TASKS)
    command = command_line("lm", argv)
    sections = []
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-bench-lm-") as tmp:
        for task in args.tasks.split(","):
            recipe = task_recipe(task, args.quick, seeds)
            task_started = time.perf_counter()
            result = run_recipe(recipe, out=Path(tmp) / task, progress=False, console=console)
            wall = time.perf_counter() - task_started
            teacher = result.teacher
            generation = next(iter(result.extra.get("generations", {}).values()), None)
            notes = [
                f"- Data: {result.data.description}.",
                f"- Teacher: {teacher.parameters:,} parameters, {teacher.source}"
                + (f" (trained in {teacher.train_seconds:.0f} s, once; cached after)" if teacher else ""),
                f"- Student: {result.student_parameters:,} parameters "
                f"({teacher.parameters / result.student_parameters:.1f}x fewer).",
                f"- Seeds {seeds}; {recipe.trainer.epochs} epochs per method over the same sequences "
                f"(equal token budget); last epoch; wall time of the task {wall:.0f} s.",
            ]
            if generation:
                notes.append(
                    "- Sequence-level KD: teacher generations "
                    f"{'from the cache' if generation['cached'] else 'made'} "
                    f"in {generation['seconds']:.1f} s "
                    "(not counted in the student's tokens/s)."
                )
            sections.append(
                f"## {task}\n\n"
                + "\n".join(notes)
                + "\n\n"
                + markdown_table(headers(result), summary_rows(result))
            )
            console.print(sections[-1])
    total = time.perf_counter() - started
    load_end = os.getloadavg()[0]
    text = (
        "# Language-model distillation benchmark\n\n"
        f"Command: `{command}` ({os.cpu_count()} CPU cores, torch threads 2); total wall time {total:.0f} s; "
        f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end (above 2 means "
        "other work shared the cores, which lowers tokens/s and raises the wall times).\n\n"
        "Perplexity, cross-entropy, token accuracy, KL(teacher ‖ student) and top-1 agreement are per "
        "counted token of the held-out split; exact match compares the greedy answer after `####`; "
        "train tok/s counts the counted training tokens per second of training (teacher forward "
        "included).\n\n" + "\n".join(sections)
    )
    write_results(out, text)
    console.print(f"wrote {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

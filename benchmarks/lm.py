"""Language-model distillation benchmark: two tasks, seven ways to train the same small student.

- `shakespeare`: tiny-shakespeare (../shared/data/text), a byte-level BPE trained on its training split,
  a Llama-style teacher trained on it (cached in $DISTILL_CACHE, its one-off time reported), a student about
  8x smaller. Metrics per held-out token: perplexity, KL(teacher || student), top-1 agreement.
- `arithmetic`: synthetic multi-digit additions with a digit-by-digit scratchpad; exact match of the
  student's greedy answer.

Rows: the student from scratch (CE), forward KL, reverse KL, JSD(0.5), TAID, AdaKD over forward KL,
sequence-level KD (CE on the teacher's completions). Every row trains on the same number of counted tokens
(same sequences, same epochs; the teacher's completions have the length of the originals). Cells are
mean ± std over seeds at the last epoch.

    python benchmarks/lm.py            # the default run (3 seeds)
    python benchmarks/lm.py --quick    # CI: smaller models and data, 2 seeds, under 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.experiment import run_recipe
from distill.lm.report import headers, summary_rows
from distill.objectives import OBJECTIVES
from distill.recipe.schema import Recipe
from distill.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, positions: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": positions,
        "tie_word_embeddings": False,
    }


def methods(seqkd: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"name": "student alone (CE)", "objectives": [{"name": "cross_entropy"}]},
        {"name": "forward KL", "objectives": [{"name": "forward_kl"}]},
        {"name": "reverse KL", "objectives": [{"name": "reverse_kl"}]},
        {"name": "JSD(0.5)", "objectives": [{"name": "generalized_jsd", "params": {"beta": 0.5}}]},
        {"name": "TAID", "objectives": [{"name": "taid"}]},
    ]
    if "adakd" in OBJECTIVES:
        rows.append(
            {
                "name": "AdaKD (forward KL)",
                "objectives": [{"name": "adakd", "params": {"base": "forward_kl"}}],
            }
        )
    rows.append(
        {
            "name": "sequence-level KD",
            "objectives": [{"name": "cross_entropy"}],
            "source": {"name": "teacher_generations", "params": seqkd},
        }
    )
    return rows


def shakespeare_recipe(quick: bool, seeds: list[int]) -> dict[str, Any]:
    length = 64 if quick else 128
    teacher = llama(128, 2, 4, 2, 256, length) if quick else llama(256, 4, 8, 4, 688, length)
    student = llama(32, 1, 2, 1, 64, length) if quick else llama(96, 2, 4, 2, 256, length)
    return {
        "name": "bench-lm-shakespeare" + ("-quick" if quick else ""),
        "description": "tiny-shakespeare, BPE on the training split; teacher -> 8x smaller student",
        "data": {
            "name": "text",
            "params": {
                "path": str(SHAKESPEARE),
                "tokenizer": {"bpe": {"vocab_size": 512 if quick else 1024}},
                "max_length": length,
                "test_fraction": 0.1,
                "prompt_tokens": length // 4,
                "max_new_tokens": 32,
                "max_train_examples": 300 if quick else 1500,
                "max_test_examples": 40 if quick else 150,
            },
            "batch_size": 16,
            "eval_batch_size": 32,
        },
        "teacher": {
            "name": "hf",
            "params": {"config": teacher},
            "train": {"epochs": 4 if quick else 6, "optimizer": {"lr": 0.003}},
        },
        "student": {"name": "hf", "params": {"config": student}},
        "methods": methods({"do_sample": True, "temperature": 1.0, "seed": 0}),
        "optimizer": {"lr": 0.003},
        "schedule": {"name": "cosine", "warmup_epochs": 0.1},
        "trainer": {"epochs": 2 if quick else 3, "threads": 2, "eval_every": 100, "log_every": 50},
        "seeds": seeds,
        "evaluation": {"latency": False},
        "output": {"tensorboard": False},
    }


def arithmetic_recipe(quick: bool, seeds: list[int]) -> dict[str, Any]:
    teacher = llama(96, 2, 4, 2, 192, 64) if quick else llama(128, 4, 4, 2, 256, 64)
    student = llama(32, 1, 2, 1, 64, 64) if quick else llama(48, 2, 4, 2, 96, 64)
    return {
        "name": "bench-lm-arithmetic" + ("-quick" if quick else ""),
        "description": "multi-digit additions with a scratchpad; exact match of greedy answers",
        "data": {
            "name": "arithmetic",
            "params": {
                "digits": 2 if quick else 3,
                "train_examples": 1500 if quick else 4000,
                "test_examples": 100 if quick else 200,
                "tokenizer": {"bpe": {"vocab_size": 300}},
            },
            "batch_size": 32,
            "eval_batch_size": 64,
        },
        "teacher": {
            "name": "hf",
            "params": {"config": teacher},
            "train": {"epochs": 6 if quick else 12, "optimizer": {"lr": 0.003}},
        },
        "student": {"name": "hf", "params": {"config": student}},
        "methods": methods({"do_sample": False}),
        "optimizer": {"lr": 0.003},
        "schedule": {"name": "cosine", "warmup_epochs": 0.1},
        "trainer": {"epochs": 3 if quick else 6, "threads": 2, "eval_every": 100, "log_every": 50},
        "seeds": seeds,
        "evaluation": {"latency": False},
        "output": {"tensorboard": False},
    }


TASKS = {"shakespeare": shakespeare_recipe, "arithmetic": arithmetic_recipe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models and data, 2 seeds (CI)")
    parser.add_argument("--tasks", default="shakespeare,arithmetic")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm.md")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    command = "python benchmarks/lm.py" + (" --quick" if args.quick else "")
    if args.tasks != "shakespeare,arithmetic":
        command += f" --tasks {args.tasks}"
    sections = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-bench-lm-") as tmp:
        for task in args.tasks.split(","):
            recipe = Recipe.model_validate(TASKS[task](args.quick, seeds))
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
            if "adakd" not in OBJECTIVES:
                notes.append("- AdaKD is not registered in this build: its row is skipped.")
            sections.append(
                f"## {task}\n\n"
                + "\n".join(notes)
                + "\n\n"
                + markdown_table(headers(result), summary_rows(result))
            )
            console.print(sections[-1])
    total = time.perf_counter() - started
    text = (
        "# Language-model distillation benchmark\n\n"
        f"Command: `{command}` (2 shared CPU cores, torch threads 2); total wall time {total:.0f} s.\n\n"
        "Perplexity, cross-entropy, token accuracy, KL(teacher ‖ student) and top-1 agreement are per "
        "counted token of the held-out split; exact match compares the greedy answer after `####`; "
        "train tok/s counts the counted training tokens per second of training (teacher forward "
        "included).\n\n" + "\n".join(sections)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    console.print(f"wrote {args.out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

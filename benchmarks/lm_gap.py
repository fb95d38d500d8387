"""Large teacher-student gap (S24, TAID): one small student, teachers of growing size, four ways to distil.

TAID (Shing et al., ICLR 2025) claims its interpolated target stays useful when the teacher is much larger
than the student, where plain KL distillation degrades. Here one Llama-style student (about 36k parameters)
learns on tiny-shakespeare from each of four teachers (about 63k to 2.0M parameters, 32x), each trained
briefly with cross-entropy on the same blocks (cached in `$DISTILL_CACHE` by the teacher store). At every
gap the student trains with forward KL, TAID (its defaults: t from 0.4 to 1, adaptive), reverse KL and
sequence-level KD (cross-entropy on the teacher's sampled continuations of the same prompts, the originals'
length); the student from scratch (cross-entropy on the data) is the reference line. Every row trains on the
same number of counted tokens; the student's held-out cross-entropy (nats per token, the last 10 % of the
text) is read at the end. Each teacher size is one `distill.experiment.run_recipe` run of the recipe built
in `recipe()`.

    python benchmarks/lm_gap.py            # 4 teachers, 2 seeds -> results/lm_gap.md and lm_gap.png
    python benchmarks/lm_gap.py --quick    # tiny models and data, 1 seed -> results/lm_gap_quick.md / .png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill.tables import claim_verdict, gain_and_spread, pm, std_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

LLAMA = {"model_type": "llama", "tie_word_embeddings": False}
STUDENT = LLAMA | {
    "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 48,
}  # fmt: skip
TEACHERS = {
    "T1": {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "T2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176},
    "T3": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 344},
    "T4": {"hidden_size": 224, "num_hidden_layers": 3, "num_attention_heads": 8, "intermediate_size": 600},
}
QUICK_STUDENT = LLAMA | {
    "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 32,
}  # fmt: skip
QUICK_TEACHERS = {
    "T1": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48},
    "T2": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "T3": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96},
    "T4": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192},
}
METHODS = {
    "forward KL": {"objectives": [{"name": "forward_kl"}]},
    "TAID": {"objectives": [{"name": "taid"}]},
    "reverse KL": {"objectives": [{"name": "reverse_kl"}]},
    "sequence-level KD": {
        "objectives": [{"name": "cross_entropy"}],
        "source": {
            "name": "teacher_generations",
            "params": {"do_sample": True, "temperature": 1.0, "seed": 0},
        },
    },
}
BASELINE = "student alone (CE)"
TITLE = "Student quality against the teacher-student gap (tiny-shakespeare)"
COLOURS = {"forward KL": "C0", "TAID": "C3", "reverse KL": "C2", "sequence-level KD": "C1", BASELINE: "0.4"}


def recipe(teacher: str, *, quick: bool, seeds: list[int], baseline: bool) -> dict[str, Any]:
    """The recipe of one gap: teacher `teacher`, the methods (and the student alone when `baseline`)."""
    shape = (QUICK_TEACHERS if quick else TEACHERS)[teacher]
    context = 32 if quick else 64
    methods = [{"name": BASELINE, "objectives": [{"name": "cross_entropy"}]}] if baseline else []
    methods += [{"name": name} | spec for name, spec in METHODS.items()]
    return {
        "name": f"lm-gap-{teacher}" + ("-quick" if quick else ""),
        "data": {
            "name": "tinyshakespeare",
            "params": {
                "tokenizer": {"bpe": {"vocab_size": 256 if quick else 1024}},
                "max_length": context,
                "test_fraction": 0.1,
                "prompt_tokens": context // 4,
                "max_new_tokens": 8 if quick else 16,
                "max_train_examples": 48 if quick else 1600,
                "max_test_examples": 16 if quick else 150,
            },
            "batch_size": 8 if quick else 16,
            "eval_batch_size": 32,
        },
        "teacher": {
            "name": "hf",
            "params": {
                "config": LLAMA
                | {"num_key_value_heads": 2 if shape["num_attention_heads"] % 2 == 0 else 1}
                | shape
                | {"max_position_embeddings": context}
            },
            "train": {"epochs": 1 if quick else 2, "optimizer": {"lr": 0.003}},
        },
        "student": {
            "name": "hf",
            "params": {
                "config": (QUICK_STUDENT if quick else STUDENT) | {"max_position_embeddings": context}
            },
        },
        "methods": methods,
        "optimizer": {"lr": 0.003},
        "schedule": {"name": "cosine", "warmup_epochs": 0.1},
        "trainer": {"epochs": 1, "threads": 1, "log_every": 50},
        "seeds": seeds,
        "evaluation": {"latency": False},
        "output": {"tensorboard": False},
    }


def run_gap(teacher: str, *, quick: bool, seeds: list[int], baseline: bool, out: Path) -> dict[str, Any]:
    """One `run_recipe`: the teacher's facts, each method's held-out CE and KL to its teacher per seed."""
    from rich.console import Console

    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    spec = recipe(teacher, quick=quick, seeds=seeds, baseline=baseline)
    started = time.perf_counter()
    result = run_recipe(
        recipe_from_dict(spec, spec["name"]),
        out=out,
        progress=False,
        console=Console(stderr=True, quiet=True),
    )
    info = result.teacher
    assert info is not None
    methods = {
        runs.name: {
            "ce": [r.result.final["loss"] for r in runs.runs],
            "kl": [r.result.final.get("teacher_kl", float("nan")) for r in runs.runs],
        }
        for runs in result.methods
    }
    return {
        "teacher": teacher,
        "teacher_parameters": info.parameters,
        "teacher_ce": info.metrics.get("loss", float("nan")),
        "teacher_seconds": info.train_seconds,
        "teacher_source": info.source,
        "student_parameters": result.student_parameters,
        "methods": methods,
        "seconds": time.perf_counter() - started,
        "data": result.data.description,
    }


def verdict(gaps: list[dict[str, Any]]) -> tuple[str, str]:
    """TAID's claim at the largest gap against forward KL, by the seeds' spread: (mark, explanation)."""
    largest = gaps[-1]["methods"]
    taid, kl = largest["TAID"]["ce"], largest["forward KL"]["ce"]
    gain, noise = gain_and_spread(kl, taid)  # forward KL - TAID: positive when TAID's CE is lower
    difference = -gain
    kl_means = [statistics.mean(g["methods"]["forward KL"]["ce"]) for g in gaps]
    best = min(range(len(gaps)), key=lambda i: kl_means[i])
    degrades = kl_means[-1] - kl_means[best]
    kl_note = (
        f"forward KL's student at the largest gap is {degrades:+.3f} nats from its best gap "
        f"({gaps[best]['teacher']})"
    )
    if len(taid) < 2:
        return "within noise", f"one seed only: TAID - forward KL = {difference:+.3f} nats; {kl_note}"
    return claim_verdict(gain, noise), (
        f"TAID - forward KL at the largest gap = {difference:+.3f} nats held-out CE (sum of the two seed "
        f"stds {noise:.3f}); {kl_note}"
    )


def table(gaps: list[dict[str, Any]]) -> str:
    names = [BASELINE, *METHODS]
    head = ["teacher", "teacher params", "gap (T / S params)", "teacher CE", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = gaps[0]["methods"].get(BASELINE)
    for gap in gaps:
        cells = [
            gap["teacher"],
            f"{gap['teacher_parameters']:,}",
            f"{gap['teacher_parameters'] / gap['student_parameters']:.1f}x",
            f"{gap['teacher_ce']:.3f}",
        ]
        for name in names:
            runs = gap["methods"].get(name) or (baseline if name == BASELINE else None)
            cells.append(pm(runs["ce"]) if runs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_table(gaps: list[dict[str, Any]]) -> str:
    head = ["teacher", *METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gap in gaps:
        lines.append(
            "| " + " | ".join([gap["teacher"], *(pm(gap["methods"][n]["kl"]) for n in METHODS)]) + " |"
        )
    return "\n".join(lines)


def plot(gaps: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: each method's student against the teacher's size (the student alone dashed); right: the
    teachers themselves (their scale would flatten the students' differences on one axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [g["teacher_parameters"] for g in gaps]
    figure, (students, teachers) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(2, 1))
    for name in METHODS:
        means = [statistics.mean(g["methods"][name]["ce"]) for g in gaps]
        spreads = [std_of(g["methods"][name]["ce"]) for g in gaps]
        students.errorbar(sizes, means, yerr=spreads, marker="o", capsize=3, label=name, color=COLOURS[name])
    baseline = gaps[0]["methods"].get(BASELINE)
    if baseline:
        students.axhline(statistics.mean(baseline["ce"]), color=COLOURS[BASELINE], ls="--", label=BASELINE)
    student = gaps[0]["student_parameters"]
    for axis in (students, teachers):
        axis.set_xscale("log")
        axis.set_xlabel(f"teacher parameters (student: {student:,})")
        axis.grid(alpha=0.3)
        for size, gap in zip(sizes, gaps, strict=True):
            label = f"{gap['teacher']} ({size / student:.0f}x)"
            axis.annotate(
                label, (size, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                textcoords="offset points", ha="center", fontsize=7,
            )  # fmt: skip
    students.set_ylabel("student held-out cross-entropy (nats / token, lower is better)")
    low, high = students.get_ylim()
    students.set_ylim(low, high + 0.25 * (high - low))  # room for the legend above the lines
    students.set_title(title, fontsize=10)
    students.legend(fontsize=7, ncols=3, loc="upper center", framealpha=0.7)
    teachers.plot(sizes, [g["teacher_ce"] for g in gaps], "k-", marker="s")
    teachers.set_ylabel("teacher held-out cross-entropy")
    teachers.set_title("the teachers", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 1 seed (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2, quick 1)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("lm_gap"))
    parser.add_argument(
        "--plot-from",
        type=Path,
        default=None,
        help="redraw the PNG beside a run's JSON (results/lm_gap.json)",
    )
    args = parser.parse_args(argv)
    if args.plot_from is not None:
        plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png"), TITLE)
        return 0
    default_seeds = 1 if args.quick else 2
    seeds = list(range(args.seeds or default_seeds))
    out = output_file(parser, "lm_gap", args.out, quick=args.quick, partial=len(seeds) != default_seeds)
    import torch

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    gaps = []
    with tempfile.TemporaryDirectory(prefix="distill-lm-gap-") as tmp:
        for index, teacher in enumerate(TEACHERS):
            gap = run_gap(
                teacher, quick=args.quick, seeds=seeds, baseline=index == 0, out=Path(tmp) / teacher
            )
            gaps.append(gap)
            print(f"{teacher}: {gap}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    mark, why = verdict(gaps)
    image = out.with_suffix(".png")
    plot(gaps, image, TITLE)
    write_results(out.with_suffix(".json"), json.dumps(gaps, indent=1))  # the numbers behind the plot
    teacher_seconds = sum(g["teacher_seconds"] for g in gaps if g["teacher_source"] == "trained")
    text = (
        "# Large teacher-student gap (S24 TAID)\n\n"
        f"Command: `{command_line('lm_gap', argv)}`; {os.cpu_count()} CPU cores shared with other work, "
        f"one torch thread; total wall time {total:.0f} s (teacher training in this run: "
        f"{teacher_seconds:.0f} s; "
        "teachers already in `$DISTILL_CACHE` are reused); 1-minute load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
        f"- Data: {gaps[0]['data']}.\n"
        f"- Student: Llama {(QUICK_STUDENT if args.quick else STUDENT)}, "
        f"{gaps[0]['student_parameters']:,} parameters; seeds {seeds}; one epoch over the same blocks for "
        "every method (equal counted tokens); AdamW lr 3e-3, cosine with 10 % warm-up; held-out CE at the "
        "end.\n"
        "- Teachers: Llama shapes in `benchmarks/lm_gap.py` (`TEACHERS`), each trained "
        f"{1 if args.quick else 2} epochs with cross-entropy on the student's training blocks (lr 3e-3).\n"
        "- Methods: `forward_kl`, `taid` (defaults), `reverse_kl`, and sequence-level KD (`cross_entropy` on "
        "`source: teacher_generations`, sampled at temperature 1); the student alone is the dashed line.\n"
        "- No hyperparameter was tuned: every method runs with its defaults and the packaged LM recipe's lr, "
        "so no validation split was needed; the held-out split is only read at the end.\n\n"
        "## Student held-out cross-entropy (nats / token, lower is better), mean ± std over seeds\n\n"
        + table(gaps)
        + "\n\n## KL(teacher ‖ student) on the held-out blocks (each row against its own teacher)\n\n"
        + kl_table(gaps)
        + f"\n\n![student quality against the gap]({image.name})\n\n"
        f"## TAID's claim (stable under a large gap where KL degrades): **{mark}**\n\n{why}.\n"
    )
    write_results(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

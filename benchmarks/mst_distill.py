"""MST-Distill benchmark (S25): is a mixture of specialised teachers a better source of knowledge for a
cross-modal student than the best single teacher, or than the plain ensemble of the same teachers?

Setting (docs/mst_distill.md): scikit-learn digits cut into two "modalities", the left and right halves of
each 8x8 image (the `view` model). The student (an MLP of 32 units) reads the left half only; the teachers
are a multimodal one (both halves, early fusion) and a cross-modal one (the right half), MLPs of 64 and 32
units trained on the labels. Rows, every one with the same student, optimizer and epochs:
- student alone: cross-entropy;
- KD from each single teacher, and from their plain ensemble (`kind: ensemble`, mean of probabilities):
  cross-entropy + hinton_kd at T = 4 (the official w_task = w_kl = 1, T = 4);
- MST-Distill (`kind: mixture`, every setting at the official default: 2 masked layers per member, k = 1,
  T = 4, 3 mask heads, hidden factor 2, KL load balancing weight 1 (x 0.9 per 10 epochs), 1 warm-up epoch,
  1 mask epoch at Adam 1e-4), with the same two terms.
Cells: test accuracy (%) after the last epoch, mean ± std over seeds; a difference is "better" or "worse"
only beyond the sum of the two standard deviations. Nothing is chosen on the test split: the student's and
the teachers' training is the packaged digits benchmark recipe's (`bench_vision_quick_digits`: AdamW, cosine
schedule; 60 student epochs there, 30 here for the time budget), the teachers' widths were set by the
budget of the full run (under 15 minutes with one thread on a busy machine).

    python benchmarks/mst_distill.py           # 3 seeds -> benchmarks/results/mst_distill.md
    python benchmarks/mst_distill.py --quick   # 2 seeds, a few epochs -> mst_distill_quick.md

Another number of --seeds writes mst_distill_partial.md (`benchmarks/_results.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill.experiment import run_recipe
from distill.recipe.load import recipe_from_dict
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, pm
from distill.tasks.results import ExperimentResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

THREADS = 1
KD = [
    {"name": "cross_entropy", "weight": 1.0},
    {"name": "hinton_kd", "weight": 1.0, "params": {"temperature": 4.0}},
]
EPOCHS = {"full": (30, 30), "quick": (4, 5)}  # (student, teachers)
ALONE, MULTI, CROSS, ENSEMBLE, MST = (
    "student alone",
    "KD: multimodal teacher",
    "KD: cross-modal teacher",
    "KD: plain ensemble",
    "MST-Distill",
)


def view(region: str, hidden: list[int]) -> dict[str, Any]:
    """A `view` model: an MLP of `region` of the image (`distill.models.views`)."""
    return {
        "name": "view",
        "params": {"region": region, "model": {"name": "mlp", "params": {"hidden": hidden}}},
    }


def teacher(region: str, epochs: int) -> dict[str, Any]:
    train = {"epochs": epochs, "optimizer": {"name": "adamw", "lr": 0.001}, "schedule": {"name": "cosine"}}
    return view(region, [64, 32]) | {"train": train}


def recipe(
    name: str, first: dict[str, Any], methods: list[dict[str, Any]], seeds: list[int], quick: bool
) -> Any:
    epochs = EPOCHS["quick" if quick else "full"][0]
    return recipe_from_dict(
        {
            "name": name,
            "data": {
                "name": "digits",
                "params": {"test_fraction": 0.3, "split_seed": 0},
                "batch_size": 32,
                "eval_batch_size": 540,
            },
            "teacher": first,
            "student": view("left", [32]),
            "methods": methods,
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
            "schedule": {"name": "cosine"},
            "trainer": {
                "epochs": epochs,
                "checkpoint_every": 1000000,
                "eval_every": epochs,
                "log_every": 50,
                "threads": THREADS,
                "device": "cpu",
            },
            "seeds": seeds,
            "evaluation": {"rule": "last", "latency": False},
            "output": {"tensorboard": False},
        },
        name,
    )


def accuracies(result: ExperimentResult, method: str) -> list[float]:
    runs = next(m for m in result.methods if m.name == method)
    return [run.result.final["accuracy"] for run in runs.runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, a few epochs (a smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("mst_distill"))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, "mst_distill", "main", ["main"])
    console = Console(stderr=True)
    torch.set_num_threads(THREADS)
    command = command_line("mst_distill", argv)
    teacher_epochs = EPOCHS["quick" if args.quick else "full"][1]
    multi, cross = teacher("all", teacher_epochs), teacher("right", teacher_epochs)
    members = [multi, cross]
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="distill-bench-mst-") as tmp:
        runs = {
            "mst-multimodal": recipe(
                "mst-multimodal",
                multi,
                [
                    {"name": ALONE, "objectives": KD[:1]},
                    {"name": MULTI, "objectives": KD},
                    {"name": ENSEMBLE, "teacher": {"kind": "ensemble", "members": members}, "objectives": KD},
                    {"name": MST, "teacher": {"kind": "mixture", "members": members}, "objectives": KD},
                ],
                seeds,
                args.quick,
            ),
            "mst-cross-modal": recipe(
                "mst-cross-modal", cross, [{"name": CROSS, "objectives": KD}], seeds, args.quick
            ),
        }
        results: dict[str, ExperimentResult] = {}
        for name, spec in runs.items():
            begun = time.perf_counter()
            results[name] = run_recipe(spec, out=Path(tmp) / name, progress=False, console=console)
            walls[name] = time.perf_counter() - begun
    total = time.perf_counter() - started
    main_run, cross_run = results["mst-multimodal"], results["mst-cross-modal"]
    values = {m: accuracies(main_run, m) for m in (ALONE, MULTI, ENSEMBLE, MST)}
    values[CROSS] = accuracies(cross_run, CROSS)
    ensemble_info = next(m for m in main_run.methods if m.name == ENSEMBLE).teacher
    assert main_run.teacher is not None and cross_run.teacher is not None and ensemble_info is not None
    teacher_acc = {
        ALONE: "-",
        MULTI: f"{100 * main_run.teacher.metrics['accuracy']:.2f}",
        CROSS: f"{100 * cross_run.teacher.metrics['accuracy']:.2f}",
        ENSEMBLE: f"{100 * ensemble_info.metrics['accuracy']:.2f}",
        MST: "routed per sample",
    }

    def versus(a: str, b: str) -> str:
        gain, spread = gain_and_spread(values[a], values[b], 100)
        return f"{gain:+.2f} ({noise_verdict(gain, spread)}, spread {spread:.2f})"

    order = [ALONE, MULTI, CROSS, ENSEMBLE, MST]
    rows = [
        [
            row,
            teacher_acc[row],
            pm(values[row], 100),
            "-" if row == ALONE else versus(row, ALONE),
            "-" if row == MST else versus(MST, row),
        ]
        for row in order
    ]
    best = max((MULTI, CROSS), key=lambda m: mean_std(values[m])[0])
    gain, spread = gain_and_spread(values[MST], values[best], 100)
    verdict = noise_verdict(gain, spread)
    if verdict == "better":
        met = "met, beyond the noise"
    elif verdict == "worse":
        met = "not met: worse beyond the noise"
    else:
        met = "met on the mean, within the noise" if gain >= 0 else "not shown: lower mean, within the noise"
    goal = (
        f"Goal, MST-Distill >= the best single teacher as a KD source: the best single teacher is the "
        f"{best.removeprefix('KD: ')} ({pm(values[best], 100)}); MST-Distill {pm(values[MST], 100)}, "
        f"{gain:+.2f} points ({verdict}, spread {spread:.2f}): **{met}**."
    )
    student_epochs, _ = EPOCHS["quick" if args.quick else "full"]
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items())
    text = (
        "# MST-Distill benchmark (S25): mixture of specialised teachers, cross-modal digits\n\n"
        f"Command: `{command}` ({os.cpu_count()} CPU cores, torch threads {THREADS}); total wall time "
        f"{total:.0f} s ({timing}); 1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (above 2: other work shared the cores).\n\n"
        'Setting: scikit-learn digits (1,257 train / 540 test images), two "modalities" cut from each 8x8 '
        "image: its left and right halves (`view` models). Student: an MLP of 32 units on the left half "
        f"({main_run.student_parameters:,} parameters), {student_epochs} epochs, AdamW lr 0.01, cosine, "
        "batch 32. Teachers: MLPs of 64 and 32 units, the multimodal one on both halves, the cross-modal one "
        f"on the right half, {teacher_epochs} epochs of cross-entropy (AdamW lr 0.001, cosine), test "
        "accuracy in the second column. KD rows: cross-entropy + hinton_kd (T = 4), weights 1 and 1. "
        "MST-Distill: `kind: mixture` over the same two teachers at every official default "
        f"(docs/mst_distill.md). Test accuracy (%) after the last epoch, mean ± std over seeds {seeds}; "
        "differences in points, with the verdict against the spread (the sum of the two standard "
        "deviations).\n\n"
        + markdown_table(
            ["KD source", "teacher acc %", "student acc %", "− student alone", "MST-Distill − this"], rows
        )
        + "\n\n"
        + goal
        + "\n"
    )
    write_results(out, text)
    console.print(text)
    console.print(f"wrote {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

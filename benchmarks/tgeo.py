"""TGeo-KD benchmark (S08): does a learned per-sample CE / KD fusion ratio beat fixed-ratio KD?

"Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation" (Hu, Wu et al., ICLR
2024); docs/tgeo.md. Fashion-MNIST (the Debian package dataset-fashion-mnist): a CNN teacher trained by the
recipe's `teacher:` section on a stratified 6,000-image subset of the training split (cached in
`$DISTILL_CACHE` after the first run), a 3-stage small CNN student that sees 100 labelled images per class,
tested on a stratified 2,000-image subset of the official test split.

Rows, all in one `run_recipe` call over the same seeds: the student alone (cross-entropy), KD with fixed
ratios (the KD protocol 0.1 CE + 0.9 KD, and 0.5 / 0.5; T = 4) and TGeo-KD (T = 4, the ratio network learned
on 10% of the student's training set held out, Meta-Weight-Net's outer Adam 1e-3 / 1e-4). Cells: the test
accuracy after the last epoch (nothing is chosen on the test split), mean ± std over seeds. Verdict: TGeo-KD
against each fixed ratio, "better" / "worse" when the gain is beyond the sum of the two standard deviations,
else "within noise". No setting was tuned here: the optimiser and schedule are the packaged standard
Fashion-MNIST bench's, the ratio network's settings Meta-Weight-Net's, the temperature the KD protocol's.

    python benchmarks/tgeo.py            # 3 seeds, 15 epochs -> benchmarks/results/tgeo.md
    python benchmarks/tgeo.py --quick    # 2 seeds, 2 epochs, about a minute with the teacher cached
                                         # -> benchmarks/results/tgeo_quick.md (never over tgeo.md)

Another number of --seeds writes tgeo_partial.md (`benchmarks/_results.py`).
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

from distill.experiment import run_recipe
from distill.recipe.load import recipe_from_dict
from distill.tables import gain_and_spread, markdown_table, noise_verdict, pm
from distill.tasks.results import ExperimentResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

TEMPERATURE = 4.0  # the KD protocol's (CRD / mdistiller CIFAR-100), for every teacher term here
BASELINE = "student alone"
FIXED = ("KD 0.1 CE + 0.9 KD", "KD 0.5 CE + 0.5 KD")
TGEO = "TGeo-KD"
METHODS: list[dict[str, Any]] = [
    {"name": BASELINE, "objectives": [{"name": "cross_entropy", "weight": 1.0}]},
    *(
        {
            "name": name,
            "objectives": [
                {"name": "cross_entropy", "weight": ce},
                {"name": "hinton_kd", "weight": 1 - ce, "params": {"temperature": TEMPERATURE}},
            ],
        }
        for name, ce in zip(FIXED, (0.1, 0.5), strict=True)
    ),
    # The objective's defaults are the settings described above (docs/tgeo.md); written out for the report.
    {
        "name": TGEO,
        "objectives": [
            {
                "name": "tgeo_kd",
                "weight": 1.0,
                "params": {
                    "temperature": TEMPERATURE,
                    "hidden": 100,
                    "validation_fraction": 0.1,
                    "outer_lr": 1e-3,
                    "outer_weight_decay": 1e-4,
                },
            }
        ],
    },
]
FULL = {"labelled_per_class": 100, "epochs": 15}
QUICK = {"labelled_per_class": 100, "epochs": 2}  # the same data: the cached teacher serves both
THREADS = 1  # tiny models on a busy machine (as the packaged vision recipes pin it)


def recipe(seeds: list[int], quick: bool, out: Path) -> dict[str, Any]:
    size = QUICK if quick else FULL
    optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005}
    return {
        "name": "tgeo-fashion-mnist" + ("-quick" if quick else ""),
        "description": "S08 TGeo-KD against fixed-ratio KD on Fashion-MNIST (benchmarks/tgeo.py)",
        "data": {
            "name": "fashion_mnist",
            "params": {
                "train_per_class": 600,
                "test_per_class": 200,
                "labelled_per_class": size["labelled_per_class"],
                "split_seed": 0,
            },
            "batch_size": 32,
            "eval_batch_size": 1000,
        },
        "teacher": {
            "name": "small_cnn",
            "params": {"channels": [32, 64, 128]},
            "train": {"epochs": 6, "optimizer": optimizer, "schedule": {"name": "cosine"}, "seed": 0},
        },
        "student": {"name": "small_cnn", "params": {"channels": [16, 32, 64]}},
        "methods": METHODS,
        "optimizer": optimizer,
        "schedule": {"name": "cosine"},
        "trainer": {
            "epochs": size["epochs"],
            "eval_every": size["epochs"],
            "log_every": 50,
            "device": "cpu",
            "threads": THREADS,
        },
        "seeds": seeds,
        "evaluation": {"rule": "last", "latency": False},
        "output": {"dir": str(out), "tensorboard": False},
    }


def accuracies(result: ExperimentResult, method: str) -> list[float]:
    runs = next(m for m in result.methods if m.name == method)
    return [r.result.final["accuracy"] for r in runs.runs]


def verdict_cell(values: list[float], base: list[float]) -> str:
    gain, spread = gain_and_spread(values, base, 100)
    return f"{gain:+.2f} ({noise_verdict(gain, spread)}, spread {spread:.2f})"


def seconds_per_seed(result: ExperimentResult, method: str) -> float:
    runs = next(m for m in result.methods if m.name == method).runs
    return sum(r.wall_seconds for r in runs) / max(1, len(runs))


def report(result: ExperimentResult, seeds: list[int], quick: bool, command: str, wall: float) -> str:
    size = QUICK if quick else FULL
    teacher = result.teacher
    teacher_accuracy = f"{100 * teacher.metrics['accuracy']:.2f} %" if teacher and teacher.metrics else "-"
    base = accuracies(result, BASELINE)
    tgeo = accuracies(result, TGEO)
    rows = []
    for method in (BASELINE, *FIXED, TGEO):
        values = accuracies(result, method)
        gain = "-" if method == BASELINE else verdict_cell(values, base)
        against = verdict_cell(tgeo, values) if method in FIXED else "-"
        rows.append([method, pm(values, 100), gain, against, f"{seconds_per_seed(result, method):.0f}"])
    headers = ["method", "test accuracy %", "vs student alone", "TGeo-KD vs this", "s / seed"]
    verdicts = [noise_verdict(*gain_and_spread(tgeo, accuracies(result, m), 100)) for m in FIXED]
    claim = "yes" if all(v == "better" for v in verdicts) else "not shown"
    if any(v == "worse" for v in verdicts):
        claim = "no"
    lines = [
        f"# TGeo-KD beats fixed-ratio KD{' (quick)' if quick else ''}",
        "",
        f"Command: `{command}` (nice {os.nice(0)}, {torch.get_num_threads()} torch thread); "
        f"wall {wall / 60:.1f} min; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Fashion-MNIST: teacher small_cnn [32, 64, 128] ({teacher_accuracy} test accuracy; "
        f"{'from the cache' if teacher and teacher.source == 'cache' else 'trained in this run'}), "
        f"student small_cnn [16, 32, 64] ({result.student_parameters:,} parameters) on "
        f"{size['labelled_per_class']} labelled images per class, {size['epochs']} epochs, SGD 0.05 / "
        f"cosine, batch 32; test: 2,000 images (200 per class); seeds {seeds}; accuracy after the last "
        "epoch. "
        "TGeo-KD trains on 90% of the student's images and learns its ratio network on the other 10%.",
        "",
        markdown_table(headers, rows),
        f'Claim "TGeo-KD beats fixed-ratio KD" (better than both fixed ratios beyond the seed spread): '
        f"**{claim}** ({', '.join(f'{m}: {v}' for m, v in zip(FIXED, verdicts, strict=True))}).",
        "",
        "Settings: KD rows Hinton KD at T 4 (T^2-scaled) with cross-entropy; TGeo-KD `tgeo_kd` with "
        "temperature 4, ratio network 6C -> 100 ReLU -> sigmoid, 10% of the training images held out "
        "(seeded), outer Adam lr 1e-3, weight decay 1e-4, one-step look-ahead at the student's learning rate "
        "(docs/tgeo.md for what follows the paper and what does not).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("tgeo"))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, "tgeo", "main", ["main"])
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tgeo-bench-") as folder:
        result = run_recipe(recipe_from_dict(recipe(seeds, args.quick, Path(folder))), progress=False)
    wall = time.perf_counter() - started
    text = report(result, seeds, args.quick, command_line("tgeo", argv), wall)
    write_results(out, text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

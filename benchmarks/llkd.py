"""LLKD benchmark (S05, "Learning with Less: Knowledge Distillation from Large Language Models via Unlabeled
Data", Li et al.): does LLKD's selection reach plain KD's accuracy with at most 60% of the unlabelled data?

A student with 20 labelled images per class and the rest of a Fashion-MNIST training subset unlabelled
(`labelled_per_class: 20, unlabelled: true`) is taught by a teacher trained on every label of that subset
(the recipe's `teacher:` section, cached in `$DISTILL_CACHE`; the same teacher for every method):
- `student alone`: cross-entropy on the labelled images;
- `KD 100%`: cross-entropy + Hinton KD (T = 4) on the whole pool (`source: dataset`);
- `KD 20%` .. `KD 80%`: the same on a random share of the unlabelled pool (`source: random_subset`, a new
  draw per seed; the labelled images always stay), for as many optimizer steps as `KD 100%` (more epochs);
- `LLKD`: the same objectives with `source: llkd` at the paper's settings (the source's defaults): per
  batch, the unlabelled rows where the teacher is confident and the student uncertain are kept and
  pseudo-labelled with the teacher's argmax; the others leave the batch.
The x-axis of the curve is the share of the unlabelled pool a student ever trained on (`unlabelled_used`;
LLKD's is the share it kept at least once; its share kept per batch is plotted too). Cells: last-epoch test
accuracy, mean ± std over seeds; nothing is chosen on the test split (fixed epochs, the last one read).

    python benchmarks/llkd.py            # Fashion-MNIST, 3 seeds -> benchmarks/results/llkd.md (+ llkd.png)
    python benchmarks/llkd.py --quick    # scikit-learn digits, 2 seeds, short -> llkd_quick.md (+ png)

Another number of --seeds writes llkd_partial.md (`benchmarks/_results.py`).
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
from distill.recipe.schema import Recipe
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, pm
from distill.tasks.results import ExperimentResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

FRACTIONS = (0.2, 0.4, 0.6, 0.8)
GOAL = 0.6  # the issue: LLKD reaches KD's accuracy with at most 60% of the data
THREADS = 1
KD = [{"name": "cross_entropy"}, {"name": "hinton_kd", "params": {"temperature": 4.0}}]

FULL: dict[str, Any] = {
    "data": {
        "name": "fashion_mnist",
        "params": {
            "train_per_class": 600,
            "test_per_class": 200,
            "labelled_per_class": 20,
            "unlabelled": True,
            "split_seed": 0,
        },
        "batch_size": 64,
        "eval_batch_size": 1000,
    },
    "teacher": {
        "name": "mlp",
        "params": {"hidden": [512, 256]},
        "train": {
            "epochs": 20,
            "optimizer": {"name": "adamw", "lr": 0.003},
            "schedule": {"name": "cosine"},
            "seed": 0,
        },
    },
    "student": {"name": "mlp", "params": {"hidden": [32]}},
    "epochs": 20,
}
QUICK: dict[str, Any] = {
    "data": {
        "name": "digits",
        "params": {"labelled_per_class": 5, "unlabelled": True},
        "batch_size": 64,
        "eval_batch_size": 1000,
    },
    "teacher": {
        "name": "mlp",
        "params": {"hidden": [128]},
        "train": {"epochs": 20, "optimizer": {"name": "adamw", "lr": 0.003}, "seed": 0},
    },
    "student": {"name": "mlp", "params": {"hidden": [32]}},
    "epochs": 30,
}


def llkd_recipe(
    setting: dict[str, Any], seeds: list[int], out: Path, methods: list[dict[str, Any]], epochs: int
) -> Recipe:
    spec = {
        "name": f"llkd-{setting['data']['name']}",
        "data": setting["data"],
        "teacher": setting["teacher"],
        "student": setting["student"],
        "methods": methods,
        "optimizer": {"name": "adamw", "lr": 0.001},
        "schedule": {"name": "cosine"},
        "trainer": {"epochs": epochs, "eval_every": epochs, "threads": THREADS},
        "seeds": seeds,
        "evaluation": {"rule": "last", "latency": False},
        "output": {"dir": str(out), "tensorboard": False},
    }
    return recipe_from_dict(spec, "benchmarks/llkd.py")


def subset_epochs(result: ExperimentResult, fraction: float, epochs: int) -> int:
    """Epochs on a random `fraction` of the pool that make as many optimizer steps as `epochs` on all of it:
    a smaller subset is not also trained for less (the labelled rows are always in)."""
    train = result.data.train
    hidden = int((train.labels if hasattr(train, "labels") else train.tensors[1]).eq(-100).sum())
    rows, kept = len(train), len(train) - hidden + round(fraction * hidden)
    return max(1, round(epochs * rows / kept))


Finals = dict[str, list[dict[str, float]]]  # method -> one final-metrics row per seed


def finals_of(result: ExperimentResult) -> Finals:
    return {
        m.name: [r.result.final | {"wall_seconds": r.wall_seconds} for r in m.runs] for m in result.methods
    }


def metric(finals: Finals, method: str, key: str, default: float | None = None) -> list[float]:
    return [row.get(key, default) for row in finals[method]]  # type: ignore[misc]


def used(finals: Finals, method: str) -> list[float]:
    """The share of the unlabelled pool each seed trained on (the whole pool: 1; labelled only: 0)."""
    return metric(finals, method, "unlabelled_used", 0.0 if method == "student alone" else 1.0)


def rows(finals: Finals, epochs: dict[str, int]) -> list[list[str]]:
    kd = metric(finals, "KD 100%", "accuracy")
    out = []
    for name in finals:
        acc = metric(finals, name, "accuracy")
        gain, spread = gain_and_spread(acc, kd, 100)
        versus = "-" if name == "KD 100%" else f"{gain:+.2f} ({noise_verdict(gain, spread)})"
        rate = metric(finals, name, "unlabelled_rate")
        out.append(
            [
                name,
                str(epochs[name]),
                pm(used(finals, name), 100, 1),
                pm(rate, 100, 1) if None not in rate else "-",
                pm(acc, 100),
                versus,
            ]
        )
    return out


def interpolated(finals: Finals, at: float) -> float:
    """The random-subset curve's mean accuracy at share `at` (linear between its points)."""
    xs = [0.0, *FRACTIONS, 1.0]
    names = ["student alone"] + [f"KD {round(100 * f)}%" for f in FRACTIONS] + ["KD 100%"]
    ys = [mean_std(metric(finals, n, "accuracy"))[0] for n in names]
    for i in range(len(xs) - 1):
        if xs[i] <= at <= xs[i + 1]:
            return ys[i] + (ys[i + 1] - ys[i]) * (at - xs[i]) / (xs[i + 1] - xs[i])
    return ys[-1]


def goal(finals: Finals) -> str:
    llkd, kd = metric(finals, "LLKD", "accuracy"), metric(finals, "KD 100%", "accuracy")
    share = mean_std(used(finals, "LLKD"))[0]
    rate = mean_std(metric(finals, "LLKD", "unlabelled_rate"))[0]
    gain, spread = gain_and_spread(llkd, kd, 100)
    verdict = noise_verdict(gain, spread)
    holds = verdict != "worse" and share <= GOAL
    at_share = interpolated(finals, share)
    return (
        f"**Goal ({'holds' if holds else 'does not hold'})**: LLKD {pm(llkd, 100)} against KD on the whole "
        f"pool {pm(kd, 100)}, {gain:+.2f} points ({verdict}, spread {spread:.2f}), using "
        f"{100 * share:.1f}% of the unlabelled pool (goal: KD's accuracy, within noise or above, with at "
        f"most {100 * GOAL:.0f}%). At the same share the random-subset curve (interpolated) gives "
        f"{100 * at_share:.2f}%: LLKD's selection is {100 * (mean_std(llkd)[0] - at_share):+.2f} points "
        "from a random subset of its size. By the other measure, the share of the unlabelled rows it met "
        f"that it kept per batch ({100 * rate:.1f}%: its gradient work on the pool, not the data it saw), "
        f"the goal {'holds' if verdict != 'worse' and rate <= GOAL else 'does not hold'}."
    )


def plot(finals: Finals, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [f"KD {round(100 * f)}%" for f in FRACTIONS] + ["KD 100%"]
    xs = [100 * mean_std(used(finals, n))[0] for n in names]
    ys = [mean_std(metric(finals, n, "accuracy")) for n in names]
    ax.errorbar(
        xs,
        [100 * m for m, _ in ys],
        yerr=[100 * s for _, s in ys],
        marker="o",
        capsize=3,
        label="KD on a random share of the pool",
    )
    kd_mean, kd_std = mean_std(metric(finals, "KD 100%", "accuracy"))
    ax.axhspan(100 * (kd_mean - kd_std), 100 * (kd_mean + kd_std), color="C0", alpha=0.12)
    ax.axhline(100 * kd_mean, color="C0", linestyle=":", linewidth=1, label="KD on the whole pool (± std)")
    alone = mean_std(metric(finals, "student alone", "accuracy"))[0]
    ax.axhline(100 * alone, color="grey", linestyle="--", linewidth=1, label="student alone (labelled only)")
    share, share_std = mean_std(used(finals, "LLKD"))
    acc, acc_std = mean_std(metric(finals, "LLKD", "accuracy"))
    ax.errorbar(
        [100 * share],
        [100 * acc],
        xerr=[100 * share_std],
        yerr=[100 * acc_std],
        marker="*",
        markersize=13,
        color="C3",
        capsize=3,
        linestyle="none",
        label="LLKD (share kept at least once)",
    )
    rate = mean_std(metric(finals, "LLKD", "unlabelled_rate"))[0]
    ax.plot(
        [100 * rate],
        [100 * acc],
        marker="*",
        markersize=13,
        markerfacecolor="none",
        color="C3",
        linestyle="none",
        label="LLKD (share kept per batch)",
    )
    ax.axvline(100 * GOAL, color="C3", linestyle=":", linewidth=1, alpha=0.6)
    ax.set_xlabel("unlabelled data used (% of the pool)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="digits, 2 seeds, short training (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("llkd"))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, "llkd", "main", ("main",))
    setting = QUICK if args.quick else FULL
    console = Console(stderr=True)
    torch.set_num_threads(THREADS)
    command = command_line("llkd", argv)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    epochs = setting["epochs"]
    main_methods: list[dict[str, Any]] = [
        {"name": "student alone", "objectives": [{"name": "cross_entropy"}]},
        {"name": "KD 100%", "objectives": KD},
        {"name": "LLKD", "objectives": KD, "source": {"name": "llkd"}},
    ]
    with tempfile.TemporaryDirectory(prefix="distill-bench-llkd-") as tmp:
        recipe = llkd_recipe(setting, seeds, Path(tmp) / "main", main_methods, epochs)
        result = run_recipe(recipe, progress=False, console=console)
        finals = finals_of(result)
        per_method = dict.fromkeys(finals, epochs)
        for fraction in FRACTIONS:  # the same teacher (cached), as many optimizer steps as KD 100%
            name = f"KD {round(100 * fraction)}%"
            method = {
                "name": name,
                "objectives": KD,
                "source": {"name": "random_subset", "params": {"fraction": fraction}},
            }
            per_method[name] = subset_epochs(result, fraction, epochs)
            subset = llkd_recipe(setting, seeds, Path(tmp) / name[3:-1], [method], per_method[name])
            finals |= finals_of(run_recipe(subset, progress=False, console=console))
    order = ["student alone", "KD 100%", *(f"KD {round(100 * f)}%" for f in FRACTIONS), "LLKD"]
    finals = {name: finals[name] for name in order}
    total = time.perf_counter() - started
    load_end = os.getloadavg()[0]
    data = recipe.data
    teacher, info = recipe.teacher, result.teacher
    assert teacher is not None and info is not None
    title = f"{data.name}: LLKD against KD on random shares of the pool ({len(seeds)} seeds)"
    png = plot(finals, out.with_suffix(".png"), title)
    timing = ", ".join(f"{name} {sum(metric(finals, name, 'wall_seconds', 0.0)):.0f} s" for name in finals)
    text = (
        "# LLKD benchmark (S05: sample selection by teacher confidence x student need)\n\n"
        f"Command: `{command}` ({os.cpu_count()} CPU cores, torch threads {THREADS}); total wall time "
        f"{total:.0f} s (students: {timing}); 1-minute load average {load_start:.1f} at the start, "
        f"{load_end:.1f} at the end (above 2 means other work shared the cores).\n\n"
        f"Data `{data.name}` {data.params}: {result.data.description}. Teacher `{teacher.name}` "
        f"{teacher.params} ({info.parameters:,} parameters, {info.source}, trained on every label of the "
        f"training subset, {teacher.train.epochs} epochs): test accuracy "
        f"{100 * info.metrics['accuracy']:.2f}%. Student `{recipe.student.name}` {recipe.student.params} "
        f"({result.student_parameters:,} parameters), AdamW lr 1e-3, cosine, batch {data.batch_size}, "
        f"{epochs} epochs on the whole pool; on a random share, as many optimizer steps (more epochs: the "
        "`epochs` column), so that a smaller share is not also trained less. KD = cross-entropy on the "
        "labels + Hinton KD (T = 4) on every counted row. LLKD at its defaults (momentum 0.999, class "
        "thresholds, pseudo-labels; docs/llkd.md); its "
        "pseudo-labels also feed the cross-entropy term.\n\n"
        f"Test accuracy (%) at the last epoch, mean ± std over seeds {seeds}. `used`: the share of the "
        "unlabelled pool the student ever trained on; `kept per batch`: LLKD's share of the unlabelled rows "
        "it met that it kept, over all batches. The last column is the difference from KD on the whole pool "
        "with the verdict against the spread (the sum of the two standard deviations).\n\n"
        + markdown_table(
            ["method", "epochs", "used %", "kept per batch %", "accuracy %", "vs KD 100%"],
            rows(finals, per_method),
        )
        + "\n"
        + goal(finals)
        + f"\n\n![accuracy against the share of unlabelled data used]({png.name})\n"
    )
    write_results(out, text)
    console.print(text, markup=False)
    console.print(f"wrote {out} and {png} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

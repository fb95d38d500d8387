"""DisWOT's training-free score against the accuracy the candidates reach with KD (seed paper S18, "DisWOT:
Student Architecture Search for Distillation WithOut Training", Dong, Li & Wei, CVPR 2023).

The paper's claim, as this benchmark tests it: the score DisWOT computes from one mini-batch through a
random-initialised teacher and student (minus the semantic distance of their classifiers' Grad-CAM class
weights and the relation distance of their sample Gram matrices) ranks candidate students in the order of
the accuracy they reach once distilled (Kendall's tau > 0), and better than a plain proxy.

The setting: scikit-learn digits (8x8), its 30 % test split set aside; a stratified 20 % of the training
split is the validation split on which the trained candidates are ranked (the test accuracy is reported
beside it). A CIFAR ResNet-32 teacher learns the rest with cross-entropy. 14 candidates from the zoo, of
four families and a 1,000x range of sizes (MLPs, small CNNs, CIFAR ResNets, WRNs), each distilled for a
short fixed budget (0.1 CE + 0.9 Hinton KD at T = 4, as the official training script's `-r 0.1 -a 0.9`;
AdamW, cosine schedule, the same settings for every candidate, none tuned), 3 seeds. Scores are computed
on one training batch of 64 for 3 random draws (score seeds): tau is mean ± std over the draws. Rows: the
paper's setting (random-initialised teacher, N(0, 1) redraw), the zoo's own initialisation, the trained
teacher, the paper's setting with the 3 draws' scores averaged (`distill search --repeats 3`), each
component alone, and the parameter count (the baseline). The ceiling: tau between the accuracy rankings of
two training seeds (how well any score could agree with one seed's ranking).

    python benchmarks/search.py            # ~7 CPU minutes, one thread -> benchmarks/results/search.md, .png
    python benchmarks/search.py --quick    # 5 candidates, 2 seeds, short runs -> search_quick.md

The trained teacher and each candidate's accuracies are kept in `$DISTILL_CACHE/bench-search` (keyed by
the teacher, candidate, budget and seed; the runs are deterministic on one thread), so a second run only
scores; `--fresh` retrains everything.

Verdicts: the paper's setting is "reproduced" when its tau is positive and its Kendall test p < 0.05 on
every score draw, "not reproduced" when tau <= 0 on every draw, "within noise" otherwise; "better than
parameter count" when its mean tau exceeds the baseline's by more than the draws' std.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, write_results  # noqa: E402
from distill.bench.memo import MemoizedTeacher  # noqa: E402
from distill.bench.search import SearchSettings, candidate_label, score_candidates, training_batch  # noqa: E402
from distill.models import build_model, count_parameters  # noqa: E402
from distill.recipe.schema import ModelSpec  # noqa: E402
from distill.tables import markdown_table, mean_std, pm  # noqa: E402
from distill.train import OptimizerConfig, ScheduleConfig, fit  # noqa: E402

NAME = "search"
FORMAT = 1  # of the benchmark's cache entries
TEACHER = ModelSpec(name="resnet32")
QUICK_TEACHER = ModelSpec(name="small_cnn", params={"channels": [32, 64]})
CANDIDATES = [
    ModelSpec(name="mlp", params={"hidden": [16]}),
    ModelSpec(name="mlp", params={"hidden": [64]}),
    ModelSpec(name="mlp", params={"hidden": [128, 64]}),
    ModelSpec(name="small_cnn", params={"channels": [8, 16]}),
    ModelSpec(name="small_cnn", params={"channels": [16, 32]}),
    ModelSpec(name="small_cnn", params={"channels": [32, 64]}),
    ModelSpec(name="small_cnn", params={"channels": [16, 32, 64]}),
    ModelSpec(name="resnet8"),
    ModelSpec(name="resnet14"),
    ModelSpec(name="resnet20"),
    ModelSpec(name="wrn_16_1"),
    ModelSpec(name="wrn_40_1"),
    ModelSpec(name="wrn_16_2"),
    ModelSpec(name="resnet8x4"),
]
QUICK_CANDIDATES = [CANDIDATES[i] for i in (0, 2, 3, 6, 7)]
NUM_CLASSES, SHAPE = 10, (1, 8, 8)
SCORE_SEEDS = (0, 1, 2)
BATCH = 64
VARIANTS = {  # row name -> (teacher, init)
    "DisWOT (paper: random teacher, N(0,1) redraw)": ("random", "gaussian"),
    "DisWOT, zoo initialisation": ("random", "default"),
    "DisWOT, trained teacher": ("trained", "gaussian"),
    "DisWOT, trained teacher, zoo initialisation": ("trained", "default"),
}
PAPER_ROW = next(iter(VARIANTS))


@dataclass
class Splits:
    train: torch.utils.data.TensorDataset
    val: torch.utils.data.TensorDataset
    test: torch.utils.data.TensorDataset


def digits_splits() -> Splits:
    from sklearn.model_selection import train_test_split

    from distill.data import build_data

    data = build_data("digits", test_fraction=0.3, split_seed=0)
    x, y = data.train.tensors
    train, val = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(), random_state=0)
    part = torch.utils.data.TensorDataset
    return Splits(part(x[train], y[train]), part(x[val], y[val]), data.test)


def build(spec: ModelSpec) -> torch.nn.Module:
    return build_model(spec.name, num_classes=NUM_CLASSES, input_shape=SHAPE, **spec.params)


def accuracy(model: torch.nn.Module, dataset: torch.utils.data.TensorDataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def cache_dir() -> Path:
    from distill.io import cache_root

    return cache_root() / "bench-search"


def run_key(*parts: Any) -> str:
    from distill.io import fingerprint

    return fingerprint([FORMAT, *[p.model_dump() if isinstance(p, ModelSpec) else p for p in parts]])


def train_teacher(
    spec: ModelSpec, splits: Splits, epochs: int, use_cache: bool
) -> tuple[torch.nn.Module, bool]:
    """The teacher, from the benchmark's cache (`$DISTILL_CACHE/bench-search`) or trained now and cached."""
    from distill.io import load_tensors, save_tensors

    path = cache_dir() / f"teacher-{run_key(spec, epochs)}.safetensors"
    torch.manual_seed(0)
    teacher = build(spec)
    if use_cache and path.is_file():
        teacher.load_state_dict(load_tensors(path))
        return teacher.eval(), True
    fit(
        teacher,
        splits.train,
        objectives=["cross_entropy"],
        optimizer=OptimizerConfig("sgd", lr=0.05, weight_decay=5e-4),
        schedule=ScheduleConfig("cosine"),
        **settings(epochs, seed=0),
    )
    save_tensors(path, {k: v.contiguous() for k, v in teacher.state_dict().items()})
    return teacher.eval(), False


def settings(epochs: int, seed: int) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "batch_size": 32,
        "seed": seed,
        "progress": False,
        "tensorboard": False,
        "eval_every": 10**6,
        "log_every": 10**6,
        "checkpoint_every": 10**9,
        "device": "cpu",
    }


def distil(
    spec: ModelSpec, teacher: torch.nn.Module, splits: Splits, epochs: int, seed: int
) -> tuple[float, float]:
    torch.manual_seed(seed)
    student = build(spec)
    fit(
        student,
        splits.train,
        teacher=teacher,
        objectives=[("cross_entropy", 0.1), ("hinton_kd", 0.9, {"temperature": 4.0})],
        optimizer=OptimizerConfig("adamw", lr=3e-3, weight_decay=5e-4),
        schedule=ScheduleConfig("cosine"),
        **settings(epochs, seed),
    )
    return accuracy(student, splits.val), accuracy(student, splits.test)


def distil_cached(
    spec: ModelSpec, teacher: Any, key: str, splits: Splits, epochs: int, seed: int, use_cache: bool
) -> tuple[tuple[float, float], bool]:
    """(validation, test) accuracy of one distilled candidate, remembered in the benchmark's cache by the
    teacher's key, the candidate, the budget and the seed (the runs are deterministic on one thread)."""
    import json

    from distill.io import atomic_write_json

    path = cache_dir() / f"run-{run_key(key, spec, epochs, seed)}.json"
    if use_cache and path.is_file():
        return tuple(json.loads(path.read_text())["accuracy"]), True  # type: ignore[return-value]
    result = distil(spec, teacher, splits, epochs, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"accuracy": list(result), "candidate": candidate_label(spec), "seed": seed})
    return result, False


def tau(x: list[float], y: list[float]) -> tuple[float, float]:
    result = kendalltau(x, y)
    return float(result.statistic), float(result.pvalue)


def run(quick: bool, seeds: list[int], use_cache: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    started, cpu_started, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    candidates = QUICK_CANDIDATES if quick else CANDIDATES
    teacher_spec = QUICK_TEACHER if quick else TEACHER
    splits = digits_splits()
    teacher_epochs, epochs = (5, 3) if quick else (20, 12)
    teacher, teacher_cached = train_teacher(teacher_spec, splits, teacher_epochs, use_cache)
    teacher_key = run_key(teacher_spec, teacher_epochs)
    teacher_acc = (accuracy(teacher, splits.val), accuracy(teacher, splits.test))
    inputs, labels = training_batch(splits.train, BATCH, 0)
    scores: dict[str, list[list[tuple[float, float]]]] = {}
    score_started = time.perf_counter()
    for row, (kind, init) in VARIANTS.items():
        reference = teacher if kind == "trained" else teacher_spec
        scores[row] = [
            score_candidates(
                build, candidates, reference, inputs, labels, SearchSettings(BATCH, kind, init, seed)
            )
            for seed in SCORE_SEEDS
        ]
    score_seconds = time.perf_counter() - score_started
    memo = MemoizedTeacher(teacher)
    val: list[list[float]] = []
    test: list[list[float]] = []
    train_started = time.perf_counter()
    hits = 0
    for spec in candidates:
        runs = []
        for seed in seeds:
            accuracies, hit = distil_cached(spec, memo, teacher_key, splits, epochs, seed, use_cache)
            runs.append(accuracies)
            hits += hit
        val.append([v for v, _ in runs])
        test.append([t for _, t in runs])
        print(
            f"{candidate_label(spec):32s} val {pm(val[-1], 100)}  test {pm(test[-1], 100)}", file=sys.stderr
        )
    return {
        "quick": quick,
        "seeds": seeds,
        "candidates": candidates,
        "teacher": teacher_spec,
        "teacher_parameters": count_parameters(teacher),
        "teacher_acc": teacher_acc,
        "teacher_cached": teacher_cached,
        "cached_runs": hits,
        "epochs": epochs,
        "splits": splits,
        "scores": scores,
        "val": val,
        "test": test,
        "parameters": [count_parameters(build(spec)) for spec in candidates],
        "score_seconds": score_seconds,
        "train_seconds": time.perf_counter() - train_started,
        "wall": time.perf_counter() - started,
        "cpu": time.process_time() - cpu_started,
        "load": (load, os.getloadavg()[0]),
    }


def proxies(run_: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Each row's proxy values per score draw (higher predicts better)."""
    rows: dict[str, list[list[float]]] = {}
    for row, draws in run_["scores"].items():
        rows[row] = [[-(s + r) for s, r in draw] for draw in draws]
    paper = run_["scores"][PAPER_ROW]
    rows["DisWOT, paper setting, the 3 draws' scores averaged"] = [
        [float(np.mean(values)) for values in zip(*rows[PAPER_ROW], strict=True)]
    ]
    rows["semantic alone (-M_s), paper setting"] = [[-s for s, _ in draw] for draw in paper]
    rows["relation alone (-M_r), paper setting"] = [[-r for _, r in draw] for draw in paper]
    rows["parameter count (baseline)"] = [[float(p) for p in run_["parameters"]]]
    return rows


def seed_ceiling(val: list[list[float]]) -> list[float]:
    """Kendall's tau between the accuracy rankings of every two training seeds."""
    seeds = len(val[0])
    return [
        tau([v[i] for v in val], [v[j] for v in val])[0] for i in range(seeds) for j in range(i + 1, seeds)
    ]


def verdicts(taus: dict[str, list[tuple[float, float]]]) -> tuple[str, str]:
    paper = taus[PAPER_ROW]
    values = [t for t, _ in paper]
    mean, std = mean_std(values)
    numbers = f"tau {mean:+.2f} ± {std:.2f} over {len(values)} score draws"
    if all(t > 0 and p < 0.05 for t, p in paper):
        claim = f"reproduced ({numbers}, p < 0.05 on every draw)"
    elif all(t <= 0 for t in values):
        claim = f"not reproduced ({numbers}, none above 0)"
    else:
        claim = f"within noise ({numbers}; no draw's correlation is significant at p < 0.05)"
    baseline = taus["parameter count (baseline)"][0][0]
    difference = f"DisWOT {mean:+.2f} ± {std:.2f} against {baseline:+.2f}"
    if mean - baseline > std:
        versus = f"reproduced ({difference})"
    elif baseline - mean > std:
        versus = f"not reproduced: worse than the parameter count ({difference})"
    else:
        versus = f"within noise ({difference})"
    return claim, versus


def plot(run_: dict[str, Any], path: Path) -> None:
    val_mean = [float(np.mean(v)) for v in run_["val"]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100 * float(np.mean(v)) for v in run_["val"]]
    err = [100 * float(np.std(v)) for v in run_["val"]]
    score = run_["scores"][PAPER_ROW][0]
    labels = [
        candidate_label(spec).replace("channels=", "").replace("hidden=", "") for spec in run_["candidates"]
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = [
        ([-(s + r) for s, r in score], "DisWOT score, paper setting (score draw 0)", False),
        ([float(p) for p in run_["parameters"]], "parameters (log scale): the baseline", True),
    ]
    for ax, (x, title, log) in zip(axes, panels, strict=True):
        ax.set_title(f"Kendall tau vs mean validation accuracy: {tau(list(x), val_mean)[0]:+.2f}")
        ax.errorbar(x, acc, yerr=err, fmt="o", capsize=3)
        for xi, yi, text in zip(x, acc, labels, strict=True):
            ax.annotate(text, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation top-1 % after KD (mean ± std, {len(run_['seeds'])} seeds)")
    fig.suptitle("DisWOT (S18) on digits: training-free score vs distilled accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def document(run_: dict[str, Any], command: str, image: str | None) -> str:
    val_mean = [float(np.mean(v)) for v in run_["val"]]
    test_mean = [float(np.mean(v)) for v in run_["test"]]
    rows = proxies(run_)
    taus = {name: [tau(draw, val_mean) for draw in draws] for name, draws in rows.items()}
    test_taus = {name: [tau(draw, test_mean)[0] for draw in draws] for name, draws in rows.items()}
    table = []
    for name in rows:
        values = [t for t, _ in taus[name]]
        table.append([name, pm(values), ", ".join(f"{p:.3f}" for _, p in taus[name]), pm(test_taus[name])])
    ceiling = seed_ceiling(run_["val"])
    claim, versus = verdicts(taus)
    splits = run_["splits"]
    seeds = run_["seeds"]
    candidates = []
    paper = run_["scores"][PAPER_ROW]
    for i, spec in enumerate(run_["candidates"]):
        draw_scores = [-(d[i][0] + d[i][1]) for d in paper]
        candidates.append(
            [
                candidate_label(spec),
                f"{run_['parameters'][i]:,}",
                pm(draw_scores, digits=4),
                pm(run_["val"][i], 100),
                pm(run_["test"][i], 100),
            ]
        )
    t_val, t_test = run_["teacher_acc"]
    return (
        "# DisWOT: training-free student search against distilled accuracy (S18)\n\n"
        f"```sh\n{command}\n```\n\n"
        f"- Data: scikit-learn digits (8x8, 10 classes): {len(splits.train)} training / {len(splits.val)} "
        f"validation (stratified 20 % of the training split, seed 0) / {len(splits.test)} test images.\n"
        f"- Teacher `{candidate_label(run_['teacher'])}` ({run_['teacher_parameters']:,} parameters), "
        f"cross-entropy, SGD 0.05, cosine: validation {100 * t_val:.2f} %, test {100 * t_test:.2f} %"
        f"{' (from the benchmark cache)' if run_['teacher_cached'] else ''}.\n"
        f"- {len(run_['candidates'])} candidates, each distilled with 0.1 x CE + 0.9 x hinton_kd (T 4), "
        f"AdamW lr 3e-3, weight decay 5e-4, cosine, batch 32, {run_['epochs']} epochs; seeds "
        f"{', '.join(map(str, seeds))}; accuracy of the last epoch.\n"
        f"- Scores: one training batch of {BATCH} (seed 0), score draws {', '.join(map(str, SCORE_SEEDS))}; "
        f"'tau' is Kendall's tau-b (scipy.stats.kendalltau) of a proxy against the mean validation accuracy, "
        "mean ± std over the score draws (the parameter count has one value); 'p' the test's p-value per "
        "draw; 'tau vs test' the same against the mean test accuracy.\n"
        f"- Ceiling: tau between the validation-accuracy rankings of two training seeds, {pm(ceiling)} "
        f"({len(ceiling)} pair(s)): no score can agree with the trained ranking much beyond the seeds' own "
        "agreement.\n"
        f"- Wall time {run_['wall'] / 60:.1f} min, CPU time {run_['cpu'] / 60:.1f} min on one torch thread "
        f"(1-minute load average {run_['load'][0]:.1f} at the start, {run_['load'][1]:.1f} at the end, "
        f"{os.cpu_count()} cores shared with other work); scoring every variant x draw took "
        f"{run_['score_seconds']:.1f} s, training the candidates {run_['train_seconds'] / 60:.1f} min"
        f" ({run_['cached_runs']} of {len(run_['candidates']) * len(seeds)} runs from the benchmark cache, "
        "`$DISTILL_CACHE/bench-search`; `--fresh` retrains them).\n\n"
        + (f"![score vs accuracy]({image})\n\n" if image else "")
        + "## Rank correlation with the distilled accuracy\n\n"
        + markdown_table(["proxy", "tau (validation)", "p per draw", "tau vs test"], table)
        + "\n## Candidates\n\n"
        + markdown_table(
            ["candidate", "parameters", "DisWOT score (paper setting)", "validation top-1 %", "test top-1 %"],
            candidates,
        )
        + "\n**Finding (S18: DisWOT's score ranks students by distilled accuracy, Kendall tau > 0): "
        f"{claim}.**\n\n"
        f"**Finding (DisWOT ranks better than the parameter count): {versus}.**\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 candidates, 2 seeds, 3-epoch runs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help(NAME))
    parser.add_argument("--fresh", action="store_true", help="retrain the teacher and every run (no cache)")
    args = parser.parse_args(argv)
    default = 2 if args.quick else 3
    seeds = list(range(args.seeds or default))
    out = output_file(parser, NAME, args.out, quick=args.quick, partial=len(seeds) != default)
    result = run(args.quick, seeds, use_cache=not args.fresh)
    image = out.with_suffix(".png")
    plot(result, image)
    text = document(result, command_line(NAME, argv), image.name)
    write_results(out, text)
    print(text)
    print(f"wrote {out} and {image}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ViT teacher -> small ViT student: S13 TRG and other feature rows on patch tokens (Fashion-MNIST).

Does the token-level relationship graph ("Knowledge Distillation via Token-level Relationship Graph", Zhang,
Liu & He, 2023) add to logit KD when both models are Vision Transformers and the graph is built on their
patch tokens? The vision suite ran TRG only on CNN positions; here both models are the zoo's `vit`
(transformers' `ViTForImageClassification`, `distill.models.vit`).

Set-up (every number is a `Settings` field):
- Data: Fashion-MNIST (28x28, patch 7: 16 patches + [CLS] = 17 tokens). A stratified validation split is
  carved from the 60k training images and used for every choice; the teacher trains on a stratified subset
  of the rest with all its labels, the students on a smaller stratified subset of the same pool (the
  few-labels regime where a teacher has something to give). Test: a stratified subset of the official
  test split, touched only for the reported numbers.
- Teacher: `vit` 6 blocks x 128 (4 heads), trained here with cross-entropy, cached in
  `$DISTILL_CACHE/bench-vit-tokens` by a key of its settings (`--fresh` trains it again).
- Student: `vit` 3 blocks x 64 (4 heads), the same patch grid. Every student: the same images, epochs,
  AdamW (lr 1e-3, weight decay 0.05), 5% warm-up then cosine, batch 64; accuracy at the last epoch.
- Rows: student alone (CE); KD (0.1 CE + 0.9 KD, T); TRG + KD (the KD row + w x trg); TRG without KD
  (CE + w x trg); FitNets on tokens (CE + fitnet: a linear regressor from the student's middle block
  tokens to the teacher's tap -3 block tokens, MSE); RKD (CE + rkd on the pooled [CLS] vectors,
  RepDistiller's weights). TRG reads the last block's tokens of each model (tap -2, [CLS] included), 16
  tokens per image, its defaults otherwise.
- Chosen on the validation split with the first seed: KD's temperature T (from `kd_temperatures`), then
  TRG's weight w in TRG + KD (from `trg_weights`, at the chosen T); TRG without KD uses the same w. Those
  first-seed runs are reused as the first seed of their rows (the runs are deterministic on one thread).
- Verdicts: a row's mean minus the baseline's mean against the sum of their standard deviations over
  seeds (`distill.tables.noise_verdict`).

    python benchmarks/vit_tokens.py            # the full run: 3 seeds, ~8 min of CPU (23 min on 2 busy cores)
    python benchmarks/vit_tokens.py --quick    # tiny models and data, 2 seeds, under a minute (CI smoke)
    python benchmarks/vit_tokens.py --data cifar10   # CIFAR-10 (shared 10k-image subset, patch 8): partial

A full run writes benchmarks/results/vit_tokens.md (and vit_tokens.png); --quick writes vit_tokens_quick.md,
another --data or number of --seeds vit_tokens_partial.md, never over the full run's file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from distill.data import build_data
from distill.data.image_dataset import per_class_subset
from distill.io import atomic_write_json, cache_root, fingerprint, load_tensors, save_tensors
from distill.models import build_model, count_parameters
from distill.models.cifar import feature_layers_of
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, objective_text, pm
from distill.train import OptimizerConfig, ScheduleConfig, fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

NAME = "vit_tokens"
FULL_DATA = ("fashion_mnist",)  # what a full run covers; --data cifar10 is a partial run
DATASETS = ("fashion_mnist", "cifar10")
FORMAT = 1  # bump when the teacher's training changes: the cache key changes with it


@dataclass(frozen=True)
class ViTSize:
    hidden: int
    depth: int
    heads: int

    def params(self, patch: int) -> dict[str, int]:
        return {"patch_size": patch, "hidden": self.hidden, "depth": self.depth, "heads": self.heads}


@dataclass(frozen=True)
class Settings:
    teacher: ViTSize
    student: ViTSize
    patch: dict[str, int]  # per data set
    val_per_class: int
    teacher_per_class: int
    student_per_class: int
    test_per_class: int
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    lr: float
    kd_temperatures: tuple[float, ...]
    trg_weights: tuple[float, ...]
    fitnet_weight: float


FULL = Settings(
    teacher=ViTSize(hidden=128, depth=6, heads=4),
    student=ViTSize(hidden=64, depth=3, heads=4),
    patch={"fashion_mnist": 7, "cifar10": 8},
    val_per_class=100,
    teacher_per_class=800,
    student_per_class=200,
    test_per_class=500,
    teacher_epochs=4,
    student_epochs=6,
    batch_size=64,
    lr=1e-3,
    kd_temperatures=(2.0, 4.0),
    trg_weights=(0.3, 1.0, 3.0),
    fitnet_weight=1.0,
)
QUICK = dataclasses.replace(
    FULL,
    teacher=ViTSize(hidden=32, depth=2, heads=2),
    student=ViTSize(hidden=16, depth=2, heads=2),
    val_per_class=20,
    teacher_per_class=60,
    student_per_class=20,
    test_per_class=20,
    teacher_epochs=2,
    student_epochs=2,
    kd_temperatures=(4.0,),
    trg_weights=(1.0,),
)


# ------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    name: str
    teacher: TensorDataset
    student: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    description: str


def load_data(cfg: Settings, name: str) -> Data:
    """Normalised tensors: validation carved from the training split by class, the teacher's and the
    students' images drawn by class from the rest, a stratified test subset."""
    splits = build_data(name)
    train, test = splits.train, splits.test
    labels = train.labels.numpy()
    val = per_class_subset(labels, cfg.val_per_class, seed=0, what="val_per_class")
    pool = np.setdiff1d(np.arange(len(labels)), val)
    teacher = pool[per_class_subset(labels[pool], cfg.teacher_per_class, seed=1, what="teacher_per_class")]
    student = pool[per_class_subset(labels[pool], cfg.student_per_class, seed=2, what="student_per_class")]
    test_index = per_class_subset(test.labels.numpy(), cfg.test_per_class, seed=3, what="test_per_class")

    def part(dataset: Any, index: np.ndarray) -> TensorDataset:
        return TensorDataset(*dataset.batch(index.tolist()))

    description = (
        f"{splits.description}; validation {len(val)} images (carved from train, "
        f"{cfg.val_per_class} per class), teacher {len(teacher)} ({cfg.teacher_per_class} per class), "
        f"students {len(student)} ({cfg.student_per_class} per class) from the rest; test {len(test_index)} "
        f"({cfg.test_per_class} per class of the official test split)"
    )
    return Data(
        name,
        part(train, teacher),
        part(train, student),
        part(train, val),
        part(test, test_index),
        tuple(splits.input_shape),
        description,
    )


# ------------------------------------------------------------------------------------------ models


def vit(size: ViTSize, cfg: Settings, data: Data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "vit", num_classes=10, input_shape=data.input_shape, **size.params(cfg.patch[data.name])
    )


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch: int = 500) -> float:
    x, y = dataset.tensors
    was_training = model.training
    model.eval()
    try:
        right = sum(
            int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
            for i in range(0, len(y), batch)
        )
    finally:
        model.train(was_training)
    return right / len(y)


def trainer_settings(cfg: Settings, epochs: int, seed: int) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "seed": seed,
        "progress": False,
        "tensorboard": False,
        "eval_every": 10**6,
        "log_every": 10**6,
        "checkpoint_every": 10**9,
        "device": "cpu",
    }


def optimizer(cfg: Settings) -> OptimizerConfig:
    return OptimizerConfig("adamw", lr=cfg.lr, weight_decay=0.05)


def schedule(cfg: Settings, images: int, epochs: int) -> ScheduleConfig:
    steps = epochs * -(-images // cfg.batch_size)
    return ScheduleConfig("cosine", warmup_steps=max(1, steps // 20))


def teacher_path(cfg: Settings, data: Data) -> Path:
    key = fingerprint(
        [FORMAT, data.name, dataclasses.asdict(cfg.teacher), cfg.patch[data.name], cfg.val_per_class]
        + [cfg.teacher_per_class, cfg.teacher_epochs, cfg.batch_size, cfg.lr]
    )
    return cache_root() / "bench-vit-tokens" / f"teacher-{key}.safetensors"


def obtain_teacher(cfg: Settings, data: Data, fresh: bool) -> tuple[nn.Module, bool, float]:
    """The teacher from the benchmark's cache, or trained now (seed 0) and cached: (model, cached,
    training seconds)."""
    teacher = vit(cfg.teacher, cfg, data, seed=0)
    path = teacher_path(cfg, data)
    info = path.with_suffix(".json")
    if path.is_file() and not fresh:
        teacher.load_state_dict(load_tensors(path))
        seconds = json.loads(info.read_text())["train_seconds"] if info.is_file() else float("nan")
        return teacher.eval(), True, seconds
    images = len(data.teacher)
    result = fit(
        teacher,
        data.teacher,
        objectives=["cross_entropy"],
        optimizer=optimizer(cfg),
        schedule=schedule(cfg, images, cfg.teacher_epochs),
        **trainer_settings(cfg, cfg.teacher_epochs, seed=0),
    )
    save_tensors(path, {k: v.contiguous() for k, v in teacher.state_dict().items()})
    atomic_write_json(info, {"train_seconds": result.train_seconds})
    return teacher.eval(), False, result.train_seconds


# ------------------------------------------------------------------------------------------ rows


Terms = list[tuple[str, float, dict[str, Any]]]


def kd_terms(temperature: float) -> Terms:
    return [("cross_entropy", 0.1, {}), ("hinton_kd", 0.9, {"temperature": temperature})]


def row_terms(row: str, temperature: float, trg_weight: float, cfg: Settings) -> Terms:
    """The objectives of each row (module docstring)."""
    ce: Terms = [("cross_entropy", 1.0, {})]
    return {
        "student alone": ce,
        "KD": kd_terms(temperature),
        "TRG + KD": kd_terms(temperature) + [("trg", trg_weight, {})],
        "TRG (no KD)": ce + [("trg", trg_weight, {})],
        "FitNet on tokens": ce + [("fitnet", cfg.fitnet_weight, {})],
        "RKD (pooled [CLS])": ce + [("rkd", 1.0, {})],
    }[row]


ROWS = ("student alone", "KD", "TRG + KD", "TRG (no KD)", "FitNet on tokens", "RKD (pooled [CLS])")


def terms_text(terms: Terms) -> str:
    return " + ".join(objective_text({"name": n, "weight": w, "params": p}) for n, w, p in terms)


@dataclass
class Run:
    val: float
    test: float
    seconds: float


class Bench:
    def __init__(self, cfg: Settings, data: Data, teacher: nn.Module, console: Console) -> None:
        self.cfg, self.data, self.teacher, self.console = cfg, data, teacher, console
        self.runs: dict[tuple[str, int], Run] = {}  # by (terms, seed)

    def run(self, terms: Terms, seed: int) -> Run:
        key = (repr(terms), seed)
        if key in self.runs:
            return self.runs[key]
        cfg, data = self.cfg, self.data
        student = vit(cfg.student, cfg, data, seed)
        distils = any(name != "cross_entropy" for name, _, _ in terms)
        result = fit(
            student,
            data.student,
            teacher=self.teacher if distils else None,
            objectives=list(terms),
            optimizer=optimizer(cfg),
            schedule=schedule(cfg, len(data.student), cfg.student_epochs),
            **trainer_settings(cfg, cfg.student_epochs, seed),
        )
        run = Run(accuracy(student, data.val), accuracy(student, data.test), result.train_seconds)
        self.runs[key] = run
        self.console.log(
            f"seed {seed} {terms_text(terms)}: val {100 * run.val:.2f} test {100 * run.test:.2f} "
            f"({run.seconds:.0f} s)"
        )
        return run


@dataclass
class Outcome:
    temperature: float
    trg_weight: float
    kd_choice: list[tuple[float, float]]  # (T, validation accuracy)
    trg_choice: list[tuple[float, float]]  # (w, validation accuracy)
    rows: dict[str, list[Run]]


def run_rows(bench: Bench, seeds: list[int]) -> Outcome:
    cfg, first = bench.cfg, seeds[0]
    kd_choice = [(t, bench.run(kd_terms(t), first).val) for t in cfg.kd_temperatures]
    temperature = max(kd_choice, key=lambda c: c[1])[0]  # ties: the first (smaller) T
    trg_choice = [
        (w, bench.run(row_terms("TRG + KD", temperature, w, cfg), first).val) for w in cfg.trg_weights
    ]
    trg_weight = max(trg_choice, key=lambda c: c[1])[0]
    rows = {
        row: [bench.run(row_terms(row, temperature, trg_weight, cfg), seed) for seed in seeds] for row in ROWS
    }
    return Outcome(temperature, trg_weight, kd_choice, trg_choice, rows)


# ------------------------------------------------------------------------------------------ report


def tests(runs: list[Run]) -> list[float]:
    return [r.test for r in runs]


def versus(runs: list[Run], base: list[Run]) -> tuple[str, str]:
    gain, spread = gain_and_spread(tests(runs), tests(base), 100)
    return f"{gain:+.2f} (spread {spread:.2f})", noise_verdict(gain, spread)


def main_table(outcome: Outcome, cfg: Settings) -> list[list[str]]:
    alone, kd = outcome.rows["student alone"], outcome.rows["KD"]
    table = []
    for row, runs in outcome.rows.items():
        terms = terms_text(row_terms(row, outcome.temperature, outcome.trg_weight, cfg))
        cells = [row, terms, pm(tests(runs), 100), pm([r.val for r in runs], 100)]
        cells += ["-", "-"] if row == "student alone" else list(versus(runs, alone))
        cells += ["-", "-"] if row in ("student alone", "KD") else list(versus(runs, kd))
        cells.append(f"{mean_std([r.seconds for r in runs])[0]:.0f}")
        table.append(cells)
    return table


HEADERS = [
    "method",
    "objectives",
    "test accuracy (%)",
    "validation (%)",
    "vs student alone",
    "verdict",
    "vs KD",
    "verdict vs KD",
    "s / run",
]


def choice_text(outcome: Outcome) -> str:
    kd = ", ".join(f"T {t:g}: {100 * v:.2f}" for t, v in outcome.kd_choice)
    trg = ", ".join(f"w {w:g}: {100 * v:.2f}" for w, v in outcome.trg_choice)
    return (
        f"Chosen on the validation split (first seed): KD temperature T = {outcome.temperature:g} "
        f"(validation accuracy per T: {kd}); then TRG weight w = {outcome.trg_weight:g} in TRG + KD at that "
        f"T (per w: {trg}). TRG (no KD) uses the same w.\n"
    )


def claims(outcome: Outcome) -> list[str]:
    """S13's claim (TRG adds to logit KD), and what the other rows show."""
    rows, lines = outcome.rows, []
    gain, spread = gain_and_spread(tests(rows["TRG + KD"]), tests(rows["KD"]), 100)
    verdict = noise_verdict(gain, spread)
    word = {"better": "reproduced", "worse": "not reproduced (worse)", "within noise": "within noise"}
    lines.append(
        f"- S13 TRG's claim, a gain over logit KD: TRG + KD minus KD = {gain:+.2f} points (spread "
        f"{spread:.2f}): **{word.get(verdict, verdict)}** on ViT patch tokens here."
    )
    for row in ("KD", "TRG (no KD)", "FitNet on tokens", "RKD (pooled [CLS])"):
        gain, spread = gain_and_spread(tests(rows[row]), tests(rows["student alone"]), 100)
        lines.append(
            f"- {row} against the student alone: {gain:+.2f} points (spread {spread:.2f}), "
            f"{noise_verdict(gain, spread)}."
        )
    return lines


def draw(outcome: Outcome, teacher_test: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(outcome.rows)
    means = [100 * mean_std(tests(outcome.rows[n]))[0] for n in names]
    stds = [100 * mean_std(tests(outcome.rows[n]))[1] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.barh(names[::-1], means[::-1], xerr=stds[::-1], color="tab:blue", alpha=0.8, capsize=3)
    ax.axvline(100 * teacher_test, color="tab:red", linestyle="--", label=f"teacher {100 * teacher_test:.1f}")
    ax.axvline(means[0], color="grey", linestyle=":", label="student alone")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_xlim(max(0.0, low - 3), max(100 * teacher_test, max(means)) + 2)
    ax.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"ViT teacher -> small ViT student ({title})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_text(cfg: Settings, data: Data, teacher: nn.Module, cached: bool, seconds: float) -> str:
    t, s, patch = cfg.teacher, cfg.student, cfg.patch[data.name]
    student = vit(s, cfg, data, 0)
    taps_s, taps_t = feature_layers_of(student), feature_layers_of(teacher)
    trained = "trained by an earlier run" if math.isnan(seconds) else f"trained in {seconds:.0f} s"
    trained += ", read from the benchmark's cache" if cached else ""
    return (
        f"Data: {data.description}.\n\n"
        f"Teacher: `vit` {t.depth} blocks x {t.hidden} ({t.heads} heads, MLP 4x, patch {patch}), "
        f"{count_parameters(teacher) / 1e6:.2f}M parameters, cross-entropy for {cfg.teacher_epochs} epochs "
        f"on its images ({trained}). Student: `vit` {s.depth} blocks x {s.hidden} ({s.heads} heads, patch "
        f"{patch}), {count_parameters(student) / 1e6:.3f}M parameters "
        f"({count_parameters(teacher) / count_parameters(student):.1f}x fewer). Every student: "
        f"{cfg.student_epochs} epochs of its {len(data.student)} images, batch {cfg.batch_size}, AdamW lr "
        f"{cfg.lr:g}, weight decay 0.05, 5% warm-up then cosine; accuracy at the last epoch.\n\n"
        f"Layers: TRG student `{taps_s[-2]}` -> teacher `{taps_t[-2]}` (tap -2, the last block's tokens, "
        f"[CLS] included, 16 of them per image); FitNets `{taps_s[-3]}` -> `{taps_t[-3]}` (tap -3, linear "
        f"regressor, weight {cfg.fitnet_weight:g}, not tuned); RKD `{taps_s[-1]}` -> `{taps_t[-1]}` "
        "(the normalised [CLS] vectors, distance 25 + angle 50, RepDistiller's weights, not tuned).\n"
    )


NOTES = """## Notes

- Scale: S13 reports on CIFAR-100 / ImageNet with full-size models trained for hundreds of epochs. Here a
  small ViT teacher trained for minutes distils into a smaller ViT that sees a few thousand labelled images
  for a few epochs, without augmentation: the differences hold for this few-label, short-training regime,
  not beyond it.
- Only KD's T and TRG's w were chosen (on the validation split); FitNets (weight 1) and RKD (RepDistiller's
  weights) run one untuned setting each, so their rows are not each method's best. TRG without KD reuses the
  w chosen with KD.
- TRG reads each block's output before the final LayerNorm, the [CLS] token included among the tokens it
  samples; S13 has no official code, and its token choice for ViTs is not known here (docs/features.md).
- 's / run': wall seconds of training per run on shared cores (noisy). The rows with a teacher include its
  forward pass; TRG without KD and FitNets stop the teacher after the block they read, RKD after `pooled`.
"""


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument(
        "--data", default=FULL_DATA[0], choices=DATASETS, help="data set (default fashion_mnist)"
    )
    parser.add_argument("--fresh", action="store_true", help="train the teacher again (ignore the cache)")
    parser.add_argument("--out", type=Path, default=None, help=out_help(NAME))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, NAME, args.data, FULL_DATA)
    torch.set_num_threads(1)  # 2 shared cores: tiny models gain nothing from a second thread
    console = Console(stderr=True)
    cfg = QUICK if args.quick else FULL
    load_start, started, cpu_started = os.getloadavg(), time.perf_counter(), time.process_time()
    data = load_data(cfg, args.data)
    teacher, cached, teacher_seconds = obtain_teacher(cfg, data, args.fresh)
    teacher_test, teacher_val = accuracy(teacher, data.test), accuracy(teacher, data.val)
    console.log(f"teacher: val {100 * teacher_val:.2f} test {100 * teacher_test:.2f} (cached: {cached})")
    outcome = run_rows(Bench(cfg, data, teacher, console), seeds)
    total, load_end = time.perf_counter() - started, os.getloadavg()
    cpu = time.process_time() - cpu_started
    table = main_table(outcome, cfg)
    plot = out.with_suffix(".png")
    draw(outcome, teacher_test, args.data, plot)
    text = (
        f"# ViT teacher -> small ViT student: TRG and feature rows on patch tokens ({args.data})\n\n"
        f"Command: `{command_line(NAME, argv)}` ({os.cpu_count()} CPU cores, torch threads 1); seeds "
        f"{seeds}; total wall time {total:.0f} s, CPU time of the process {cpu:.0f} s. Load average "
        f"(1/5/15 min) {load_start[0]:.1f}/"
        f"{load_start[1]:.1f}/{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/"
        f"{load_end[2]:.1f} at the end (other work shared the cores: times are noisy).\n\n"
        + settings_text(cfg, data, teacher, cached, teacher_seconds)
        + f"\nTeacher: test {100 * teacher_test:.2f} %, validation {100 * teacher_val:.2f} %.\n\n"
        "## Students: test accuracy (%)\n\n"
        "Cells are mean ± std over seeds at the last epoch. 'vs' columns: difference of the means in points "
        "(spread = sum of the two standard deviations); 'better' / 'worse' when the difference is beyond the "
        "spread, else 'within noise'.\n\n"
        + markdown_table(HEADERS, table)
        + f"\n![test accuracy per row]({plot.name})\n\n"
        + choice_text(outcome)
        + "\n## Verdict\n\n"
        + "\n".join(claims(outcome))
        + "\n\n"
        + NOTES
    )
    write_results(out, text)
    console.print(text)
    console.print(f"wrote {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

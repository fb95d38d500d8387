"""Modulation recognition benchmark (S01, "ClST: A Convolutional Transformer Framework for Automatic
Modulation Recognition by Knowledge Distillation", Hou et al., IEEE TWC 2024): a ClST-style teacher and the
KD-CNN / KD-MobileNet students, each alone and with SKD (soft targets + hard labels), over the SNR sweep.

Data: the `signals` data set (synthetic, 8 modulations, SNR -20..18 dB step 2, (2, 128) I/Q frames). The
packaged recipe `signals` (teacher `clst`, student `kd_cnn`) runs once per student (`kd_cnn`, then
`kd_mobilenet` in its place); the teacher is trained in the first run (seed 0 of the recipe's teacher), kept
in `$DISTILL_CACHE/teachers` and loaded by the second, and its logits are memoised across students
(`distill.bench.memo`). Each trained model is then read back and scored frame by frame on the test split:
accuracy per SNR (the plot), at high SNR (the mean over frames of SNR >= 10 dB) and overall.

Hyperparameters: SKD's (temperature, alpha) for each student are chosen from a small grid on the validation
split (`holdout: validation`, drawn from its own seed; the test split is not read), seed 0, by mean validation
accuracy at SNR >= 10 dB; the rest is the recipe's.

    python benchmarks/signals.py            # 3 seeds -> benchmarks/results/signals.md + signals.png
    python benchmarks/signals.py --quick    # tiny data, 2 epochs, 2 seeds, under a minute
                                            # -> benchmarks/results/signals_quick.md (never over signals.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.bench.memo import MemoizedTeacher
from distill.data.signals import SignalDataset, accuracy_by_snr
from distill.experiment import run_recipe
from distill.io import save_tensors
from distill.models import build_model, count_parameters
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.schema import Recipe
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, pm
from distill.tasks.results import ExperimentResult
from distill.tasks.teacher_store import load_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

PARTS = ("students",)
STUDENTS = {"kd_cnn": "KD-CNN", "kd_mobilenet": "KD-MobileNet"}
STUDENT_PARAMS: dict[str, dict[str, Any]] = {
    "kd_cnn": {"channels": [16, 24, 32]},
    "kd_mobilenet": {"stem": 16, "channels": [32, 48, 64], "strides": [4, 2, 2], "kernel": 5},
}
GRID = ((2.0, 0.5), (4.0, 0.9))  # SKD (temperature, alpha) candidates, chosen on validation
HIGH_SNR = 10.0  # dB: "high SNR" is every SNR >= this
ALONE, SKD = "student alone", "SKD"
THREADS = 1
QUICK = {
    "data": {
        "params": {"train_per_class_per_snr": 3, "val_per_class_per_snr": 2, "test_per_class_per_snr": 2}
    },
    "teacher": {"train": {"epochs": 2}},
    "trainer": {"epochs": 2},
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def signals_recipe(
    student: str,
    seeds: list[int],
    quick: bool,
    *,
    skd: tuple[float, float],
    holdout: str = "test",
    methods: tuple[str, ...] = (ALONE, SKD),
) -> Recipe:
    """The packaged recipe with `student`, SKD at (temperature, alpha), the given holdout and methods."""
    recipe = parse_yaml(builtin_recipe_text("signals"), "signals")
    temperature, alpha = skd
    skd_method = {
        "name": SKD,
        "objectives": [
            {"name": "cross_entropy", "weight": round(1 - alpha, 6)},
            {"name": "hinton_kd", "weight": alpha, "params": {"temperature": temperature}},
        ],
    }
    every = {
        ALONE: {"name": ALONE, "objectives": [{"name": "cross_entropy", "weight": 1.0}]},
        SKD: skd_method,
    }
    changes: dict[str, Any] = {
        "student": {"name": student, "params": STUDENT_PARAMS[student]},
        "data": {"params": {"holdout": holdout}},
        "methods": [every[m] for m in methods],
        "seeds": seeds,
        "evaluation": {"latency": holdout == "test"},
    }
    if quick:
        changes = merged(changes, QUICK)
    recipe = merged(recipe, changes)
    recipe["name"] = f"signals-{student}-{holdout}"
    return recipe_from_dict(recipe, "signals")


@torch.inference_mode()
def predictions(model: nn.Module, data: SignalDataset, batch: int = 1024) -> torch.Tensor:
    model.eval()
    frames = data.tensors[0]
    return torch.cat([model(frames[i : i + batch]).argmax(-1) for i in range(0, len(frames), batch)])


@dataclass
class Scores:
    """One trained model's test accuracy: per SNR, at high SNR, overall."""

    by_snr: dict[float, float]
    high: float
    overall: float


def score(model: nn.Module, data: SignalDataset) -> Scores:
    pred = predictions(model, data)
    labels, snr = data.tensors[1], data.snr
    high = snr >= HIGH_SNR
    return Scores(
        accuracy_by_snr(pred, labels, snr),
        float((pred[high] == labels[high]).float().mean()),
        float((pred == labels).float().mean()),
    )


def trained_student(result: ExperimentResult, method: str, seed: int) -> nn.Module:
    """The student of `method` and `seed` as it ended (its last checkpoint), read back from the run folder."""
    runs = next(m for m in result.methods if m.name == method)
    run = next(r for r in runs.runs if r.seed == seed)
    assert run.result.run_dir is not None
    folder = run.result.run_dir / "checkpoints"
    latest = folder / (folder / "latest").read_text().strip() / "model.safetensors"
    spec, data = result.recipe.student, result.data
    model = build_model(spec.name, num_classes=data.num_classes, input_shape=data.input_shape, **spec.params)
    load_weights(model, latest, "student")
    return model


def flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass on one frame (torch's FlopCounterMode: a multiply-add
    counts 2; matrix products and convolutions only)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


@dataclass
class Row:
    label: str
    parameters: int
    flops: int
    scores: list[Scores] = field(default_factory=list)


def choose_skd(student: str, quick: bool, runner: Runner) -> tuple[tuple[float, float], list[str]]:
    """SKD's (temperature, alpha) with the best mean validation accuracy at high SNR (seed 0), and the table
    lines that show each candidate's score."""
    best, best_score, lines = GRID[0], -1.0, []
    grid = GRID[:1] if quick else GRID
    for temperature, alpha in grid:
        recipe = signals_recipe(
            student, [0], quick, skd=(temperature, alpha), holdout="validation", methods=(SKD,)
        )
        result = runner.run(recipe, f"T{temperature:g}-a{alpha:g}")
        value = score(trained_student(result, SKD, 0), result.data.test).high
        lines.append(f"T {temperature:g}, alpha {alpha:g}: {100 * value:.2f}")
        if value > best_score:
            best, best_score = (temperature, alpha), value
    return best, lines


def plot(rows: list[Row], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"teacher": ("black", "-"), "KD-CNN": ("tab:blue", None), "KD-MobileNet": ("tab:orange", None)}
    for row in rows:
        levels = sorted(row.scores[0].by_snr)
        means = [100 * mean_std([s.by_snr[level] for s in row.scores])[0] for level in levels]
        family = next(k for k in styles if row.label.startswith(k))
        colour, line = styles[family]
        line = line or ("--" if row.label.endswith("alone") else "-")
        ax.plot(levels, means, color=colour, linestyle=line, marker="o", markersize=3, label=row.label)
    ax.axvline(HIGH_SNR, color="grey", linewidth=0.5)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel(f"test accuracy % (students: mean of {len(rows[-1].scores)} seeds; teacher: 1 model)")
    ax.set_title("Modulation recognition: accuracy over SNR (8 classes, chance 12.5%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


class Runner:
    """Runs recipes with one teacher: the first run trains it (the recipe's teacher spec, seed 0), every later
    run loads its weights (`teacher.checkpoint`) instead of training it again for another holdout or student,
    and every run's students read its logits through one memo (`MemoizedTeacher`: the same frames, the same
    weights, so the same logits)."""

    def __init__(self, folder: Path, console: Console) -> None:
        self.folder, self.console = folder, console
        self.teacher: nn.Module | None = None
        self.memo: MemoizedTeacher | None = None
        self.info: Any = None  # the first run's TeacherInfo: how the teacher was trained
        self.walls: dict[str, float] = {}

    def wrap(self, teacher: nn.Module) -> nn.Module:
        if self.memo is None:
            self.teacher, self.memo = teacher, MemoizedTeacher(teacher)
        return self.memo

    def run(self, recipe: Recipe, tag: str) -> ExperimentResult:
        if self.teacher is not None:
            weights = self.folder / "teacher.safetensors"
            if not weights.exists():
                save_tensors(
                    weights, {k: v.detach().contiguous() for k, v in self.teacher.state_dict().items()}
                )
            assert recipe.teacher is not None
            recipe = recipe.model_copy(
                update={"teacher": recipe.teacher.model_copy(update={"checkpoint": weights})}
            )
        begun = time.perf_counter()
        result = run_recipe(
            recipe,
            out=self.folder / f"{recipe.name}-{tag}",
            progress=False,
            console=self.console,
            teacher_wrapper=self.wrap,
        )
        self.walls[f"{recipe.name} {tag}"] = time.perf_counter() - begun
        if self.info is None:
            self.info = result.teacher
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, 2 epochs, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("signals"))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, "signals", "students", PARTS)
    console = Console(stderr=True)
    torch.set_num_threads(THREADS)
    command = command_line("signals", argv)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[Row] = []
    chosen: dict[str, tuple[float, float]] = {}
    grid_lines: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="distill-bench-signals-") as tmp:
        runner = Runner(Path(tmp), console)
        for student, label in STUDENTS.items():
            chosen[student], grid_lines[student] = choose_skd(student, args.quick, runner)
            result = runner.run(signals_recipe(student, seeds, args.quick, skd=chosen[student]), "test")
            test, shape = result.data.test, result.data.input_shape
            if not rows:
                teacher = runner.teacher
                assert teacher is not None
                rows.append(
                    Row(
                        "teacher (ClST)",
                        count_parameters(teacher),
                        flops(teacher, shape),
                        [score(teacher, test)],
                    )
                )
            for method in (ALONE, SKD):
                models = [trained_student(result, method, seed) for seed in seeds]
                suffix = "alone" if method == ALONE else "+ SKD"
                rows.append(
                    Row(
                        f"{label} {suffix}",
                        count_parameters(models[0]),
                        flops(models[0], shape),
                        [score(m, test) for m in models],
                    )
                )
    total = time.perf_counter() - started
    png = out.with_suffix(".png")
    plot(rows, png)
    text = report(
        rows,
        chosen,
        grid_lines,
        seeds,
        command,
        total,
        runner.walls,
        load_start,
        png,
        runner.info,
        args.quick,
    )
    write_results(out, text)
    console.print(text)
    console.print(f"wrote {out} and {png} in {total:.0f} s")
    return 0


def high_values(row: Row) -> list[float]:
    return [s.high for s in row.scores]


def position(gap: float) -> str:
    """`gap` = teacher - student, in points, as words."""
    return f"{abs(gap):.2f} points {'below' if gap > 0 else 'above'} the teacher"


def verdict(student: Row, teacher: Row) -> str:
    """Reproduced when the student's high-SNR mean is within 2 points of the teacher's (or above it), with
    >= 5x fewer parameters; "within noise" when the gap exceeds 2 points by less than the spread (the sum of
    the standard deviations); else not reproduced."""
    gap = 100 * (mean_std(high_values(teacher))[0] - mean_std(high_values(student))[0])
    ratio = teacher.parameters / student.parameters
    spread = 100 * (mean_std(high_values(student))[1] + mean_std(high_values(teacher))[1])
    if ratio < 5:
        return f"not reproduced (only {ratio:.1f}x fewer parameters)"
    if gap <= 2:
        return f"reproduced ({position(gap)}, {ratio:.0f}x fewer parameters)"
    if gap - 2 <= spread:
        return f"within noise ({position(gap)}, spread {spread:.2f}; {ratio:.0f}x fewer parameters)"
    return f"not reproduced ({position(gap)}, {ratio:.0f}x fewer parameters)"


def claim_mark(verdicts: list[str]) -> str:
    """A claim that every comparison be better: reproduced, within noise, or not reproduced."""
    if all(v == "better" for v in verdicts):
        return "reproduced"
    return "not reproduced" if "worse" in verdicts else "within noise"


def teacher_claim(rows: list[Row]) -> str:
    """The paper's ClST beats the CNN baselines: the teacher against each student trained alone."""
    teacher, parts, verdicts = rows[0], [], []
    for label in STUDENTS.values():
        alone = next(r for r in rows if r.label == f"{label} alone")
        gain, spread = gain_and_spread(high_values(teacher), high_values(alone), 100)
        verdicts.append(noise_verdict(gain, spread))
        parts.append(f"{gain:+.2f} over {label} alone ({verdicts[-1]}, spread {spread:.2f})")
    return (
        "- The teacher (ClST) is more accurate than the small CNNs trained alone, at SNR >= "
        f"{HIGH_SNR:g} dB: {claim_mark(verdicts)} ({'; '.join(parts)}; the teacher is one model: its own "
        "seed-to-seed spread is not measured)."
    )


def teacher_note(info: Any) -> str:
    if info is None or info.source != "trained":
        return f"came from {'the teacher cache' if info is None else info.source} (trained by an earlier run)"
    return f"was trained in this run ({info.train_seconds:.0f} s)"


def report(
    rows: list[Row],
    chosen: dict[str, tuple[float, float]],
    grid_lines: dict[str, list[str]],
    seeds: list[int],
    command: str,
    total: float,
    walls: dict[str, float],
    load_start: float,
    png: Path,
    teacher_info: Any,
    quick: bool,
) -> str:
    teacher = rows[0]
    table = []
    for row in rows:
        high = [s.high for s in row.scores]
        overall = [s.overall for s in row.scores]
        table.append(
            [
                row.label,
                f"{row.parameters:,}",
                f"{teacher.parameters / row.parameters:.1f}x",
                f"{row.flops / 1e6:.2f}",
                pm(high, 100),
                pm(overall, 100),
                str(len(row.scores)),
            ]
        )
    levels = sorted(teacher.scores[0].by_snr)
    curve = [
        [f"{level:g}"] + [f"{100 * mean_std([s.by_snr[level] for s in row.scores])[0]:.1f}" for row in rows]
        for level in levels
    ]
    gains, claims = [], []
    for label in STUDENTS.values():
        alone = next(r for r in rows if r.label == f"{label} alone")
        skd = next(r for r in rows if r.label == f"{label} + SKD")
        gain, spread = gain_and_spread([s.high for s in skd.scores], [s.high for s in alone.scores], 100)
        overall_gain, overall_spread = gain_and_spread(
            [s.overall for s in skd.scores], [s.overall for s in alone.scores], 100
        )
        verdicts = [noise_verdict(gain, spread), noise_verdict(overall_gain, overall_spread)]
        gains.append(
            f"- {label} with SKD more accurate than alone: {claim_mark(verdicts)}; SKD − alone at high SNR "
            f"{gain:+.2f} ({verdicts[0]}, spread {spread:.2f}), over all SNRs {overall_gain:+.2f} "
            f"({verdicts[1]}, spread {overall_spread:.2f})."
        )
        claims.append(
            f"- {label} + SKD near the teacher (within 2 points at SNR >= {HIGH_SNR:g} dB) with >= 5x "
            f"fewer parameters: {verdict(skd, teacher)}."
        )
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items())
    chosen_text = "; ".join(
        f"{STUDENTS[s]}: T {t:g}, alpha {a:g} (validation high-SNR accuracy % — {', '.join(grid_lines[s])})"
        for s, (t, a) in chosen.items()
    )
    return (
        "# Modulation recognition benchmark (S01: ClST teacher, KD-CNN / KD-MobileNet students, SKD)\n\n"
        + (
            "**Quick mode: tiny data and 2 epochs; the numbers say nothing about the method.**\n\n"
            if quick
            else ""
        )
        + f"Command: `{command}` ({os.cpu_count()} CPU cores, torch threads {THREADS}); total wall time "
        f"{total:.0f} s ({timing}); 1-minute load average {load_start:.1f} at the start (above 2 means other "
        "work shared the cores).\n\n"
        "Data: the `signals` data set (synthetic: BPSK, QPSK, 8PSK, 16QAM, 64QAM, PAM4, GFSK, CPFSK; RRC "
        "roll-off 0.35 at 8 samples per symbol, random timing / carrier frequency / phase offsets, AWGN at "
        "-20..18 dB step 2; frames (2, 128)); "
        f"the recipe `signals` with its sizes; the teacher {teacher_note(teacher_info)}. "
        f"High SNR: the frames of SNR >= "
        f"{HIGH_SNR:g} dB (10, 12, 14, 16, 18). Accuracies are of the last epoch (no selection on the test "
        f"split); students over seeds {seeds}, mean ± std; the teacher is one model (seed 0, trained "
        "once and shared by every student, as the paper distils from one teacher), so its row has no "
        "spread. FLOPs: one "
        "forward pass on one frame, `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2; "
        "normalisations, activations and softmax not counted).\n\n"
        f"SKD settings chosen on the validation split (seed 0): {chosen_text}.\n\n"
        + markdown_table(
            [
                "model",
                "parameters",
                "fewer than teacher",
                "MFLOPs / frame",
                f"accuracy % (SNR >= {HIGH_SNR:g} dB)",
                "accuracy % (all SNRs)",
                "seeds",
            ],
            table,
        )
        + "\n\n## The paper's claims\n\n"
        + teacher_claim(rows)
        + "\n"
        + "\n".join(claims)
        + "\n"
        + "\n".join(gains)
        + "\n\n## Accuracy (%) per SNR, mean over seeds\n\n"
        + f"![accuracy over SNR]({png.name})\n\n"
        + markdown_table(["SNR dB", *[r.label for r in rows]], curve)
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())

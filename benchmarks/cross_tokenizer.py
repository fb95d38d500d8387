"""Cross-tokenizer distillation on tiny-shakespeare: a teacher with a 4,096-token BPE, a student with a
1,024-token BPE (both byte-level, trained here on the training text), against the student alone and against
KD from a teacher of the same size that shares the student's tokenizer.

Rows (every student: the same model, data, epochs and seeds):
- student alone: cross-entropy only;
- ULD: CE + lambda * `uld` (Boizard et al., 2024), teacher with its own 4k tokenizer;
- aligned: CE + lambda * `aligned_kd` (TRL GOLD's aligned form), same teacher;
- same-tokenizer KD (reference): CE + lambda * `forward_kl`, a teacher of the same size trained with the
  student's 1k tokenizer.
Tokenizers, teachers and students train on the first `train_chars - val_chars` characters of the training
text; each lambda is chosen on the next `val_chars` (the validation split), then every row is measured on
the held-out 10% of tiny-shakespeare (the same teachers: the validation run trains them, the test run finds
them in `$DISTILL_CACHE`). Held-out loss is in bits per byte of the predicted text
(the text is ASCII: bits per character), comparable across tokenizers.

    python benchmarks/cross_tokenizer.py          # 3 seeds -> benchmarks/results/cross_tokenizer.md
    python benchmarks/cross_tokenizer.py --quick  # CI: tiny models and data, 2 seeds, under a minute
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill.data import build_data
from distill.data.paths import data_path
from distill.data.token_alignment import token_bytes
from distill.experiment import run_recipe
from distill.recipe.load import recipe_from_dict
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

STUDENT_VOCAB, TEACHER_VOCAB = 1024, 4096
TEST_FRACTION = 0.1  # tiny-shakespeare's last 10% is the held-out test text (as `lm_shakespeare`)


@dataclass
class Settings:
    train_chars: int  # the first characters of the training text that the benchmark reads
    val_chars: int  # of those, the last ones: the validation split (every model trains on the rest)
    test_chars: int | None  # of the held-out text (None: all of it)
    max_length: int
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_epochs: int
    student_epochs: int
    grid: dict[str, list[float]] = field(default_factory=dict)  # objective -> lambdas tried on validation
    batch_size: int = 16
    lr: float = 0.003


LLAMA = {"model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": False}
FULL = Settings(
    train_chars=300_000,
    val_chars=40_000,
    test_chars=None,
    max_length=128,
    teacher={**LLAMA, "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "intermediate_size": 352, "max_position_embeddings": 160},
    student={**LLAMA, "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 128, "max_position_embeddings": 160},
    teacher_epochs=6,
    student_epochs=1,
    grid={"uld": [1.0, 4.0], "aligned_kd": [1.0, 4.0], "forward_kl": [0.5, 2.0]},
)  # fmt: skip
QUICK = Settings(
    train_chars=30_000,
    val_chars=6_000,
    test_chars=8_000,
    max_length=48,
    teacher={**LLAMA, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64},
    student={**LLAMA, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 64},
    teacher_epochs=1,
    student_epochs=1,
    grid={"uld": [1.0], "aligned_kd": [1.0], "forward_kl": [1.0]},
)  # fmt: skip

ROWS = {  # row -> (objective, teacher's tokenizer)
    "student alone (CE)": (None, None),
    "ULD (4k teacher)": ("uld", TEACHER_VOCAB),
    "aligned / GOLD (4k teacher)": ("aligned_kd", TEACHER_VOCAB),
    "same-tokenizer KD (1k teacher)": ("forward_kl", STUDENT_VOCAB),
}


def split_files(folder: Path, settings: Settings) -> dict[str, tuple[Path, Path]]:
    """Text files: ("validation": training text minus its tail, the tail) and ("test": the same training
    text, the held-out text)."""
    text = data_path("text/tinyshakespeare.txt").read_text()
    training = text[: int(len(text) * (1 - TEST_FRACTION))]
    held_out = text[int(len(text) * (1 - TEST_FRACTION)) :]
    if settings.test_chars is not None:
        held_out = held_out[: settings.test_chars]
    train = training[: settings.train_chars]
    parts = {
        "fit": train[: -settings.val_chars],
        "val": train[-settings.val_chars :],
        "test": held_out,
    }
    for name, part in parts.items():
        (folder / f"{name}.txt").write_text(part)
    return {
        "validation": (folder / "fit.txt", folder / "val.txt"),
        "test": (folder / "fit.txt", folder / "test.txt"),
    }


def method(name: str, objective: str | None, weight: float) -> dict[str, Any]:
    terms: list[dict[str, Any]] = [{"name": "cross_entropy"}]
    if objective is not None:
        terms.append({"name": objective, "weight": weight})
    return {"name": name, "objectives": terms}


def recipe(
    settings: Settings,
    files: tuple[Path, Path],
    teacher_vocab: int,
    methods: list[dict[str, Any]],
    seeds: list[int],
    out: Path,
) -> dict[str, Any]:
    train, test = files
    return {
        "name": f"cross-tokenizer-{teacher_vocab}",
        "data": {
            "name": "text",
            "params": {
                "path": str(train),
                "test_path": str(test),
                "tokenizer": {"bpe": {"vocab_size": STUDENT_VOCAB}},
                "max_length": settings.max_length,
                "max_new_tokens": 4,
            },
            "batch_size": settings.batch_size,
            "eval_batch_size": 32,
        },
        "teacher": {
            "name": "hf",
            "params": {"config": settings.teacher, "tokenizer": {"bpe": {"vocab_size": teacher_vocab}}},
            "train": {"epochs": settings.teacher_epochs, "optimizer": {"lr": settings.lr}},
        },
        "student": {"name": "hf", "params": {"config": settings.student}},
        "methods": methods,
        "optimizer": {"lr": settings.lr},
        "schedule": {"name": "cosine", "warmup_epochs": 0.1},
        "trainer": {"epochs": settings.student_epochs, "threads": 1, "log_every": 1000},
        "seeds": seeds,
        "evaluation": {"latency": False},
        "output": {"dir": str(out), "tensorboard": False},
    }


def bytes_per_token(params: dict[str, Any], tokenizer: Any) -> float:
    """Bytes of text per counted held-out token, for the data `params` in `tokenizer`'s tokens."""
    data = build_data("text", **{**params, "tokenizer": tokenizer})
    table = token_bytes(data.tokenizer)
    counted = sum(
        len(table[e.ids[i]]) for e in data.test.examples for i in range(1, len(e.ids)) if e.targets[i]
    )
    return counted / data.test.counted_tokens()


def bits_per_byte(nats_per_token: float, bytes_per_tok: float) -> float:
    return nats_per_token / bytes_per_tok / math.log(2)


@dataclass
class Run:
    """One recipe run's numbers: per method the held-out nats per token of each seed; the teacher's."""

    losses: dict[str, list[float]]
    teacher_loss: float
    teacher_seconds: float
    student_bytes: float  # bytes per counted held-out token, student tokenizer
    teacher_bytes: float
    parameters: tuple[int, int]  # teacher, student


def run(spec: dict[str, Any], console: Console) -> Run:
    result = run_recipe(recipe_from_dict(spec), progress=False, console=console)
    losses = {m.name: [r.result.final["loss"] for r in m.runs] for m in result.methods}
    teacher = result.teacher
    assert teacher is not None
    params = spec["data"]["params"]
    teacher_tokenizer = {"bpe": spec["teacher"]["params"]["tokenizer"]["bpe"]}
    return Run(
        losses,
        teacher.metrics["loss"],
        teacher.train_seconds,
        bytes_per_token(params, params["tokenizer"]),
        bytes_per_token(params, teacher_tokenizer),
        (teacher.parameters, result.student_parameters),
    )


def verdict(row: list[float], base: list[float]) -> str:
    """The project's rule (`distill.tables.noise_verdict`) with lower bits per character better: beyond
    noise when the difference of means exceeds the sum of the two standard deviations."""
    gain, spread = gain_and_spread(base, row)  # base - row: positive when the row has fewer bits
    return noise_verdict(gain, spread)


def choose_lambdas(
    settings: Settings, files: tuple[Path, Path], out: Path, console: Console
) -> tuple[dict[str, float], list[list[str]]]:
    """The lambda of each KD objective with the lowest validation loss (seed 0), and the validation table."""
    chosen: dict[str, float] = {}
    table: list[list[str]] = []
    for vocab in (TEACHER_VOCAB, STUDENT_VOCAB):
        objectives = [o for o, v in ROWS.values() if v == vocab and o is not None]
        methods = [method(f"{o} x{w:g}", o, w) for o in objectives for w in settings.grid[o]]
        if vocab == TEACHER_VOCAB:
            methods.insert(0, method("student alone (CE)", None, 0.0))
        found = run(recipe(settings, files, vocab, methods, [0], out / f"val-{vocab}"), console)
        for name, values in found.losses.items():
            table.append([name, f"{vocab} BPE" if "x" in name else "-", f"{values[0]:.4f}"])
        for objective in objectives:
            best = min(settings.grid[objective], key=lambda w, o=objective: found.losses[f"{o} x{w:g}"][0])
            chosen[objective] = best
    return chosen, table


def plot(rows: dict[str, list[float]], teachers: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    means = [mean_std(rows[n])[0] for n in names]
    stds = [mean_std(rows[n])[1] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(names, means, xerr=stds, color=["#888888", "#4477aa", "#66ccee", "#228833"][: len(names)])
    for label, value in teachers.items():
        ax.axvline(value, linestyle="--", color="#aa3377" if "4k" in label else "#ccbb44", label=label)
    ax.set_xlim(min(min(means), *teachers.values()) - 0.05, max(means) + 0.05)
    ax.invert_yaxis()
    ax.set_xlabel("held-out bits per character (lower is better; mean ± std over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 2 seeds (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("cross_tokenizer"))
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, "cross_tokenizer", "all", ["all"])
    settings = QUICK if args.quick else FULL
    command = command_line("cross_tokenizer", argv)
    torch.set_num_threads(1)
    console = Console(stderr=True, quiet=args.quick)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="distill-bench-xtok-") as tmp:
        folder = Path(tmp)
        files = split_files(folder, settings)
        lambdas, val_table = choose_lambdas(settings, files["validation"], folder, console)
        cross = run(
            recipe(
                settings,
                files["test"],
                TEACHER_VOCAB,
                [method(n, o, lambdas.get(o or "", 0.0)) for n, (o, v) in ROWS.items() if v != STUDENT_VOCAB],
                seeds,
                folder / "cross",
            ),
            console,
        )
        same = run(
            recipe(
                settings,
                files["test"],
                STUDENT_VOCAB,
                [method(n, o, lambdas[o or ""]) for n, (o, v) in ROWS.items() if v == STUDENT_VOCAB],
                seeds,
                folder / "same",
            ),
            console,
        )
    wall = time.perf_counter() - started
    bpc = {
        name: [bits_per_byte(x, cross.student_bytes) for x in values]
        for name, values in {**cross.losses, **same.losses}.items()
    }
    nats = {**cross.losses, **same.losses}
    teachers = {
        "teacher, 4k BPE": bits_per_byte(cross.teacher_loss, cross.teacher_bytes),
        "teacher, 1k BPE": bits_per_byte(same.teacher_loss, same.student_bytes),
    }
    base = bpc["student alone (CE)"]
    base_mean = mean_std(base)[0]
    rows = []
    for name, (objective, vocab) in ROWS.items():
        m, s = mean_std(bpc[name])
        nm, ns = mean_std(nats[name])
        rows.append(
            [
                name,
                "-" if vocab is None else f"{vocab} BPE",
                "-" if objective is None else f"{objective} x{lambdas[objective]:g}",
                f"{nm:.4f} ± {ns:.4f}",
                f"{m:.4f} ± {s:.4f}",
                "-" if objective is None else f"{m - base_mean:+.4f}",
                "-" if objective is None else verdict(bpc[name], base),
            ]
        )
    for label, value in teachers.items():
        loss = cross.teacher_loss if "4k" in label else same.teacher_loss
        rows.append([label, "-", "-", f"{loss:.4f} (own tokens)", f"{value:.4f}", "-", "-"])
    headers = [
        "row",
        "teacher tokenizer",
        "KD term (lambda)",
        "held-out CE (nats / student token)",
        "bits per char",
        "Δ bpc vs alone",
        "vs alone",
    ]
    table = markdown_table(headers, rows)
    plot_path = out.with_suffix(".png")
    plot(bpc, teachers, plot_path)
    uld_verdict = verdict(bpc["ULD (4k teacher)"], base)
    aligned_verdict = verdict(bpc["aligned / GOLD (4k teacher)"], base)

    def claim(result: str) -> str:
        return {"better": "reproduced", "within noise": "within noise", "worse": "not reproduced (worse)"}[
            result
        ]

    teacher_params, student_params = cross.parameters
    held_out = (
        "its last 10%"
        if settings.test_chars is None
        else f"the first {settings.test_chars:,} characters of its last 10%"
    )
    text = "\n".join(
        [
            "# Cross-tokenizer distillation (tiny-shakespeare)",
            "",
            f"Command: `{command}` (torch threads 1, {os.cpu_count()} CPU cores shared with other work; "
            f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); "
            f"wall time {wall:.0f} s including the two teachers' training.",
            "",
            f"- Data: every model trains on the first {settings.train_chars - settings.val_chars:,} "
            "characters of tiny-shakespeare's training text (its first 90%); the next "
            f"{settings.val_chars:,} are the validation split; held-out: {held_out}, "
            f"in blocks of {settings.max_length} tokens. Byte-level BPE tokenizers trained here on the "
            f"training text: {STUDENT_VOCAB} tokens (student) and {TEACHER_VOCAB} (cross-tokenizer "
            f"teacher); {cross.student_bytes:.2f} and {cross.teacher_bytes:.2f} characters per token on the "
            "held-out text.",
            f"- Teachers: {teacher_params:,} parameters with the 4k tokenizer, "
            f"{same.parameters[0]:,} with the 1k one (same layers; the embeddings differ), "
            f"{settings.teacher_epochs} epochs. Student: {student_params:,} parameters, 1k tokenizer, "
            f"{settings.student_epochs} epoch(s) over the same blocks for every row (equal token budget).",
            f"- Lambda (weight of the KD term beside CE, weight 1) chosen per objective from "
            f"{settings.grid} on the validation split (seed 0; table below).",
            f"- Seeds {seeds}; mean ± std of the last epoch. 'vs alone': better / worse when the difference "
            "of means is beyond the sum of the two standard deviations, else within noise.",
            "- Bits per character: the held-out cross-entropy summed over counted tokens, divided by the "
            "characters those tokens spell, / ln 2 (the text is ASCII: bytes = characters).",
            "",
            table,
            "",
            f"![bits per character]({plot_path.name})",
            "",
            "## Claims",
            "",
            f"- ULD (Boizard et al., 2024): distilling across tokenizers improves the student over training "
            f"alone: {claim(uld_verdict)} here ({uld_verdict}).",
            f"- Aligned form (TRL GOLD): byte-aligned groups + vocabulary mapping improve the student over "
            f"training alone: {claim(aligned_verdict)} here ({aligned_verdict}).",
            "",
            "## Validation (lambda choice; held-out CE in nats per student token, seed 0)",
            "",
            markdown_table(["method", "teacher tokenizer", "val CE"], val_table),
            "",
        ]
    )
    write_results(out, text)
    console.print(text)
    print(f"wrote {out} in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A causal-LM distillation training step at large vocabularies: dense logits vs the trainer's fused path.

The recipe's training step as `distill.train.fit` runs it: Llama-style teacher (H=512, 2 layers) and student
(H=256, 2 layers), 4 sequences x 512 tokens per step, forward KL alone and with 0.5 cross-entropy, SGD.
`trainer.fused_loss` "off" builds the (tokens x vocabulary) logits of both models; "auto" (the default)
takes the fused path (`distill.heads`: hidden states and output layers into
`fused_linear_divergence` and `linear_cross_entropy`).

Each cell runs in a fresh process under GNU `time -v`. The process builds the models, the data and the
trainer and reads its peak RSS (the baseline: weights, data, imports); "peak over baseline" is the final peak
RSS minus it, i.e. what the training steps need (gradients, activations, loss). GNU time's maximum resident
set size is reported beside the process's own count. Seconds are the median step time after one warm-up
step. The first step's loss of the two paths must agree (the tests hold them together exactly).

    python benchmarks/lm_fused_step.py            # V = 32768 and 131072 -> results/lm_fused_step.md
    python benchmarks/lm_fused_step.py --quick    # V = 4096, a smoke test -> results/lm_fused_step_quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _child import run_under_gnu_time  # noqa: E402  (one process per cell)
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

VOCABS = (32768, 131072)
QUICK_VOCABS = (4096,)
BATCH, TOKENS, STEPS = 4, 512, 4  # STEPS includes the warm-up step
TEACHER = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4}
STUDENT = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
PATHS = {"off": "dense logits", "auto": "fused (default)"}
OBJECTIVES = {
    "fkl": [("forward_kl", 1.0)],
    "fkl+ce": [("forward_kl", 1.0), ("cross_entropy", 0.5)],
}
LOSS_LABELS = {"fkl": "forward KL", "fkl+ce": "forward KL + 0.5 CE"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(vocab: int, shape: dict, seed: int):  # noqa: ANN202 (torch is imported in the child)
    import torch

    from distill.models.causal_lm import build_causal_lm

    torch.manual_seed(seed)
    config = {"model_type": "llama", "num_hidden_layers": 2, "max_position_embeddings": TOKENS, **shape}
    return build_causal_lm(config=config, vocab_size=vocab)


def run_cell(mode: str, loss: str, vocab: int, tokens: int) -> dict:
    """One measurement, in this process: build, read the baseline, train STEPS steps."""
    import torch

    from distill.train import OptimizerConfig, ScheduleConfig, Trainer, TrainerConfig

    torch.set_num_threads(os.cpu_count() or 1)
    teacher, student = _model(vocab, TEACHER, 0), _model(vocab, STUDENT, 1)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (STEPS * BATCH, tokens), generator=generator)
    labels = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], dim=1)
    data = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y, "mask": y != -100}
        for i, y in zip(ids, labels, strict=True)
    ]
    starts: list[float] = []

    def stamp(batch, model, progress):  # noqa: ANN001, ANN202 (the trainer's batch_transform hook)
        starts.append(time.perf_counter())
        return batch

    trainer = Trainer(
        student,
        data,
        teacher=teacher,
        objectives=OBJECTIVES[loss],
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0),
        schedule=ScheduleConfig(name="constant"),
        config=TrainerConfig(
            epochs=1,
            batch_size=BATCH,
            fused_loss=mode,
            progress=False,
            tensorboard=False,
            device="cpu",
            log_every=1,
        ),  # fmt: skip
        batch_transform=stamp,
    )
    baseline = _maxrss_mb()
    result = trainer.fit()
    starts.append(time.perf_counter())
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    peak = _maxrss_mb()
    first_loss = next(row["train_loss"] for row in result.history if "train_loss" in row)
    return {
        "path": result.loss_path,
        "baseline_mb": baseline,
        "peak_mb": peak,
        "seconds": statistics.median(steps[1:]),
        "first_loss": first_loss,
    }


def measure(mode: str, loss: str, vocab: int, tokens: int, timeout: int) -> dict:
    """Run one cell in a fresh process under GNU time; its JSON plus GNU time's max RSS."""
    command = [sys.executable, __file__, "--child", mode, loss, str(vocab), str(tokens)]
    return run_under_gnu_time(command, timeout, error_chars=120)


def row(vocab: int, loss: str, mode: str, cell: dict, dense: dict) -> str:
    label = f"| {vocab} | {LOSS_LABELS[loss]} | {PATHS[mode]}"
    if "error" in cell:
        return f"{label} | {cell['error']} | | | | | |"
    over = cell["peak_mb"] - cell["baseline_mb"]
    ratios = ["", ""]
    if "error" not in dense and mode != "off":
        ratios = [
            f"{over / (dense['peak_mb'] - dense['baseline_mb']):.2f}x",
            f"{cell['seconds'] / dense['seconds']:.2f}x",
        ]
    gnu = "-" if cell.get("gnu_time_mb") is None else f"{cell['gnu_time_mb']:.0f}"
    return (
        f"{label} ({cell['path']}) | {gnu} | {over:.0f} | {cell['seconds']:.2f} | {cell['first_loss']:.6f} | "
        f"{ratios[0]} | {ratios[1]} |"
    )


def table(results: dict[tuple[str, str, int], dict], vocabs: tuple[int, ...]) -> str:
    head = [
        "V", "objectives", "path", "peak RSS MB (GNU time)", "peak over baseline MB", "s / step",
        "first-step loss", "over baseline vs dense", "time vs dense",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vocab in vocabs:
        for loss in OBJECTIVES:
            dense = results[("off", loss, vocab)]
            lines += [row(vocab, loss, mode, results[(mode, loss, vocab)], dense) for mode in PATHS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small vocabulary, short sequences")
    parser.add_argument("--out", type=Path, default=None, help=out_help("lm_fused_step"))
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    parser.add_argument(
        "--child", nargs=4, metavar=("MODE", "LOSS", "VOCAB", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        mode, loss, vocab, tokens = args.child
        print(json.dumps(run_cell(mode, loss, int(vocab), int(tokens))))
        return 0
    out = output_file(parser, "lm_fused_step", args.out, quick=args.quick, partial=False)
    vocabs = QUICK_VOCABS if args.quick else VOCABS
    tokens = 64 if args.quick else TOKENS
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    results = {}
    for vocab in vocabs:
        for loss in OBJECTIVES:
            for mode in PATHS:
                results[(mode, loss, vocab)] = measure(mode, loss, vocab, tokens, args.timeout)
                print(f"V={vocab} {loss} {mode}: {results[(mode, loss, vocab)]}", file=sys.stderr)
    command = command_line("lm_fused_step", argv)
    text = (
        "# Causal-LM distillation step: dense logits vs the fused path\n\n"
        f"Command: `{command}`; {os.cpu_count()} CPU cores; {time.perf_counter() - started:.0f} s; "
        f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
        f"Teacher Llama H=512 x 2 layers, student H=256 x 2 layers, {BATCH} x {tokens} tokens per step, "
        "forward KL alone or with 0.5 cross-entropy, SGD, float32; median of "
        f"{STEPS - 1} steps after a warm-up step. Peak over baseline: peak RSS minus the RSS once models, "
        "data and trainer are built.\n\n" + table(results, vocabs) + "\n"
    )
    write_results(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probes by depth (S03): at which depth does a teacher, and its distilled student, separate the classes?

Two tasks, each with a teacher, a KD student trained from it in this script, and a randomly initialised
copy of the teacher (the control: what a probe reads off untrained features):

- `digits`: scikit-learn digits (8x8). Teacher `small_cnn` (4 stages), student `small_cnn` (2 stages,
  CE + Hinton KD). Probe: multinomial logistic regression on each stage's globally average-pooled output;
  depth 0 is the raw pixels (the baseline every curve starts from).
- `arithmetic`: true / false statements `a+b=c` (a, b < 30; false: c off by 1..9). A tiny Llama teacher
  (4 layers) learns every true statement as a language model; the student (2 layers) learns them by
  token-level Hinton KD + CE. Probes read each decoder layer's token activations of a statement: the
  last-token linear probe (the usual veracity probe) and a multiple-instance probe over the bag of
  every token (sAwMIL-style, `distill.models.probes.fit_mil_probe`); depth 0 is the token embeddings.

Splits: the models train on the training split; the probe is fitted on part of that split (the
model's own training data: for arithmetic, the statements over one set of (a, b) pairs), its strength
chosen on a validation split carved from it; split conformal prediction (LAC, alpha = 0.1) is
calibrated on a split no model or probe saw, and everything is reported on the test split.

    python benchmarks/probes.py            # both tasks, 3 seeds -> benchmarks/results/probes.md + .png
    python benchmarks/probes.py --quick    # short training, 2 seeds, about a minute -> probes_quick.md

A subset of --tasks or another number of --seeds writes probes_partial.md (`benchmarks/_results.py`).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn

from distill.losses.classic import hinton_kd
from distill.models.probes import (
    capture_features,
    fit_linear_probe,
    fit_mil_probe,
    probe_layers,
    split_conformal,
)
from distill.models.zoo import SmallCNN
from distill.tables import BETTER, WORSE, gain_and_spread, markdown_table, mean_std, noise_verdict, pm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

TASKS = ("digits", "arithmetic")
MODELS = ("teacher", "student", "random teacher")
ALPHA = 0.1
TEACHER_CHANNELS, STUDENT_CHANNELS = (32, 64, 64, 128), (8, 16)  # digits: 4 stages against 2
L2_GRID = (1e-4, 1e-3, 1e-2)  # the linear probes' penalty, chosen on validation rows
# a row: (task, model, probe, relative depth, seed) -> (test accuracy, coverage, mean set size)
Row = tuple[str, str, str, float, int]
Measures = dict[Row, tuple[float, float, float]]


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


PROBE_STEPS = {False: 100, True: 30}  # L-BFGS iterations per probe (full run, quick run)


def chosen_linear(x: Tensor, y: Tensor, seed: int, quick: bool):  # noqa: ANN201 - a Probe
    """A linear probe whose L2 penalty is chosen on a validation quarter of the probe-training rows, then
    refitted on all of them (quick: the middle of the grid, no choice)."""
    steps = PROBE_STEPS[quick]
    if quick:
        return fit_linear_probe(x, y, l2=L2_GRID[1], steps=steps)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) // 4
    val, fit = order[:cut], order[cut:]

    def val_acc(l2: float) -> float:
        probe = fit_linear_probe(x[fit], y[fit], l2=l2, steps=steps)
        return float((probe.predict_proba(x[val]).argmax(1) == y[val].numpy()).mean())

    best = max(L2_GRID, key=val_acc)
    return fit_linear_probe(x, y, l2=best, steps=steps)


def evaluate(probe, splits: dict[str, tuple[object, Tensor]]) -> tuple[float, float, float]:  # noqa: ANN001
    """Test accuracy, conformal coverage and mean set size (calibrated on the calibration split)."""
    cal_x, cal_y = splits["cal"]
    test_x, test_y = splits["test"]
    test_proba = probe.predict_proba(test_x)
    report = split_conformal(
        probe.predict_proba(cal_x), cal_y.numpy(), test_proba, test_y.numpy(), alpha=ALPHA, score="lac"
    )
    accuracy = float((test_proba.argmax(1) == test_y.numpy()).mean())
    return accuracy, report.coverage, report.mean_set_size


def subset(features: Tensor | list[Tensor], index: Tensor) -> Tensor | list[Tensor]:
    if isinstance(features, Tensor):
        return features[index]
    return [features[i] for i in index.tolist()]


# --- digits ---------------------------------------------------------------------------------------------


def digits_splits(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """train 60% (models and probe fit), calibration 15%, test 25%, stratified, per seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor((bunch.images / 16.0 - 0.5) / 0.5, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    index = np.arange(len(y))
    train, rest = train_test_split(index, train_size=0.6, stratify=y, random_state=seed)
    cal, test = train_test_split(rest, train_size=0.375, stratify=y[rest], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", train), ("cal", cal), ("test", test))}


def train_image(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, teacher: nn.Module | None = None
) -> nn.Module:
    """Adam, batch 64; with a teacher: 0.5 CE + 0.5 Hinton KD (T = 4)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            logits = model(x[batch])
            loss = nn.functional.cross_entropy(logits, y[batch])
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x[batch])
                loss = 0.5 * loss + 0.5 * hinton_kd(logits, teacher_logits, temperature=4.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy_of(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_digits(seed: int, quick: bool, measures: Measures, notes: dict[str, list[float]]) -> None:
    set_seed(seed)
    splits = digits_splits(seed)
    x, y = splits["train"]
    epochs = 2 if quick else 30
    teacher = train_image(
        SmallCNN(num_classes=10, input_shape=(1, 8, 8), channels=(32, 64, 64, 128)), x, y, epochs
    )
    student = SmallCNN(num_classes=10, input_shape=(1, 8, 8), channels=(8, 16))
    student = train_image(student, x, y, epochs, teacher=teacher)
    control = SmallCNN(num_classes=10, input_shape=(1, 8, 8), channels=(32, 64, 64, 128)).eval()
    test_x, test_y = splits["test"]
    notes.setdefault("digits teacher", []).append(accuracy_of(teacher, test_x, test_y))
    notes.setdefault("digits student", []).append(accuracy_of(student, test_x, test_y))
    flat = {name: (sx.flatten(1), sy) for name, (sx, sy) in splits.items()}
    raw = evaluate(chosen_linear(*flat["train"], seed, quick), flat)
    for name, model in (("teacher", teacher), ("student", student), ("random teacher", control)):
        measures["digits", name, "linear", 0.0, seed] = raw
        layers = probe_layers(model)[:-1]  # the stages; the last tap ("pool") repeats the last stage pooled
        features = {part: capture_features(model, layers, [(sx, sy)])[0] for part, (sx, sy) in splits.items()}
        for depth, layer in enumerate(layers, start=1):
            by_split = {part: (features[part][layer], splits[part][1]) for part in splits}
            probe = chosen_linear(*by_split["train"], seed, quick)  # type: ignore[arg-type]
            measures["digits", name, "linear", depth / len(layers), seed] = evaluate(probe, by_split)


# --- arithmetic statements --------------------------------------------------------------------------------

VOCAB = [*"0123456789+=", "<s>", "</s>", "<pad>"]
BOS, EOS, PAD = 12, 13, 14


def tiny_llama(hidden: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config)


def encode(statements: list[str]) -> tuple[Tensor, Tensor]:
    """Right-padded character ids with <s> ... </s>, and the attention mask."""
    ids = [[BOS, *(VOCAB.index(ch) for ch in s), EOS] for s in statements]
    longest = max(map(len, ids))
    x = torch.full((len(ids), longest), PAD)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return x, mask


def statements(pairs: list[tuple[int, int]], rng: random.Random) -> tuple[list[str], Tensor]:
    """For each pair one true statement (label 1) and one false one (label 0: the sum off by 1..9)."""
    texts, labels = [], []
    for a, b in pairs:
        wrong = a + b + rng.choice([d for d in range(-9, 10) if d and a + b + d >= 0])
        texts += [f"{a}+{b}={a + b}", f"{a}+{b}={wrong}"]
        labels += [1, 0]
    return texts, torch.tensor(labels)


def train_lm(
    model: nn.Module, facts: list[str], steps: int, seed: int, teacher: nn.Module | None = None
) -> nn.Module:
    """AdamW on batches of 64 true statements; with a teacher: 0.5 CE + 0.5 token-level Hinton KD (T = 2)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x, mask = encode(rng.sample(facts, 64))
        labels = x.masked_fill(mask == 0, -100)
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=x, attention_mask=mask).logits
            kd = hinton_kd(out.logits, teacher_logits, mask=mask.bool(), temperature=2.0)
            loss = 0.5 * loss + 0.5 * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def exact_match(model: nn.Module, facts: list[str]) -> float:
    """Share of true statements whose every answer character is the model's greedy next-token choice."""
    x, mask = encode(facts)
    with torch.no_grad():
        predicted = model(input_ids=x, attention_mask=mask).logits.argmax(-1)
    right = 0
    for i, fact in enumerate(facts):
        start, end = fact.index("=") + 1, len(fact) + 1  # positions predicting the answer and </s>
        right += bool((predicted[i, start:end] == x[i, start + 1 : end + 1]).all())
    return right / len(facts)


def run_arithmetic(seed: int, quick: bool, measures: Measures, notes: dict[str, list[float]]) -> None:
    set_seed(seed)
    rng = random.Random(seed)
    limit = 16 if quick else 30
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    facts = [f"{a}+{b}={a + b}" for a, b in pairs]
    steps = 20 if quick else 500
    teacher = train_lm(tiny_llama(64, 4), facts, steps, seed)
    student = train_lm(tiny_llama(64, 2), facts, steps, seed, teacher=teacher)
    control = tiny_llama(64, 4).eval()
    notes.setdefault("arithmetic teacher", []).append(exact_match(teacher, facts))
    notes.setdefault("arithmetic student", []).append(exact_match(student, facts))
    rng.shuffle(pairs)
    # probe-train 50% of the pairs (validation carved inside), calibration 20%, test 30%
    cuts = (int(0.5 * len(pairs)), int(0.7 * len(pairs)))
    parts = {"train": pairs[: cuts[0]], "cal": pairs[cuts[0] : cuts[1]], "test": pairs[cuts[1] :]}
    data = {part: statements(p, rng) for part, p in parts.items()}
    for name, model in (("teacher", teacher), ("student", student), ("random teacher", control)):
        blocks = probe_layers(model)
        layers = ["model.embed_tokens", *blocks]
        bags: dict[str, dict[str, list[Tensor]]] = {}
        for part, (texts, labels) in data.items():
            x, mask = encode(texts)
            bags[part] = capture_features(model, layers, [(x, mask, labels)], pool="bags")[0]  # type: ignore[assignment]
        for depth, layer in enumerate(layers):
            relative = depth / len(blocks)
            last = {p: (torch.stack([bag[-1] for bag in bags[p][layer]]), data[p][1]) for p in data}
            probe = chosen_linear(*last["train"], seed, quick)
            measures["arithmetic", name, "linear (last token)", relative, seed] = evaluate(probe, last)
            as_bags = {p: (bags[p][layer], data[p][1]) for p in data}
            mil = fit_mil_probe(*as_bags["train"], steps=PROBE_STEPS[quick])  # type: ignore[arg-type]
            measures["arithmetic", name, "MIL (all tokens)", relative, seed] = evaluate(mil, as_bags)


RUNNERS: dict[str, Callable[[int, bool, Measures, dict[str, list[float]]], None]] = {
    "digits": run_digits,
    "arithmetic": run_arithmetic,
}


# --- report -----------------------------------------------------------------------------------------------


def curves(measures: Measures) -> dict[tuple[str, str, str], dict[float, list[tuple[float, float, float]]]]:
    out: dict[tuple[str, str, str], dict[float, list[tuple[float, float, float]]]] = {}
    for (task, model, probe, depth, _seed), value in measures.items():
        out.setdefault((task, model, probe), {}).setdefault(depth, []).append(value)
    return out


def table_rows(measures: Measures) -> list[list[str]]:
    rows = []
    for (task, model, probe), by_depth in curves(measures).items():
        for depth in sorted(by_depth):
            values = by_depth[depth]
            rows.append(
                [
                    task,
                    model,
                    probe,
                    f"{depth:.2f}",
                    pm([v[0] for v in values], 100, 1),
                    pm([v[1] for v in values], 100, 1),
                    pm([v[2] for v in values], 1, 2),
                ]
            )
    return rows


def plot(measures: Measures, path: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    colours = {"teacher": "tab:blue", "student": "tab:orange", "random teacher": "tab:gray"}
    for axis, task in zip(axes[0], tasks, strict=True):
        for (t, model, probe), by_depth in curves(measures).items():
            if t != task:
                continue
            depths = sorted(by_depth)
            means = [100 * mean_std([v[0] for v in by_depth[d]])[0] for d in depths]
            stds = [100 * mean_std([v[0] for v in by_depth[d]])[1] for d in depths]
            style = "--" if probe.startswith("linear (last") else "-"
            axis.errorbar(
                depths,
                means,
                yerr=stds,
                label=f"{model}, {probe}",
                color=colours[model],
                linestyle=style,
                marker="o",
                capsize=3,
            )
        axis.set_title(task)
        axis.set_xlabel("relative depth (0 = input / embeddings, 1 = last block)")
        axis.set_ylabel("probe test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def best_depths(measures: Measures) -> list[str]:
    """Per curve: the shallowest depth whose mean accuracy is within one std of the curve's best."""
    lines = []
    for (task, model, probe), by_depth in curves(measures).items():
        stats = {d: mean_std([100 * v[0] for v in values]) for d, values in by_depth.items()}
        best = max(stats, key=lambda d: stats[d][0])
        first = min(d for d, (m, _) in stats.items() if m >= stats[best][0] - stats[best][1])
        lines.append(
            f"- {task}, {model}, {probe}: best {stats[best][0]:.1f} % at depth {best:.2f}; "
            f"within one std of it from depth {first:.2f}"
        )
    return lines


def accuracies(measures: Measures, task: str, model: str, probe: str, depth: float) -> list[float]:
    return [v[0] for (t, m, p, d, _), v in measures.items() if (t, m, p, d) == (task, model, probe, depth)]


def compared(a: list[float], b: list[float]) -> tuple[str, str]:
    """`+x.x ± y.y points` (difference of the means, sum of the stds) and its verdict."""
    gain, spread = gain_and_spread(a, b, 100)
    return f"{gain:+.1f} ± {spread:.1f} points", noise_verdict(gain, spread)


def claims(measures: Measures, tasks: list[str]) -> list[str]:
    """The paper's claims that these runs can test, each with its verdict, and the teacher / student gaps."""
    lines = []
    if "arithmetic" in tasks:
        verdict = {BETTER: "reproduced", WORSE: "not reproduced (worse)"}
        for model in ("teacher", "student"):
            mil = accuracies(measures, "arithmetic", model, "MIL (all tokens)", 1.0)
            last = accuracies(measures, "arithmetic", model, "linear (last token)", 1.0)
            diff, noise = compared(mil, last)
            lines.append(
                f"- Probing every token (MIL) reads veracity better than the last token alone, {model}, last "
                f"block: MIL {pm(mil, 100, 1)} % against the last-token probe {pm(last, 100, 1)} % (the "
                f"baseline), {diff}: {verdict.get(noise, 'within noise')}."
            )
    coverages = [v[1] for v in measures.values()]
    mean, std = mean_std(coverages)
    sem = std / len(coverages) ** 0.5
    held = mean >= 1 - ALPHA - 2 * sem  # the guarantee is on average over calibration splits
    lines.append(
        f"- Split-conformal coverage >= 1 - alpha = {1 - ALPHA:g} on average: measured "
        f"{pm(coverages, 100, 1)} % over all {len(coverages)} (probe, depth, seed) cells (standard error "
        f"of the mean {100 * sem:.1f}), "
        f"lowest cell {100 * min(coverages):.1f} %, {sum(c < 1 - ALPHA for c in coverages)} cells under "
        f"{100 * (1 - ALPHA):g} % (one calibration split's coverage scatters around the target): "
        f"{'reproduced' if held else 'not reproduced'}."
    )
    for task in tasks:
        top = max(d for (t, _, _, d, _) in measures if t == task)
        probe = "linear" if task == "digits" else "MIL (all tokens)"
        teacher = accuracies(measures, task, "teacher", probe, top)
        student = accuracies(measures, task, "student", probe, top)
        control = accuracies(measures, task, "random teacher", probe, top)
        lines.append(
            f"- {task}, {probe} probe at the last block: teacher {pm(teacher, 100, 1)} %, student "
            f"{pm(student, 100, 1)} % (student - teacher {compared(student, teacher)[0]}, "
            f"{compared(student, teacher)[1]}); untrained teacher {pm(control, 100, 1)} % (teacher - "
            f"untrained {compared(teacher, control)[0]}, {compared(teacher, control)[1]})."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short training, 2 seeds (about a minute)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    parser.add_argument("--out", type=Path, default=None, help=out_help("probes"))
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    seeds, out = seeds_and_file(parser, args, "probes", args.tasks, TASKS)
    torch.set_num_threads(1)
    console = Console(stderr=True)
    measures: Measures = {}
    notes: dict[str, list[float]] = {}
    started = time.perf_counter()
    for task in tasks:
        for seed in seeds:
            console.print(f"{task} seed {seed} ({time.perf_counter() - started:.0f} s)")
            RUNNERS[task](seed, args.quick, measures, notes)
    elapsed = time.perf_counter() - started
    headers = [
        "task",
        "model",
        "probe",
        "depth",
        "test acc (%)",
        f"coverage (%, 1-alpha={1 - ALPHA:g})",
        "set size",
    ]
    table = markdown_table(headers, table_rows(measures))
    console.print(table)
    png = out.with_suffix(".png")
    plot(measures, png, tasks)
    model_lines = [f"- {name}: {pm(values, 100, 1)} %" for name, values in notes.items()]
    text = "\n".join(
        [
            "# Probes by depth (S03: sAwMIL-style probes with conformal prediction)",
            "",
            f"Command: `{command_line('probes', argv)}` ({elapsed:.0f} s, single-threaded, seeds {seeds}).",
            "",
            "What the models reach on their own task (digits: test accuracy; arithmetic: exact match of the "
            "answer on the true statements they were trained on), mean ± std over seeds:",
            "",
            *model_lines,
            "",
            f"![probe accuracy by depth]({png.name})",
            "",
            "Probe test accuracy, empirical coverage of the split-conformal (LAC) prediction sets at alpha = "
            f"{ALPHA:g} and their mean size, by relative depth (0: raw pixels / token embeddings; k / K: the "
            "output of block k of K), mean ± std over seeds. The random teacher is the teacher's "
            "architecture untrained: the control for what a probe reads off features that learned nothing.",
            "",
            table,
            "Claims and comparisons (differences: mean difference ± sum of the stds; 'better' / 'worse' "
            "only beyond that spread):",
            "",
            *claims(measures, tasks),
            "",
            "Where each curve saturates:",
            "",
            *best_depths(measures),
            "",
        ]
    )
    write_results(out, text)
    console.print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

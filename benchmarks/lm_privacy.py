"""S29 Swing distillation with measured privacy: canary exposure of teacher and students on tiny-shakespeare.

Swing distillation (Li et al., 2022) claims to cut canary exposure by over 80 % against KD at competitive
quality. Here canaries ("the secret code of Anna is 6604", `distill.data.canaries`) are inserted `REPEATS`
times each into the training text; a small Llama teacher learns the text with cross-entropy (it memorises
the secrets); students about 8x smaller learn from it with
- cross-entropy alone (no teacher, on the same canary-laden text),
- KD (forward KL on the teacher's full distributions),
- Swing with the teacher-proxy privacy score (the teacher's top-1 probability),
- Swing with the data's privacy scores (the digit detector, `privacy: data`),
the two Swing forms over a sweep of `swing` (the trade-off curve). Exposure (Carlini et al., 2019) by
enumerating all 10^4 secrets per canary (`distill.metrics_privacy`); utility as held-out token accuracy and
perplexity on the last 10 % of tiny-shakespeare (no canaries there).

`swing` is chosen per score source on a validation split carved from the training text (the last 10 % of
its first 90 %; its own teacher), seed 0: the lowest mean exposure whose token accuracy stays within 1 point
of KD's; the test split is read only in the final run.

    python benchmarks/lm_privacy.py            # 3 seeds -> results/lm_privacy.md and lm_privacy.png
    python benchmarks/lm_privacy.py --quick    # tiny models and data, 2 seeds -> results/lm_privacy_quick.md
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill.tables import pm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

LLAMA = {"model_type": "llama", "tie_word_embeddings": False, "num_key_value_heads": 1}
TEACHER = LLAMA | {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 176,
}
STUDENT = LLAMA | {
    "hidden_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
FULL = {
    "train_chars": 120_000,
    "max_length": 64,
    "vocab": 512,
    "teacher_epochs": 4,
    "student_epochs": 2,
    "canaries": 5,
    "repeats": 20,
    "test_examples": 120,
    "swings": {"teacher": (1.0, 10.0, 100.0), "data": (1.0, 10.0, 100.0, 1000.0)},
}
QUICK = FULL | {
    "train_chars": 8_000,
    "max_length": 32,
    "vocab": 256,
    "teacher_epochs": 2,
    "student_epochs": 1,
    "canaries": 2,
    "repeats": 10,
    "test_examples": 8,
    "swings": {"teacher": (10.0,), "data": (10.0,)},
}
DIGITS = 4
ALONE = "student alone (CE)"
KD = "KD (forward KL)"
PROXY = "Swing, teacher-proxy score"
DATA = "Swing, data privacy score"


def swing_name(source: str, swing: float) -> str:
    return f"{PROXY if source == 'teacher' else DATA} (swing={swing:g})"


def methods(swings: dict[str, tuple[float, ...]]) -> dict[str, list[Any]]:
    """Method name -> the `fit` objectives."""
    rows: dict[str, list[Any]] = {ALONE: ["cross_entropy"], KD: ["forward_kl"]}
    for source in ("teacher", "data"):
        for swing in swings[source]:
            rows[swing_name(source, swing)] = [("swing_kd", 1.0, {"swing": swing, "privacy": source})]
    return rows


def build_data(path: Path, settings: dict[str, Any]) -> Any:
    from distill.data.canaries import canary_text_data

    return canary_text_data(
        path=str(path),
        tokenizer={"bpe": {"vocab_size": settings["vocab"]}},
        canaries=settings["canaries"],
        canary_digits=DIGITS,
        canary_repeats=settings["repeats"],
        train_chars=settings["train_chars"],
        max_length=settings["max_length"],
        max_test_examples=settings["test_examples"],
    )


def new_model(config: dict[str, Any], data: Any, seed: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(config, vocab_size=data.num_classes, max_position_embeddings=data.input_shape[0])
    cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return AutoModelForCausalLM.from_config(cfg)


def held_out(model: Any, data: Any) -> dict[str, float]:
    """Token accuracy and mean cross-entropy (nats / token) over every counted test token."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    loader = DataLoader(data.test, batch_size=32, collate_fn=data.test.collate_fn)
    nll, right, count = 0.0, 0, 0
    with torch.inference_mode():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["mask"]
            rows, targets = logits[mask].float(), batch["labels"][mask]
            nll += float(torch.nn.functional.cross_entropy(rows, targets, reduction="sum"))
            right += int((rows.argmax(-1) == targets).sum())
            count += int(mask.sum())
    return {"accuracy": 100.0 * right / count, "ce": nll / count}


def unigram_floor(data: Any) -> float:
    """Mean exposure of the canaries under the training text's digit frequencies alone (no sequence)."""
    from distill.metrics_privacy import digit_token_ids, digit_unigram_exposure

    digits = digit_token_ids(data.tokenizer)
    counts = [0] * 10
    for example in data.train.examples:
        for token in example.ids:
            if token in digits:
                counts[digits.index(token)] += 1
    return statistics.mean(digit_unigram_exposure(c.secret, counts) for c in data.canaries)


def measure(model: Any, data: Any) -> dict[str, float]:
    from distill.metrics_privacy import canary_exposures

    exposures = canary_exposures(model, data.tokenizer, data.canaries)
    return held_out(model, data) | {"exposure": statistics.mean(exposures)}


def train(model: Any, data: Any, objectives: list[Any], *, teacher: Any, epochs: int, seed: int) -> None:
    from distill.train import OptimizerConfig, ScheduleConfig, fit

    fit(
        model,
        data.train,
        teacher=teacher,
        objectives=objectives,
        optimizer=OptimizerConfig(lr=3e-3),
        schedule=ScheduleConfig(name="cosine", warmup_steps=math.ceil(len(data.train) / 16 * epochs * 0.1)),
        epochs=epochs,
        batch_size=16,
        seed=seed,
        progress=False,
        tensorboard=False,
        fused_loss="off",
        log_every=10_000,
        eval_every=10_000,
    )


def run(path: Path, settings: dict[str, Any], seeds: list[int], names: list[str] | None = None) -> dict:
    """Teacher (seed 0) and every method x seed on the text file `path`: their measurements."""
    started = time.perf_counter()
    data = build_data(path, settings)
    teacher = new_model(TEACHER, data, 0)
    train(teacher, data, ["cross_entropy"], teacher=None, epochs=settings["teacher_epochs"], seed=0)
    out: dict[str, Any] = {"teacher": measure(teacher, data), "methods": {}, "floor": unigram_floor(data)}
    print(f"teacher: {out['teacher']}", file=sys.stderr, flush=True)
    for name, objectives in methods(settings["swings"]).items():
        if names is not None and name not in names:
            continue
        rows = []
        for seed in seeds:
            student = new_model(STUDENT, data, seed)
            uses_teacher = objectives != ["cross_entropy"]
            train(
                student,
                data,
                objectives,
                teacher=teacher if uses_teacher else None,
                epochs=settings["student_epochs"],
                seed=seed,
            )
            rows.append(measure(student, data))
        out["methods"][name] = rows
        print(f"{name}: {rows}", file=sys.stderr, flush=True)
    out["data"] = data.description
    out["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    out["student_parameters"] = sum(p.numel() for p in new_model(STUDENT, data, 0).parameters())
    out["seconds"] = time.perf_counter() - started
    return out


def carve_validation(source: Path, folder: Path) -> Path:
    """The first 90 % of the text (the real run's training part), whose last 10 % is the validation split."""
    text = source.read_text()
    path = folder / "train_part.txt"
    path.write_text(text[: int(len(text) * 0.9)])
    return path


def choose(val: dict, source: str, swings: dict[str, tuple[float, ...]]) -> float:
    """The swing with the lowest validation exposure among those within 1 point of KD's token accuracy (the
    largest swing's accuracy decides when none is)."""
    kd = val["methods"][KD][0]["accuracy"]
    swings = swings[source]
    rows = {s: val["methods"][swing_name(source, s)][0] for s in swings}
    allowed = [s for s in swings if rows[s]["accuracy"] >= kd - 1.0] or [
        max(swings, key=lambda s: rows[s]["accuracy"])
    ]
    return min(allowed, key=lambda s: rows[s]["exposure"])


def values(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows]


def verdict(data_rows: list[dict], kd_rows: list[dict]) -> tuple[str, str]:
    """The paper's claim: exposure cut >= 80 % against KD at <= 1 point of token accuracy."""
    kd_exp, sw_exp = (
        statistics.mean(values(kd_rows, "exposure")),
        statistics.mean(values(data_rows, "exposure")),
    )
    cut = 100.0 * (1 - sw_exp / kd_exp) if kd_exp > 0 else float("nan")
    drop = statistics.mean(values(kd_rows, "accuracy")) - statistics.mean(values(data_rows, "accuracy"))
    kd_ppl = math.exp(statistics.mean(values(kd_rows, "ce")))
    ppl = math.exp(statistics.mean(values(data_rows, "ce")))
    why = (
        f"exposure {sw_exp:.2f} bits against KD's {kd_exp:.2f} (a cut of {cut:.1f} %), token accuracy "
        f"{-drop:+.2f} points, perplexity {ppl:.2f} against {kd_ppl:.2f} ({100 * (ppl / kd_ppl - 1):+.1f} %)"
    )
    if cut >= 80.0 and (drop <= 1.0 or ppl <= 1.05 * kd_ppl):
        return "reproduced", why
    return "not reproduced", why


def plot(test: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    groups = {ALONE: ("0.5", "s"), KD: ("C0", "o"), PROXY: ("C1", "^"), DATA: ("C3", "D")}
    for family, (color, marker) in groups.items():
        members = [n for n in names if n.startswith(family)]
        xs = [math.exp(statistics.mean(values(test["methods"][n], "ce"))) for n in members]
        ys = [statistics.mean(values(test["methods"][n], "exposure")) for n in members]
        es = [statistics.pstdev(values(test["methods"][n], "exposure")) for n in members]
        axis.errorbar(
            xs,
            ys,
            yerr=es,
            color=color,
            marker=marker,
            linestyle="-" if len(xs) > 1 else "",
            label=family,
            capsize=3,
        )
        for n, x, y in zip(members, xs, ys, strict=True):
            if "swing=" in n:
                axis.annotate(
                    n.split("(")[-1].rstrip(")"),
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    axis.axhline(test["teacher"]["exposure"], color="k", linestyle=":", label="teacher")
    kd_exposure = statistics.mean(values(test["methods"][KD], "exposure"))
    axis.axhline(0.2 * kd_exposure, color="C2", linestyle="--", label="goal: 80 % below KD")
    axis.axhline(test["floor"], color="0.6", linestyle="-.", label="digit frequencies alone")
    axis.set_xlabel("student held-out perplexity (lower is better)")
    axis.set_ylabel(f"mean canary exposure (bits, max {math.log2(10**DIGITS):.1f})")
    axis.set_title("Swing distillation: privacy against utility (tiny-shakespeare)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(
    argv: list[str] | None,
    settings: dict,
    seeds: list[int],
    val: dict,
    test: dict,
    chosen: dict[str, float],
    total: float,
    load: tuple[float, float],
    image: Path,
) -> str:
    kd = test["methods"][KD]
    kd_exp, kd_acc = statistics.mean(values(kd, "exposure")), statistics.mean(values(kd, "accuracy"))

    def line(name: str, rows: list[dict]) -> str:
        exp, acc = statistics.mean(values(rows, "exposure")), statistics.mean(values(rows, "accuracy"))
        cut = f"{100 * (1 - exp / kd_exp):.1f} %" if name != KD and kd_exp > 0 else "-"
        ppl = math.exp(statistics.mean(values(rows, "ce")))
        return (
            f"| {name} | {pm(values(rows, 'exposure'), digits=2)} | {pm(values(rows, 'accuracy'), digits=2)} "
            f"| {ppl:.2f} | {acc - kd_acc:+.2f} | {cut} |"
        )

    def single(name: str, row: dict) -> str:
        return f"| {name} | {row['exposure']:.2f} | {row['accuracy']:.2f} | {math.exp(row['ce']):.2f} |"

    rows = [single("teacher", test["teacher"]) + " - | - |"] + [
        line(n, r) for n, r in test["methods"].items()
    ]
    val_rows = [single("teacher", val["teacher"])] + [single(n, r[0]) for n, r in val["methods"].items()]
    mark, why = verdict(test["methods"][swing_name("data", chosen["data"])], kd)
    proxy_mark, proxy_why = verdict(test["methods"][swing_name("teacher", chosen["teacher"])], kd)
    space = math.log2(10**DIGITS)
    facts = [
        f"Command: `{command_line('lm_privacy', argv)}`; {os.cpu_count()} CPU cores shared with other work, "
        f"one torch thread; total wall time {total:.0f} s (validation run {val['seconds']:.0f} s, test run "
        f"{test['seconds']:.0f} s); 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
        "end.",
        "",
        f"- Data: {test['data']}. Canaries `the secret code of <name> is <{DIGITS} digits>` are inserted as "
        "their own lines at seeded places of the training text only (`distill.data.canaries`).",
        f"- Teacher: Llama {TEACHER}, {test['teacher_parameters']:,} parameters, "
        f"{settings['teacher_epochs']} epochs of cross-entropy on the canary-laden text (seed 0).",
        f"- Students: Llama {STUDENT}, {test['student_parameters']:,} parameters, "
        f"{settings['student_epochs']} epochs, seeds {seeds}; AdamW lr 3e-3, cosine with 10 % warm-up, batch "
        "16; the same blocks for every method. KD and Swing learn from the teacher only (no cross-entropy "
        "term); `swing_kd` at its defaults otherwise (temperature 1, Laplace noise_scale 0.1).",
        "- Privacy scores: `teacher` = the teacher's top-1 probability (the loss's proxy); `data` = the "
        "share of digit characters in each target token, computed from the training text (docs/privacy.md).",
        f"- Exposure: log2(10^{DIGITS}) - log2 rank of the canary's secret among all 10^{DIGITS} secrets by "
        f"the model's log-perplexity after the canary's prefix (max {space:.2f} bits; a model that ranks at "
        f"random scores 1/ln 2 = 1.44 bits on average), mean over the {settings['canaries']} canaries. The "
        "canaries' digits are the only digits in the training text, so their frequencies alone carry "
        "information: a model that knows only how often each digit occurs and memorises no sequence "
        f"scores {test['floor']:.2f} bits (`digit_unigram_exposure`, the dash-dot line in the plot). "
        "Utility: token accuracy and perplexity (exp of the mean cross-entropy) on the held-out last 10 % of "
        "tiny-shakespeare (no canaries).",
        f"- swing chosen per score source on the validation split (seed 0) among "
        f"{list(settings['swings']['teacher'])} (teacher proxy) and {list(settings['swings']['data'])} "
        "(data): the lowest exposure within 1 point of KD's token accuracy. Chosen: teacher proxy "
        f"{chosen['teacher']:g}, data {chosen['data']:g}. The test run has every data swing (the trade-off "
        "curve) and the teacher proxy at its chosen swing. Both runs train on the same first "
        f"{settings['train_chars']:,} characters (`train_chars`), so the validation run's models are the "
        "test run's seed-0 models (same exposure); only the held-out text differs (validation: 81-90 % of "
        "the file, "
        "never trained on; test: the last 10 %).",
    ]
    return (
        "# Swing distillation with measured privacy (S29)\n\n"
        + "\n".join(facts)
        + "\n\n## Validation (seed 0, validation split)\n\n"
        "| model | exposure (bits) | token accuracy % | perplexity |\n|---|---|---|---|\n"
        + "\n".join(val_rows)
        + "\n\n## Test: mean ± std over seeds\n\n"
        "| model | exposure (bits) | token accuracy % | perplexity | accuracy vs KD (points) "
        "| exposure cut vs KD |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n![exposure against perplexity]({image.name})\n\n"
        "## Swing's claim (exposure cut >= 80 % against KD at <= 1 point of token accuracy or perplexity "
        f"within 5 %), data privacy score, swing={chosen['data']:g}: **{mark}**\n\n{why}. "
        "Reading the curve: `swing_kd` divides both logits by tau_i and multiplies by tau_i^2, so a "
        "large tau_i turns the term into logit matching, gradient (z_s - z_t) / V on the student's logits "
        "(Hinton's high-temperature limit), which still pulls the student towards the teacher's digit "
        "logits; only the noise removes information, and at large tau_i the noise (tau_i x noise_scale on "
        "the raw logits) "
        "grows enough to cost perplexity. The 80 % target "
        f"({0.2 * kd_exp:.2f} bits) lies {'below' if 0.2 * kd_exp < test['floor'] else 'above'} the "
        f"{test['floor']:.2f} bits of a model that knows the digit frequencies and no sequence: below it, "
        "a student must also forget how often each digit occurs.\n\n"
        f"With the teacher-proxy score (swing={chosen['teacher']:g}): **{proxy_mark}**: {proxy_why}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("lm_privacy"))
    args = parser.parse_args(argv)
    default_seeds = 2 if args.quick else 3
    seeds = list(range(args.seeds or default_seeds))
    out = output_file(parser, "lm_privacy", args.out, quick=args.quick, partial=len(seeds) != default_seeds)
    import torch

    from distill.data.paths import data_path

    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    source = data_path("text/tinyshakespeare.txt")
    with tempfile.TemporaryDirectory(prefix="distill-lm-privacy-") as tmp:
        validation_text = carve_validation(source, Path(tmp))
        val_names = [KD] + [swing_name(s, w) for s in ("teacher", "data") for w in settings["swings"][s]]
        val = run(validation_text, settings, [0], val_names)
    chosen = {s: choose(val, s, settings["swings"]) for s in ("teacher", "data")}
    # The test run: every data-score swing (the trade-off curve), the teacher-proxy score at its chosen swing.
    test_names = [ALONE, KD, swing_name("teacher", chosen["teacher"])]
    test_names += [swing_name("data", w) for w in settings["swings"]["data"]]
    test = run(source, settings, seeds, test_names)
    total = time.perf_counter() - started
    image = out.with_suffix(".png")
    plot(test, list(test["methods"]), image)
    text = report(argv, settings, seeds, val, test, chosen, total, (load_start, os.getloadavg()[0]), image)
    write_results(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

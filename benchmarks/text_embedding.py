"""Sentence-embedding distillation benchmark: all-MiniLM-L6-v2 (mean pooling + L2 norm, used as it is) teaches
smaller sentence encoders on SMS Spam Collection texts (`task: text_embedding`, docs/text_embedding.md).

Rows, all measured in the same run:
- the teacher itself;
- a fresh 2-layer, 128-wide encoder projected to 384 dimensions: at initialisation (no training: the
  baseline, since a fresh embedder trained with no teacher has no target), then distilled with embedding MSE
  ("Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", Reimers & Gurevych,
  2020: sentence-transformers' MSE distillation) and with 1 - cosine;
- a DistilBERT-initialised student (Sanh et al., 2019): every 2nd block of the teacher kept (blocks 0, 2, 4
  of 6) with its embeddings, at initialisation and distilled with 1 - cosine.
Metrics (held-out texts, last epoch, mean ± std over seeds): cosine to the teacher's embedding, Spearman's
rho of pair similarities against the teacher's, k-NN (k 10) and logistic-probe macro F1 on the spam labels
(never trained on), parameters, CPU latency at batch 1 and 64 (student and teacher in the same run).

Data: the SMS Spam Collection split as `sms_spam` does (stratified 80 / 20, seed 0); the first TRAIN texts
of its training split (shuffled, seeded) and HELD texts of its test split, written to a jsonl each and read
through `text_table`. Nothing is chosen on the held-out texts: the learning rate and epochs are fixed in
advance (sentence-transformers' defaults scaled to a small student; no search).

    python benchmarks/text_embedding.py           # 3 seeds -> benchmarks/results/text_embedding.md
    python benchmarks/text_embedding.py --quick   # 300 texts, 2 seeds, 1 epoch, under a minute
                                                  # -> benchmarks/results/text_embedding_quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill.data.paths import data_path
from distill.data.text_classification import stratified_split
from distill.experiment import run_recipe
from distill.recipe.load import recipe_from_dict
from distill.runfolder import RunFolder
from distill.tables import gain_and_spread, markdown_table, noise_verdict, pm
from distill.tasks import task_named
from distill.tasks.results import ExperimentResult
from distill.train.seeding import seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402

PARTS = ("fresh", "distilbert")
FRESH = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
KEEP = [0, 2, 4]
FULL = {"train": 1500, "held": 500, "max_length": 48, "fresh_epochs": 5, "keep_epochs": 2}
QUICK = {"train": 240, "held": 60, "max_length": 32, "fresh_epochs": 1, "keep_epochs": 1}
COLUMNS = [("cos to teacher", "teacher_cosine", 1.0), ("Spearman", "spearman", 1.0)]
COLUMNS += [("k-NN F1 %", "knn_f1", 100.0), ("probe F1 %", "probe_f1", 100.0)]


def write_texts(folder: Path, train: int, held: int) -> str:
    """SMS texts as two jsonl files (the subset of the module docstring); returns where they came from."""
    rows = []
    for line in data_path("textcls/SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines():
        label, sep, text = line.partition("\t")
        if sep:
            rows.append((text, label))
    train_rows, test_rows = stratified_split([label for _, label in rows], 0.2, 0)
    random.Random(0).shuffle(train_rows)
    random.Random(1).shuffle(test_rows)
    for name, chosen in (("train", train_rows[:train]), ("held", test_rows[:held])):
        with (folder / f"{name}.jsonl").open("w") as handle:
            for i in chosen:
                handle.write(json.dumps({"text": rows[i][0], "label": rows[i][1]}) + "\n")
    return f"SMS Spam Collection: {train} training texts, {held} held-out texts"


def recipe(
    folder: Path, settings: dict[str, Any], student: dict[str, Any], methods: list, epochs: int, seeds
):  # noqa: ANN001, ANN201
    def distil(metric: str) -> dict[str, Any]:
        params = {"metric": metric, "student_layer": "embedding", "teacher_layer": "embedding"}
        return {"name": "embedding_distill", "params": params}

    return recipe_from_dict(
        {
            "name": "bench-text-embedding",
            "task": "text_embedding",
            "data": {
                "name": "text_table",
                "params": {
                    "path": str(folder / "train.jsonl"),
                    "test_path": str(folder / "held.jsonl"),
                    "max_length": settings["max_length"],
                },
                "batch_size": 32,
                "eval_batch_size": 128,
            },
            "teacher": {
                "name": "sentence_encoder",
                "params": {"path": "all-MiniLM-L6-v2", "normalize": True},
            },
            "student": {"name": "sentence_encoder", "params": {"path": "all-MiniLM-L6-v2", **student}},
            "methods": [{"name": name, "objectives": [distil(metric)]} for name, metric in methods],
            "optimizer": {
                "name": "adamw",
                "lr": 0.001 if "config" in student else 0.0001,
                "weight_decay": 0.01,
            },
            "schedule": {"name": "cosine", "warmup_epochs": 0.1},
            "trainer": {"epochs": epochs, "eval_every": epochs, "threads": 1, "log_every": 1000},
            "seeds": list(seeds),
            "evaluation": {"latency": True},
        },
        "bench-text-embedding",
    )


def at_init(parsed: Any, seeds: list[int], folder: Path) -> list[dict[str, float]]:
    """The untrained student's metrics, one row per seed (the evaluator of the task's own setup)."""
    task = task_named("text_embedding")
    setup = task.prepare(parsed, RunFolder(folder), progress=False, console=Console(quiet=True))
    rows = []
    for seed in seeds:
        seed_everything(seed)
        rows.append(setup.fit_settings["evaluator"](task.build_student(parsed, setup)))
    return rows


def values(rows: list[dict[str, float]], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def finals(result: ExperimentResult, name: str) -> list[dict[str, float]]:
    runs = next(m for m in result.methods if m.name == name)
    return [r.result.final for r in runs.runs]


def cells(rows: list[dict[str, float]]) -> list[str]:
    return [pm(values(rows, key), scale, 2 if scale > 1 else 4) for _, key, scale in COLUMNS]


CLAIM = {"better": "reproduced", "worse": "not reproduced (worse)", "within noise": "within noise"}


def verdict(rows: list[dict[str, float]], base: list[dict[str, float]], key: str, scale: float) -> str:
    gain, spread = gain_and_spread(values(rows, key), values(base, key), scale)
    return f"{gain:+.2f} (spread {spread:.2f}, {noise_verdict(gain, spread)})"


def claim(rows: list[dict[str, float]], base: list[dict[str, float]], key: str, scale: float) -> str:
    """A paper's claim that `rows` beat `base` on `key`: reproduced, not reproduced or within noise."""
    gain, spread = gain_and_spread(values(rows, key), values(base, key), scale)
    return CLAIM.get(noise_verdict(gain, spread), "-")


def latency_cells(result: ExperimentResult) -> list[str]:
    latency = result.latency
    return [f"{1e3 * latency['student_b1']:.2f}", f"{1e3 * latency['student']:.1f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="240 texts, 2 seeds, 1 epoch (a smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--out", type=Path, default=None, help=out_help("text_embedding"))
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--parts must be a comma-separated subset of {PARTS}")
    seeds, out = seeds_and_file(parser, args, "text_embedding", args.parts, PARTS)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(stderr=True)
    started = time.perf_counter()
    rows: list[list[str]] = []
    speed: list[list[str]] = []
    claims: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-text-embedding-") as tmp:
        folder = Path(tmp)
        source = write_texts(folder, settings["train"], settings["held"])
        teacher_row: list[str] | None = None
        fresh: dict[str, list[dict[str, float]]] = {}
        if "fresh" in parts:
            methods = [("MSE distil", "mse"), ("cosine distil", "cosine")]
            parsed = recipe(folder, settings, {"config": FRESH}, methods, settings["fresh_epochs"], seeds)
            result = run_recipe(parsed, out=folder / "fresh", progress=False, console=console)
            assert result.teacher is not None
            teacher = [result.teacher.metrics]
            teacher_row = ["teacher (all-MiniLM-L6-v2)", f"{result.teacher.parameters:,}", *cells(teacher)]
            latency = result.latency
            teacher_row += [f"{1e3 * latency['teacher_b1']:.2f}", f"{1e3 * latency['teacher']:.1f}", "-"]
            fresh["init"] = at_init(parsed, seeds, folder / "probe-fresh")
            size = f"{result.student_parameters:,}"
            rows.append(["2x128 student at init", size, *cells(fresh["init"]), *latency_cells(result), "-"])
            for name, _ in methods:
                fresh[name] = finals(result, name)
                seconds = [
                    r.result.train_seconds for r in next(m for m in result.methods if m.name == name).runs
                ]
                rows.append(
                    [f"2x128 {name}", size, *cells(fresh[name]), *latency_cells(result), pm(seconds, 1, 1)]
                )
            speed.append(
                [
                    "2x128",
                    f"{latency['teacher_b1'] / latency['student_b1']:.1f}x",
                    f"{latency['teacher'] / latency['student']:.1f}x",
                ]
            )
            mse, cosine = fresh["MSE distil"], fresh["cosine distil"]
            init = fresh["init"]
            claims.append(
                "- Reimers & Gurevych (2020): MSE distillation makes the student embed as the teacher does "
                "(cosine to the teacher, MSE-distilled vs at init): "
                f"{verdict(mse, init, 'teacher_cosine', 1.0)}: **{claim(mse, init, 'teacher_cosine', 1.0)}** "
                "(in direction; the student stays far from the teacher at this budget); 1 - cosine: "
                f"{verdict(cosine, init, 'teacher_cosine', 1.0)}."
            )
            claims.append(
                "- Reimers & Gurevych's MSE objective against 1 - cosine (cosine to the teacher): cosine - "
                f"MSE {verdict(cosine, mse, 'teacher_cosine', 1.0)}; Spearman "
                f"{verdict(cosine, mse, 'spearman', 1.0)}; probe F1 "
                f"{verdict(cosine, mse, 'probe_f1', 100.0)}."
            )
        if "distilbert" in parts:
            methods = [("cosine distil", "cosine")]
            student = {"keep_layers": KEEP}
            parsed = recipe(folder, settings, student, methods, settings["keep_epochs"], seeds)
            result = run_recipe(parsed, out=folder / "keep", progress=False, console=console)
            if teacher_row is None and result.teacher is not None:
                latency = result.latency
                teacher_row = ["teacher (all-MiniLM-L6-v2)", f"{result.teacher.parameters:,}"]
                teacher_row += [*cells([result.teacher.metrics]), f"{1e3 * latency['teacher_b1']:.2f}"]
                teacher_row += [f"{1e3 * latency['teacher']:.1f}", "-"]
            init = at_init(parsed, seeds, folder / "probe-keep")
            distilled = finals(result, "cosine distil")
            size = f"{result.student_parameters:,}"
            seconds = [r.result.train_seconds for r in result.methods[0].runs]
            rows.append([f"blocks {KEEP} at init", size, *cells(init), *latency_cells(result), "-"])
            rows.append(
                [
                    f"blocks {KEEP} cosine distil",
                    size,
                    *cells(distilled),
                    *latency_cells(result),
                    pm(seconds, 1, 1),
                ]
            )
            latency = result.latency
            speed.append(
                [
                    f"blocks {KEEP}",
                    f"{latency['teacher_b1'] / latency['student_b1']:.1f}x",
                    f"{latency['teacher'] / latency['student']:.1f}x",
                ]
            )
            claims.append(
                "- DistilBERT-initialised student, distilled vs at init (cosine to the teacher): "
                f"{verdict(distilled, init, 'teacher_cosine', 1.0)}."
            )
            if "cosine distil" in fresh:
                claims.append(
                    "- Sanh et al. (2019): initialising the student from the teacher's layers helps; the "
                    "DistilBERT-init student against the fresh 2x128 one, both cosine-distilled (cosine to "
                    f"the teacher): {verdict(distilled, fresh['cosine distil'], 'teacher_cosine', 1.0)}: "
                    f"**{claim(distilled, fresh['cosine distil'], 'teacher_cosine', 1.0)}** (confounded: it "
                    "is also 4x larger); "
                    f"probe F1 {verdict(distilled, fresh['cosine distil'], 'probe_f1', 100.0)}."
                )
    wall = time.perf_counter() - started
    headers = ["row", "params", *(c[0] for c in COLUMNS), "ms batch 1", "ms batch 64", "train s"]
    table = markdown_table(headers, ([teacher_row] if teacher_row else []) + rows)
    text = (
        "# Sentence-embedding distillation (text_embedding task)\n\n"
        f"Command: `{command_line('text_embedding', argv)}`; {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); "
        f"wall time {wall:.0f} s on a shared 2-core CPU machine (1 thread per run).\n\n"
        f"- Data: {source} (`sms_spam`'s stratified split, seed 0), {settings['max_length']} tokens at most, "
        "all-MiniLM-L6-v2 tokenizer.\n"
        "- Teacher: all-MiniLM-L6-v2, mean pooling + L2 norm as sentence-transformers runs it, not "
        "fine-tuned; its embeddings of the training texts computed once.\n"
        f"- Students: a fresh BERT {FRESH} + linear projection to 384 (lr 1e-3, "
        f"{settings['fresh_epochs']} epochs); the teacher's blocks {KEEP} and embeddings (DistilBERT's "
        f"initialisation, lr 1e-4, {settings['keep_epochs']} epochs). AdamW, weight decay 0.01, cosine "
        "schedule, batch 32; fixed in advance, nothing tuned on the held-out texts.\n"
        "- Cells: mean ± std over seeds of the last epoch on the held-out texts. Cosine and Spearman (rho of "
        "the pairwise cosine similarities, 1,000 texts at most) are against the teacher's embeddings; k-NN "
        "(k 10, cosine) and the logistic-regression probe classify ham / spam from the training texts' "
        "embeddings (macro F1). 'at init' rows are the untrained students (one per seed). Latency: median "
        "CPU milliseconds per forward pass, 1 thread, the same run.\n\n"
        + table
        + "\nSpeed-up of each student over the teacher (same run):\n\n"
        + markdown_table(["student", "batch 1", "batch 64"], speed)
        + "\nClaims (gain, spread = sum of the two standard deviations over seeds, verdict):\n\n"
        + "\n".join(claims)
        + "\n"
    )
    write_results(out, text)
    console.print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Text-classification distillation benchmark (issue: text encoders; S17 LELP, S20 Talking Models, S02
attribution-guided attention, TinyBERT, MiniLM, embedding distillation).

Parts:
- `sweep`: the hyperparameters the main part uses, chosen on a validation split carved from SMS spam's
  training split (`holdout: validation`; the test split is never read), one seed, 2 epochs: KD's temperature,
  the weight of each feature term, LELP's subclass temperature, and S02's attribution x operator grid.
  Writes `benchmarks/results/text_sweep.md`.
- `main`: `distill bench text --suite standard` (SMS spam and Debian fortunes topics, every method x 3
  seeds, the packaged recipes `bench_text_*.yaml`, whose values come from the sweep). Writes
  `benchmarks/results/text.md`.

    python benchmarks/text.py --part sweep          # ~20 min on 2 cores (--jobs 2: two runs side by side)
    python benchmarks/text.py --part main           # ~1.5 h on 2 cores
    python benchmarks/text.py --part main --resume DIR   # continue (or assemble) a run folder; each data
        # set may also be run on its own first, in parallel: distill run bench_text_sms_spam --out
        # DIR/bench-text-sms-spam (and bench_text_fortunes -> DIR/bench-text-fortunes)
    python benchmarks/text.py --quick               # the quick suite, ~4 min -> text_quick.md
    python benchmarks/text.py --recipes bench_text_sms_spam [--resume DIR]   # one data set -> text_partial.md

A quick run, or another number of seeds, never writes over the full run's file (`benchmarks/_results.py`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from distill.bench.text import results_markdown, run_text_bench
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, output_file, write_results  # noqa: E402  (the results-file rule)

PARTS = ("main", "sweep")
CE = {"name": "cross_entropy", "weight": 0.5}


def kd(temperature: float = 2.0) -> dict[str, Any]:
    return {"name": "hinton_kd", "weight": 0.5, "params": {"temperature": temperature}}


def sweep_methods() -> list[tuple[str, str, dict[str, Any]]]:
    """(family, the value swept, method) for every configuration of the sweep."""
    grid: list[tuple[str, str, dict[str, Any]]] = []
    for t in (1.0, 2.0, 4.0):
        grid.append(("KD temperature", f"T {t:g}", {"objectives": [CE, kd(t)]}))
    features = {
        "TinyBERT weight": lambda w: [
            {"name": "tinybert_hidden", "weight": w},
            {"name": "tinybert_attention", "weight": w, "params": {"relation_heads": 2}},
        ],
        "MiniLM weight": lambda w: [
            {"name": "minilm_relations", "weight": w, "params": {"relation_heads": 8}}
        ],
        "Talking Models weight": lambda w: [{"name": "talking_models", "weight": w}],
        "embedding MSE weight": lambda w: [
            {"name": "embedding_distill", "weight": w, "params": {"metric": "mse"}}
        ],
    }
    for family, terms in features.items():
        for w in (0.1, 1.0):
            grid.append((family, f"weight {w:g}", {"objectives": [CE, kd(), *terms(w)]}))
    for beta in (0.5, 1.0, 2.0):
        lelp = {"name": "lelp", "weight": 0.5, "params": {"temperature": 2.0, "subclass_temperature": beta}}
        grid.append(("LELP subclass temperature", f"beta {beta:g}", {"objectives": [CE, lelp]}))
    # Every operator with the teacher's attention (the attribution S02 finds most useful); Captum's layer
    # gradient x activation (a teacher forward and backward per step) with `average` only, for time.
    s02 = [("attention", op) for op in ("add", "multiply", "average", "replace")]
    for attribution, operator in [*s02, ("layer_gradient_x_activation", "average")]:
        params = {"attribution": attribution, "operator": operator}
        guide = {"name": "attribution_guidance", "weight": 1.0, "params": params}
        grid.append(
            ("S02 attribution x operator", f"{attribution}, {operator}", {"objectives": [CE, kd(), guide]})
        )
    return [(family, value, {"name": f"{family}: {value}", **method}) for family, value, method in grid]


def run_recipes(recipes: list[dict[str, Any]], out_dir: Path, jobs: int) -> list[dict[str, Any]]:
    """Each recipe through `distill run FILE --out DIR` in its own process, `jobs` at a time; their
    metrics.json documents, in order. (Processes, not threads: each run seeds the global random streams.)"""
    running: list[tuple[int, subprocess.Popen[bytes], Path]] = []
    documents: dict[int, dict[str, Any]] = {}
    pending = list(enumerate(recipes))
    while pending or running:
        while pending and len(running) < jobs:
            index, recipe = pending.pop(0)
            file, folder = out_dir / f"{recipe['name']}.yaml", out_dir / recipe["name"]
            file.write_text(yaml.safe_dump(recipe, sort_keys=False))
            command = [sys.executable, "-m", "distill", "run", str(file), "--out", str(folder)]
            with (out_dir / f"{recipe['name']}.log").open("wb") as log:
                running.append(
                    (index, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), folder)
                )
        time.sleep(2)
        for entry in [e for e in running if e[1].poll() is not None]:
            running.remove(entry)
            index, process, folder = entry
            if process.returncode != 0:
                raise SystemExit(f"error: {folder.name} failed; see {folder}.log")
            documents[index] = json.loads((folder / "metrics.json").read_text())
    return [documents[i] for i in range(len(recipes))]


def sweep(out_dir: Path, jobs: int) -> str:
    name = "bench_text_sms_spam"
    base = parse_yaml(builtin_recipe_text(name), name)
    grid = sweep_methods()
    base["data"]["params"]["holdout"] = "validation"
    base["seeds"] = [0]
    base["trainer"]["epochs"] = 2
    base["evaluation"]["latency"] = False
    recipe_from_dict({**base, "methods": [m for _, _, m in grid]}, name)  # every configuration is valid
    methods = [method for _, _, method in grid]
    # The first configuration alone trains (and caches) the teacher; the others share it, `jobs` at a time.
    shards = [methods[:1]] + [methods[1:][k::jobs] for k in range(jobs) if methods[1:][k::jobs]]
    recipes = [{**base, "name": f"bench-text-sweep-{k}", "methods": shard} for k, shard in enumerate(shards)]
    documents = run_recipes(recipes[:1], out_dir, 1) + run_recipes(recipes[1:], out_dir, jobs)
    f1 = {m["name"]: m["seeds"][0]["final"]["f1"] for document in documents for m in document["methods"]}
    rows, chosen = [], []
    families = list(dict.fromkeys(family for family, _, _ in grid))
    for family in families:
        entries = [(value, method["name"]) for fam, value, method in grid if fam == family]
        best = max(entries, key=lambda entry: f1[entry[1]])
        chosen.append(f"- {family}: {best[0]}")
        for value, method in entries:
            rows.append(
                [family, value, f"{100 * f1[method]:.2f}", "chosen" if (value, method) == best else ""]
            )
    teacher = documents[0]["teacher"]["metrics"]
    return (
        "# Text benchmark: hyperparameters chosen on a validation split\n\n"
        f"{documents[0]['data']}.\n\nOne seed (0), {base['trainer']['epochs']} epochs, otherwise the "
        "`bench_text_sms_spam` recipe (teacher, student, optimiser); the teacher (trained on the reduced "
        f"training split) scores validation macro F1 {100 * teacher['f1']:.2f}. The validation split is a "
        "stratified 20% of the training split; the test split is not read. Cells are validation macro F1 "
        "(%). One seed cannot separate close values: a choice within a few tenths of a point is a coin "
        "toss, and the main table says which differences are beyond the seed noise.\n\n"
        + markdown_table(["family", "value", "validation F1 %", ""], rows)
        + "\nChosen (the packaged `bench_text_*.yaml` recipes use these):\n\n"
        + "\n".join(chosen)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the quick suite, 2 seeds, short training")
    parser.add_argument("--part", choices=PARTS, default="main")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the recipes' 3)")
    parser.add_argument("--resume", type=Path, default=None, help="a bench folder to continue or assemble")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: benchmarks/results/)")
    parser.add_argument("--jobs", type=int, default=2, help="sweep: runs side by side (one thread each)")
    parser.add_argument(
        "--recipes", default=None, help="main: a subset of the suite's recipes, e.g. bench_text_sms_spam"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    if args.part == "sweep":
        out = output_file(parser, "text_sweep", args.out, quick=False, partial=False)
        with tempfile.TemporaryDirectory(prefix="distill-bench-text-sweep-") as tmp:
            text = sweep(Path(tmp), args.jobs)
        text += f"\n`{command_line('text', argv)}`: {(time.perf_counter() - started) / 60:.1f} min.\n"
        write_results(out, text)
        console.print(f"wrote {out}")
        return 0
    suite = "quick" if args.quick else "standard"
    only = [name for name in args.recipes.split(",") if name] if args.recipes else None
    partial = (args.seeds is not None and args.seeds != 3) or only is not None
    out = output_file(parser, "text", args.out, quick=args.quick, partial=partial)
    command = command_line("text", argv)
    with tempfile.TemporaryDirectory(prefix="distill-bench-text-") as tmp:
        folder = args.resume if args.resume is not None else Path(tmp) / "bench"
        bench = run_text_bench(
            suite,
            out=folder,
            seeds=args.seeds,
            resume=args.resume is not None,
            console=console,
            command=command,
            only=only,
        )
    write_results(out, results_markdown(bench))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

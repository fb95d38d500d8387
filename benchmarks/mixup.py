"""Mixup and the KD temperature (seed paper S37, "Understanding the Role of Mixup in Knowledge Distillation",
Choi et al., WACV 2023).

The paper's finding, as this benchmark tests it: mixup and KD both smooth the targets a student learns from,
so with mixup-fed KD a high temperature over-smooths and a lower one is better, while without mixup the
usual higher temperature helps. Each temperature T in (1, 2, 4, 8) trains the KD protocol
(0.1 cross-entropy + 0.9 KD) with and without a `mixup` source (alpha 1, every batch, the teacher fed the
mixed images), next to the student alone with and without mixup; 3 seeds; the Fashion-MNIST recipe of the
vision benchmark's standard suite (a ResNet-20 teacher, a small CNN student that sees 20 labelled images per
class). Nothing is tuned: the temperatures are the grid, the test split only reports.

    python benchmarks/mixup.py            # ~15 min on one busy core -> benchmarks/results/mixup.md
    python benchmarks/mixup.py --quick    # digits, 2 seeds, 2 temperatures -> mixup_quick.md

The finding is "reproduced" when the best temperature with mixup is lower than without it and the loss
from mixup grows with T (its gain at T = 8 below its gain at T = 1 by more than the spread of the two).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, pm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _one_recipe import one_recipe_main  # noqa: E402

NAME = "mixup"
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
QUICK_TEMPERATURES = (1.0, 8.0)
MIXUP = {"name": "mixup", "params": {"alpha": 1.0}}


def methods(temperatures: tuple[float, ...]) -> list[dict[str, Any]]:
    ce = {"name": "cross_entropy", "weight": 1.0}
    out: list[dict[str, Any]] = [
        {"name": "student alone", "objectives": [ce]},
        {"name": "student alone + mixup", "objectives": [ce], "source": MIXUP},
    ]
    for t in temperatures:
        kd = [
            {"name": "cross_entropy", "weight": 0.1},
            {"name": "hinton_kd", "weight": 0.9, "params": {"temperature": t}},
        ]
        out.append({"name": f"KD T {t:g}", "objectives": kd})
        out.append({"name": f"KD T {t:g} + mixup", "objectives": kd, "source": MIXUP})
    return out


def recipe(quick: bool, seeds: list[int], out: Path) -> Any:
    if quick:
        data: dict[str, Any] = {
            "name": "mixup-quick",
            "data": {"name": "digits", "params": {"labelled_per_class": 20}, "batch_size": 32},
            "teacher": {"name": "mlp", "params": {"hidden": [128]}, "train": {"epochs": 10}},
            "student": {"name": "mlp", "params": {"hidden": [16]}},
            "trainer": {"epochs": 10},
        }
    else:
        data = parse_yaml(builtin_recipe_text("bench_vision_standard_fashion_mnist"), "recipe")
        data.pop("objectives", None)
        data["name"] = "mixup-fashion-mnist"
    data["methods"] = methods(QUICK_TEMPERATURES if quick else TEMPERATURES)
    data["seeds"] = seeds
    data["evaluation"] = {"latency": False}
    data["output"] = {"dir": str(out), "tensorboard": False}
    data.get("trainer", {}).update({"device": "cpu"})
    return recipe_from_dict(data, "mixup benchmark")


def accuracy(result: Any) -> dict[str, list[float]]:
    return {m.name: [r.result.final["accuracy"] for r in m.runs] for m in result.methods}


def ece(result: Any) -> dict[str, list[float]]:
    return {m.name: [r.result.final["ece"] for r in m.runs] for m in result.methods}


def verdict(acc: dict[str, list[float]], temperatures: tuple[float, ...]) -> tuple[str, list[str]]:
    """The finding's verdict and the lines that support it."""
    plain = {t: mean_std(acc[f"KD T {t:g}"])[0] for t in temperatures}
    mixed = {t: mean_std(acc[f"KD T {t:g} + mixup"])[0] for t in temperatures}
    best_plain, best_mixed = max(plain, key=plain.__getitem__), max(mixed, key=mixed.__getitem__)
    low, high = temperatures[0], temperatures[-1]
    gain_low, spread_low = gain_and_spread(acc[f"KD T {low:g} + mixup"], acc[f"KD T {low:g}"], 100)
    gain_high, spread_high = gain_and_spread(acc[f"KD T {high:g} + mixup"], acc[f"KD T {high:g}"], 100)
    lines = [
        f"- Best temperature without mixup: T {best_plain:g} ({100 * plain[best_plain]:.2f} %); "
        f"with mixup: T {best_mixed:g} ({100 * mixed[best_mixed]:.2f} %).",
        f"- Mixup's effect on KD: {gain_low:+.2f} points at T {low:g} (spread {spread_low:.2f}, "
        f"{noise_verdict(gain_low, spread_low)}), {gain_high:+.2f} at T {high:g} (spread {spread_high:.2f}, "
        f"{noise_verdict(gain_high, spread_high)}).",
    ]
    lower_best = best_mixed < best_plain
    grows = gain_low - gain_high > spread_low + spread_high
    if lower_best and grows:
        return "reproduced", lines
    if not lower_best and gain_low - gain_high < -(spread_low + spread_high):
        return "not reproduced (the opposite holds)", lines
    if lower_best or gain_low > gain_high:
        return "within noise (the trend points the paper's way, within the seed spread)", lines
    return "not reproduced", lines


def document(result: Any, command: str, quick: bool, wall: float) -> str:
    temperatures = QUICK_TEMPERATURES if quick else TEMPERATURES
    acc, calibration = accuracy(result), ece(result)
    alone = acc["student alone"]
    rows = []
    for name, values in acc.items():
        gain, spread = gain_and_spread(values, alone, 100)
        cells = [name, pm(values, 100), pm(calibration[name], 100)]
        cells += (
            ["-", "-"]
            if name == "student alone"
            else [f"{gain:+.2f} ({spread:.2f})", noise_verdict(gain, spread)]
        )
        rows.append(cells)
    finding, lines = verdict(acc, temperatures)
    headers = ["method", "top-1 % (last)", "ECE %", "gain vs alone (spread)", "vs student alone"]
    return (
        "# Mixup and the KD temperature (S37)\n\n"
        f"```sh\n{command}\n```\n\n"
        f"- {result.data.description}.\n"
        f"- Teacher: {result.teacher.parameters:,} parameters, test accuracy "
        f"{100 * result.teacher.metrics['accuracy']:.2f} %; "
        f"student {result.student_parameters:,} parameters.\n"
        f"- Seeds {', '.join(map(str, result.recipe.seeds))}; mean ± std on the test split; "
        "'spread' is the sum of the two standard deviations; "
        "mixup: alpha 1 on every batch, the teacher sees the mixed images.\n"
        f"- Wall time {wall / 60:.1f} min.\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + "\n".join(lines)
        + f"\n\n**Finding (S37: with mixup a lower temperature is better): {finding}.**\n"
    )


def main(argv: list[str] | None = None) -> int:
    return one_recipe_main(
        NAME, __doc__.splitlines()[0], "digits, 2 seeds, T 1 and 8", recipe, document, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())

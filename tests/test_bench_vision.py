"""`distill bench vision`: suite recipes, the registry-driven method list, a tiny end-to-end run, and the
cifar100 suite's wiring on a stand-in folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from data_helpers import require_data
from distill.bench import methods as bench_methods
from distill.bench.memo import MemoizedTeacher
from distill.bench.vision import (
    HEADERS,
    SUITES,
    DatasetResult,
    merge,
    parse_set,
    run_vision_bench,
    suite_recipes,
    table_rows,
)
from distill.errors import UserError
from distill.experiment import MethodRuns, SeedRun
from distill.objectives import OBJECTIVES, Objective, StepOutputs
from distill.recipe.check import check_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.train import FitResult

TINY_DIGITS = {
    "data": {"params": {"labelled_per_class": 3}},
    "teacher": {"train": {"epochs": 1}},
    "trainer": {"epochs": 2, "eval_every": 1},
}


@pytest.mark.parametrize("name", [n for names in SUITES.values() for n in names])
def test_suite_recipes_validate(name: str) -> None:
    recipe = recipe_from_dict(parse_yaml(builtin_recipe_text(name), name), name)
    check_recipe(recipe, name)
    assert recipe.teacher is not None and recipe.seeds == [0, 1, 2]


def test_suites_get_every_method_and_published_settings() -> None:
    for suite in SUITES:
        for recipe, chosen in suite_recipes(suite):
            names = [m.name for m in recipe.method_list()]
            assert names[0] == "student alone" and len(names) == len(chosen) > 8
    ((cifar, _),) = suite_recipes("cifar100")
    methods = {m.name: m for m in cifar.method_list()}
    kd = {o.name: o for o in methods["KD"].objectives}
    assert kd["cross_entropy"].weight == 0.1 and kd["hinton_kd"].weight == 0.9
    assert kd["hinton_kd"].params == {"temperature": 4.0}
    dkd = {o.name: o for o in methods["DKD"].objectives}["dkd"]
    assert dkd.params == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0} and dkd.warmup_epochs == 20
    assert cifar.trainer.epochs == 240 and cifar.schedule.milestones == [150, 180, 210]
    assert cifar.optimizer.lr == 0.05 and cifar.optimizer.weight_decay == 0.0005
    assert cifar.data.batch_size == 64 and cifar.data.params["augment"] is True
    (quick, _), _ = suite_recipes("quick")
    dkd_quick = {o.name: o for o in {m.name: m for m in quick.method_list()}["DKD"].objectives}["dkd"]
    assert dkd_quick.warmup_epochs == pytest.approx(20 * quick.trainer.epochs / 240, abs=1e-3)


def test_method_list_comes_from_the_registry() -> None:
    keys = [key for key, _ in bench_methods.classification_methods()]
    for expected in ("student", "hinton_kd", "dkd", "dist_kd", "pld", "sinkhorn_kd", "bdkd", "taid"):
        assert expected in keys
    skipped = bench_methods.skipped_objectives()
    assert {"adakd", "token_selective_kd", "cross_entropy"} <= set(skipped)
    assert not set(skipped) & set(keys)
    # every registered objective is either run (alone or in a combination) or skipped with a reason
    run = {setting.objective for _, setting in bench_methods.classification_methods()}
    assert {e.name for e in OBJECTIVES} <= run | set(skipped) | {"cross_entropy"}
    assert {"fitnet", "attention_transfer", "similarity_preserving", "pkt", "rkd", "crd", "trg"} <= run


def test_a_newly_registered_logit_objective_joins_and_a_declared_one_leaves() -> None:
    class Plain(Objective):
        def forward(self, outputs: StepOutputs) -> torch.Tensor:
            return (outputs.student_logits - outputs.teacher_logits).pow(2).mean()

    class Features(Plain):
        student_layers = ("body.0",)

    OBJECTIVES.add("bench_test_plain", Plain, summary="test")
    OBJECTIVES.add("bench_test_features", Features, summary="test")
    OBJECTIVES.add("bench_test_tokens", Plain, summary="test", classification=False)
    try:
        methods = dict(bench_methods.classification_methods())
        assert "bench_test_plain" in methods
        terms = methods["bench_test_plain"].terms
        assert [(t.objective, t.weight) for t in terms] == [("cross_entropy", 0.1), ("bench_test_plain", 0.9)]
        skipped = bench_methods.skipped_objectives()
        assert "intermediate features" in skipped["bench_test_features"]
        assert "bench_test_tokens" in skipped
    finally:
        for name in ("bench_test_plain", "bench_test_features", "bench_test_tokens"):
            OBJECTIVES._entries.pop(name)


def test_methods_selection_and_errors() -> None:
    chosen = bench_methods.select_methods(["hinton_kd", "DKD"])
    assert [key for key, _ in chosen] == ["student", "hinton_kd", "dkd"]
    with pytest.raises(UserError, match="did you mean 'hinton_kd'"):
        bench_methods.select_methods(["hinton_kdd"])
    with pytest.raises(UserError, match="unknown suite"):
        suite_recipes("quik")
    with pytest.raises(UserError, match="at least 1"):
        suite_recipes("quick", seeds=0)


def test_overrides() -> None:
    assert parse_set(["trainer.epochs=2", "data.params.root=/x", "seeds=[4, 5]"]) == {
        "trainer": {"epochs": 2},
        "data": {"params": {"root": "/x"}},
        "seeds": [4, 5],
    }
    with pytest.raises(UserError, match="KEY.PATH=VALUE"):
        parse_set(["trainer.epochs"])
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(UserError, match="unknown key"):
        suite_recipes("quick", overrides={"trainer": {"epoch": 1}})


def test_memoized_teacher_matches_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    memo = MemoizedTeacher(teacher)
    x = torch.randn(8, 3, 4)
    with torch.inference_mode():
        first = memo(x[:5])
        mixed = memo(x[2:])  # 3 seen rows, 3 new
        again = memo(x)
        expected = teacher(x)
    torch.testing.assert_close(first, expected[:5])
    torch.testing.assert_close(mixed, expected[2:])
    torch.testing.assert_close(again, expected)
    assert memo.misses == 8 and memo.hits == 3 + 8


def _fake_dataset(accuracies: dict[str, list[float]]) -> DatasetResult:
    """A data set's results without a run: one method per entry (the first is the student alone)."""

    def runs(name: str, values: list[float]) -> MethodRuns:
        fits = [FitResult({"accuracy": a, "ece": 0.05}, {"accuracy": a}) for a in values]
        return MethodRuns(name, [], [SeedRun(seed, fit, 1.0) for seed, fit in enumerate(fits)])

    settings = [(name, bench_methods.Setting(name, (), "test")) for name in accuracies]
    experiment = SimpleNamespace(teacher=None, methods=[runs(n, v) for n, v in accuracies.items()])
    return DatasetResult(recipe=None, experiment=experiment, methods=settings)  # type: ignore[arg-type]


def test_table_says_better_worse_or_within_noise() -> None:
    dataset = _fake_dataset(
        {
            "student alone": [0.80, 0.82, 0.84],  # std 2 points
            "up": [0.90, 0.91, 0.92],  # +9 points, spread 3: better
            "down": [0.70, 0.71, 0.72],  # -11 points, spread 3: worse (was "yes" under `gain > spread?`)
            "same": [0.81, 0.83, 0.85],  # +1 point, spread 4: within noise
        }
    )
    assert HEADERS[3:5] == ["gain vs alone (last)", "vs student alone"]
    rows = {row[0]: row for row in table_rows(dataset)}
    assert rows["student alone"][3:5] == ["-", "-"]
    assert rows["up"][3:5] == ["+9.00 (spread 3.00)", "better"]
    assert rows["down"][3:5] == ["-11.00 (spread 3.00)", "worse"]
    assert rows["same"][3:5] == ["+1.00 (spread 4.00)", "within noise"]


def _check_outputs(out: Path, datasets: int) -> dict:
    for name in ("results.md", "results.json", "accuracy.png", "learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "results.json").read_text())
    assert len(document["datasets"]) == datasets
    return document


@pytest.mark.slow
def test_tiny_quick_suite_end_to_end(tmp_path: Path) -> None:
    require_data("images/mnist_t10k")  # the quick suite's second data set
    from distill.cli import app

    out = tmp_path / "bench"
    args = ["bench", "vision", "--suite", "quick", "--out", str(out), "--seeds", "1"]
    args += ["--methods", "hinton_kd,dkd"]
    args += ["--set", "data.params.labelled_per_class=3", "--set", "teacher.train.epochs=1"]
    args += ["--set", "trainer.epochs=2", "--set", "trainer.eval_every=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    document = _check_outputs(out, 2)
    for dataset in document["datasets"]:
        names = [m["name"] for m in dataset["methods"]]
        assert names == ["student alone", "KD", "DKD"]
        kd = dataset["methods"][1]
        assert 0.0 <= kd["accuracy_last"]["mean"] <= 1.0 and kd["gain_vs_alone"] is not None
        assert kd["gain_vs_alone"]["verdict"] in ("better", "worse", "within noise")
        assert kd["wall_seconds"]["mean"] > 0 and len(kd["per_seed"]) == 1
        assert (out / dataset["recipe"] / "report.md").exists()
    text = (out / "results.md").read_text()
    assert text.startswith("# Vision distillation benchmark: `quick` suite")
    assert "distill bench vision --suite quick" in text and "| KD |" in text
    assert "KD vs student alone" in text and "| vs student alone |" in text and "gain > spread" not in text
    # a second run into the same folder is refused; --resume finishes from the stored runs
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, UserError)
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (
        json.loads((out / "results.json").read_text())["datasets"][0]["methods"][1]["accuracy_last"]
        == document["datasets"][0]["methods"][1]["accuracy_last"]
    )


def _stand_in_cifar100(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] = 40 * c  # a little class signal
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_cifar100_suite_wiring_on_a_stand_in_folder(tmp_path: Path) -> None:
    root = _stand_in_cifar100(tmp_path / "cifar100")
    out = tmp_path / "bench"
    overrides = parse_set(
        [
            f"data.params.root={root}",
            "teacher.name=resnet8",  # the published pair is resnet32x4 -> resnet8x4; tiny here for speed
            "teacher.train.epochs=1",
            "teacher.train.schedule.milestones=[1]",
            "student.name=resnet8",
            "trainer.epochs=2",
            "schedule.milestones=[1]",
            "data.batch_size=6",
            "evaluation.latency=false",
        ]
    )
    ((recipe, _),) = suite_recipes("cifar100", seeds=1, methods=["hinton_kd"], overrides=overrides)
    assert recipe.data.params["augment"] is True
    result = run_vision_bench(
        "cifar100", out=out, seeds=1, methods=["hinton_kd"], overrides=overrides, command="test"
    )
    document = _check_outputs(out, 1)
    assert document["datasets"][0]["data"].startswith("CIFAR-100 folders")
    assert [m["name"] for m in document["datasets"][0]["methods"]] == ["student alone", "KD"]
    assert result.datasets[0].experiment.data.num_classes == 3


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    import subprocess

    run = subprocess.run(
        [sys.executable, "-m", "distill", "bench", "vision", "--suite", "quik", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --suite: unknown suite 'quik'; did you mean 'quick'?"

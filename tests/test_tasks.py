"""One runner for every task: a new task is a new `Task` plus its registration, and `run_recipe` drives it
without a line of change; the package's layers hold (the pure losses load nothing else)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from distill.experiment import run_recipe
from distill.io import atomic_write_text
from distill.recipe.load import recipe_from_dict
from distill.report import write_report
from distill.tasks import TASKS, Task, TaskSetup, task_for


class ParityTask(Task):
    """A problem the project has never seen: the parity of 4 bits, an MLP teacher and a linear student."""

    name = "parity_toy"

    def prepare(self, recipe, folder, *, progress, console):  # noqa: ANN001, ANN201
        bits = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=torch.float32)
        data = TensorDataset(bits.repeat(4, 1), (bits.sum(1) % 2).long().repeat(4))
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
        return TaskSetup(data, data, teacher, fit_settings={"eval_data": data})

    def build_student(self, recipe, setup):  # noqa: ANN001, ANN201
        return nn.Linear(4, 2)

    def write_report(self, result):  # noqa: ANN001, ANN201
        path = result.out_dir / "report.md"
        accuracy = [r.result.final["accuracy"] for m in result.methods for r in m.runs]
        atomic_write_text(path, f"# parity\n\naccuracy per run: {accuracy}\n")
        return path


def test_a_new_task_runs_through_the_unchanged_runner(tmp_path: Path) -> None:
    TASKS.add("parity_toy", ParityTask, summary="test-only task")
    try:
        recipe = recipe_from_dict(
            {
                "name": "parity",
                "task": "parity_toy",
                "student": {"name": "unused-by-this-task"},
                "methods": [
                    {"name": "alone", "objectives": [{"name": "cross_entropy"}]},
                    {"name": "kd", "objectives": [{"name": "cross_entropy"}, {"name": "hinton_kd"}]},
                ],
                "trainer": {"epochs": 2, "device": "cpu"},
                "data": {"batch_size": 16},
                "seeds": [0, 1],
                "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
            }
        )
        assert isinstance(task_for(recipe), ParityTask)
        result = run_recipe(recipe, progress=False, console=Console(quiet=True))
        assert result.task == "parity_toy" and [m.name for m in result.methods] == ["alone", "kd"]
        assert all(len(m.runs) == 2 for m in result.methods)
        assert "accuracy per run" in write_report(result).read_text()
        final = json.loads((tmp_path / "run" / "methods" / "kd" / "seed-1" / "final.json").read_text())
        assert 0.0 <= final["final"]["accuracy"] <= 1.0
    finally:
        TASKS._entries.pop("parity_toy", None)


def test_tasks_are_chosen_by_what_the_recipe_names() -> None:
    lm = {
        "name": "x",
        "data": {"name": "jsonl"},
        "student": {"name": "hf"},
        "objectives": [{"name": "cross_entropy"}],
    }
    image = {"name": "x", "student": {"name": "mlp"}, "objectives": [{"name": "cross_entropy"}]}
    assert task_for(recipe_from_dict(lm)).name == "causal_lm"
    assert task_for(recipe_from_dict(image)).name == "classification"


def test_the_losses_load_no_other_part_of_the_package() -> None:
    code = (
        "import sys, distill.losses; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('distill.')})); "
        "heavy = ('accelerate', 'transformers', 'datasets', 'safetensors'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['losses']", "[]"]


def test_schedules_count_the_steps_of_one_process(monkeypatch) -> None:
    """Each process takes its share of the batches, so epoch-based warm-ups and milestones are converted with
    the world size (a 2-process run's milestones used to fire at twice the epoch)."""
    from distill.recipe.schema import ScheduleSpec
    from distill.tasks.teacher_store import schedule_config, steps_per_epoch, world_size

    assert steps_per_epoch(100, 10, 1) == 10
    assert steps_per_epoch(100, 10, 1, world_size=2) == 5
    assert steps_per_epoch(101, 10, 2, world_size=2) == 3  # 51 samples -> 6 batches -> 3 windows
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_epoch = steps_per_epoch(100, 10, 1, world_size())
    schedule = schedule_config(ScheduleSpec(name="step", warmup_epochs=1, milestones=[2, 4]), per_epoch)
    assert schedule.warmup_steps == 5 and schedule.milestones == [10, 20]


def test_validate_names_the_task_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    import yaml

    from distill.recipe.load import builtin_recipe_text

    data = yaml.safe_load(builtin_recipe_text("quickstart"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    ok = subprocess.run(
        [sys.executable, "-m", "distill", "validate", str(path)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "task classification" in ok.stdout
    data["task"] = "clasification"
    path.write_text(yaml.safe_dump(data))
    bad = subprocess.run(
        [sys.executable, "-m", "distill", "validate", str(path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "did you mean 'classification'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

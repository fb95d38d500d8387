"""Experiment trackers through Accelerate (`output.trackers`, `fit(trackers=...)`): refused in one line when
not installed, and every run's config, log rows and end reach them. wandb and mlflow are not installed here:
the plumbing is tested with Accelerate `GeneralTracker`s, one of them standing in for wandb by name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.tracking import GeneralTracker

from distill import build_data, build_model, fit
from distill.errors import NonFiniteLossError, UserError
from distill.objectives import Objective, StepOutputs
from distill.recipe.load import recipe_from_dict
from distill.train.seeding import seed_everything
from distill.train.trackers import available_trackers


class Recording(GeneralTracker):
    """Keeps what Accelerate hands a tracker."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self, run_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        self.run_name, self.kwargs = run_name, kwargs
        self.config: dict[str, Any] = {}
        self.logged: list[tuple[int | None, dict[str, Any]]] = []
        self.finished = 0

    @property
    def tracker(self) -> Recording:
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((step, dict(values)))

    def finish(self) -> None:
        self.finished += 1


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", labelled_per_class=5)


def _student(data):
    seed_everything(0)
    return build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[8])


def _recipe(out: Path, **output: Any) -> dict[str, Any]:
    return {
        "name": "tracked",
        "data": {"name": "digits", "params": {"labelled_per_class": 5}, "batch_size": 16},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "objectives": [{"name": "cross_entropy"}],
        "trainer": {"epochs": 2, "log_every": 1, "device": "cpu"},
        "evaluation": {"latency": False},
        "output": {"dir": str(out), "tensorboard": False, **output},
    }


@pytest.mark.skipif(bool(available_trackers() & {"wandb", "mlflow"}), reason="a tracker is installed here")
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_asked_for_but_not_installed_is_refused_in_one_line(tracker: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        recipe_from_dict(_recipe(tmp_path, trackers=[tracker]), "r.yaml")
    assert str(err.value) == (
        f"r.yaml: output.trackers: {tracker} asked for but not installed (pip install {tracker})"
    )
    with pytest.raises(UserError, match=f"trackers: {tracker} asked for but not installed"):
        fit(_student(build_data("digits", labelled_per_class=2)), [], trackers=[tracker])  # before the data


@pytest.mark.parametrize(
    ("trackers", "fragment"),
    [(["comet"], "output.trackers[0]: Input should be 'wandb' or 'mlflow'"), (["wandb", "wandb"], "once")],
)
def test_unknown_or_repeated_trackers_are_refused(trackers: list[str], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        recipe_from_dict(_recipe(tmp_path, trackers=trackers))


def test_a_run_logs_its_config_rows_and_end_to_its_trackers(digits, tmp_path: Path) -> None:
    tracker = Recording()
    result = fit(
        _student(digits),
        digits.train,
        eval_data=digits.test,
        epochs=2,
        batch_size=16,
        log_every=1,
        progress=False,
        tensorboard=False,
        run_dir=tmp_path,
        trackers=[tracker],
        tracker_project="my-project",
    )
    assert tracker.config["trainer.epochs"] == 2 and tracker.config["optimizer.lr"] == 1e-3
    assert tracker.config["trainer.total_steps"] == result.steps and "trainer.trackers" not in tracker.config
    train = [(step, values) for step, values in tracker.logged if "train/loss" in values]
    evals = [(step, values) for step, values in tracker.logged if "eval/accuracy" in values]
    assert [step for step, _ in train] == list(range(1, result.steps + 1))
    assert [step for step, _ in evals] == [row["step"] for row in result.history]
    assert evals[-1][1]["eval/accuracy"] == result.final["accuracy"]
    assert tracker.finished == 1


class Exploding(Objective):
    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return outputs.student_logits.sum() * math.inf


def test_a_run_that_stops_early_still_ends_its_trackers(digits) -> None:
    tracker = Recording()
    with pytest.raises(NonFiniteLossError):
        fit(_student(digits), digits.train, objectives=[Exploding()], trackers=[tracker], progress=False)
    assert tracker.finished == 1 and tracker.config


def test_a_recipe_names_a_tracker_and_accelerate_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`output.trackers: [wandb]` with wandb "installed": Accelerate builds its wandb tracker class (here a
    stand-in) for each method and seed, in a project named after the recipe."""
    import accelerate.tracking as tracking
    from accelerate.utils import LoggerType

    built: list[Recording] = []

    class FakeWandB(Recording):
        name = "wandb"

        def __init__(self, run_name: str, **kwargs: Any) -> None:
            super().__init__(run_name, **kwargs)
            built.append(self)

    monkeypatch.setattr(tracking, "_available_trackers", [*tracking._available_trackers, LoggerType.WANDB])
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandB)
    from distill.experiment import run_recipe

    recipe = recipe_from_dict(_recipe(tmp_path / "run", trackers=["wandb"]) | {"seeds": [0, 1]})
    result = run_recipe(recipe, progress=False)
    assert [(t.run_name, t.kwargs["name"]) for t in built] == [
        ("tracked", "distill seed 0"),
        ("tracked", "distill seed 1"),
    ]
    assert all(t.kwargs["dir"].endswith(f"seed-{i}") and t.finished == 1 for i, t in enumerate(built))
    final = result.methods[0].runs[0].result.final
    assert any(values.get("eval/accuracy") == final["accuracy"] for _, values in built[0].logged)

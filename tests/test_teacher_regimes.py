"""Teacher regimes in recipes (`methods[].teacher`): ensembles, an online peer, the student's EMA and
iterative self-distillation, through `run_recipe` on the digits data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distill.errors import UserError
from distill.experiment import run_recipe
from distill.recipe.load import recipe_from_dict
from distill.tasks.regimes import ensemble_members, generation_terms, split_terms
from distill.teachers import CoTrainedTeacher, EMATeacher, FrozenTeacher

KD = [{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5}]


def recipe(out: Path, methods: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": "regimes",
        "data": {"name": "digits", "params": {"labelled_per_class": 20}, "batch_size": 32},
        "teacher": {"name": "mlp", "params": {"hidden": [32]}, "train": {"epochs": 2}},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "methods": methods,
        "trainer": {"epochs": 2, "device": "cpu"},
        "evaluation": {"latency": False},
        "output": {"dir": str(out), "tensorboard": False},
        **extra,
    }


def run(out: Path, methods: list[dict[str, Any]], **extra: Any) -> Any:
    return run_recipe(recipe_from_dict(recipe(out, methods, **extra)), progress=False)


def refusal(tmp_path: Path, methods: list[dict[str, Any]], **extra: Any) -> str:
    with pytest.raises(UserError) as err:
        run(tmp_path / "refused", methods, **extra)
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- the schema
@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ({"kind": "ensemble", "seeds": [1]}, "at least two teachers"),
        ({"kind": "ensemble", "seeds": [1, 1]}, "distinct"),
        ({"kind": "ensemble", "seeds": [1, 2], "weights": [1.0]}, "one weight per member"),
        ({"kind": "ensemble", "seeds": [1, 2], "normalise": "standard"}, "normalise applies to combine"),
        ({"kind": "emma"}, "kind"),
        ({"kind": "ema", "decay": 1.0}, "decay"),
        ({"kind": "self", "generations": 1}, "generations"),
        ({"kind": "self", "alpha": 1.5}, "alpha"),
        ({"kind": "online", "lr": -1}, "lr"),
    ],
)
def test_a_wrong_regime_is_refused_by_the_recipe(tmp_path: Path, teacher: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        recipe_from_dict(recipe(tmp_path, [{"name": "m", "teacher": teacher, "objectives": KD}]), "r.yaml")


def test_a_method_without_a_regime_dumps_as_before(tmp_path: Path) -> None:
    """The recipe's fingerprint (resume, export) of a method with no `teacher` is what it was before."""
    parsed = recipe_from_dict(recipe(tmp_path, [{"name": "m", "objectives": KD}]))
    assert "teacher" not in parsed.model_dump(mode="json")["methods"][0]


def test_ensemble_seeds_need_a_retrainable_recipe_teacher(tmp_path: Path) -> None:
    parsed = recipe_from_dict(
        recipe(tmp_path, [{"name": "m", "teacher": {"kind": "ensemble", "seeds": [0, 1]}, "objectives": KD}])
    )
    members = ensemble_members(parsed, parsed.methods[0].teacher)  # type: ignore[index,arg-type]
    assert [spec.train.seed for _, spec in members] == [0, 1]
    assert [name for name, _ in members] == ["mlp seed 0", "mlp seed 1"]
    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"")
    pinned = parsed.model_copy(
        update={"teacher": parsed.teacher.model_copy(update={"checkpoint": weights})}  # type: ignore[union-attr]
    )
    with pytest.raises(UserError, match="loads a checkpoint"):
        ensemble_members(pinned, parsed.methods[0].teacher)  # type: ignore[index,arg-type]


def test_self_distillation_splits_label_and_teacher_terms(tmp_path: Path) -> None:
    parsed = recipe_from_dict(
        recipe(tmp_path, [{"name": "m", "teacher": {"kind": "self"}, "objectives": KD}])
    )
    method = parsed.methods[0]  # type: ignore[index]
    assert split_terms(method) == ([0], [1])
    from distill.experiment import method_terms

    terms = method_terms(method)
    assert [(t.objective, t.weight) for t in generation_terms(method, terms, None)] == [
        ("cross_entropy", 0.5)
    ]
    weighted = generation_terms(method, terms, 0.3)
    assert [t.weight for t in weighted] == pytest.approx([0.5 * 0.3, 0.5 * 0.7])


@pytest.mark.parametrize(
    ("objectives", "expected"),
    [
        ([{"name": "hinton_kd"}], "add a label term"),
        ([{"name": "cross_entropy"}], "needs a teacher term"),
    ],
)
def test_self_distillation_without_both_kinds_of_term_is_refused(
    tmp_path: Path, objectives: list, expected: str
) -> None:
    message = refusal(tmp_path, [{"name": "m", "teacher": {"kind": "self"}, "objectives": objectives}])
    assert expected in message
    assert not (tmp_path / "refused").exists()  # refused before the teacher trains or a folder appears


# ---------------------------------------------------------------------------------------- end to end
def test_every_regime_trains_from_one_recipe(tmp_path: Path) -> None:
    methods = [
        {"name": "ensemble", "teacher": {"kind": "ensemble", "seeds": [0, 1]}, "objectives": KD},
        {
            "name": "ensemble again",  # the same members: obtained once, shared
            "teacher": {"kind": "ensemble", "seeds": [0, 1], "combine": "logits", "normalise": "standard"},
            "objectives": KD,
        },
        {
            "name": "dml",
            "teacher": {"kind": "online"},
            "objectives": [{"name": "cross_entropy"}, {"name": "forward_kl"}],
        },
        {"name": "mean teacher", "teacher": {"kind": "ema", "decay": 0.9}, "objectives": KD},
        {"name": "self", "teacher": {"kind": "self", "generations": 3, "alpha": 0.4}, "objectives": KD},
        {"name": "self, alpha estimated", "teacher": {"kind": "self", "generations": 2}, "objectives": KD},
    ]
    result = run(tmp_path / "run", methods)
    by_name = {m.name: m for m in result.methods}
    ensemble = by_name["ensemble"].teacher
    assert len(ensemble.members) == 2 and 0.0 < ensemble.metrics["accuracy"] <= 1.0
    assert ensemble.parameters == 2 * result.teacher.parameters
    # Two members, each trained (or found in the teacher cache) once for both methods.
    assert len(list((tmp_path / "run" / "teachers").iterdir())) <= 2
    generations = by_name["self"].runs[0].extra["generations"]
    assert [g["alpha"] for g in generations] == [None, 0.4, 0.4]
    assert generations[-1]["metrics"]["accuracy"] == by_name["self"].runs[0].result.final["accuracy"]
    seeds = tmp_path / "run" / "methods" / "self"
    assert sorted(p.name for p in seeds.iterdir()) == ["seed-0", "seed-0-generation-1", "seed-0-generation-2"]
    estimated = by_name["self, alpha estimated"].runs[0].extra["generations"]
    assert estimated[0]["alpha"] is None and all(0.0 <= g["alpha"] <= 1.0 for g in estimated[1:])
    probes = tmp_path / "run" / "methods" / "self--alpha-estimated"
    assert (probes / "seed-0-generation-2-alpha-0").is_dir()  # the alpha-0 student of S22's estimate
    for name in ("dml", "mean teacher"):
        assert "agreement" in by_name[name].runs[0].result.final


def test_regime_teachers_are_the_kinds_the_trainer_knows(tmp_path: Path) -> None:
    """Each regime hands the trainer the teacher kind whose contract it needs: an online peer learns (its own
    parameter group), an EMA follows the student, an ensemble is frozen."""
    from distill.tasks import task_for
    from distill.tasks.regimes import Regimes

    methods = [
        {"name": "dml", "teacher": {"kind": "online", "lr": 0.01}, "objectives": KD},
        {"name": "ema", "teacher": {"kind": "ema"}, "objectives": KD},
    ]
    parsed = recipe_from_dict(recipe(tmp_path, methods))
    regimes = Regimes(task_for(parsed), parsed, None, None, False)  # type: ignore[arg-type]
    regimes.setup = type("Setup", (), {"data": _digits()})()  # type: ignore[assignment]
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    online = regimes.seed_teacher(parsed.methods[0], student)  # type: ignore[index]
    ema = regimes.seed_teacher(parsed.methods[1], student)  # type: ignore[index]
    assert isinstance(online, CoTrainedTeacher) and online.trainable and not online.static
    assert online.optimizer_options() == {"lr": 0.01}
    assert isinstance(ema, EMATeacher) and not ema.trainable and not ema.static
    assert FrozenTeacher(student).static


def _digits() -> Any:
    from distill.data import build_data

    return build_data("digits", labelled_per_class=2)


def test_the_online_peer_learns_and_is_checkpointed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    methods = [{"name": "dml", "teacher": {"kind": "online"}, "objectives": KD}]
    result = run(tmp_path / "run", methods, trainer={"epochs": 2, "device": "cpu", "checkpoint_every": 1})
    assert result.methods[0].runs[0].result.completed
    stored = [p for p in (tmp_path / "run" / "methods" / "dml" / "seed-0").rglob("*.safetensors")]
    keys = set().union(*(load_file(p).keys() for p in stored))
    assert any("model" in k for k in keys), sorted(keys)[:10]


def test_regimes_a_task_cannot_serve_are_refused_in_one_line(tmp_path: Path) -> None:
    """The graph task builds no peers or ensemble members: one line, before a student trains."""
    from distill.tasks.base import Task

    with pytest.raises(UserError, match="has no online teachers"):
        Task().peer_model(None, None, None)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="has no teacher ensembles"):
        Task().member_teacher(None, None, None, None, progress=False, run_name="x")  # type: ignore[arg-type]


def test_the_held_out_part_is_seeded_and_disjoint_from_training() -> None:
    from distill.tasks.regimes import held_out_split

    data = torch.utils.data.TensorDataset(torch.arange(50.0))
    rest, held = held_out_split(data, 0.1, seed=3)
    assert len(held) == 5 and len(rest) == 45
    assert not set(rest.indices) & set(held.indices)  # type: ignore[attr-defined]
    assert held_out_split(data, 0.1, seed=3)[1].indices == held.indices  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="cannot spare"):
        held_out_split(torch.utils.data.TensorDataset(torch.arange(1.0)), 0.1, seed=0)


def test_a_task_without_regimes_refuses_them_before_anything_trains(tmp_path: Path) -> None:
    from distill.tasks.base import Task

    parsed = recipe_from_dict(recipe(tmp_path, [{"name": "m", "teacher": {"kind": "ema"}, "objectives": KD}]))
    with pytest.raises(UserError, match="task 'task' has no 'ema' teachers"):
        Task().check(parsed)


def test_the_report_shows_each_ensemble_and_each_generation(tmp_path: Path) -> None:
    import json

    from distill.report import write_report

    methods = [
        {"name": "ensemble", "teacher": {"kind": "ensemble", "seeds": [0, 1]}, "objectives": KD},
        {"name": "self", "teacher": {"kind": "self", "generations": 2, "alpha": 0.5}, "objectives": KD},
    ]
    result = run(tmp_path / "run", methods, seeds=[0, 1])
    text = write_report(result).read_text()
    assert "- ensemble (teacher: ensemble of 2):" in text and "Teacher of ensemble (test split):" in text
    assert "| mlp seed 1 |" in text and "| ensemble |" in text
    assert "Generations of self (mean ± std over seeds):" in text
    assert "| 1 | labels only |" in text and "| 2 | 0.500 ± 0.000 |" in text
    document = json.loads((tmp_path / "run" / "metrics.json").read_text())
    by_name = {m["name"]: m for m in document["methods"]}
    assert len(by_name["ensemble"]["ensemble"]["members"]) == 2
    assert [g["alpha"] for g in by_name["self"]["generations"][0]] == [None, 0.5]

"""Feature objectives in the trainer: layers by path or tap index, projectors built from one probe and
trained and checkpointed, a teacher that stops at the deepest layer needed, CRD's memory banks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distill.errors import UserError
from distill.models import build_model
from distill.objectives import OBJECTIVES, build_objective
from distill.objectives.features import FeatureObjective
from distill.train import OptimizerConfig, Trainer, TrainerConfig

FEATURE_METHODS = ["fitnet", "attention_transfer", "similarity_preserving", "pkt", "rkd", "fsp", "crd", "trg"]


def images(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :6].mean((1, 2, 3)) > 0).long()
    return TensorDataset(x, y)


def cnn(channels: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=4, input_shape=(1, 12, 12), channels=channels)


def trainer(
    objectives: list,
    tmp_path: Path | None = None,
    epochs: int = 1,
    student: tuple[int, ...] = (4, 8, 8),
    eval_size: int = 8,
    **config: object,
) -> Trainer:
    return Trainer(
        cnn(list(student), seed=1),
        images(),
        teacher=cnn([8, 16, 16], seed=2),
        eval_data=images(eval_size, seed=1),
        objectives=objectives,
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
        config=TrainerConfig(
            epochs=epochs, batch_size=8, device="cpu", progress=False, tensorboard=False, **config
        ),
        run_dir=tmp_path,
        fingerprint="features",
    )


def test_every_feature_method_is_registered_as_a_feature_kind() -> None:
    for name in FEATURE_METHODS:
        assert OBJECTIVES.entry(name).extra.get("kind") == "feature", name
        assert isinstance(build_objective(name), FeatureObjective)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_each_method_trains_its_projectors_and_the_student(name: str) -> None:
    # FSP compares flows between equal channel counts: a narrower student of the same depth for it.
    run = trainer([("cross_entropy", 1.0), (name, 1.0)], student=(8, 16, 16) if name == "fsp" else (4, 8, 8))
    objective = run.objectives[1]
    assert objective.built and objective.student_layers and objective.teacher_layers
    own = [p.detach().clone() for p in objective.parameters()]
    student = [p.detach().clone() for p in run.student.parameters()]
    result = run.fit()
    assert result.completed
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final.values() if isinstance(v, float))
    assert any(not torch.equal(a, b) for a, b in zip(student, run.student.parameters(), strict=True))
    if own:  # projectors (FitNets' regressor, CRD's embeddings) learn with the student
        assert any(not torch.equal(a, b) for a, b in zip(own, objective.parameters(), strict=True))


def test_default_taps_pair_the_deepest_stages() -> None:
    run = trainer([("attention_transfer", 1.0)])
    at = run.objectives[0]
    # small_cnn taps: [features.0, features.1, features.2, pool]; stages are taps[1:-1] on both sides
    assert at.student_layers == ("features.1", "features.2")
    assert at.teacher_layers == ("features.1", "features.2")
    fitnet = trainer([("fitnet", 1.0)]).objectives[0]
    assert fitnet.student_layers == ("features.1",)  # tap -3, RepDistiller's hint layer 2 of [stem, 3 stages]


def test_a_misspelt_layer_names_the_nearest_path() -> None:
    with pytest.raises(UserError, match=r"student.*did you mean 'features\.1'"):
        trainer([("fitnet", 1.0, {"student_layer": "feature.1"})])
    with pytest.raises(UserError, match="tap index 9 is out of range"):
        trainer([("fitnet", 1.0, {"teacher_layer": 9})])


def test_fsp_refuses_layers_of_different_widths_in_one_line() -> None:
    with pytest.raises(UserError, match="FSP needs feature maps with equal channel counts"):
        trainer([("fsp", 1.0)])


def test_bad_layer_parameters_are_refused_before_any_model() -> None:
    with pytest.raises(UserError, match="student_layer"):
        build_objective("fitnet", {"student_layer": 1.5})
    with pytest.raises(UserError, match="did you mean 'student_layer'"):
        build_objective("fitnet", {"student_layers": [1]})
    with pytest.raises(UserError, match="stages"):
        build_objective("attention_transfer", {"teacher_layers": []})


def test_teacher_runs_only_up_to_the_deepest_layer_when_no_objective_needs_its_logits() -> None:
    run = trainer([("cross_entropy", 1.0), ("fitnet", 1.0)])
    calls = {"head": 0}
    run.teacher.module.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    run.fit()
    evaluation_passes = calls["head"]  # the evaluation of agreement still runs the whole teacher
    assert evaluation_passes == 1  # one pass over the 8 evaluation images; none in the 3 training steps
    with_logits = trainer([("cross_entropy", 1.0), ("fitnet", 1.0), ("hinton_kd", 1.0)])
    calls["head"] = 0
    with_logits.teacher.module.head.register_forward_hook(
        lambda *_: calls.__setitem__("head", calls["head"] + 1)
    )
    with_logits.fit()
    assert calls["head"] == 3 + 1


def test_a_features_only_teacher_reads_fresh_features_after_an_evaluation() -> None:
    """The evaluation runs the whole teacher with its hooks on; the next training step must not take the
    evaluation's outputs for layers its early-stopped pass did not reach again."""
    # 5 evaluation images against training batches of 8: a stale output would not even fit the batch.
    result = trainer([("cross_entropy", 1.0), ("attention_transfer", 1.0)], epochs=3, eval_size=5).fit()
    assert result.completed and result.steps == 9


def test_projectors_are_checkpointed_and_a_resumed_run_ends_identically(tmp_path: Path) -> None:
    objectives = [("cross_entropy", 1.0), ("fitnet", 1.0), ("crd", 0.8, {"negatives": 8})]
    whole = trainer(objectives, tmp_path / "whole", epochs=2, checkpoint_every=2).fit()
    trainer(objectives, tmp_path / "cut", epochs=2, checkpoint_every=2, stop_after_steps=4).fit()
    resumed_run = trainer(objectives, tmp_path / "cut", epochs=2, checkpoint_every=2)
    resumed = resumed_run.fit(resume=True)
    keys = [k for k, v in whole.final.items() if isinstance(v, float) and k != "seconds"]
    for key in keys:
        assert resumed.final[key] == pytest.approx(whole.final[key], abs=1e-6), key
    state = resumed_run.saved_state.state_dict()
    assert any("regressor" in k for k in state) and any("memory_student" in k for k in state)


def test_crd_reads_sample_ids_and_updates_its_memory_banks() -> None:
    run = trainer([("cross_entropy", 1.0), ("crd", 0.8, {"negatives": 5})])
    crd = run.objectives[1]
    assert crd.memory_student.shape == (24, 128) and float(crd.z[0]) == -1.0
    before = crd.memory_teacher.clone()
    run.fit()
    assert float(crd.z[0]) > 0 and float(crd.z[1]) > 0  # estimated on the first batch
    changed = (crd.memory_teacher != before).any(1)
    assert bool(changed.all())  # one epoch visits every sample once


def test_token_features_with_a_mask() -> None:
    """FitNets on (B, T, D) token features: masked positions change nothing."""
    fitnet = build_objective("fitnet", {"student_layer": "s", "teacher_layer": "t"})
    fitnet.bind_layers(["s"], ["t"])
    fitnet.build([torch.Size([2, 5, 3])], [torch.Size([2, 5, 4])], 10)
    from distill.objectives import StepOutputs

    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    step = StepOutputs(torch.zeros(2, 5, 7), mask=mask, student_features={"s": s}, teacher_features={"t": t})
    value = fitnet(step)
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:], t2[0, 3:] = 100.0, -100.0
    step2 = StepOutputs(
        torch.zeros(2, 5, 7), mask=mask, student_features={"s": s2}, teacher_features={"t": t2}
    )
    assert torch.allclose(fitnet(step2), value)


def _digits_recipe(tmp_path: Path, params: dict) -> dict:
    return {
        "name": "feature-layers",
        "data": {
            "name": "digits",
            "params": {"test_fraction": 0.3, "labelled_per_class": 5},
            "batch_size": 16,
        },
        "teacher": {"name": "small_cnn", "params": {"channels": [8, 16]}, "train": {"epochs": 1}},
        "student": {"name": "small_cnn", "params": {"channels": [4, 8]}},
        "objectives": [{"name": "cross_entropy"}, {"name": "fitnet", "weight": 10.0, "params": params}],
        "trainer": {"epochs": 1},
        "seeds": [0],
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }


def test_a_misspelt_layer_is_refused_before_the_teacher_trains(tmp_path: Path, monkeypatch) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict
    from distill.tasks import classification

    def no_training(*args, **kwargs):  # the check must come first
        raise AssertionError("the teacher was trained before the layers were checked")

    monkeypatch.setattr(classification, "obtain_teacher", no_training)
    recipe = recipe_from_dict(_digits_recipe(tmp_path, {"teacher_layer": "features.7"}))
    with pytest.raises(
        UserError, match=r"objectives: objective 'fitnet': teacher.*has no module 'features\.7'"
    ):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_feature_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    recipe = recipe_from_dict(_digits_recipe(tmp_path, {"student_layer": -2, "teacher_layer": -2}))
    result = run_recipe(recipe, progress=False)
    (run,) = result.methods[0].runs
    assert run.result.completed and 0.0 <= run.result.final["accuracy"] <= 1.0

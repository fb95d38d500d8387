"""Every kind of teacher behind one interface: frozen, ensemble (normalise then aggregate), router,
co-trained peer (mutual learning), the student's EMA. Only the co-trained kind learns; a co-trained run
resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from distill import fit
from distill.errors import UserError
from distill.teachers import (
    CoTrainedTeacher,
    EMATeacher,
    Ensemble,
    FrozenTeacher,
    Router,
    TeacherRequest,
    aggregate,
    normalise_scores,
)
from distill.train import Trainer, TrainerConfig


def toy_data(n: int = 48, features: int = 6, classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y.clamp_max(classes - 1))


def mlp(seed: int, features: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


SETTINGS = dict(epochs=2, batch_size=8, progress=False, tensorboard=False, device="cpu", eval_batch_size=64)


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.floats(-30, 30), min_size=4, max_size=4),
    st.lists(st.floats(-30, 30), min_size=4, max_size=4),
    st.floats(0.05, 5.0),
)
def test_aggregate_matches_float64_reference(a: list[float], b: list[float], w: float) -> None:
    za, zb = torch.tensor([a]), torch.tensor([b])
    weights = torch.tensor([w, 1.0])
    got = aggregate([za, zb], weights, combine="probabilities")
    pa, pb = torch.softmax(za.double(), -1), torch.softmax(zb.double(), -1)
    expected = ((w * pa + pb) / (w + 1)).log()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    standard = aggregate([za, zb], weights, combine="logits", normalise="standard")
    za64, zb64 = za.double(), zb.double()
    norm = [
        (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)
        for z in (za64, zb64)
    ]
    torch.testing.assert_close(standard.double(), (w * norm[0] + norm[1]) / (w + 1), atol=1e-4, rtol=1e-4)


def test_normalisation_puts_scores_of_any_scale_on_one_scale() -> None:
    scores = torch.tensor([[0.0, 10.0, 20.0]])
    for how in ("standard", "minmax"):
        torch.testing.assert_close(normalise_scores(scores, how), normalise_scores(scores * 1000 + 7, how))
    assert torch.equal(normalise_scores(scores, "minmax"), torch.tensor([[0.0, 0.5, 1.0]]))


def test_ensemble_of_one_model_twice_is_that_model() -> None:
    model = mlp(1)
    ensemble = Ensemble([model, model])
    x = torch.randn(5, 6)
    torch.testing.assert_close(torch.softmax(ensemble(x), -1), torch.softmax(model(x), -1))
    with pytest.raises(UserError, match="at least two"):
        Ensemble([model])
    with pytest.raises(UserError, match="normalise applies"):
        Ensemble([model, model], normalise="standard")


def test_a_frozen_teacher_never_reaches_the_optimizer() -> None:
    teacher = mlp(1)
    before = [p.clone() for p in teacher.parameters()]
    trainer = Trainer(
        mlp(2), toy_data(), teacher=teacher, objectives=["hinton_kd"], config=TrainerConfig(**SETTINGS)
    )
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_ensemble_teacher_trains_a_student() -> None:
    teacher = FrozenTeacher(Ensemble([mlp(1), mlp(3)], [2.0, 1.0], combine="logits", normalise="standard"))
    result = fit(
        mlp(2), toy_data(), teacher=teacher, eval_data=toy_data(), objectives=["hinton_kd"], **SETTINGS
    )
    assert math.isfinite(result.final["accuracy"]) and "agreement" in result.final


def test_router_learns_its_gate_and_never_its_teachers() -> None:
    members = [mlp(1), mlp(3)]
    before = [p.clone() for m in members for p in m.parameters()]
    router = Router(members, input_features=6, combine="logits", normalise="standard")
    gate_before = [p.clone() for p in router.gate.parameters()]
    teacher = CoTrainedTeacher(router, [("cross_entropy", 1.0)])
    fit(mlp(2), toy_data(), teacher=teacher, objectives=["cross_entropy", "hinton_kd"], **SETTINGS)
    assert all(
        torch.equal(a, b) for a, b in zip(before, [p for m in members for p in m.parameters()], strict=True)
    )
    assert any(not torch.equal(a, b) for a, b in zip(gate_before, router.gate.parameters(), strict=True))


def test_mutual_learning_updates_both_peers_and_the_peer_learns_from_the_student() -> None:
    peer = mlp(1)
    before = [p.clone() for p in peer.parameters()]
    teacher = CoTrainedTeacher(
        peer, [("cross_entropy", 1.0), ("hinton_kd", 1.0, {"temperature": 1.0})], lr=0.01
    )
    trainer = Trainer(
        mlp(2),
        toy_data(),
        teacher=teacher,
        objectives=["cross_entropy", "hinton_kd"],
        config=TrainerConfig(**SETTINGS),
    )
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == 0.01
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.parameters(), strict=True))
    # The swap: the peer's KD term reads the student's detached logits as its target.
    x = torch.randn(4, 6)
    outputs = teacher.outputs(TeacherRequest(x))
    assert outputs.logits is not None and not outputs.logits.requires_grad
    from distill.objectives import StepOutputs

    student_logits = torch.randn(4, 3, requires_grad=True)
    loss = teacher.loss(StepOutputs(student_logits=student_logits, labels=torch.zeros(4, dtype=torch.long)))
    assert loss is not None
    loss.backward()
    assert student_logits.grad is None  # the student's logits are the peer's target, detached
    assert all(p.grad is not None for p in peer.parameters())


def test_cotrained_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    def run(folder: Path, stop: int | None, resume: bool) -> tuple[dict, list[torch.Tensor]]:
        torch.manual_seed(0)
        peer = mlp(1)
        teacher = CoTrainedTeacher(peer, [("cross_entropy", 1.0), ("hinton_kd", 1.0)])
        result = fit(
            mlp(2),
            toy_data(),
            teacher=teacher,
            eval_data=toy_data(),
            objectives=["cross_entropy", "hinton_kd"],
            run_dir=folder,
            resume=resume,
            stop_after_steps=stop,
            **SETTINGS,
        )
        return result.final, [p.detach().clone() for p in peer.parameters()]

    whole, whole_peer = run(tmp_path / "whole", None, False)
    run(tmp_path / "split", 5, False)
    resumed, resumed_peer = run(tmp_path / "split", None, True)
    assert resumed["accuracy"] == whole["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(whole_peer, resumed_peer, strict=True))


def test_ema_teacher_follows_the_student_by_its_decay() -> None:
    student = mlp(2)
    teacher = EMATeacher(student, decay=0.5)
    start = [p.clone() for p in teacher.model.parameters()]
    fit(
        student,
        toy_data(n=8),
        teacher=teacher,
        objectives=["cross_entropy", "hinton_kd"],
        **{**SETTINGS, "epochs": 1},
    )
    # One optimizer step (8 samples, batch 8): theta_T = 0.5 theta_T0 + 0.5 theta_S1.
    for t0, t1, s1 in zip(start, teacher.model.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.5 * t0 + 0.5 * s1.detach())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(UserError, match="decay"):
        EMATeacher(student, decay=1.0)

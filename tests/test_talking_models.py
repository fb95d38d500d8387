"""S20 Talking Models on a real pre-trained teacher and a small student encoder: the teacher rerun on a
message, each term against a float64 reference, where each term's gradient goes, padding, the cached-teacher
fallback, and refusals of bad parameters."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.models.encoders import MASK_TAP
from distill.models.hooks import FeatureHooks
from distill.objectives import OBJECTIVES, StepOutputs, build_objective
from distill.objectives.features import is_feature_objective
from distill.objectives.talking_models import TOKEN_MASK, TalkingModels
from distill.teachers import FrozenTeacher, TeacherRequest
from distill.train.feature_taps import bind_feature_objectives, probe_and_build
from encoder_helpers import encoder_pair

LENGTHS = [32, 20, 12, 28, 9, 31]


@pytest.fixture(scope="module")
def encoders() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    return encoder_pair(LENGTHS, [0, 1, 0, 0, 1, 1])


def _bound(encoders, **params) -> tuple[TalkingModels, FrozenTeacher]:
    model, student, ids, labels = encoders
    objective = build_objective("talking_models", params)
    bind_feature_objectives([objective], ["talking_models"], student, model)
    teacher = FrozenTeacher(model)
    teacher.attach("cpu", nullcontext, objective.teacher_layers)
    probe_and_build([objective], student, teacher, (ids, labels), lambda v: v, n_data=len(ids))
    return objective, teacher


def _outputs(objective, teacher, student, ids, labels) -> StepOutputs:
    out = teacher.outputs(TeacherRequest(ids, None, None))
    with FeatureHooks(student, objective.student_layers) as hooks:
        logits = student(ids)
        return StepOutputs(
            logits,
            teacher_logits=out.logits,
            labels=labels,
            student_features=dict(hooks.features),
            teacher_features=out.features,
        )


def test_talking_models_is_a_registered_feature_objective() -> None:
    assert "talking_models" in OBJECTIVES.names() and is_feature_objective("talking_models")
    assert TOKEN_MASK == MASK_TAP


def test_binding_and_codecs_on_real_encoders(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders)
    assert objective.student_layers == ("encoder.encoder.layer.1", MASK_TAP)  # -2: the last block
    assert objective.teacher_layers == ("encoder.encoder.layer.5",)
    sizes = [(m.in_features, m.out_features) for m in (objective.student_encoder, objective.student_decoder)]
    assert sizes == [(128, 384), (384, 128)]  # messages default to the teacher's width
    assert not set(map(id, objective.parameters())) & set(map(id, teacher_model.parameters()))
    assert not any("teacher." in k or "encoder.encoder" in k for k in objective.state_dict())
    teacher.detach()


@pytest.mark.parametrize("layer", [-2, "encoder.encoder.layer.2"])
def test_the_teacher_rerun_reproduces_its_logits_on_its_own_hidden_states(encoders, layer) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders, teacher_layer=layer)
    step = _outputs(objective, teacher, student, ids, labels)
    own = step.teacher_features[objective.teacher_layers[0]]
    reply = objective.teacher_reply(own, own)
    torch.testing.assert_close(reply, step.teacher_logits, rtol=1e-5, atol=1e-5)
    changed = objective.teacher_reply(own + 1.0, own)
    assert not torch.allclose(changed, step.teacher_logits, atol=1e-3)
    teacher.detach()


def _mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of the per-token mean squared error, float64."""
    per_token = (a.double() - b.double()).pow(2).mean(-1)
    return per_token[mask].mean()


def _kd(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    p = torch.softmax(teacher.double() / t, -1)
    return t**2 * (p * (p.log() - torch.log_softmax(student.double() / t, -1))).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_term_matches_a_float64_reference(encoders, temperature: float) -> None:
    teacher_model, student, ids, labels = encoders
    weights = {"reconstruction_weight": 0.5, "hidden_weight": 2.0, "interpret_weight": 1.5}
    objective, teacher = _bound(
        encoders, temperature=temperature, response_weight=0.25, label_weight=0.75, **weights
    )
    student.eval()
    step = _outputs(objective, teacher, student, ids, labels)
    value = objective(step)
    with torch.no_grad():
        s = step.student_features[objective.student_layers[0]].double()
        t = step.teacher_features[objective.teacher_layers[0]].double()
        mask = step.student_features[MASK_TAP] > 0
        assert mask.sum(1).tolist() == LENGTHS
        codecs = (objective.student_encoder, objective.student_decoder, objective.teacher_encoder,
                  objective.teacher_decoder)  # fmt: skip
        e_s, d_s, e_t, d_t = (copy.deepcopy(m).double() for m in codecs)
        reconstruction = _mse(d_t(e_t(t)), t, mask) + _mse(d_s(e_s(s)), s, mask)
        hidden = _mse(s, d_s(e_t(t)), mask)
        reply = objective.teacher_reply(d_t(e_s(s)).float(), t.float()).double()
        interpret = _kd(reply, step.teacher_logits, temperature)
        response = _kd(step.student_logits, reply, temperature)
        label = torch.nn.functional.cross_entropy(reply, labels)
        expected = 0.5 * reconstruction + 2.0 * hidden + 1.5 * interpret + 0.25 * response + 0.75 * label
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-4)
    student.train()
    teacher.detach()


def _grads(module: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


@pytest.mark.parametrize("layer", [-2, "encoder.encoder.layer.2"])
def test_forward_backward_reaches_the_student_and_every_codec_not_the_teacher(encoders, layer) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders, teacher_layer=layer, label_weight=1.0)
    student.zero_grad()
    value = objective(_outputs(objective, teacher, student, ids, labels))
    assert torch.isfinite(value)
    value.backward()
    assert all(_grads(objective).values()), _grads(objective)
    got = _grads(student)
    assert got["encoder.encoder.layer.0.attention.self.query.weight"] and got["head.weight"]
    assert all(p.grad is None for p in teacher_model.parameters())
    teacher.detach()


def test_interpretation_trains_the_student_side_through_the_frozen_teacher(encoders) -> None:
    """Only the interpret term: the gradient goes through the teacher's later layers into D_t, E_s and the
    student's blocks below the layer, and nowhere else; only the response term: into the student's
    classifier and nothing of the codecs (the teacher's answer is a fixed target)."""
    teacher_model, student, ids, labels = encoders
    only = {"reconstruction_weight": 0.0, "hidden_weight": 0.0, "response_weight": 0.0}
    objective, teacher = _bound(encoders, **only)
    student.zero_grad()
    objective(_outputs(objective, teacher, student, ids, labels)).backward()
    got = _grads(objective)
    assert got["student_encoder.weight"] and got["teacher_decoder.weight"]
    assert not got["teacher_encoder.weight"] and not got["student_decoder.weight"]
    student_grads = _grads(student)
    assert student_grads["encoder.encoder.layer.1.output.dense.weight"] and not student_grads["head.weight"]
    teacher.detach()
    objective, teacher = _bound(encoders, reconstruction_weight=0.0, hidden_weight=0.0, interpret_weight=0.0)
    student.zero_grad()
    objective(_outputs(objective, teacher, student, ids, labels)).backward()
    assert not any(_grads(objective).values())
    student_grads = _grads(student)
    assert (
        student_grads["head.weight"] and student_grads["encoder.encoder.layer.0.attention.self.query.weight"]
    )
    teacher.detach()


def test_a_co_trained_teacher_takes_no_gradient_from_the_rerun(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders, reconstruction_weight=0.0, hidden_weight=0.0)
    teacher_model.requires_grad_(True)  # as a co-trained teacher's would
    try:
        step = _outputs(objective, teacher, student, ids, labels)
        objective(step).backward()
        assert all(p.grad is None for p in teacher_model.parameters())
        assert all(p.requires_grad for p in teacher_model.parameters())  # restored after the rerun
    finally:
        teacher_model.requires_grad_(False)
        teacher.detach()


def test_padding_tokens_change_nothing(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders, interact=False)
    step = _outputs(objective, teacher, student, ids, labels)
    value = objective(step)
    s_path, t_path = objective.student_layers[0], objective.teacher_layers[0]
    noisy_s, noisy_t = step.student_features[s_path].clone(), step.teacher_features[t_path].clone()
    noisy_s[1, 20:], noisy_t[1, 20:] = 100.0, -100.0  # text 1 has 20 real tokens
    noisy = StepOutputs(
        step.student_logits,
        teacher_logits=step.teacher_logits,
        student_features={s_path: noisy_s, MASK_TAP: step.student_features[MASK_TAP]},
        teacher_features={t_path: noisy_t},
    )
    torch.testing.assert_close(objective(noisy), value)
    teacher.detach()


def test_a_cached_teacher_trains_the_codecs_without_the_rerun(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    live, teacher = _bound(encoders)
    step = _outputs(live, teacher, student, ids, labels)
    layer = {"teacher_layer": live.teacher_layers[0]}  # a cache is read by path
    cached = build_objective("talking_models", layer)
    bind_feature_objectives([cached], ["talking_models"], student, None)  # a cache: no teacher model
    shapes = [step.student_features[p].shape for p in cached.student_layers]
    cached.build(shapes, [step.teacher_features[live.teacher_layers[0]].shape], len(ids))
    cached.load_state_dict(live.state_dict())
    without = build_objective("talking_models", {"interact": False})
    bind_feature_objectives([without], ["talking_models"], student, teacher_model)
    without.build(shapes, [step.teacher_features[live.teacher_layers[0]].shape], len(ids))
    without.load_state_dict(live.state_dict())
    assert cached.teacher_reply(torch.zeros(1), torch.zeros(1)) is None
    torch.testing.assert_close(cached(step), without(step))
    assert float(live(step).detach()) > float(cached(step).detach())
    teacher.detach()


# -------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"message_dim": 0}, "params.message_dim: must be a whole number from 1 to 65536 or null"),
        ({"temperature": -1.0}, "params.temperature: must be a positive finite number"),
        ({"hidden_weight": -0.5}, "params.hidden_weight: must be a finite number >= 0"),
        ({"label_weight": float("inf")}, "params.label_weight: must be a finite number >= 0"),
        ({"interact": 1}, "params.interact: must be true or false"),
        ({"teacher_layer": True}, "teacher_layer"),
        ({"message_size": 8}, "did you mean 'message_dim'"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_objective("talking_models", params)
    assert "\n" not in str(err.value)


def test_layers_of_different_kinds_are_refused_at_build(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    objective = build_objective("talking_models", {"student_layer": -1})  # a vector against token states
    bind_feature_objectives([objective], ["talking_models"], student, teacher_model)
    teacher = FrozenTeacher(teacher_model)
    teacher.attach("cpu", nullcontext, objective.teacher_layers)
    with pytest.raises(UserError, match="messages pass token by token") as err:
        probe_and_build([objective], student, teacher, (ids, labels), lambda v: v, n_data=len(ids))
    assert "\n" not in str(err.value)
    teacher.detach()


@pytest.mark.slow
def test_the_trainer_runs_talking_models_on_real_encoders(encoders) -> None:
    """End to end: the trainer's teacher call is the one the objective reruns, every step."""
    from torch.utils.data import TensorDataset

    from distill.train import OptimizerConfig, Trainer, TrainerConfig

    teacher_model, student, ids, labels = encoders
    data = TensorDataset(torch.cat([ids, ids.flip(0)]), torch.cat([labels, labels.flip(0)]))
    run = Trainer(
        copy.deepcopy(student),
        data,
        teacher=teacher_model,
        objectives=[("cross_entropy", 1.0), ("talking_models", 1.0, {"label_weight": 1.0})],
        optimizer=OptimizerConfig(name="adamw", lr=1e-3),
        config=TrainerConfig(epochs=2, batch_size=4, device="cpu", progress=False, tensorboard=False),
    )
    objective = run.objectives[1]
    before = [p.detach().clone() for p in objective.parameters()]
    calls = []
    objective.teacher_reply = lambda *a, _f=objective.teacher_reply: calls.append(1) or _f(*a)  # count reruns
    result = run.fit()
    assert result.completed and result.steps == 6 and len(calls) == 6
    assert all(not torch.equal(a, b) for a, b in zip(before, objective.parameters(), strict=True))

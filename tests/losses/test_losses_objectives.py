"""The registered objectives: every loss reachable by name, labels declared, state in buffers (so
checkpoints carry it), schedules advancing in after_step, unknown parameters refused in one line."""

from __future__ import annotations

import pytest
import torch

import distill.losses as L
from distill.errors import UserError
from distill.objectives import OBJECTIVES, Progress, StepOutputs, build_objective

EXPECTED = {
    "forward_kl", "reverse_kl", "total_variation", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl",
    "hinton_kd", "dkd", "dist_kd", "kl_mixing", "taid", "adakd", "bdkd", "pld", "sinkhorn_kd", "dbild",
    "swing_kd", "token_selective_kd", "entropy_regularizer",
}  # fmt: skip


def _outputs(requires_grad: bool = True) -> StepOutputs:
    g = torch.Generator().manual_seed(0)
    return StepOutputs(
        student_logits=torch.randn(2, 4, 9, generator=g).requires_grad_(requires_grad),
        teacher_logits=torch.randn(2, 4, 9, generator=g),
        labels=torch.randint(0, 9, (2, 4), generator=g),
        mask=torch.tensor([[True, True, True, False], [True, True, False, False]]),
    )


def test_all_objectives_registered_with_paper_and_summary() -> None:
    assert set(OBJECTIVES.names()) >= EXPECTED
    for name in EXPECTED:
        entry = OBJECTIVES.entry(name)
        assert entry.paper and entry.summary


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_objective_runs_and_backpropagates(name: str) -> None:
    objective = build_objective(name)
    outputs = _outputs()
    value = objective(outputs)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(outputs.student_logits.grad).all()
    objective.after_step(Progress(1, 10, 0.1), float(value.detach()))


def test_labels_are_declared() -> None:
    assert build_objective("dkd").needs_labels and build_objective("pld").needs_labels
    assert not build_objective("hinton_kd").needs_labels
    assert not build_objective("entropy_regularizer").needs_teacher


def test_logit_objective_equals_its_function() -> None:
    outputs = _outputs()
    got = build_objective("hinton_kd", {"temperature": 2.0})(outputs)
    expected = L.hinton_kd(outputs.student_logits, outputs.teacher_logits, mask=outputs.mask, temperature=2.0)
    torch.testing.assert_close(got, expected)


def test_unknown_parameter_is_a_user_error() -> None:
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        build_objective("hinton_kd", {"temprature": 2.0})
    with pytest.raises(UserError, match="t_start"):
        build_objective("taid", {"t_strat": 0.3})
    with pytest.raises(UserError, match="base"):
        build_objective("adakd", {"base": "nope"})


def test_taid_schedule_state_lives_in_buffers_and_round_trips() -> None:
    objective = build_objective("taid", {"t_start": 0.2})
    assert float(objective.schedule.t) == pytest.approx(0.2)
    for step in range(1, 6):
        value = objective(_outputs(requires_grad=False))
        objective.after_step(Progress(step, 10, step / 10), float(value))
    assert float(objective.schedule.t) >= 0.2 + 0.8 * 0.5 - 1e-9
    state = objective.state_dict()
    assert {"schedule.t", "schedule.prev_loss", "schedule.momentum"} <= set(state)
    fresh = build_objective("taid", {"t_start": 0.2})
    fresh.load_state_dict(state)
    assert float(fresh.schedule.t) == float(objective.schedule.t)


def test_adakd_ratio_shrinks_while_the_loss_falls() -> None:
    objective = build_objective("adakd", {"warmup": 0.0})
    objective.after_step(Progress(1, 100, 0.0), 10.0)
    for step in range(2, 60):
        objective.after_step(Progress(step, 100, step / 100), 10.0 * 0.9**step)
    assert float(objective.token_ratio) < 1.0
    assert "token_ratio" in objective.state_dict()


def test_swing_noise_changes_with_the_step_and_is_reproducible() -> None:
    a, b = build_objective("swing_kd"), build_objective("swing_kd")
    out = _outputs(requires_grad=False)
    first = a(out)
    assert a(out) == b(out)
    a.after_step(Progress(1, 10, 0.1), float(first))
    assert a(out) != first
    assert int(a.state_dict()["step"]) == 1


def test_bdkd_online_trains_the_teacher_too() -> None:
    outputs = _outputs()
    outputs.teacher_logits.requires_grad_(True)
    build_objective("bdkd", {"online": True})(outputs).backward()
    assert outputs.teacher_logits.grad is not None and outputs.teacher_logits.grad.abs().sum() > 0
    offline = _outputs()
    offline.teacher_logits.requires_grad_(True)
    build_objective("bdkd")(offline).backward()
    assert offline.teacher_logits.grad is None

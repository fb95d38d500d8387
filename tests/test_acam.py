"""S32 ACAM-KD: cross-attention fusion, adaptive spatial / channel masks, masked distances and Dice
diversity against float64 maths written out here; masks that follow the student; gradients to every
learned part; one epoch in the real trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from distill.errors import UserError
from distill.objectives import OBJECTIVES, StepOutputs, build_objective
from distill.objectives.acam import (
    ACAMKD,
    _channel_masked_distance,
    _dice_diversity,
    _spatial_masked_distance,
)
from distill.objectives.features import FeatureObjective
from test_feature_objectives import trainer


def built(
    student: tuple[int, ...] = (3, 4, 5, 5), teacher: tuple[int, ...] = (3, 6, 5, 5), **params: object
) -> ACAMKD:
    torch.manual_seed(0)
    objective = build_objective("acam_kd", {"student_layer": "s", "teacher_layer": "t", **params})
    objective.bind_layers(["s"], ["t"])
    objective.build([torch.Size(student)], [torch.Size(teacher)], 10)
    # Units larger than the N(0, 0.01) start, so that the masks are far from a constant 0.5.
    with torch.no_grad():
        objective.channel_units.normal_(0, 1.0)
        objective.spatial_units.normal_(0, 1.0)
    return objective


def step(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> StepOutputs:
    return StepOutputs(
        torch.zeros(len(student), 3),
        mask=mask,
        student_features={"s": student},
        teacher_features={"t": teacher},
    )


def reference(objective: ACAMKD, student: Tensor, teacher: Tensor) -> tuple[float, float]:
    """The objective's distance term (L^c + L^s) and diversity term in float64, batch means, written loop by
    loop from the paper's formulas."""
    p = {k: v.detach().double() for k, v in objective.state_dict().items()}
    s, t = student.double(), teacher.double()
    if s.shape[-2:] != t.shape[-2:]:
        s = F.adaptive_avg_pool2d(s, t.shape[-2:])
    n, c, h, w = t.shape
    m = objective.num_masks
    distance = diversity = 0.0
    for i in range(n):
        fs, ft = s[i].flatten(1), t[i].flatten(1)  # (Cs, HW), (C, HW)
        aligned = p["align.weight"][:, :, 0, 0] @ fs + p["align.bias"][:, None]
        q = p["fusion.query.weight"][:, :, 0, 0] @ ft
        k = p["fusion.key.weight"][:, :, 0, 0] @ fs
        v = p["fusion.value.weight"][:, :, 0, 0] @ fs
        attention = torch.softmax(q.T @ k / math.sqrt(q.shape[0]), dim=1)  # rows: teacher positions
        fused = v @ attention.T  # (C, HW)
        channel = torch.sigmoid(p["channel_units"] * fused.mean(1)[None, :])  # (M, C)
        spatial = torch.sigmoid(p["spatial_units"] @ fused)  # (M, HW)
        d = ft - aligned
        lc = sum(
            float(((channel[j][:, None] * d) ** 2).sum()) / (h * w * float(channel[j].sum()))
            for j in range(m)
        )
        ls = sum(
            float(((spatial[j][None, :] * d) ** 2).sum()) / (c * float(spatial[j].sum())) for j in range(m)
        )
        div = 0.0
        for masks in (spatial, channel):
            pairs = [
                2 * float(masks[a] @ masks[b]) / float(masks[a] @ masks[a] + masks[b] @ masks[b])
                for a in range(m)
                for b in range(m)
                if a != b
            ]
            div += sum(pairs) / len(pairs)
        distance += lc / m + ls / m
        diversity += div
    return distance / n, diversity / n


def test_registered_as_a_feature_objective_on_the_last_stage() -> None:
    assert OBJECTIVES.entry("acam_kd").extra.get("kind") == "feature"
    objective = build_objective("acam_kd")
    assert isinstance(objective, FeatureObjective)
    assert objective.student_refs == [-2] and objective.teacher_refs == [-2]
    run = trainer([("acam_kd", 1.0)])
    assert run.objectives[0].student_layers == ("features.2",)
    assert run.objectives[0].teacher_layers == ("features.2",)


def test_mask_shapes_and_ranges() -> None:
    objective = built()
    aligned, channel, spatial = objective.parts(torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5))
    assert aligned.shape == (3, 6, 5, 5)
    assert channel.shape == (3, 6, 6)  # (N, M, C_teacher)
    assert spatial.shape == (3, 6, 25)  # (N, M, H*W)
    for masks in (channel, spatial):
        assert bool(((masks > 0) & (masks < 1)).all())
    assert float(spatial.detach().std()) > 0.05  # not a constant mask


@pytest.mark.parametrize("student_size", [5, 10])
def test_value_equals_float64_reference(student_size: int) -> None:
    """Equal sizes, and a student map twice as large (average-pooled to the teacher's size)."""
    objective = built(student=(3, 4, student_size, student_size))
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, student_size, student_size, generator=g)
    t = torch.randn(3, 6, 5, 5, generator=g)
    value = objective(step(s, t))
    assert value.dtype == torch.float32
    distance, diversity = reference(objective, s, t)
    assert value.item() == pytest.approx(distance + diversity, rel=1e-5)
    objective.diversity_weight = 0.0
    assert objective(step(s, t)).item() == pytest.approx(distance, rel=1e-5)
    objective.diversity_weight, objective.channel_weight, objective.spatial_weight = 2.0, 0.0, 0.0
    assert objective(step(s, t)).item() == pytest.approx(2 * diversity, rel=1e-5)


def test_a_smaller_student_map_is_interpolated_up() -> None:
    objective = built(student=(2, 4, 3, 3), teacher=(2, 6, 6, 6))
    aligned, _, spatial = objective.parts(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 6, 6))
    assert aligned.shape == (2, 6, 6, 6) and spatial.shape == (2, 6, 36)


def test_pure_helpers_equal_loops_in_float64() -> None:
    g = torch.Generator().manual_seed(1)
    diff = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    channel = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    spatial = torch.rand(2, 4, 20, generator=g, dtype=torch.float64)
    for i in range(2):
        d = diff[i].flatten(1)  # (C, HW)
        lc = sum(
            float(((channel[i, m][:, None] * d) ** 2).sum() / (20 * channel[i, m].sum())) for m in range(4)
        )
        ls = sum(float(((spatial[i, m][None] * d) ** 2).sum() / (3 * spatial[i, m].sum())) for m in range(4))
        assert float(_channel_masked_distance(diff, channel)[i]) == pytest.approx(lc / 4, rel=1e-10)
        assert float(_spatial_masked_distance(diff, spatial)[i]) == pytest.approx(ls / 4, rel=1e-10)
        dice = [
            2
            * float(spatial[i, a] @ spatial[i, b])
            / float(spatial[i, a] @ spatial[i, a] + spatial[i, b] @ spatial[i, b])
            for a in range(4)
            for b in range(4)
            if a != b
        ]
        assert float(_dice_diversity(spatial)[i]) == pytest.approx(sum(dice) / 12, rel=1e-10)
    # Identical masks: Dice 1; disjoint masks: 0; one mask: no pairs, 0; all-zero masks: 0, not 0/0.
    same = torch.rand(1, 1, 7, dtype=torch.float64).expand(1, 3, 7)
    assert float(_dice_diversity(same)) == pytest.approx(1.0)
    assert float(_dice_diversity(torch.eye(3, dtype=torch.float64)[None])) == 0.0
    assert float(_dice_diversity(torch.rand(2, 1, 7))[0]) == 0.0
    zeros = torch.zeros(1, 3, 7)
    assert float(_dice_diversity(zeros)) == 0.0
    assert float(_spatial_masked_distance(torch.ones(1, 2, 7, 1), zeros)) == 0.0


def test_masks_follow_the_student() -> None:
    """Adaptive: the same teacher map with another student map gives other masks (and vice versa)."""
    objective = built()
    g = torch.Generator().manual_seed(5)
    s1, s2 = torch.randn(2, 3, 4, 5, 5, generator=g)
    t1, t2 = torch.randn(2, 3, 6, 5, 5, generator=g)
    _, c1, sp1 = objective.parts(s1, t1)
    _, c2, sp2 = objective.parts(s2, t1)
    assert not torch.allclose(c1, c2, atol=1e-4) and not torch.allclose(sp1, sp2, atol=1e-4)
    _, c3, sp3 = objective.parts(s1, t2)
    assert not torch.allclose(sp1, sp3, atol=1e-4)


def test_gradients_reach_the_student_the_alignment_and_the_mask_generators() -> None:
    objective = built()
    s = torch.randn(3, 4, 5, 5, requires_grad=True)
    objective(step(s, torch.randn(3, 6, 5, 5))).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    for name, parameter in objective.named_parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
    names = {n for n, _ in objective.named_parameters()}
    assert {"align.weight", "fusion.query.weight", "fusion.key.weight", "fusion.value.weight"} <= names
    assert {"channel_units", "spatial_units"} <= names


def test_the_student_gradient_skips_the_masks_unless_asked() -> None:
    g = torch.Generator().manual_seed(2)
    s0, t = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 5, 5, generator=g)
    grads = {}
    for through in (False, True):
        objective = built(student_grad_through_masks=through)
        s = s0.clone().requires_grad_(True)
        objective(step(s, t)).backward()
        grads[through] = s.grad
    # Without the mask path the student's gradient is that of the distances with the masks held fixed.
    objective = built()
    s = s0.clone().requires_grad_(True)
    aligned, channel, spatial = objective.parts(s, t)
    d = t - aligned
    (
        _channel_masked_distance(d, channel.detach()) + _spatial_masked_distance(d, spatial.detach())
    ).mean().backward()
    assert torch.allclose(grads[False], s.grad, atol=1e-6)
    assert not torch.allclose(grads[False], grads[True], atol=1e-6)


def test_a_masked_sample_changes_nothing() -> None:
    objective = built()
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 5, 5, generator=g)
    keep = torch.tensor([True, False, True])
    value = objective(step(s, t, keep))
    s2, t2 = s.clone(), t.clone()
    s2[1], t2[1] = 100.0, -100.0
    assert torch.allclose(objective(step(s2, t2, keep)), value)
    assert value.item() == pytest.approx(sum(reference(objective, s[[0, 2]], t[[0, 2]])), rel=1e-5)


def test_one_mask_has_no_diversity_term() -> None:
    objective = built(num_masks=1)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    zero_diversity = build_objective(
        "acam_kd", {"student_layer": "s", "teacher_layer": "t", "num_masks": 1, "diversity_weight": 0.0}
    )
    zero_diversity.bind_layers(["s"], ["t"])
    zero_diversity.build([torch.Size((2, 4, 5, 5))], [torch.Size((2, 6, 5, 5))], 10)
    zero_diversity.load_state_dict(objective.state_dict())
    assert torch.allclose(objective(step(s, t)), zero_diversity(step(s, t)))


def test_bf16_features_stay_finite() -> None:
    objective = built()
    for scale in (1.0, 1e4):
        s = (scale * torch.randn(3, 4, 5, 5)).bfloat16().requires_grad_(True)
        t = (scale * torch.randn(3, 6, 5, 5)).bfloat16()
        value = objective(step(s, t))
        assert torch.isfinite(value)
        value.backward()
        assert s.grad is not None and bool(torch.isfinite(s.grad).all())


def test_bad_parameters_and_layers_are_refused() -> None:
    with pytest.raises(UserError, match="num_masks"):
        build_objective("acam_kd", {"num_masks": 0})
    with pytest.raises(UserError, match="diversity_weight"):
        build_objective("acam_kd", {"diversity_weight": -1.0})
    with pytest.raises(UserError, match="student_grad_through_masks"):
        build_objective("acam_kd", {"student_grad_through_masks": "yes"})
    with pytest.raises(UserError, match="did you mean 'num_masks'"):
        build_objective("acam_kd", {"num_mask": 3})
    objective = build_objective("acam_kd", {"student_layer": "s", "teacher_layer": "t"})
    objective.bind_layers(["s"], ["t"])
    with pytest.raises(UserError, match="CNN feature maps"):
        objective.build([torch.Size((2, 5, 8))], [torch.Size((2, 5, 16))], 10)


def test_trains_one_epoch_in_the_trainer_and_keeps_its_modules_in_the_checkpoint() -> None:
    run = trainer([("cross_entropy", 1.0), ("acam_kd", 1.0)])
    objective = run.objectives[1]
    assert objective.built and objective.align.weight.shape == (16, 8, 1, 1)  # student 8 -> teacher 16
    own = {n: p.detach().clone() for n, p in objective.named_parameters()}
    student = [p.detach().clone() for p in run.student.parameters()]
    result = run.fit()
    assert result.completed
    assert all(math.isfinite(v) for v in result.final.values() if isinstance(v, float))
    assert any(not torch.equal(a, b) for a, b in zip(student, run.student.parameters(), strict=True))
    for name in ("align.weight", "fusion.query.weight", "fusion.value.weight", "spatial_units"):
        assert not torch.equal(own[name], dict(objective.named_parameters())[name]), name
    state = run.saved_state.state_dict()
    assert any(k.endswith("spatial_units") for k in state) and any("fusion.key" in k for k in state)

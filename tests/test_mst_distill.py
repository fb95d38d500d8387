"""MST-Distill (S25, `methods[].teacher.kind: mixture`): the routing maths against the official code's
formulas, the mask networks, which parameters learn from which loss in each stage, one-line refusals, the
`view` model that cuts two "modalities" from one image, and a recipe run on digits."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill import fit
from distill.errors import UserError
from distill.experiment import run_recipe
from distill.losses import hinton_kd
from distill.models import build_model
from distill.models.views import region_of
from distill.objectives import StepOutputs
from distill.recipe.load import parse_yaml, recipe_from_dict
from distill.teachers import MixtureSettings, MixtureTeacher, TeacherRequest
from distill.teachers.mixture import (
    MaskNet,
    apply_mask,
    balance_weight,
    load_balance,
    mixed_logits,
    route,
    routed_target,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- the maths
def test_the_mixture_of_experts_is_the_mean_of_their_tempered_probabilities() -> None:
    logits = torch.randn(5, 3, 7) * 4
    for t in (1.0, 4.0):
        mixed = mixed_logits(logits, t)
        torch.testing.assert_close(
            torch.softmax(mixed / t, -1), torch.softmax(logits / t, -1).mean(1), atol=1e-6, rtol=1e-5
        )
    one = logits[:, :1]
    assert torch.equal(mixed_logits(one, 4.0), one[:, 0])  # one expert: its logits, exact at any T


def test_top_k_routing_picks_the_most_probable_experts_and_mixes_them() -> None:
    probabilities = torch.softmax(torch.randn(6, 4), -1)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(6))
    chosen = route(probabilities, 2)
    assert chosen.shape == (6, 2)
    assert torch.equal(chosen[:, 0], probabilities.argmax(-1))
    others = probabilities.scatter(1, chosen, -1.0)
    assert (probabilities.gather(1, chosen).min(1).values >= others.max(1).values).all()
    experts = torch.randn(6, 4, 5)
    top1 = routed_target(experts, route(probabilities, 1), 4.0)
    assert torch.equal(top1, experts[torch.arange(6), probabilities.argmax(-1)])
    top2 = routed_target(experts, chosen, 4.0)
    # The official loss, the mean of k KL terms, has the gradient of one KL to the probability mean.
    student = torch.randn(6, 5, requires_grad=True)
    picked = experts.gather(1, chosen[..., None].expand(-1, -1, 5))
    official = sum(hinton_kd(student, picked[:, i], temperature=4.0) for i in range(2)) / 2
    (g_official,) = torch.autograd.grad(official, student)
    (g_ours,) = torch.autograd.grad(hinton_kd(student, top2, temperature=4.0), student)
    torch.testing.assert_close(g_ours, g_official, atol=1e-6, rtol=1e-5)


def test_load_balance_matches_the_official_formulas() -> None:
    probabilities = torch.softmax(torch.randn(16, 4), -1)
    mean = probabilities.mean(0)
    official_kl = nn.KLDivLoss(reduction="batchmean")(mean.log(), torch.full((4,), 0.25))
    torch.testing.assert_close(load_balance(probabilities, "kl"), official_kl)
    importance = probabilities.sum(0)
    torch.testing.assert_close(load_balance(probabilities, "cv"), importance.std() / importance.mean())
    balanced = torch.eye(4).repeat(4, 1)  # every expert chosen equally often
    assert float(load_balance(balanced, "kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(load_balance(torch.eye(4)[[0] * 16], "kl")) > 1.0  # all rows on one expert


def test_the_balance_weight_follows_the_official_epoch_loop() -> None:
    weight, expected = 1.0, []
    for epoch in range(35):  # main-MST-Distill.py: after each epoch, `w_lb *= 0.9 if epoch % 10 == 0`
        expected.append(weight)
        weight *= 0.9 if epoch % 10 == 0 else 1
    assert [balance_weight(1.0, 0.9, e) for e in range(35)] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ the masks
def test_a_mask_net_gives_one_gate_per_channel_in_0_1() -> None:
    vector = MaskNet(596, spatial=False)  # AV-MNIST's fused layer: hidden 596 // (2 x 3) x 3
    assert vector.hidden == 297 and vector.embed.out_features == 297 * 596
    x = torch.randn(3, 596)
    mask = vector(x)
    assert mask.shape == (3, 596) and ((mask > 0) & (mask < 1)).all()
    maps = MaskNet(12, spatial=True)
    feature = torch.randn(2, 12, 5, 4)
    masked = apply_mask(feature, maps.eval())
    gate = maps(feature)[:, :, None, None]
    torch.testing.assert_close(masked, feature * gate)  # one value per channel, over every position
    with pytest.raises(UserError, match="too narrow") as err:
        MaskNet(5, spatial=False)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the teacher, by hand
def toy_data(n: int = 48) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp_max(2)
    return TensorDataset(x, y)


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def mixture(student: nn.Module, **settings: Any) -> MixtureTeacher:
    loader = DataLoader(toy_data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return MixtureTeacher(
        [net(1), net(2)],
        student,
        loader,
        steps_per_epoch=6,
        layers=[["1", "3"], ["1", "3"]],
        settings=MixtureSettings(**settings),
    )


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_masks_fit_alone_and_then_each_row_is_taught_by_its_routed_expert() -> None:
    student = net(3)
    teacher = mixture(student, warmup_epochs=0, k=1)
    m = teacher.mixture
    assert len(m.experts) == 4 and not bool(m.status.fitted)
    before = {
        name: snapshot(part) for name, part in (("masks", m.masks), ("gate", m.gate), ("members", m.members))
    }
    student_before = snapshot(student)
    teacher.attach("cpu", nullcontext, [])
    x = toy_data()[:8][0]
    out = teacher.outputs(TeacherRequest(x))  # warm-up 0: stage 2 runs first
    # Stage 2 moved the masks alone: not the members, not the gate, not the student.
    assert bool(m.status.fitted) and len(teacher.mask_losses) == 1
    assert not same(before["masks"], snapshot(m.masks))
    assert same(before["members"], snapshot(m.members)) and same(before["gate"], snapshot(m.gate))
    assert same(student_before, snapshot(student))
    # Stage 3: the student's forward routes every row to one expert; the target is that expert's logits.
    logits = student(x)
    probabilities = teacher._probabilities
    assert probabilities is not None
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(8))
    with torch.no_grad():
        experts = m.expert_logits(x)
        chosen = torch.softmax(m.gate(logits), -1).argmax(-1)
    torch.testing.assert_close(out.logits, experts[torch.arange(8), chosen])
    assert int(teacher.routed.sum()) == 8
    # The KD term teaches the student only; the balance loss trains the gate (and, as in the official
    # code, reaches the student through its logits); masks and members learn from neither.
    kd = hinton_kd(logits, out.logits, temperature=4.0)
    kd.backward(retain_graph=True)
    assert all(p.grad is None for p in m.gate.parameters())
    assert all(p.grad is not None for p in student.parameters())
    student.zero_grad(set_to_none=True)
    balance = teacher.loss(StepOutputs(student_logits=logits, teacher_logits=out.logits))
    assert balance is not None and balance.requires_grad
    balance.backward()
    assert all(p.grad is not None for p in m.gate.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in [*m.masks.parameters(), *m.members.parameters()])
    assert teacher.trainable_parameters() == list(m.gate.parameters())
    teacher.detach()
    student(x)  # the hook is gone: a forward after training routes nothing
    assert int(teacher.routed.sum()) == 8


def test_before_the_masks_fit_the_target_is_the_members_mean_and_nothing_routes() -> None:
    student = net(3)
    teacher = mixture(student, warmup_epochs=1)
    teacher.attach("cpu", nullcontext, [])
    x = toy_data()[:8][0]
    out = teacher.outputs(TeacherRequest(x))
    student(x)
    assert not bool(teacher.mixture.status.fitted) and teacher._probabilities is None
    with torch.no_grad():
        members = torch.stack([member(x) for member in teacher.mixture.members], 1)
    torch.testing.assert_close(
        torch.softmax(out.logits / 4, -1), torch.softmax(members / 4, -1).mean(1), atol=1e-6, rtol=1e-5
    )
    assert teacher.loss(StepOutputs(student_logits=student(x))) is None


def test_a_mixture_run_fits_the_masks_after_the_warm_up_and_resumes_exactly(tmp_path: Path) -> None:
    settings = dict(
        epochs=3, batch_size=8, progress=False, tensorboard=False, device="cpu", eval_batch_size=64
    )

    def run(folder: Path, stop: int | None, resume: bool) -> tuple[dict, MixtureTeacher]:
        torch.manual_seed(0)
        student = net(3)
        teacher = mixture(student)
        result = fit(
            student,
            toy_data(),
            teacher=teacher,
            eval_data=toy_data(),
            objectives=["cross_entropy", ("hinton_kd", 1.0, {"temperature": 4.0})],
            run_dir=folder,
            resume=resume,
            stop_after_steps=stop,
            **settings,
        )
        return result.final, teacher

    whole, teacher = run(tmp_path / "whole", None, False)
    assert bool(teacher.mixture.status.fitted) and int(teacher.mixture.status.steps) == 18
    assert int(teacher.routed.sum()) == 2 * 48  # routed in epochs 2 and 3 only
    for stop in (4, 9):  # before and after the masks fit (at step 6)
        run(tmp_path / f"split-{stop}", stop, False)
        resumed, again = run(tmp_path / f"split-{stop}", None, True)
        assert resumed["accuracy"] == whole["accuracy"] and resumed["loss"] == whole["loss"]
        assert same(snapshot(again.mixture.masks), snapshot(teacher.mixture.masks))
        assert same(snapshot(again.mixture.gate), snapshot(teacher.mixture.gate))


def test_a_mixture_serves_logit_objectives_only() -> None:
    teacher = mixture(net(3))
    with pytest.raises(UserError, match="teacher layers"):
        teacher.attach("cpu", nullcontext, ["1"])

    class Reads(nn.Module):
        teacher_layers = ("1",)

    with pytest.raises(UserError, match="read teacher layers"):
        teacher.check_objectives(["fitnet"], [Reads()])  # type: ignore[list-item]


# -------------------------------------------------------------------------------------- the view model
def test_view_models_read_complementary_halves() -> None:
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    left, right = region_of(x, "left"), region_of(x, "right")
    assert left.shape == right.shape == (2, 1, 8, 4)
    assert torch.equal(torch.cat([left, right], -1), x)
    assert torch.equal(torch.cat([region_of(x, "top"), region_of(x, "bottom")], -2), x)
    model = build_model(
        "view", num_classes=10, input_shape=(1, 8, 8), region="right", model={"name": "mlp", "params": {}}
    )
    assert model.model.body[1].in_features == 32  # built for the 8 x 4 half
    assert model(x).shape == (2, 10)
    changed = x.clone()
    changed[..., :4] = 0  # the left half does not reach a model of the right one
    assert torch.equal(model(changed), model(x))
    assert model.feature_layers() == ["model.body.0", "model.body.2", "model.body"]
    with pytest.raises(UserError, match="region must be one of"):
        build_model("view", num_classes=10, input_shape=(1, 8, 8), region="middle")


# ------------------------------------------------------------------------------------------- recipes
KD = [{"name": "cross_entropy"}, {"name": "hinton_kd", "params": {"temperature": 4.0}}]


def view(region: str, hidden: list[int]) -> dict[str, Any]:
    return {
        "name": "view",
        "params": {"region": region, "model": {"name": "mlp", "params": {"hidden": hidden}}},
    }


TRAIN = {"train": {"epochs": 2}}
MEMBERS = [view("all", [32, 16]) | TRAIN, view("right", [32, 16]) | TRAIN]  # multimodal, cross-modal


def recipe(out: Path, methods: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": "mst",
        "data": {"name": "digits", "params": {"labelled_per_class": 20}, "batch_size": 32},
        "teacher": MEMBERS[0],
        "student": view("left", [16]),
        "methods": methods,
        "trainer": {"epochs": 3, "device": "cpu"},
        "evaluation": {"latency": False},
        "output": {"dir": str(out), "tensorboard": False},
        **extra,
    }


def build(out: Path, methods: list[dict[str, Any]], **extra: Any) -> Any:
    return recipe_from_dict(recipe(out, methods, **extra), "r.yaml")


def refusal(tmp_path: Path, methods: list[dict[str, Any]], **extra: Any) -> str:
    with pytest.raises(UserError) as err:
        run_recipe(build(tmp_path / "refused", methods, **extra), progress=False)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ({"kind": "mixture", "members": MEMBERS[:1]}, "members"),
        ({"kind": "mixture", "members": MEMBERS, "k": 5}, "k is 5, but there are 4"),
        (
            {"kind": "mixture", "members": MEMBERS, "layers": [["model.body.1"]]},
            "a non-empty list per member",
        ),
        ({"kind": "mixture", "members": MEMBERS, "balance": "entropy"}, "balance"),
        ({"kind": "mixture", "members": MEMBERS, "temperature": 0}, "temperature"),
    ],
)
def test_a_wrong_mixture_is_refused_by_the_recipe(tmp_path: Path, teacher: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        build(tmp_path, [{"name": "m", "teacher": teacher, "objectives": KD}])


@pytest.mark.parametrize(
    ("teacher", "objectives", "expected"),
    [
        ({}, [{"name": "cross_entropy"}], "needs a teacher term"),
        ({"warmup_epochs": 3}, KD, "leave none of the 3 epochs"),
        ({"mask_layers": 3}, KD, "has 2 feature taps to mask, mask_layers is 3"),
        ({"layers": [["model.body.9"], ["model.body.1"]]}, KD, "no module 'model.body.9'"),
    ],
)
def test_a_mixture_the_run_cannot_serve_is_refused_in_one_line(
    tmp_path: Path, teacher: dict, objectives: list, expected: str
) -> None:
    spec = {"kind": "mixture", "members": MEMBERS, **teacher}
    assert expected in refusal(tmp_path, [{"name": "m", "teacher": spec, "objectives": objectives}])


def test_mst_distill_and_the_plain_ensemble_train_from_one_recipe(tmp_path: Path) -> None:
    methods = [
        {"name": "ensemble", "teacher": {"kind": "ensemble", "members": MEMBERS}, "objectives": KD},
        {"name": "mst", "teacher": {"kind": "mixture", "members": MEMBERS}, "objectives": KD},
    ]
    result = run_recipe(build(tmp_path / "run", methods), progress=False)
    by_name = {m.name: m for m in result.methods}
    accuracy = by_name["mst"].runs[0].result.final["accuracy"]
    assert 0.0 < accuracy <= 1.0
    # The members are obtained once (the multimodal one is also the recipe's teacher) and shared.
    members = by_name["ensemble"].teacher.members
    assert [m["metrics"]["accuracy"] for m in members][0] == result.teacher.metrics["accuracy"]
    assert (tmp_path / "run" / "methods" / "mst" / "seed-0").is_dir()


def test_the_documented_recipe_is_valid() -> None:
    text = (ROOT / "docs" / "mst_distill.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    parsed = recipe_from_dict(parse_yaml(block.group(1), "docs/mst_distill.md"))
    spec = parsed.method_list()[-1].teacher
    assert spec is not None and spec.kind == "mixture" and (spec.k, spec.temperature) == (1, 4.0)
    assert math.isclose(spec.mask_lr, 1e-4)

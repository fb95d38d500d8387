"""S06 DHO: the `dual_head` model (two linear heads, their mixture at inference) and the objective `dho`
(CE on the CE head's labelled rows, T^2 KL on the KD head's every row), against float64 maths, gradient
routing, refusals and one semi-supervised run on digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.experiment import run_recipe
from distill.losses.dho import dho_loss, dho_mixture, dho_terms
from distill.models import MODELS, build_model
from distill.models.dual_head import DualHead
from distill.models.hooks import FeatureHooks
from distill.objectives import StepOutputs, build_objective
from distill.recipe.load import recipe_from_dict
from distill.train.feature_taps import bind_feature_objectives

BASE = {"name": "mlp", "params": {"hidden": [16]}}


def dual(alpha: float = 0.5, beta: float = 1.0, base: Any = None) -> DualHead:
    model = build_model(
        "dual_head", num_classes=5, input_shape=(1, 4, 4), base=base or BASE, alpha=alpha, beta=beta
    )
    assert isinstance(model, DualHead)
    return model


def mixture64(ce: Tensor, kd: Tensor, alpha: float, beta: float) -> Tensor:
    ce, kd = ce.double(), kd.double()
    return torch.log(alpha * torch.softmax(ce, -1) + (1 - alpha) * torch.softmax(kd / beta, -1))


# ------------------------------------------------------------------------------------- the mixture
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 1.0), (0.3, 1.7), (0.9, 0.5), (0.0, 2.0), (1.0, 1.0)])
def test_the_mixture_is_the_papers_against_float64(alpha: float, beta: float) -> None:
    torch.manual_seed(0)
    ce, kd = 4 * torch.randn(32, 7), 4 * torch.randn(32, 7)
    got = dho_mixture(ce, kd, alpha=alpha, beta=beta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), mixture64(ce, kd, alpha, beta), rtol=1e-5, atol=1e-5)
    # confident heads: no underflow to log 0 where the float64 value is finite
    far = dho_mixture(ce * 200, kd * 200, alpha=alpha, beta=beta)
    assert torch.isfinite(far).all() or alpha in (0.0, 1.0)
    torch.testing.assert_close(far.exp().sum(-1), torch.ones(32))


def test_the_model_returns_the_mixture_of_its_two_heads() -> None:
    torch.manual_seed(1)
    model = dual(alpha=0.3, beta=1.7).eval()
    x = torch.randn(6, 1, 4, 4)
    ce, kd = model.head_logits(x)
    with FeatureHooks(model, ["ce_head", "kd_head"]) as hooks:
        out = model(x)
        torch.testing.assert_close(hooks.features["ce_head"], ce)
        torch.testing.assert_close(hooks.features["kd_head"], kd)
    torch.testing.assert_close(out.double(), mixture64(ce, kd, 0.3, 1.7), rtol=1e-5, atol=1e-5)
    model.alpha = 1.0  # the inference mixture is a plain attribute: the CE head alone
    torch.testing.assert_close(model(x), torch.log_softmax(ce, -1))


def test_the_dual_head_keeps_the_base_models_network_and_classifier() -> None:
    """Same seed, same backbone and CE head as the plain student: only the KD head is new."""
    torch.manual_seed(3)
    plain = build_model("mlp", num_classes=5, input_shape=(1, 4, 4), hidden=[16])
    torch.manual_seed(3)
    model = dual()
    torch.testing.assert_close(model.backbone.body[1].weight, plain.body[1].weight)
    torch.testing.assert_close(model.ce_head.weight, plain.head.weight)
    assert isinstance(model.backbone.head, nn.Identity)
    assert model.kd_head.weight.shape == model.ce_head.weight.shape
    assert model.feature_layers() == [f"backbone.{p}" for p in plain.feature_layers()]
    assert "dual_head" in MODELS


class Scaled(nn.Module):
    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return 2 * self.head(x.flatten(1))


@pytest.mark.parametrize(
    ("base", "alpha", "beta", "expected"),
    [
        ({"name": "dual_head"}, 0.5, 1.0, "cannot itself be"),
        ({"name": "mlp", "parms": {}}, 0.5, 1.0, "no key 'parms'"),
        ("mlpp", 0.5, 1.0, "mlp"),
        ("mlp", 1.5, 1.0, "alpha must be a number in"),
        ("mlp", 0.5, 0.0, "beta must be a positive"),
        ("scaled_for_test", 0.5, 1.0, "not its last linear layer"),
    ],
)
def test_a_model_that_cannot_be_split_is_refused_in_one_line(
    base: Any, alpha: float, beta: float, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if base == "scaled_for_test":  # a base model that post-processes its logits (not registered: no residue)
        monkeypatch.setattr("distill.models.dual_head.build_model", lambda name, **kw: Scaled(**kw))
    with pytest.raises(UserError, match=expected) as err:
        dual(alpha, beta, base)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ the loss
def reference_terms(
    ce: Tensor, kd: Tensor, teacher: Tensor, labels: Tensor, mask: Tensor, t: float
) -> Tensor:
    """float64: mean CE over labelled counted rows, mean T^2 KL over counted rows."""
    ce, kd, teacher = ce.double(), kd.double(), teacher.double()
    labelled = mask & (labels >= 0)
    nll = -torch.log_softmax(ce, -1)[labelled, labels[labelled]]
    p = torch.softmax(teacher / t, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(kd / t, -1))).sum(-1)
    return torch.stack([nll.mean(), t * t * kl[mask].mean()])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_the_loss_matches_float64_with_hidden_labels_and_a_mask(temperature: float) -> None:
    torch.manual_seed(2)
    ce, kd, teacher = 3 * torch.randn(10, 6), 3 * torch.randn(10, 6), 3 * torch.randn(10, 6)
    labels = torch.tensor([0, -100, 2, -100, -100, 5, 1, -100, 3, 4])
    mask = torch.ones(10, dtype=torch.bool)
    mask[[2, 7]] = False
    expected = reference_terms(ce, kd, teacher, labels, mask, temperature)
    got = torch.stack(dho_terms(ce, kd, teacher, labels, mask=mask, temperature=temperature))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    loss = dho_loss(ce, kd, teacher, labels, mask=mask, ce_weight=0.3, temperature=temperature)
    torch.testing.assert_close(loss.double(), 0.3 * expected[0] + 0.7 * expected[1], rtol=1e-5, atol=1e-6)


def test_the_loss_computes_in_float32_and_is_zero_without_labelled_rows() -> None:
    torch.manual_seed(4)
    ce, kd, teacher = (torch.randn(8, 5).bfloat16() for _ in range(3))
    labels = torch.full((8,), -100)
    ce_term, kd_term = dho_terms(ce, kd, teacher, labels)
    assert ce_term.dtype == kd_term.dtype == torch.float32
    assert ce_term.item() == 0.0
    expected = reference_terms(
        ce.float(), kd.float(), teacher.float(), labels, torch.ones(8, dtype=torch.bool), 2.0
    )
    torch.testing.assert_close(kd_term.double(), expected[1], rtol=1e-5, atol=1e-6)


def test_each_term_reaches_only_its_own_head() -> None:
    torch.manual_seed(5)
    model = dual()
    x, teacher = torch.randn(8, 1, 4, 4), torch.randn(8, 5)
    labels = torch.tensor([0, -100, 1, -100, 2, -100, 3, 4])
    ce, kd = model.head_logits(x)
    ce_term, kd_term = dho_terms(ce, kd, teacher, labels)
    heads = {"ce_head": model.ce_head.weight, "kd_head": model.kd_head.weight}
    shared = model.backbone.body[1].weight
    for term, own, other in ((ce_term, "ce_head", "kd_head"), (kd_term, "kd_head", "ce_head")):
        g_own, g_other, g_shared = torch.autograd.grad(
            term, [heads[own], heads[other], shared], retain_graph=True, allow_unused=True
        )
        assert g_own is not None and g_own.abs().sum() > 0
        assert g_other is None or not g_other.any()
        assert g_shared is not None and g_shared.abs().sum() > 0
    # the CE term reads labelled rows only: a hidden row's CE logits get no gradient
    ce_leaf, kd_leaf = ce.detach().requires_grad_(), kd.detach().requires_grad_()
    grad_ce, grad_kd = torch.autograd.grad(dho_loss(ce_leaf, kd_leaf, teacher, labels), [ce_leaf, kd_leaf])
    hidden = labels == -100
    assert not grad_ce[hidden].any() and grad_ce[~hidden].abs().sum(-1).gt(0).all()
    assert grad_kd.abs().sum(-1).gt(0).all()  # every row teaches the KD head


# ----------------------------------------------------------------------------------- the objective
def test_the_objective_reads_the_heads_through_the_hooks() -> None:
    torch.manual_seed(6)
    model = dual()
    objective = build_objective("dho", {"ce_weight": 0.25, "temperature": 3.0})
    bind_feature_objectives([objective], ["dho"], model, None)
    assert objective.student_layers == ("ce_head", "kd_head") and objective.teacher_layers == ()
    x, teacher, labels = torch.randn(4, 1, 4, 4), torch.randn(4, 5), torch.tensor([1, -100, -100, 0])
    with FeatureHooks(model, objective.student_layers) as hooks:
        logits = model(x)
        step = StepOutputs(logits, teacher, labels, student_features=dict(hooks.features))
    value = objective(step)
    ce, kd = model.head_logits(x)
    torch.testing.assert_close(value, dho_loss(ce, kd, teacher, labels, ce_weight=0.25, temperature=3.0))
    with pytest.raises(UserError, match="full logits, not a top-k cache"):
        objective(StepOutputs(logits, None, labels, student_features=step.student_features, teacher_topk=1))
    with pytest.raises(UserError, match="needs labels"):
        objective(StepOutputs(logits, teacher, None, student_features=step.student_features))


@pytest.mark.parametrize(
    ("params", "expected"),
    [({"ce_weight": 1.5}, "ce_weight"), ({"temperature": 0}, "temperature"), ({"lambda": 0.5}, "ce_weight")],
)
def test_bad_parameters_are_refused(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        build_objective("dho", params)


def test_a_student_that_is_not_dual_head_is_refused_in_one_line() -> None:
    plain = build_model("mlp", num_classes=5, input_shape=(1, 4, 4))
    with pytest.raises(UserError, match="needs a dual_head student") as err:
        bind_feature_objectives([build_objective("dho")], ["dho"], plain, None)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ end to end
def recipe(out: Path, student: dict[str, Any], objectives: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "dho",
        "data": {"name": "digits", "params": {"labelled_per_class": 5, "unlabelled": True}, "batch_size": 64},
        "teacher": {"name": "mlp", "params": {"hidden": [32]}, "train": {"epochs": 8, "cache": False}},
        "student": student,
        "methods": [{"name": "dho", "objectives": objectives}],
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 3, "device": "cpu", "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str(out), "tensorboard": False},
    }


def test_run_recipe_trains_a_dual_head_student_on_digits(tmp_path: Path) -> None:
    student = {"name": "dual_head", "params": {"base": {"name": "mlp", "params": {"hidden": [16]}}}}
    result = run_recipe(
        recipe_from_dict(recipe(tmp_path / "run", student, [{"name": "dho", "weight": 1.0}])), progress=False
    )
    final = result.methods[0].runs[0].result.final
    assert 0.5 < final["accuracy"] <= 1.0, final


def test_run_recipe_refuses_a_plain_student_before_training(tmp_path: Path) -> None:
    spec = recipe(
        tmp_path / "refused", {"name": "mlp", "params": {"hidden": [16]}}, [{"name": "dho", "weight": 1.0}]
    )
    with pytest.raises(UserError, match="needs a dual_head student") as err:
        run_recipe(recipe_from_dict(spec), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").rglob("*.safetensors"))

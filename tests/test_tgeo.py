"""TGeo-KD (S08): the relation features and the fused loss against float64 maths, the ratio network's range,
T-bar, the bilevel outer step (finite differences), checkpoints, refusals and a recipe run on digits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import UserError
from distill.experiment import run_recipe
from distill.losses.tgeo import tgeo_kd, trilateral_relations
from distill.objectives import Progress, StepOutputs, build_objective
from distill.objectives.tgeo import RatioNet, TGeoKD
from distill.recipe.load import recipe_from_dict
from distill.train.fitting import fit

C = 5


def batch(n: int = 8, seed: int = 0, scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, C, generator=g), scale * torch.randn(n, C, generator=g), torch.arange(n) % C


# ------------------------------------------------------------------------------------------ pure maths
def test_relations_are_the_triangle_edges_in_probability_space() -> None:
    s, t, y = batch()
    bar = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(1)), -1)[y]
    got = trilateral_relations(s, t, y, bar)
    assert got.dtype == torch.float32 and got.shape == (8, 6 * C)
    ps, pt = (torch.softmax(z.double(), -1) for z in (s, t))
    g = torch.eye(C, dtype=torch.float64)[y]
    want = torch.cat([ps - pt, ps - g, pt - g, ps - bar.double(), pt - bar.double(), g - bar.double()], -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # the triangle closes: (S - T) - (S - G) + (T - G) = 0
    edges = got.view(8, 6, C)
    torch.testing.assert_close(edges[:, 0] - edges[:, 1] + edges[:, 2], torch.zeros(8, C), atol=1e-6, rtol=0)


def reference_loss(s: Tensor, t: Tensor, y: Tensor, alpha: Tensor, temperature: float) -> Tensor:
    s, t, alpha = s.double(), t.double(), alpha.double()
    p = torch.exp(t / temperature) / torch.exp(t / temperature).sum(-1, keepdim=True)
    q = torch.exp(s / temperature) / torch.exp(s / temperature).sum(-1, keepdim=True)
    kd = temperature**2 * (p * (p.log() - q.log())).sum(-1)
    ce = -(torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)).log()[torch.arange(len(y)), y]
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fused_loss_matches_float64_reference_with_masks(temperature: float) -> None:
    s, t, y = batch()
    alpha = torch.linspace(0.05, 0.95, 8)
    per_row = reference_loss(s, t, y, alpha, temperature)
    got = tgeo_kd(s, t, labels=y, alpha=alpha, temperature=temperature, reduction="none")
    torch.testing.assert_close(got.double(), per_row, rtol=1e-5, atol=1e-6)
    mask = torch.tensor([True, False] * 4)
    hidden = y.masked_fill(torch.arange(8) == 2, -100)  # a hidden label masks its row too
    counted = mask & (hidden >= 0)
    value = tgeo_kd(s, t, labels=hidden, alpha=alpha, mask=mask, temperature=temperature)
    torch.testing.assert_close(value.double(), per_row[counted].mean(), rtol=1e-5, atol=1e-6)
    # alpha 0 is cross-entropy, alpha 1 Hinton's KD
    ce = tgeo_kd(s, t, labels=y, alpha=torch.zeros(8), temperature=temperature)
    torch.testing.assert_close(ce, nn.functional.cross_entropy(s, y))
    from distill.losses import hinton_kd

    kd = tgeo_kd(s, t, labels=y, alpha=torch.ones(8), temperature=temperature)
    torch.testing.assert_close(kd, hinton_kd(s, t, temperature=temperature))


def test_fused_loss_refuses_ratios_outside_the_unit_interval() -> None:
    s, t, y = batch()
    with pytest.raises(ValueError, match="alpha"):
        tgeo_kd(s, t, labels=y, alpha=torch.full((8,), 1.5))


# ------------------------------------------------------------------------------------------ the objective
def step(objective: TGeoKD, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
    return objective(StepOutputs(student_logits=s, teacher_logits=t, labels=y))


def test_alpha_lies_in_the_open_unit_interval_and_stays_out_of_the_students_optimizer() -> None:
    objective = build_objective("tgeo_kd")
    assert isinstance(objective, TGeoKD)
    for seed, scale in ((0, 1.0), (1, 30.0), (2, 1e3)):
        s, t, y = batch(32, seed, scale)
        step(objective, s, t, y)
        alpha = objective.alpha(s, t, y)
        assert bool(((alpha > 0) & (alpha < 1)).all())
    assert not [p for p in objective.parameters() if p.requires_grad]  # omega learns on held-out data only
    s, t, y = batch()
    leaf = s.clone().requires_grad_()
    step(objective, leaf, t, y).backward()
    assert leaf.grad is not None and all(p.grad is None for p in objective.parameters())


def test_tbar_is_the_teachers_mean_prediction_per_class() -> None:
    objective = build_objective("tgeo_kd")
    assert isinstance(objective, TGeoKD)
    seen = []
    for seed in range(3):
        s, t, y = batch(10, seed)
        y = y.masked_fill(torch.arange(10) == 9, -100)  # a hidden label is not observed
        step(objective, s, t, y)
        seen += [
            (row, label)
            for row, label in zip(torch.softmax(t.double(), -1), y.tolist(), strict=True)
            if label >= 0
        ]
    for k in range(C):
        rows = [row for row, label in seen if label == k]
        torch.testing.assert_close(objective.class_mean()[k], torch.stack(rows).mean(0))


# ------------------------------------------------------------------------------------------ the outer step
def tiny_problem() -> tuple[TGeoKD, nn.Module, Tensor]:
    """A float64 linear student, one training micro-batch seen by `forward`, a held-out part."""
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = ((x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()) % 3
    objective = TGeoKD(hidden=8, validation_fraction=0.25, validation_batch_size=10).double()
    train = objective.hold_out(TensorDataset(x, y), seed=0)
    student = nn.Linear(4, 3).double()
    teacher = nn.Linear(4, 3).double()
    inputs, labels = next(iter(DataLoader(train, batch_size=12)))
    objective(
        StepOutputs(student_logits=student(inputs), teacher_logits=teacher(inputs).detach(), labels=labels)
    )
    objective.double()  # the ratio network is made at the first batch
    return objective, student, inputs


def omega_of(objective: TGeoKD) -> dict[str, Tensor]:
    assert objective.ratio is not None
    return {n: p.detach().clone() for n, p in objective.ratio.net.named_parameters()}


def test_outer_gradient_matches_finite_differences() -> None:
    objective, student, inputs = tiny_problem()
    val = objective.validation_batch(0, 12, torch.device("cpu"))
    omega = {n: p.requires_grad_() for n, p in omega_of(objective).items()}

    def J(w: dict[str, Tensor]) -> Tensor:
        return objective.lookahead_loss(student, w, inputs, *val, lr=0.5)

    grads = torch.autograd.grad(J(omega), list(omega.values()))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in omega.items()}
        eps = 1e-5
        plus = J({n: p.detach() + eps * direction[n] for n, p in omega.items()})
        minus = J({n: p.detach() - eps * direction[n] for n, p in omega.items()})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((gr * direction[n]).sum() for gr, n in zip(grads, omega, strict=True))
        torch.testing.assert_close(analytic, numeric.detach(), rtol=1e-5, atol=1e-9)
    assert any(bool(gr.abs().sum() > 0) for gr in grads)


def test_the_outer_step_lowers_the_lookahead_validation_loss() -> None:
    objective, student, inputs = tiny_problem()
    objective.outer_lr = 1e-4
    val = objective.validation_batch(0, 12, torch.device("cpu"))
    before = objective.lookahead_loss(student, omega_of(objective), inputs, *val, lr=0.5).detach()
    weights = [p.detach().clone() for p in student.parameters()]
    objective.after_optimizer_step(student, inputs, Progress(0, 10, 0.0), 0.5)
    after = objective.lookahead_loss(student, omega_of(objective), inputs, *val, lr=0.5).detach()
    assert int(objective.outer_steps) == 1
    assert after.item() < before.item()
    assert all(torch.equal(a, b) for a, b in zip(weights, student.parameters(), strict=True))  # untouched


def test_the_outer_adam_step_is_torch_adam() -> None:
    torch.manual_seed(0)
    net = RatioNet(3, 4)
    twin = copy.deepcopy(net.net)
    for p in twin.parameters():
        p.requires_grad_(True)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2, weight_decay=1e-3)
    for step_ in range(1, 4):
        grads = [torch.randn_like(p) for p in net.net.parameters()]
        net.adam_step(grads, step_, 1e-2, 1e-3)
        for p, gr in zip(twin.parameters(), grads, strict=True):
            p.grad = gr.clone()
        adam.step()
    for a, b in zip(net.net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach())


def test_the_held_out_part_is_seeded_disjoint_and_labelled() -> None:
    data = TensorDataset(torch.randn(50, 2), torch.arange(50) % 5)
    data.labels = torch.where(torch.arange(50) < 20, torch.arange(50) % 5, -100)  # type: ignore[attr-defined]
    objective = TGeoKD(validation_fraction=0.25)
    rest = objective.hold_out(data, seed=1)
    assert objective.held_out is not None
    held = objective.held_out.indices
    assert len(held) == 5 and all(i < 20 for i in held)  # a quarter of the 20 labelled rows
    assert sorted(held + rest.indices) == list(range(50))
    again = TGeoKD(validation_fraction=0.25)
    again.hold_out(data, seed=1)
    assert again.held_out is not None and again.held_out.indices == held


# ------------------------------------------------------------------------------------------ in the trainer
def toy_data(n: int = 60) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


SETTINGS = dict(epochs=2, batch_size=8, progress=False, tensorboard=False, device="cpu", eval_batch_size=64)


def test_a_resumed_run_keeps_omega_and_tbar(tmp_path: Path) -> None:
    def run(folder: Path, stop: int | None, resume: bool) -> tuple[dict, TGeoKD]:
        objective = TGeoKD(hidden=8)
        result = fit(
            mlp(2),
            toy_data(),
            teacher=mlp(1),
            eval_data=toy_data(),
            objectives=[objective],
            run_dir=folder,
            resume=resume,
            stop_after_steps=stop,
            **SETTINGS,
        )
        return result.final, objective

    whole, trained = run(tmp_path / "whole", None, False)
    assert int(trained.outer_steps) == 14  # 54 training samples (6 held out) in batches of 8, 2 epochs
    run(tmp_path / "split", 5, False)
    resumed, again = run(tmp_path / "split", None, True)
    assert resumed["accuracy"] == whole["accuracy"]
    assert int(again.outer_steps) == int(trained.outer_steps)
    assert again.ratio is not None and trained.ratio is not None
    for a, b in zip(trained.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(trained.class_mean(), again.class_mean())


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 0}, "params.temperature"),
        ({"validation_fraction": 1.0}, "params.validation_fraction"),
        ({"hidden": 0}, "params.hidden"),
        ({"outer_lr": -1}, "params.outer_lr"),
        ({"validation_batch_size": 0}, "params.validation_batch_size"),
        ({"tempreature": 2}, "did you mean 'temperature'"),
    ],
)
def test_bad_params_are_refused_in_one_line(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected) as err:
        build_objective("tgeo_kd", params)
    assert "\n" not in str(err.value)


def one_line(call: Any) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_what_it_cannot_use_is_refused_in_one_line() -> None:
    s, t, y = batch()
    objective = build_objective("tgeo_kd")
    assert "needs labels" in one_line(lambda: objective(StepOutputs(student_logits=s, teacher_logits=t)))
    assert "full logits" in one_line(lambda: objective(StepOutputs(student_logits=s, labels=y)))
    soft = torch.softmax(t, -1)
    assert "soft" in one_line(lambda: objective(StepOutputs(student_logits=s, teacher_logits=t, labels=soft)))
    tokens = s.view(2, 4, C)
    assert "classifiers" in one_line(
        lambda: objective(StepOutputs(student_logits=tokens, teacher_logits=tokens, labels=y.view(2, 4)))
    )
    data = toy_data(8)
    assert "DataLoader" in one_line(lambda: TGeoKD().hold_out(DataLoader(data), 0))
    assert "holds out 0" in one_line(lambda: TGeoKD(validation_fraction=0.01).hold_out(data, 0))
    assert "needs labels" in one_line(
        lambda: fit(
            mlp(2), TensorDataset(torch.randn(20, 6)), teacher=mlp(1), objectives=["tgeo_kd"], **SETTINGS
        )
    )


# ------------------------------------------------------------------------------------------ a recipe run
def test_a_recipe_runs_tgeo_kd_on_digits(tmp_path: Path) -> None:
    recipe = {
        "name": "tgeo",
        "data": {"name": "digits", "params": {"labelled_per_class": 20}, "batch_size": 32},
        "teacher": {"name": "mlp", "params": {"hidden": [32]}, "train": {"epochs": 2}},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "methods": [
            {
                "name": "TGeo-KD",
                "objectives": [
                    {"name": "tgeo_kd", "params": {"temperature": 4.0, "validation_fraction": 0.1}}
                ],
            }
        ],
        "trainer": {"epochs": 2, "device": "cpu"},
        "evaluation": {"latency": False},
        "output": {"dir": str(tmp_path), "tensorboard": False},
    }
    result = run_recipe(recipe_from_dict(recipe), progress=False)
    (method,) = result.methods
    final = method.runs[0].result.final
    assert 0.0 <= final["accuracy"] <= 1.0 and final["train_loss"] == final["train_loss"]

"""`optimizer.decay_biases_and_norms: false`: biases and normalisation weights get no weight decay, the
matrices keep it; the default (true) leaves the optimizer and the recipe's fingerprint as they were."""

from __future__ import annotations

import torch
from torch import nn

from distill.recipe.load import recipe_from_dict
from distill.tasks.teacher_store import optimizer_config
from distill.train.optim import OptimizerConfig, build_optimizer, without_decay_on_vectors


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def test_vectors_go_to_a_group_without_decay_and_group_options_survive() -> None:
    model = _model()
    teacher = nn.Linear(2, 2)
    groups = without_decay_on_vectors(
        [{"params": list(model.parameters())}, {"params": list(teacher.parameters()), "lr": 0.5}]
    )
    assert [len(g["params"]) for g in groups] == [2, 4, 1, 1]
    assert [g.get("weight_decay") for g in groups] == [None, 0.0, None, 0.0]
    assert groups[2]["lr"] == groups[3]["lr"] == 0.5
    assert all(p.ndim <= 1 for g in groups if g.get("weight_decay") == 0.0 for p in g["params"])
    # A plain parameter list is one group, not one group per parameter.
    assert len(without_decay_on_vectors(list(model.parameters()))) == 2


def test_with_zero_gradients_only_the_matrices_shrink() -> None:
    for decay_vectors in (True, False):
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = OptimizerConfig(lr=0.1, weight_decay=0.5, decay_biases_and_norms=decay_vectors)
        optimizer = build_optimizer(list(model.parameters()), config)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for name, p in model.named_parameters():
            expected = before[name] * (1 - 0.1 * 0.5) if decay_vectors or p.ndim > 1 else before[name]
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def _recipe(**optimizer) -> dict:
    return {
        "name": "groups",
        "data": {"name": "digits"},
        "student": {"name": "mlp"},
        "methods": [{"name": "alone", "objectives": [{"name": "cross_entropy"}]}],
        "optimizer": {"lr": 0.01, "weight_decay": 0.1, **optimizer},
    }


def test_the_recipe_setting_reaches_the_optimizer_and_the_default_dumps_as_before() -> None:
    off = recipe_from_dict(_recipe(decay_biases_and_norms=False))
    assert optimizer_config(off.optimizer).decay_biases_and_norms is False
    assert off.model_dump(mode="json")["optimizer"]["decay_biases_and_norms"] is False
    default = recipe_from_dict(_recipe())
    assert optimizer_config(default.optimizer).decay_biases_and_norms is True
    assert "decay_biases_and_norms" not in default.model_dump(mode="json")["optimizer"]

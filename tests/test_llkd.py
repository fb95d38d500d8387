"""LLKD's sample selection (S05, `distill.sources.selection`, `distill.tasks.selection`): the rule on a
hand-computed batch, the thresholds' moving averages, the batch transform, refusals in one line, and recipes
that train end to end on semi-supervised digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.errors import UserError
from distill.sources.selection import (
    LLKDSettings,
    ThresholdState,
    llkd_select,
    random_subset,
    updated,
)
from distill.tasks.selection import LLKDBatches, selection_settings

# A hand-computed batch of 4 unlabelled rows, 2 classes (numbers worked out in the comments).
TEACHER = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]]).log()  # c = .9 .6 .8 .55
STUDENT = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.95, 0.05], [0.99, 0.01]]).log()


def _entropy2(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_the_rule_on_a_hand_computed_batch() -> None:
    # momentum 0: the thresholds are this batch's means.
    # teacher: c = (.9, .6, .8, .55), y = (0, 0, 1, 1), tau_T = 2.85 / 4 = 0.7125
    # student: u = H(p) / log 2 = (1, .4690, .2864, .0808), tau_S = 0.45905
    state = ThresholdState.initial(2)
    flat = llkd_select(TEACHER, STUDENT, state, LLKDSettings(momentum=0.0, class_thresholds=False))
    torch.testing.assert_close(flat.confidence, torch.tensor([0.9, 0.6, 0.8, 0.55]))
    torch.testing.assert_close(flat.need, torch.tensor([_entropy2(p) for p in (0.5, 0.9, 0.95, 0.99)]))
    assert flat.labels.tolist() == [0, 0, 1, 1]
    assert flat.state.global_thresholds() == pytest.approx((0.7125, 0.4590464))
    # row 0: confident and needy; row 1: not confident (.6); row 2: not needy (.286); row 3: neither
    assert flat.keep.tolist() == [True, False, False, False]

    # class thresholds (MaxNorm): qbar = (.5375, .4625) -> tau_T(1) = .7125 x .4625 / .5375 = 0.61308;
    # pbar = (.835, .165) -> tau_S(1) = .45905 x .165 / .835 = 0.09071. Row 2 (pseudo-label 1: c .8 >= .613,
    # u .286 >= .091) is now kept; row 3 (c .55 < .613) still is not.
    by_class = llkd_select(TEACHER, STUDENT, state, LLKDSettings(momentum=0.0))
    tau_t, tau_s = by_class.state.thresholds()
    torch.testing.assert_close(tau_t, torch.tensor([0.7125, 0.6130814]))
    torch.testing.assert_close(tau_s, torch.tensor([0.4590464, 0.0907098]))
    assert by_class.keep.tolist() == [True, False, True, False]


def test_the_thresholds_are_bias_corrected_moving_averages() -> None:
    q = torch.tensor([[0.8, 0.2]])
    p = torch.tensor([[0.6, 0.4]])
    state = ThresholdState.initial(2)
    assert state.global_thresholds() == (0.0, 0.0)  # before any batch every row passes
    # after one batch the thresholds are its means, whatever the momentum
    once = updated(state, q, torch.tensor([0.8]), p, torch.tensor([0.3]), 0.999)
    assert once.global_thresholds() == pytest.approx((0.8, 0.3))
    # after means m1 then m2 with lambda = 0.5: (lambda (1 - lambda) m1 + (1 - lambda) m2) / (1 - lambda^2)
    # = m1 / 3 + 2 m2 / 3
    once_half = updated(state, q, torch.tensor([0.8]), p, torch.tensor([0.3]), 0.5)
    twice = updated(once_half, q, torch.tensor([0.5]), p, torch.tensor([0.9]), 0.5)
    assert once_half.updates == 1 and twice.updates == 2
    assert twice.global_thresholds() == pytest.approx((0.8 / 3 + 2 * 0.5 / 3, 0.3 / 3 + 2 * 0.9 / 3))
    # lambda = 0.999 remembers: after 100 batches of need 0.9, one of need 0.1 barely moves the threshold
    slow = state
    for _ in range(100):
        slow = updated(slow, q, torch.tensor([0.8]), p, torch.tensor([0.9]), 0.999)
    slow = updated(slow, q, torch.tensor([0.8]), p, torch.tensor([0.1]), 0.999)
    weights = torch.tensor([0.999**k for k in range(101)])  # newest first
    expected = (0.1 * weights[0] + 0.9 * weights[1:].sum()) / weights.sum()
    assert slow.global_thresholds()[1] == pytest.approx(float(expected), rel=1e-5)
    # an empty batch changes nothing
    assert updated(slow, q[:0], torch.zeros(0), p[:0], torch.zeros(0), 0.999) is slow


def test_a_student_whose_need_falls_is_given_fewer_rows() -> None:
    """The long memory: the threshold trails the falling entropy, so the kept share shrinks."""
    torch.manual_seed(0)
    teacher = torch.randn(512, 10) * 3
    state, shares = ThresholdState.initial(10), []
    for sharpness in (0.5, 1.0, 2.0, 4.0):
        selection = llkd_select(teacher, torch.randn(512, 10) * sharpness, state)
        state = selection.state
        shares.append(float(selection.keep.float().mean()))
    assert shares == sorted(shares, reverse=True) and shares[0] > 0.5 > 0.1 > shares[-1]


class Table(torch.nn.Module):
    """A model whose logits for input row [i] are `table[i]`."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_the_batch_transform_labels_kept_rows_and_masks_the_others() -> None:
    # rows 0..3: the hand-computed unlabelled batch; row 4 labelled (class 1)
    teacher = Table(torch.cat([TEACHER, torch.zeros(1, 2)]))
    student = Table(torch.cat([STUDENT, torch.zeros(1, 2)]))
    inputs = torch.arange(5.0)[:, None]
    hidden = torch.tensor([True] * 4 + [False] + [True] * 3)  # the pool: 7 unlabelled rows of 8
    transform = LLKDBatches(LLKDSettings(momentum=0.0), 2, teacher, hidden)
    batch = {
        "inputs": inputs,
        "labels": torch.tensor([-100] * 4 + [1]),
        "index": torch.tensor([0, 1, 2, 3, 4]),
    }
    out = transform(batch, student, None)
    assert out["mask"].tolist() == [True, False, True, False, True]  # as by hand, and the labelled row
    assert out["labels"].tolist() == [0, -100, 1, -100, 1]  # kept rows take the teacher's argmax
    assert batch["labels"].tolist() == [-100] * 4 + [1]  # the batch given is not changed
    assert torch.equal(out["inputs"], inputs) and torch.equal(out["index"], batch["index"])
    report = transform.report()
    assert report["unlabelled_used"] == pytest.approx(2 / 7) and report["unlabelled_rate"] == 0.5
    assert report["llkd_teacher_threshold"] == pytest.approx(0.7125)
    # without pseudo-labels the kept rows stay unlabelled: only the distillation terms read them
    plain = LLKDBatches(LLKDSettings(momentum=0.0, pseudo_labels=False), 2, teacher, hidden)
    assert plain(batch, student, None)["labels"].tolist() == [-100] * 4 + [1]
    # a batch of labelled rows only passes untouched
    labelled = {"inputs": inputs[4:], "labels": torch.tensor([1]), "index": torch.tensor([4])}
    assert transform(labelled, student, None) is labelled


def test_random_subset_keeps_every_labelled_row_and_a_share_of_the_pool() -> None:
    hidden = torch.tensor([False, True] * 50)
    kept = random_subset(hidden, 0.4, seed=3)
    assert set((~hidden).nonzero().flatten().tolist()) <= set(kept.tolist())
    assert int(hidden[kept].sum()) == 20 and kept.tolist() == sorted(kept.tolist())
    assert torch.equal(kept, random_subset(hidden, 0.4, seed=3))
    assert not torch.equal(kept, random_subset(hidden, 0.4, seed=4))
    assert int(hidden[random_subset(hidden, 1.0, seed=0)].sum()) == 50


# ----------------------------------------------------------------------------------------- recipes


def _recipe(source: dict | None, tmp_path: Path | None = None, data: dict | None = None, **extra):
    from distill.recipe.load import recipe_from_dict

    kd = [{"name": "cross_entropy"}, {"name": "hinton_kd", "params": {"temperature": 4.0}}]
    method = {"name": "selected", "objectives": kd} | ({"source": source} if source else {})
    spec = {
        "name": "llkd",
        "data": {
            "name": "digits",
            "params": data if data is not None else {"labelled_per_class": 5, "unlabelled": True},
            "batch_size": 64,
        },
        "teacher": {
            "name": "small_cnn",
            "params": {"channels": [8, 16]},
            "train": {"epochs": 4, "optimizer": {"name": "adamw", "lr": 0.01}},
        },
        "student": {"name": "mlp", "params": {"hidden": [16]}},
        "methods": [{"name": "kd", "objectives": kd}, method],
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 3, "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str((tmp_path or Path("/nonexistent")) / "run"), "tensorboard": False},
    } | extra
    return recipe_from_dict(spec)


@pytest.mark.parametrize(
    ("source", "params", "problem"),
    [
        ("llkd", {"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ("llkd", {"momentum": -0.1}, r"momentum must lie in \[0, 1\)"),
        ("llkd", {"momentum": "slow"}, "momentum"),
        ("llkd", {"momentun": 0.9}, "unknown setting 'momentun'; did you mean 'momentum'"),
        ("llkd", {"pseudo_labels": 1}, "pseudo_labels"),
        ("random_subset", {"fraction": 0}, r"fraction must lie in \(0, 1\]"),
        ("random_subset", {"fraction": 1.5}, r"fraction must lie in \(0, 1\]"),
        ("random_subset", {"seed": -1}, "seed"),
    ],
)
def test_bad_params_are_refused_in_one_line(source: str, params: dict, problem: str) -> None:
    with pytest.raises(UserError, match=problem) as caught:
        selection_settings(source, params)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=f"methods\\[1\\].source: source '{source}': .*{problem}") as caught:
        _recipe({"name": source, "params": params})
    assert "\n" not in str(caught.value)


def test_tasks_without_unlabelled_rows_refuse_the_source() -> None:
    from distill.tasks.base import task_named

    recipe = _recipe({"name": "llkd"})
    task_named("classification").check(recipe)
    for name in ("graph",):  # causal_lm refuses the recipe's image student first
        with pytest.raises(
            UserError, match=f"source 'llkd' selects unlabelled rows .* task '{name}'"
        ) as caught:
            task_named(name).check(recipe)
        assert "\n" not in str(caught.value)


def test_what_a_selecting_method_cannot_have_is_refused_before_training(tmp_path: Path) -> None:
    from distill.experiment import run_recipe
    from distill.tasks.base import task_named

    no_teacher = _recipe({"name": "llkd"}).model_copy(update={"teacher": None})
    with pytest.raises(UserError, match="source 'llkd': selects rows by the teacher's confidence, but"):
        task_named("classification").check(no_teacher)
    labelled_only = _recipe({"name": "llkd"}, tmp_path, data={"labelled_per_class": 5})
    with pytest.raises(UserError, match="unlabelled rows .* the training set has none") as caught:
        run_recipe(labelled_only, progress=False)
    assert "\n" not in str(caught.value)


def test_llkd_and_random_subset_recipes_train_and_report_the_data_they_used(tmp_path: Path) -> None:
    from distill.experiment import run_recipe

    seeds = {"seeds": [0, 1]}
    llkd = run_recipe(_recipe({"name": "llkd"}, tmp_path / "a", **seeds), progress=False)
    runs = {m.name: m.runs for m in llkd.methods}
    for run in runs["selected"]:
        final = run.result.final
        assert 0.3 < final["accuracy"] <= 1.0
        assert 0.0 < final["unlabelled_rate"] < 1.0  # some rows were left out of some batches
        assert final["unlabelled_rate"] <= final["unlabelled_used"] <= 1.0
        assert run.result.best["unlabelled_used"] == final["unlabelled_used"]
        assert 0 < final["llkd_student_threshold"] < 1 and 0.1 < final["llkd_teacher_threshold"] < 1
    assert "unlabelled_used" not in runs["kd"][0].result.final
    # the same recipe trains the same way: the selection is reproducible
    again = run_recipe(_recipe({"name": "llkd"}, tmp_path / "b", **seeds), progress=False)
    for first, second in zip(runs["selected"], again.methods[1].runs, strict=True):
        assert first.result.final["accuracy"] == second.result.final["accuracy"]
        assert first.result.final["unlabelled_used"] == second.result.final["unlabelled_used"]

    subset = _recipe({"name": "random_subset", "params": {"fraction": 0.25}}, tmp_path / "c", **seeds)
    result = run_recipe(subset, progress=False)
    for run in result.methods[1].runs:
        assert run.result.final["unlabelled_used"] == pytest.approx(0.25, abs=1e-3)
        assert 0.2 < run.result.final["accuracy"] <= 1.0
    # fewer rows, fewer steps: 50 labelled + 302 of the 1207 unlabelled rows, batch 64 -> 6 steps an epoch
    assert result.methods[1].runs[0].result.steps == 3 * 6

"""Mixup / cutmix sources (S37, `distill.sources.mixup`) and the soft-label cross-entropy they feed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import build_data, build_model, fit
from distill.errors import UserError
from distill.objectives import Progress, StepOutputs
from distill.objectives.base import build_objective
from distill.sources.mixup import MixBatches, MixSettings, box_lam, cut_boxes
from distill.tasks.mixing import mix_settings
from distill.train.seeding import seed_everything


def _transform(kind: str = "mixup", seed: int = 0, classes: int = 10, **settings) -> MixBatches:
    return MixBatches(kind, MixSettings(**settings), classes, seed)


def _step(step: int = 0) -> Progress:
    return Progress(step, 100, 0.0)


def _distinct_batch(n: int = 10, shape: tuple[int, ...] = (1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i is the constant image i + 1 with class i: every output row tells its partner and its lam."""
    inputs = torch.arange(1, n + 1, dtype=torch.float32).reshape(n, *([1] * len(shape))).expand(n, *shape)
    return inputs.clone(), torch.arange(n)


def _partners(soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam, partner) of each row of mixed labels whose rows were classes 0..n-1."""
    n = len(soft)
    own = soft[torch.arange(n), torch.arange(n)]
    other = soft.clone()
    other[torch.arange(n), torch.arange(n)] = -1
    partner = torch.where(own < 1, other.argmax(1), torch.arange(n))
    return own, partner


# ------------------------------------------------------------------------------------------- mixup maths


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_mixes_inputs_and_labels_with_one_lam(per_sample: bool) -> None:
    inputs, labels = _distinct_batch()
    mixed, soft = _transform(per_sample=per_sample)((inputs, labels), None, _step())
    assert soft.dtype == torch.float32 and soft.shape == (10, 10)
    assert torch.allclose(soft.sum(1), torch.ones(10))
    lam, partner = _partners(soft)
    assert sorted(partner.tolist()) == list(range(10))  # a permutation
    expected = lam[:, None, None, None] * inputs + (1 - lam[:, None, None, None]) * inputs[partner]
    assert torch.allclose(mixed, expected)
    took = partner != torch.arange(10)
    assert ((lam[took] > 0) & (lam[took] < 1)).all()
    if not per_sample:  # one lam for the batch
        assert torch.allclose(lam[took], lam[took][0].expand(int(took.sum())))
    else:
        assert len(set(lam[took].tolist())) > 1


def test_lam_follows_beta_alpha_alpha() -> None:
    n = 2000
    inputs, labels = _distinct_batch(n, (2,))
    middle = {}
    for alpha in (1.0, 0.2):
        _, soft = _transform(alpha=alpha, per_sample=True, classes=n)((inputs, labels), None, _step())
        lam, partner = _partners(soft)
        lam = lam[partner != torch.arange(n)]
        middle[alpha] = float(((lam > 0.1) & (lam < 0.9)).float().mean())
        if alpha == 1.0:  # Beta(1, 1) is uniform
            assert abs(float(lam.mean()) - 0.5) < 0.03
            assert abs(middle[alpha] - 0.8) < 0.04
    assert middle[0.2] < 0.5  # a small alpha keeps lam near 0 or 1


def test_probability_zero_is_the_identity_and_probability_mixes_that_share() -> None:
    inputs, labels = _distinct_batch()
    batch = (inputs, labels)
    never = _transform(probability=0.0)
    for step in range(5):
        assert never(batch, None, _step(step)) is batch
    sometimes = _transform(probability=0.3)
    mixed = sum(sometimes(batch, None, _step(step)) is not batch for step in range(400))
    assert 90 < mixed < 150
    rows = _transform(probability=0.3, per_sample=True, classes=2000)
    many = _distinct_batch(2000, (2,))
    lam, partner = _partners(rows(many, None, _step())[1])
    unmixed = float((lam == 1).float().mean())
    assert 0.65 < unmixed < 0.75


# ------------------------------------------------------------------------------------------ cutmix maths


def test_cut_boxes_and_their_area_corrected_lam() -> None:
    class Centre:  # a generator whose box centres are given
        def __init__(self, y: int, x: int) -> None:
            self.values = [np.array([y]), np.array([x])]

        def integers(self, low: int, high: int, size: int) -> np.ndarray:
            return self.values.pop(0)

    boxes = cut_boxes(np.array([0.75]), 8, 8, Centre(4, 4))  # sides 8 * sqrt(0.25) = 4
    assert boxes.tolist() == [[2, 6, 2, 6]]
    assert box_lam(boxes, 8, 8).tolist() == [0.75]
    corner = cut_boxes(np.array([0.75]), 8, 8, Centre(0, 0))  # clipped: a 2 x 2 box is left
    assert corner.tolist() == [[0, 2, 0, 2]]
    assert box_lam(corner, 8, 8).tolist() == [1 - 4 / 64]


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_pastes_one_box_and_mixes_labels_by_area(per_sample: bool) -> None:
    inputs, labels = _distinct_batch(10, (3, 8, 8))
    transform = _transform("cutmix", per_sample=per_sample)
    masks = []
    for step in range(20):
        mixed, soft = transform((inputs, labels), None, _step(step))
        assert torch.allclose(soft.sum(1), torch.ones(10))
        lam, partner = _partners(soft)
        for row in range(10):
            own = mixed[row] == inputs[row, 0, 0, 0]
            theirs = mixed[row] == inputs[partner[row], 0, 0, 0]
            assert bool((own | theirs).all())
            assert torch.equal(own[0], own[1]) and torch.equal(own[0], own[2])  # same box on every channel
            assert abs(float(own[0].float().mean()) - float(lam[row])) < 1e-6  # lam = own pixels' share
            pasted = (~own[0]).nonzero()
            if len(pasted):  # one rectangle
                top, left = pasted.min(0).values.tolist()
                bottom, right = (pasted.max(0).values + 1).tolist()
                assert len(pasted) == (bottom - top) * (right - left)
            masks.append(own[0])
        if not per_sample:  # one box for the batch
            took = partner != torch.arange(10)
            boxes = [~(mixed[r, 0] == inputs[r, 0, 0, 0]) for r in took.nonzero().flatten().tolist()]
            assert all(torch.equal(b, boxes[0]) for b in boxes)
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 3  # boxes move


def test_mixing_keeps_the_batch_kind_index_and_mask() -> None:
    inputs, labels = _distinct_batch()
    index = torch.arange(100, 110)
    out = _transform("cutmix")({"inputs": inputs, "labels": labels, "index": index}, None, _step())
    assert set(out) == {"inputs", "labels", "index"} and torch.equal(out["index"], index)
    mask = torch.ones(10, dtype=torch.bool)
    mask[3] = False
    mixed, soft, new_mask = _transform()((inputs, labels, mask), None, _step())
    lam, partner = _partners(soft)
    # a row counts when it did and so did the partner it took from
    expected = mask & ((partner == torch.arange(10)) | mask[partner])
    assert torch.equal(new_mask, expected) and not new_mask[3]
    # ignore_index labels count nowhere
    labels_ignored = labels.clone()
    labels_ignored[5] = -100
    _, soft, new_mask = _transform()((inputs, labels_ignored), None, _step())
    assert not new_mask[5] and soft[5, :].sum() < 1 + 1e-6


# ------------------------------------------------------------------------------------------ reproducible


def _run(transform: MixBatches, steps: int = 6, micro: int = 2) -> list[torch.Tensor]:
    inputs, labels = _distinct_batch()
    out = []
    for step in range(steps):
        for _ in range(micro):
            torch.manual_seed(step * 17 + 5)  # whatever else draws from the global RNG changes nothing
            np.random.seed(step)
            result = transform((inputs, labels), None, _step(step))
            out.append(result[0] if isinstance(result, tuple) else result)
    return out


def test_the_same_seed_mixes_the_same_batches_and_a_resume_picks_up_the_stream() -> None:
    for kind in ("mixup", "cutmix"):
        first, second = _run(_transform(kind, seed=4)), _run(_transform(kind, seed=4))
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        other = _run(_transform(kind, seed=5))
        assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
        # micro-batches of one step differ
        assert not torch.equal(first[0], first[1])
        # a fresh transform (a resumed run) at step 3 mixes as the uninterrupted one did
        resumed = _transform(kind, seed=4)
        inputs, labels = _distinct_batch()
        again = [resumed((inputs, labels), None, _step(3))[0] for _ in range(2)]
        assert torch.equal(again[0], first[6]) and torch.equal(again[1], first[7])


def _digits_parts():
    data = build_data("digits", labelled_per_class=8)
    seed_everything(123)
    teacher = build_model("small_cnn", num_classes=10, input_shape=data.input_shape, channels=[8, 16])
    return data, teacher


def _student(data, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[16], dropout=0.1)


def test_a_resumed_mixup_run_ends_with_the_metrics_of_an_uninterrupted_one(tmp_path: Path) -> None:
    data, teacher = _digits_parts()
    settings = dict(epochs=3, batch_size=16, grad_accum=2, progress=False, tensorboard=False, seed=3)
    objectives = [("cross_entropy", 0.5), ("hinton_kd", 0.5, {"temperature": 2.0})]

    def run(name: str, **extra) -> object:
        return fit(
            _student(data, seed=7 if extra.get("resume") else 0),
            data.train,
            teacher=teacher,
            eval_data=data.test,
            objectives=objectives,
            run_dir=tmp_path / name,
            batch_transform=_transform("mixup", seed=3, alpha=0.4),
            **settings,
            **extra,
        )

    full = run("full")
    cut = run("cut", checkpoint_every=4, stop_after_steps=5)
    assert not cut.completed
    seed_everything(999)
    resumed = run("cut", resume=True)
    assert resumed.completed and resumed.steps == full.steps
    for key in ("accuracy", "loss", "teacher_kl", "train_loss"):
        assert resumed.final[key] == full.final[key], key


def test_the_teacher_sees_the_mixed_images() -> None:
    data, _ = _digits_parts()
    seen: list[torch.Tensor] = []

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    fit(
        _student(data),
        data.train,
        teacher=Recording(),
        objectives=["cross_entropy", "hinton_kd"],
        batch_transform=_transform("mixup", seed=1),
        epochs=1,
        batch_size=16,
        progress=False,
        tensorboard=False,
    )
    originals = {tuple(x.flatten().tolist()) for x, _ in data.train}
    rows = [tuple(r.flatten().tolist()) for batch in seen[-3:] for r in batch]
    assert sum(r not in originals for r in rows) > len(rows) // 2


# ------------------------------------------------------------------------------ soft-label cross-entropy


def _outputs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> StepOutputs:
    return StepOutputs(student_logits=logits, labels=labels, mask=mask)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_cross_entropy_matches_float64_reference_and_respects_the_mask(smoothing: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 7) * 3
    targets = torch.distributions.Dirichlet(torch.full((7,), 0.5)).sample((12,))
    mask = torch.rand(12) > 0.3
    ce = build_objective("cross_entropy", {"label_smoothing": smoothing})
    q = targets.double() * (1 - smoothing) + smoothing / 7
    rows = -(q * torch.log_softmax(logits.double(), -1)).sum(-1)
    assert torch.allclose(ce(_outputs(logits, targets)).double(), rows.mean(), atol=1e-6)
    assert torch.allclose(ce(_outputs(logits, targets, mask)).double(), rows[mask].mean(), atol=1e-6)
    garbage = logits.clone()
    garbage[~mask] = 1e4  # rows the mask leaves out change nothing
    assert torch.allclose(ce(_outputs(garbage, targets, mask)), ce(_outputs(logits, targets, mask)))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_soft_cross_entropy_on_one_hot_labels_equals_the_hard_one(smoothing: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(9, 5)
    labels = torch.randint(0, 5, (9,))
    ce = build_objective("cross_entropy", {"label_smoothing": smoothing})
    hard = ce(_outputs(logits, labels))
    soft = ce(_outputs(logits, F.one_hot(labels, 5).float()))
    assert torch.allclose(hard, soft, atol=1e-6)
    assert torch.allclose(hard, F.cross_entropy(logits, labels, label_smoothing=smoothing), atol=1e-6)


def test_float_labels_of_the_wrong_shape_are_refused() -> None:
    ce = build_objective("cross_entropy")
    with pytest.raises(UserError, match=r"class distributions shaped like the logits \(4, 3\)"):
        ce(_outputs(torch.randn(4, 3), torch.rand(4, 5)))


# ------------------------------------------------------------------------------------------ refusals


def test_objectives_reading_class_indices_refuse_soft_labels() -> None:
    soft = torch.full((4, 3), 1 / 3)
    outputs = StepOutputs(student_logits=torch.randn(4, 3), teacher_logits=torch.randn(4, 3), labels=soft)
    for name in ("dkd", "pld"):
        with pytest.raises(UserError, match=f"objective '{name}' needs class indices, not soft"):
            build_objective(name)(outputs)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"probability": 1.5}, r"probability must lie in \[0, 1\]"),
        ({"probability": -0.1}, r"probability must lie in \[0, 1\]"),
        ({"alhpa": 1.0}, "unknown setting 'alhpa'; did you mean 'alpha'"),
        ({"alpha": "big"}, "alpha"),
        ({"per_sample": 2}, "per_sample"),
    ],
)
def test_bad_params_are_refused_in_one_line(params: dict, problem: str) -> None:
    with pytest.raises(UserError, match=problem) as caught:
        mix_settings("mixup", params)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=f"methods\\[1\\].source: source 'cutmix': .*{problem}") as caught:
        _recipe({"name": "cutmix", "params": params})
    assert "\n" not in str(caught.value)


def _recipe(source: dict, objectives: list | None = None, tmp_path: Path | None = None, **extra):
    from distill.recipe.load import recipe_from_dict

    kd = [{"name": "cross_entropy"}, {"name": "hinton_kd", "params": {"temperature": 4.0}}]
    spec = {
        "name": "mixup",
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {
            "name": "small_cnn",
            "params": {"channels": [8, 16]},
            "train": {"epochs": 4, "optimizer": {"name": "adamw", "lr": 0.01}},
        },
        "student": {"name": "mlp", "params": {"hidden": [16]}},
        "methods": [
            {"name": "kd", "objectives": kd},
            {"name": "kd-mix", "objectives": objectives or kd, "source": source},
        ],
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 4, "threads": 1},
        "seeds": [0],
        "output": {"dir": str((tmp_path or Path("/nonexistent")) / "run"), "tensorboard": False},
    } | extra
    return recipe_from_dict(spec)


def test_tasks_that_cannot_mix_refuse_the_source() -> None:
    from distill.tasks.base import task_named

    recipe = _recipe({"name": "mixup"})
    task_named("classification").check(recipe)  # image classification mixes
    for name in ("text_classification", "graph"):
        refused = f"source 'mixup' mixes input images .* task '{name}' cannot serve"
        with pytest.raises(UserError, match=refused):
            task_named(name).check(recipe)


def test_a_mixing_method_with_a_class_index_objective_is_refused_before_training() -> None:
    from distill.tasks.base import task_named

    recipe = _recipe({"name": "cutmix"}, [{"name": "dkd"}])
    with pytest.raises(
        UserError, match="method 'kd-mix': source 'cutmix': objective 'dkd' reads class indices"
    ):
        task_named("classification").check(recipe)


def test_inputs_that_cannot_be_mixed_are_refused() -> None:
    transform = _transform("mixup")
    with pytest.raises(UserError, match="cannot mix torch.int64 inputs"):
        transform((torch.ones(4, 6, dtype=torch.long), torch.arange(4)), None, _step())
    with pytest.raises(UserError, match=r"pastes boxes of images \(N, C, H, W\); these inputs are \(4, 6\)"):
        _transform("cutmix")((torch.ones(4, 6), torch.arange(4)), None, _step())


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_mixup_recipe_trains_and_evaluates(tmp_path: Path) -> None:
    from distill.experiment import run_recipe

    recipe = _recipe({"name": "mixup", "params": {"alpha": 0.4}}, tmp_path=tmp_path)
    result = run_recipe(recipe, progress=False)
    by_name = {m.name: m for m in result.methods}
    assert set(by_name) == {"kd", "kd-mix"}
    for runs in by_name.values():
        final = runs.runs[0].result.final
        assert 0.5 < final["accuracy"] <= 1.0 and np.isfinite(final["loss"])
    # the mixed method trained on other batches than the plain one
    assert (
        by_name["kd"].runs[0].result.final["train_loss"]
        != by_name["kd-mix"].runs[0].result.final["train_loss"]
    )

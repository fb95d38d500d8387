"""S17 LELP: the pseudo-subclass loss and subspace fit against float64 references, the construction on
embeddings of known structure, the objective on a real pre-trained teacher and a small student encoder, its
statistics pass in the trainer, and refusals of bad parameters."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from distill.errors import UserError
from distill.losses.classic import hinton_kd
from distill.losses.subclasses import fit_class_subspaces, haar_rotations, lelp_kd, subclass_projections
from distill.models import build_model
from distill.models.hooks import FeatureHooks
from distill.objectives import OBJECTIVES, Progress, StepOutputs, build_objective
from distill.objectives.features import is_feature_objective
from distill.objectives.lelp import LELP
from distill.teachers import FrozenTeacher, TeacherRequest
from distill.train.feature_taps import bind_feature_objectives, probe_and_build
from encoder_helpers import encoder_pair

# ------------------------------------------------------------------------------------- the loss


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(student, teacher, sub_s, proj_t, temperature, beta) -> np.ndarray:
    """Per-row T^2 KL(p || q) over S x C pseudo-subclasses, in float64 with explicit loops."""
    s, t, a, z = (np.asarray(x, dtype=np.float64) for x in (student, teacher, sub_s, proj_t))
    n, classes, subclasses = a.shape
    out = np.zeros(n)
    for i in range(n):
        p_class, q_class = _softmax(t[i] / temperature), _softmax(s[i] / temperature)
        for c in range(classes):
            p_sub, q_sub = _softmax(z[i, c] / beta), _softmax(a[i, c])
            for k in range(subclasses):
                p, q = p_class[c] * p_sub[k], q_class[c] * q_sub[k]
                out[i] += p * (math.log(p) - math.log(q))
    return temperature**2 * out


@pytest.mark.parametrize(("temperature", "beta"), [(1.0, 1.0), (4.0, 0.5)])
def test_lelp_kd_matches_a_float64_reference(temperature: float, beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 3, generator=g) * 2, torch.randn(6, 3, generator=g) * 2
    sub_s, proj_t = torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 4, generator=g) * 3
    expected = _reference(student, teacher, sub_s, proj_t, temperature, beta)
    kwargs = {"temperature": temperature, "subclass_temperature": beta}
    per_row = lelp_kd(student, teacher, sub_s, proj_t, reduction="none", **kwargs)
    assert per_row.dtype == torch.float32
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(lelp_kd(student, teacher, sub_s, proj_t, **kwargs)) == pytest.approx(
        expected.mean(), rel=1e-5
    )
    mask = torch.tensor([True, False, True, True, False, True])
    masked = lelp_kd(student, teacher, sub_s, proj_t, mask=mask, reduction="sum", **kwargs)
    assert float(masked) == pytest.approx(expected[mask.numpy()].sum(), rel=1e-5)
    # bf16 inputs are computed in float32
    half = lelp_kd(*(x.bfloat16() for x in (student, teacher, sub_s, proj_t)), reduction="none", **kwargs)
    assert half.dtype == torch.float32


def test_lelp_kd_is_kd_plus_the_expected_subclass_kl() -> None:
    """The factorised S x C KL splits into Hinton KD on the classifier plus sum_c p_c KL(p_{S|c} || q_{S|c});
    with equal within-class distributions it is exactly Hinton KD."""
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    sub_s, proj_t = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    t = 2.0
    kd = hinton_kd(student, teacher, temperature=t, reduction="none")
    p_class = torch.softmax(teacher / t, -1)
    p_sub, q_sub = torch.softmax(proj_t, -1), torch.softmax(sub_s, -1)
    conditional = (p_class * (p_sub * (p_sub.log() - q_sub.log())).sum(-1)).sum(-1)
    total = lelp_kd(student, teacher, sub_s, proj_t, temperature=t, reduction="none")
    torch.testing.assert_close(total, kd + t**2 * conditional, rtol=1e-5, atol=1e-6)
    same = lelp_kd(student, teacher, proj_t, proj_t, temperature=t, reduction="none")
    torch.testing.assert_close(same, kd, rtol=1e-5, atol=1e-6)


def test_lelp_kd_gradients_pass_gradcheck_in_float64() -> None:
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)]
    tensors += [torch.randn(3, 2, 3, generator=g), torch.randn(3, 2, 3, generator=g)]
    leaves = [t.double().requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda *x: lelp_kd(*x, temperature=2.0, subclass_temperature=0.5), leaves, eps=1e-6, atol=1e-6
    )


def test_lelp_kd_refuses_mismatched_subclass_tensors() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, S\)"):
        lelp_kd(logits, logits, torch.zeros(2, 4, 2), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="subclass_temperature"):
        lelp_kd(logits, logits, torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), subclass_temperature=0.0)


# ------------------------------------------------------------------------------ the subspaces


def _moments(embeddings: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    h = embeddings.double()
    count = torch.bincount(labels, minlength=classes).double()
    total = torch.zeros(classes, h.shape[1], dtype=torch.float64).index_add_(0, labels, h)
    outer = torch.zeros(classes, h.shape[1], h.shape[1], dtype=torch.float64)
    outer.index_add_(0, labels, h[:, :, None] * h[:, None, :])
    return count, total, outer


def test_fit_matches_a_float64_pca_reference() -> None:
    g = torch.Generator().manual_seed(2)
    classes, dim, subclasses = 3, 7, 3
    labels = torch.arange(90) % classes
    embeddings = torch.randn(90, dim, generator=g) * torch.linspace(0.5, 3.0, dim) + labels[:, None]
    weight = torch.randn(classes, dim, generator=g)
    rotations = haar_rotations(classes, subclasses, torch.Generator().manual_seed(0))
    directions, offsets = fit_class_subspaces(
        *_moments(embeddings, labels, classes),
        subclasses=subclasses,
        rotations=rotations,
        output_weight=weight,
    )
    w = weight.double().numpy()
    projector = np.eye(dim) - np.linalg.pinv(w) @ w
    for c in range(classes):
        x = embeddings[labels == c].double().numpy()
        mean = x.mean(0)
        covariance = projector @ np.cov(x, rowvar=False, bias=True) @ projector
        values, vectors = np.linalg.eigh(covariance)
        top = vectors[:, ::-1][:, :subclasses]
        u = directions[c].numpy().T * math.sqrt(values[::-1][:subclasses].mean())  # undo the standardisation
        np.testing.assert_allclose(u @ u.T, top @ top.T, atol=1e-8)  # the same subspace, orthonormal rows
        signs = top.T @ u @ rotations[c].numpy().T  # u = top diag(+-1) Q_c: eigenvectors have no sign
        np.testing.assert_allclose(np.abs(signs), np.eye(subclasses), atol=1e-8)
        assert np.abs(directions[c].numpy() @ w.T).max() < 1e-8  # nothing along the teacher's logits
        np.testing.assert_allclose(offsets[c].numpy(), directions[c].numpy() @ mean, atol=1e-8)
        z = subclass_projections(torch.from_numpy(x), directions, offsets)[:, c].numpy()
        assert z.var(0).mean() == pytest.approx(1.0, rel=1e-6)  # standardised: unit mean variance


def test_haar_rotations_are_orthonormal() -> None:
    q = haar_rotations(4, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(5, dtype=torch.float64).expand(4, 5, 5))


def test_pseudo_subclasses_recover_the_clusters_of_each_class() -> None:
    """Two classes, each two well-separated clusters (class 0 along e1, class 1 along e2), and a larger
    within-class spread along the teacher's logit direction e0: the null-space PCA ignores e0, and with
    S = 2 the arg-max pseudo-subclass of every embedding is its cluster, whatever the random rotation (which
    only turns the boundary through the class mean, between the two clusters)."""
    g = torch.Generator().manual_seed(4)
    per, dim = 200, 6
    labels = torch.arange(2 * per) // per
    cluster = torch.arange(2 * per) % 2
    embeddings = 0.05 * torch.randn(2 * per, dim, generator=g)
    embeddings[:, 0] += 4.0 * torch.randn(2 * per, generator=g) + (2 * labels - 1) * 3.0  # logit direction
    axis = 1 + labels  # class 0 splits along e1, class 1 along e2
    embeddings[torch.arange(2 * per), axis] += (2 * cluster - 1) * 3.0
    weight = torch.tensor([[1.0, 0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0]])
    moments = _moments(embeddings, labels, 2)
    for seed in range(5):
        rotations = haar_rotations(2, 2, torch.Generator().manual_seed(seed))
        directions, offsets = fit_class_subspaces(
            *moments, subclasses=2, rotations=rotations, output_weight=weight
        )
        z = subclass_projections(embeddings, directions, offsets)
        for c in range(2):
            rows = labels == c
            agreement = float((z[rows, c].argmax(-1) == cluster[rows]).float().mean())
            assert max(agreement, 1 - agreement) == 1.0, (seed, c)  # each cluster is one pseudo-subclass
            assert directions[c, :, 0].abs().max() < 1e-9  # nothing along the logit direction
    plain, _ = fit_class_subspaces(*moments, subclasses=2, rotations=rotations)  # without the projection
    assert plain[:, :, 0].abs().max() > 0.1  # the plain PCA spends a direction on what the logits say


# ---------------------------------------------------------------------- on real encoders


@pytest.fixture(scope="module")
def encoders() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    return encoder_pair([32, 20, 12, 28, 9, 31, 16, 24], [0, 1, 0, 0, 1, 0, 1, 0])


def _bound(encoders, **params) -> tuple[LELP, FrozenTeacher]:
    teacher_model, student, ids, labels = encoders
    objective = build_objective("lelp", params)
    bind_feature_objectives([objective], ["lelp"], student, teacher_model)
    teacher = FrozenTeacher(teacher_model)
    teacher.attach("cpu", nullcontext, objective.teacher_layers)
    probe_and_build([objective], student, teacher, (ids, labels), lambda v: v, n_data=len(ids))
    return objective, teacher


def _step(
    objective: LELP, teacher: FrozenTeacher, student: nn.Module, ids: Tensor, labels: Tensor, epoch: float
):
    out = teacher.outputs(TeacherRequest(ids, None, None))
    with FeatureHooks(student, objective.student_layers) as hooks:
        logits = student(ids)
        step = StepOutputs(
            logits,
            teacher_logits=out.logits,
            labels=labels,
            student_features=dict(hooks.features),
            teacher_features=out.features,
            progress=Progress(int(epoch * 10), 100, epoch),
        )
        return objective(step), logits, out.logits


def test_lelp_on_a_pretrained_teacher_gathers_then_fits_and_trains(encoders) -> None:
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders)
    assert objective.student_layers == ("pooled",) and objective.teacher_layers == ("pooled",)
    torch.testing.assert_close(objective.teacher_weight, teacher_model.head.weight.detach())
    assert objective.head.out_features == 2 * 4 and objective.head.in_features == 128
    student.train()
    # the statistics pass: before the fit the value is Hinton KD at T = 1 on the student's classifier
    value, logits, teacher_logits = _step(objective, teacher, student, ids[:4], labels[:4], epoch=0.0)
    torch.testing.assert_close(value, hinton_kd(logits, teacher_logits, temperature=1.0))
    _step(objective, teacher, student, ids[4:], labels[4:], epoch=0.5)
    assert objective.count.tolist() == [5.0, 3.0] and not bool(objective.fitted)
    # the first step past the pass fits the subspaces, then they stay
    student.zero_grad()
    value, *_ = _step(objective, teacher, student, ids, labels, epoch=1.0)
    assert bool(objective.fitted) and torch.isfinite(value)
    assert objective.directions.abs().sum() > 0
    assert (objective.directions @ objective.teacher_weight.T).abs().max() < 1e-4  # null space of W
    value.backward()
    assert objective.head.weight.grad is not None and objective.head.weight.grad.abs().sum() > 0
    for name in ("encoder.encoder.layer.0.attention.self.query.weight", "head.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher_model.parameters())
    frozen = objective.directions.clone()
    _step(objective, teacher, student, ids[:4], labels[:4], epoch=1.5)
    assert torch.equal(objective.directions, frozen) and objective.count.sum() == 8


def test_observe_then_fit_gives_the_subclass_term_from_the_first_step(encoders) -> None:
    """The pre-pass a trainer hook would make: `observe` every batch, `fit`, and the loss has its subclass
    term from step 0."""
    teacher_model, student, ids, labels = encoders
    objective, teacher = _bound(encoders, subclasses=2, subclass_temperature=0.5)
    embeddings = teacher.outputs(TeacherRequest(ids, None, None)).features["pooled"]
    objective.observe(embeddings, labels)
    objective.fit()
    value, logits, teacher_logits = _step(objective, teacher, student, ids, labels, epoch=0.0)
    assert float(value.detach()) > float(hinton_kd(logits, teacher_logits, temperature=1.0).detach()) + 1e-4


@pytest.mark.parametrize("teacher_pass", [True, False])
def test_trainer_fits_the_subspaces_before_training_or_after_one_epoch(teacher_pass: bool) -> None:
    """In the trainer (small CNNs): the teacher's pass over the training set before the first step fits the
    subspaces (the paper's order); without it the first epoch gathers every training sample and the second
    trains on the pseudo-subclasses. The moments and subspaces are checkpointed state."""
    from distill.train import OptimizerConfig, Trainer, TrainerConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    torch.manual_seed(0)
    student = build_model("small_cnn", num_classes=2, input_shape=(1, 8, 8), channels=[4, 8])
    teacher = build_model("small_cnn", num_classes=2, input_shape=(1, 8, 8), channels=[8, 16])
    run = Trainer(
        student,
        TensorDataset(x, y),
        teacher=teacher,
        objectives=[("cross_entropy", 1.0), ("lelp", 1.0, {"subclasses": 3, "teacher_pass": teacher_pass})],
        optimizer=OptimizerConfig(name="sgd", lr=0.05),
        config=TrainerConfig(epochs=2, batch_size=8, device="cpu", progress=False, tensorboard=False),
    )
    objective = run.objectives[1]
    assert bool(objective.fitted) == teacher_pass  # fitted before any step, or not yet
    if teacher_pass:
        assert objective.count.tolist() == torch.bincount(y).double().tolist()
    head = objective.head.weight.detach().clone()
    result = run.fit()
    assert result.completed and bool(objective.fitted)
    assert objective.count.sum() == 24 and objective.count.tolist() == torch.bincount(y).double().tolist()
    assert not torch.equal(head, objective.head.weight)
    state = run.saved_state.state_dict()
    assert any(k.endswith("directions") for k in state) and any(k.endswith("outer") for k in state)


# -------------------------------------------------------------------------------- refusals


def test_lelp_is_a_registered_feature_objective() -> None:
    assert "lelp" in OBJECTIVES.names() and is_feature_objective("lelp")
    assert isinstance(build_objective("lelp"), LELP)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"subclasses": 0}, "params.subclasses: must be a whole number from 1"),
        ({"temperature": 0}, "params.temperature: must be a positive finite number"),
        ({"subclass_temperature": float("nan")}, "params.subclass_temperature: must be a positive"),
        ({"statistics_epochs": 0.0}, r"params.statistics_epochs: must be a number in \(0, 1\]"),
        ({"statistics_epochs": 1.5}, r"params.statistics_epochs: must be a number in \(0, 1\]"),
        ({"null_space": "yes"}, "params.null_space: must be true or false"),
        ({"standardize": 1}, "params.standardize: must be true or false"),
        ({"num_classes": 0}, "params.num_classes: must be a whole number >= 1 or null"),
        ({"student_layer": 1.5}, "student_layer"),
        ({"subclass": 4}, "did you mean 'subclasses'"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_objective("lelp", params)
    assert "\n" not in str(err.value)


def test_too_many_subclasses_for_the_embedding_are_refused_at_build() -> None:
    student = build_model("small_cnn", num_classes=3, input_shape=(1, 8, 8), channels=[4, 4])
    teacher = build_model("small_cnn", num_classes=3, input_shape=(1, 8, 8), channels=[4, 5])
    objective = build_objective("lelp", {"subclasses": 3})  # width 5 - 3 logit directions leaves 2
    bind_feature_objectives([objective], ["lelp"], student, teacher)
    frozen = FrozenTeacher(teacher)
    frozen.attach("cpu", nullcontext, objective.teacher_layers)
    batch = (torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match="3 subclasses need as many directions") as err:
        probe_and_build([objective], student, frozen, batch, lambda v: v, n_data=2)
    assert "\n" not in str(err.value)
    wide = build_objective("lelp", {"student_layer": -2, "teacher_layer": -2})
    bind_feature_objectives([wide], ["lelp"], student, teacher)
    frozen.detach()
    frozen.attach("cpu", nullcontext, wide.teacher_layers)
    with pytest.raises(UserError, match="one embedding per sample"):
        probe_and_build([wide], student, frozen, batch, lambda v: v, n_data=2)


@pytest.mark.slow
def test_the_trainer_runs_lelp_on_real_encoders(encoders) -> None:
    import copy

    from distill.train import OptimizerConfig, Trainer, TrainerConfig

    teacher_model, student, ids, labels = encoders
    data = TensorDataset(torch.cat([ids, ids.flip(0)]), torch.cat([labels, labels.flip(0)]))
    run = Trainer(
        copy.deepcopy(student),
        data,
        teacher=teacher_model,
        objectives=[("lelp", 1.0, {"statistics_epochs": 0.5, "teacher_pass": False})],
        optimizer=OptimizerConfig(name="adamw", lr=1e-3),
        config=TrainerConfig(epochs=2, batch_size=4, device="cpu", progress=False, tensorboard=False),
    )
    objective = run.objectives[0]
    result = run.fit()
    assert result.completed and bool(objective.fitted)
    assert objective.count.sum() == 8  # the first half epoch: two batches of four
    assert (objective.directions @ objective.teacher_weight.T).abs().max() < 1e-4

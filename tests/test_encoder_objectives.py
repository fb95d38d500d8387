"""Text-encoder distillation: the losses of `distill.losses.encoders` against float64 references written
plainly (loops over batch, head, query and key), padding that changes nothing, -inf scores, half-precision
inputs computed in float32, hypothesis properties; and the objectives of `distill.objectives.encoders` bound
to the real all-MiniLM-L6-v2 teacher and a small fresh student (4 SMS texts): paths, gradients to the
student and the projectors, padding, refusals, and the attention the query / key taps give against the
attention probabilities transformers itself returns."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from data_helpers import missing_data, require_data
from distill.errors import UserError
from distill.losses.encoders import (
    attention_kl,
    attention_mse,
    attention_probs,
    attention_scores,
    embedding_cosine,
    embedding_mse,
    hidden_mse,
    scaled_dot,
    self_attention_relations,
    split_heads,
    value_relation_kl,
)
from distill.models.hooks import FeatureHooks
from distill.objectives import OBJECTIVES, StepOutputs, build_objective
from distill.objectives.features import FeatureObjective
from distill.teachers import FrozenTeacher, TeacherRequest
from distill.train.feature_taps import bind_feature_objectives, probe_and_build

ENCODER_OBJECTIVES = ["tinybert_hidden", "tinybert_attention", "minilm_attention", "minilm_relations"]
SMALL = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
# Student: 2 blocks, width 128, 2 heads; teacher: 6 blocks, width 384, 12 heads. 2 relation heads fit both.
PARAMS: dict[str, dict[str, Any]] = {
    "tinybert_hidden": {},
    "tinybert_attention": {"relation_heads": 2},
    "minilm_attention": {"relation_heads": 2},
    "minilm_relations": {"relation_heads": 2},
    "embedding_distill": {},
}


def randn(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def lengths_mask(lengths: list[int], length: int) -> Tensor:
    return torch.tensor([[i < n for i in range(length)] for n in lengths])


# ------------------------------------------------------------------ float64 references, written plainly


def ref_scores(x: Tensor, y: Tensor, heads: int) -> Tensor:
    """scores[b, a, i, j] = sum_c x[b, i, a*d + c] y[b, j, a*d + c] / sqrt(d)."""
    b, t, h = x.shape
    d = h // heads
    out = torch.zeros(b, heads, t, t, dtype=torch.float64)
    for n in range(b):
        for a in range(heads):
            for i in range(t):
                for j in range(t):
                    out[n, a, i, j] = (x[n, i, a * d : (a + 1) * d] * y[n, j, a * d : (a + 1) * d]).sum()
    return out / math.sqrt(d)


def ref_softmax(row: Tensor, keys: list[int]) -> dict[int, float]:
    """The softmax of `row` over the real keys only."""
    top = max(float(row[j]) for j in keys)
    e = {j: math.exp(float(row[j]) - top) for j in keys}
    z = sum(e.values())
    return {j: v / z for j, v in e.items()}


def ref_kl_maps(s: Tensor, t: Tensor, lengths: list[int]) -> float:
    """mean over heads and real query rows of KL(softmax(t row) || softmax(s row)) over real keys."""
    total, rows = 0.0, 0
    for n, length in enumerate(lengths):
        keys = list(range(length))
        for a in range(s.shape[1]):
            for i in range(length):
                p, q = ref_softmax(t[n, a, i], keys), ref_softmax(s[n, a, i], keys)
                total += sum(p[j] * math.log(p[j] / q[j]) for j in keys if p[j] > 0)
                rows += 1
    return total / max(rows, 1)


def ref_mse_maps(s: Tensor, t: Tensor, lengths: list[int]) -> float:
    total, count = 0.0, 0
    for n, length in enumerate(lengths):
        for a in range(s.shape[1]):
            for i in range(length):
                for j in range(length):
                    total += float(s[n, a, i, j] - t[n, a, i, j]) ** 2
                    count += 1
    return total / max(count, 1)


def ref_hidden(s: Tensor, t: Tensor, lengths: list[int]) -> float:
    total, count = 0.0, 0
    for n, length in enumerate(lengths):
        for i in range(length):
            for c in range(s.shape[-1]):
                total += float(s[n, i, c] - t[n, i, c]) ** 2
                count += 1
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------- losses

LENGTHS = [5, 3, 1]  # three texts, padded to 5 tokens


def test_scores_and_probabilities_match_the_reference_and_hide_padded_keys() -> None:
    q, k = randn(3, 5, 8, seed=0), randn(3, 5, 8, seed=1)
    mask = lengths_mask(LENGTHS, 5)
    expected = ref_scores(q, k, heads=2)
    assert torch.allclose(scaled_dot(q, k, heads=2), expected)
    scores = attention_scores(q, k, heads=2, mask=mask)
    probs = attention_probs(q, k, heads=2, mask=mask)
    for n, length in enumerate(LENGTHS):
        for a in range(2):
            for i in range(5):  # padded query rows too: BERT's rows are distributions over the real keys
                want = ref_softmax(expected[n, a, i], list(range(length)))
                for j in range(5):
                    assert float(probs[n, a, i, j]) == pytest.approx(want.get(j, 0.0), abs=1e-12)
                    assert (scores[n, a, i, j] == float("-inf")) == (j >= length)


def test_split_heads_is_berts_transpose_for_scores() -> None:
    x = randn(2, 3, 6, seed=2)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 3, 2)
    assert torch.equal(heads[1, 2, 0], x[1, 0, 4:6])
    with pytest.raises(ValueError, match="not a multiple of 4 heads"):
        split_heads(x, 4)


def test_attention_kl_and_mse_match_the_reference() -> None:
    s, t = randn(3, 2, 5, 5, seed=3), randn(3, 2, 5, 5, seed=4)
    mask = lengths_mask(LENGTHS, 5)
    assert float(attention_kl(s, t, mask=mask)) == pytest.approx(ref_kl_maps(s, t, LENGTHS), rel=1e-10)
    assert float(attention_mse(s, t, mask=mask)) == pytest.approx(ref_mse_maps(s, t, LENGTHS), rel=1e-10)
    every = [5, 5, 5]
    assert float(attention_kl(s, t)) == pytest.approx(ref_kl_maps(s, t, every), rel=1e-10)
    assert float(attention_mse(s, t)) == pytest.approx(ref_mse_maps(s, t, every), rel=1e-10)


def test_value_relations_and_minilmv2_relations_match_the_reference_across_widths() -> None:
    # Student width 4, teacher width 6, both re-split into 2 relation heads (widths 2 and 3).
    student = [randn(3, 5, 4, seed=10 + i) for i in range(3)]
    teacher = [randn(3, 5, 6, seed=20 + i) for i in range(3)]
    mask = lengths_mask(LENGTHS, 5)

    def ref(a: int, b: int) -> float:
        return ref_kl_maps(
            ref_scores(student[a], student[b], 2), ref_scores(teacher[a], teacher[b], 2), LENGTHS
        )

    vr = value_relation_kl(student[2], teacher[2], heads=2, mask=mask)
    assert float(vr) == pytest.approx(ref(2, 2), rel=1e-10)
    relations = self_attention_relations(student, teacher, heads=2, mask=mask)
    assert float(relations) == pytest.approx(ref(0, 0) + ref(1, 1) + ref(2, 2), rel=1e-10)
    qk = self_attention_relations(student, teacher, heads=2, mask=mask, relations=["qk"])
    assert float(qk) == pytest.approx(ref(0, 1), rel=1e-10)


def test_hidden_and_embedding_losses_match_the_reference() -> None:
    s, t = randn(3, 5, 4, seed=5), randn(3, 5, 4, seed=6)
    mask = lengths_mask(LENGTHS, 5)
    assert float(hidden_mse(s, t, mask=mask)) == pytest.approx(ref_hidden(s, t, LENGTHS), rel=1e-10)
    assert float(hidden_mse(s, t, mask=mask.double())) == pytest.approx(ref_hidden(s, t, LENGTHS), rel=1e-10)
    a, b = randn(4, 6, seed=7), randn(4, 6, seed=8)
    mse = sum(float(a[n, c] - b[n, c]) ** 2 for n in range(4) for c in range(6)) / 24
    assert float(embedding_mse(a, b)) == pytest.approx(mse, rel=1e-10)
    cos = [float(a[n] @ b[n]) / (float(a[n].norm()) * float(b[n].norm())) for n in range(4)]
    assert float(embedding_cosine(a, b)) == pytest.approx(sum(1 - c for c in cos) / 4, rel=1e-10)
    keep = torch.tensor([True, False, True, True])
    assert float(embedding_mse(a, b, mask=keep)) == pytest.approx(float(embedding_mse(a[keep], b[keep])))


def test_padded_positions_change_neither_value_nor_the_real_gradients() -> None:
    mask = lengths_mask(LENGTHS, 5)
    padded = ~mask
    q, k, v = (randn(3, 5, 8, seed=30 + i) for i in range(3))
    tq, tk, tv = (randn(3, 5, 8, seed=40 + i) for i in range(3))

    def losses(noise: float) -> tuple[list[Tensor], list[Tensor]]:
        leaves = [x.clone().masked_fill(padded[..., None], noise).requires_grad_(True) for x in (q, k, v)]
        targets = [x.clone().masked_fill(padded[..., None], -noise) for x in (tq, tk, tv)]
        values = [
            attention_kl(
                scaled_dot(leaves[0], leaves[1], heads=2), scaled_dot(*targets[:2], heads=2), mask=mask
            ),
            attention_mse(
                scaled_dot(leaves[0], leaves[1], heads=2), scaled_dot(*targets[:2], heads=2), mask=mask
            ),
            value_relation_kl(leaves[2], targets[2], heads=4, mask=mask),
            self_attention_relations(leaves, targets, heads=2, mask=mask),
            hidden_mse(leaves[0], targets[0], mask=mask),
        ]
        grads = []
        for value in values:
            grads.extend(torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True))
        return values, grads

    base_values, base_grads = losses(0.0)
    values, grads = losses(1e3)
    for a, b in zip(base_values, values, strict=True):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12, abs=1e-12)
    for a, b in zip(base_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(b[padded], torch.zeros_like(b[padded]))  # padded tokens learn nothing


def test_minus_infinity_scores_stay_finite_in_values_and_gradients() -> None:
    mask = lengths_mask(LENGTHS, 5)
    q, k = randn(3, 5, 8, seed=50), randn(3, 5, 8, seed=51)
    teacher = attention_scores(q, k, heads=2, mask=mask)
    teacher[0, 0, 0, 2] = float("-inf")  # a real key the teacher gives no mass, the student neither
    student = (attention_scores(k, q, heads=2, mask=mask)).clone()
    student[0, 0, 0, 2] = float("-inf")
    student.requires_grad_(True)
    for loss in (attention_kl, attention_mse):
        value = loss(student, teacher, mask=mask)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), loss.__name__
    # without a mask the -inf columns are just zero-probability keys (KL) and zeroed scores (MSE)
    assert torch.isfinite(attention_kl(student, teacher)) and torch.isfinite(attention_mse(student, teacher))
    # a sample without any real token: zero rows, a zero loss, no NaN
    empty = torch.zeros(3, 5, dtype=torch.bool)
    assert float(attention_kl(student.detach(), teacher, mask=empty)) == 0.0
    assert float(hidden_mse(q, k, mask=empty)) == 0.0
    assert torch.equal(
        attention_probs(q, k, heads=2, mask=empty), torch.zeros(3, 2, 5, 5, dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    mask = lengths_mask(LENGTHS, 5)
    x = [randn(3, 5, 8, seed=60 + i).to(dtype) for i in range(6)]
    up = [t.float() for t in x]
    e = [randn(4, 8, seed=70 + i).to(dtype) for i in range(2)]
    cases = [
        (lambda a: hidden_mse(a[0], a[1], mask=mask), x, up),
        (
            lambda a: attention_kl(
                scaled_dot(a[0], a[1], heads=2), scaled_dot(a[2], a[3], heads=2), mask=mask
            ),
            x,
            up,
        ),
        (
            lambda a: attention_mse(
                scaled_dot(a[0], a[1], heads=2), scaled_dot(a[2], a[3], heads=2), mask=mask
            ),
            x,
            up,
        ),
        (lambda a: value_relation_kl(a[0], a[1], heads=2, mask=mask), x, up),
        (lambda a: self_attention_relations(a[:3], a[3:], heads=4, mask=mask), x, up),
        (lambda a: embedding_mse(a[0], a[1]), e, [t.float() for t in e]),
        (lambda a: embedding_cosine(a[0], a[1]), e, [t.float() for t in e]),
    ]
    for fn, half, full in cases:
        value = fn(half)
        assert value.dtype == torch.float32
        assert float(value) == pytest.approx(float(fn(full)), rel=1e-6, abs=1e-7)
    huge = [(1e4 * t.float()).to(dtype) for t in x]  # fp16 products of 1e4-scale inputs would overflow
    assert torch.isfinite(
        attention_kl(scaled_dot(huge[0], huge[1], heads=2), scaled_dot(huge[2], huge[3], heads=2), mask=mask)
    )


def test_zero_embeddings_have_finite_gradients() -> None:
    s = torch.zeros(3, 4, requires_grad=True)
    value = embedding_cosine(s, torch.zeros(3, 4)) + embedding_mse(s, torch.zeros(3, 4))
    value.backward()
    assert float(value.detach()) == 1.0 and torch.isfinite(s.grad).all()


def test_per_head_maps_of_different_head_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="relation heads"):
        attention_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 12, 3, 3))


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    b, t, heads = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    ds, dt = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, t)) for _ in range(b)]
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    student = [scale * randn(b, t, heads * ds, seed=seed + i) for i in range(3)]
    teacher = [scale * randn(b, t, heads * dt, seed=seed + 10 + i) for i in range(3)]
    return *student, *teacher, heads, lengths_mask(lengths, t)  # type: ignore[return-value]


@settings(max_examples=40, deadline=None)
@given(token_batches())
def test_kl_losses_are_non_negative_and_zero_at_equality(batch: tuple[Any, ...]) -> None:
    *tensors, heads, mask = batch
    student, teacher = tensors[:3], tensors[3:]
    relations = self_attention_relations(student, teacher, heads=heads, mask=mask)
    value = value_relation_kl(student[2], teacher[2], heads=heads, mask=mask)
    attention = attention_kl(
        scaled_dot(student[0], student[1], heads=heads),
        scaled_dot(teacher[0], teacher[1], heads=heads),
        mask=mask,
    )
    for loss in (relations, value, attention):
        assert float(loss) >= -1e-12
    assert float(self_attention_relations(teacher, teacher, heads=heads, mask=mask)) == pytest.approx(
        0, abs=1e-12
    )
    scores = scaled_dot(teacher[0], teacher[1], heads=heads)
    assert float(attention_kl(scores, scores, mask=mask)) == pytest.approx(0, abs=1e-12)
    assert float(attention_mse(scores, scores, mask=mask)) == 0.0
    assert float(hidden_mse(teacher[0], teacher[0], mask=mask)) == 0.0


@settings(max_examples=40, deadline=None)
@given(token_batches(), st.floats(-1e3, 1e3))
def test_padded_tokens_never_matter(batch: tuple[Any, ...], noise: float) -> None:
    *tensors, heads, mask = batch
    student, teacher = tensors[:3], tensors[3:]
    padded = ~mask[..., None]
    noisy_student = [x.masked_fill(padded, noise) for x in student]
    noisy_teacher = [x.masked_fill(padded, -noise) for x in teacher]

    def values(a: list[Tensor], b: list[Tensor]) -> tuple[float, float, float]:
        relations = self_attention_relations(a, b, heads=heads, mask=mask)
        scores = (scaled_dot(a[0], a[1], heads=heads), scaled_dot(b[0], b[1], heads=heads))
        return (
            float(relations),
            float(attention_mse(*scores, mask=mask)),
            float(attention_kl(*scores, mask=mask)),
        )

    expected = values(student, teacher)
    assert values(noisy_student, noisy_teacher) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------- real encoders


@pytest.fixture(scope="module")
def encoders() -> tuple[Any, Any, Tensor, Tensor]:
    """The pre-trained teacher (6 blocks, 384 wide, 12 heads), a fresh student (2 blocks, 128 wide, 2 heads)
    and a batch of 4 SMS texts cut to 32 tokens (two of them padded)."""
    require_data("textcls/SMSSpamCollection.tsv")
    from distill.data import build_data
    from distill.models import build_model
    from distill.pretrained import pretrained_folder

    try:
        pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))
    torch.manual_seed(0)
    teacher = build_model("hf_encoder", num_classes=2, input_shape=(64,), path="all-MiniLM-L6-v2")
    student = build_model(
        "hf_encoder", num_classes=2, input_shape=(64,), path="all-MiniLM-L6-v2", config=SMALL
    )
    data = build_data("sms_spam")
    rows = [data.train[i] for i in range(4)]
    ids = torch.stack([r[0][:32] for r in rows])
    labels = torch.stack([r[1] for r in rows])
    assert (ids == 0).any(), "the batch must hold padding"
    return teacher, student, ids, labels


@contextmanager
def bound(
    name: str, params: dict[str, Any], student: Any, teacher: Any, ids: Tensor, labels: Tensor
) -> Iterator[tuple[FeatureObjective, FrozenTeacher]]:
    """The objective bound and built the trainer's way, with the frozen teacher serving its layers."""
    objective = build_objective(name, params)
    bind_feature_objectives([objective], [name], student, teacher)
    frozen = FrozenTeacher(teacher)
    frozen.attach("cpu", nullcontext, objective.teacher_layers)
    frozen.skip_logits()
    try:
        probe_and_build([objective], student, frozen, (ids, labels), lambda v: v, n_data=len(ids))
        yield objective, frozen
    finally:
        frozen.detach()


def step(objective: FeatureObjective, frozen: FrozenTeacher, student: Any, ids: Tensor) -> StepOutputs:
    with FeatureHooks(student, objective.student_layers) as hooks:
        logits = student(ids)
        features = dict(hooks.features)
    teacher = frozen.outputs(TeacherRequest(ids))
    return StepOutputs(logits, student_features=features, teacher_features=teacher.features)


def test_every_encoder_objective_is_a_registered_feature_objective() -> None:
    for name in [*ENCODER_OBJECTIVES, "embedding_distill"]:
        assert OBJECTIVES.entry(name).extra.get("kind") == "feature", name
        assert isinstance(build_objective(name), FeatureObjective)


def test_default_layer_maps_are_tinyberts_uniform_mapping(encoders: Any) -> None:
    teacher, student, ids, labels = encoders
    with bound("tinybert_hidden", {}, student, teacher, ids, labels) as (hidden, _):
        # g(m) = m * 6 / 2: embeddings -> embeddings, block 1 -> block 3, block 2 -> block 6
        assert hidden.student_layers == (
            "encoder.embeddings",
            "encoder.encoder.layer.0",
            "encoder.encoder.layer.1",
            "token_mask",
        )
        assert hidden.teacher_layers == (
            "encoder.embeddings",
            "encoder.encoder.layer.2",
            "encoder.encoder.layer.5",
            "token_mask",
        )
        assert list(hidden.projectors) == ["128_to_384"]  # one shared W_h, as the official fit_dense
    with bound("tinybert_attention", PARAMS["tinybert_attention"], student, teacher, ids, labels) as (att, _):
        assert att.teacher_layers[:2] == (
            "encoder.encoder.layer.2.attention.self.query",
            "encoder.encoder.layer.2.attention.self.key",
        )
        assert att.teacher_layers[2].startswith("encoder.encoder.layer.5.")
    explicit = {"layer_map": [[1, 4], [2, 6]], "shared_projection": False}
    with bound("tinybert_hidden", explicit, student, teacher, ids, labels) as (mapped, _):
        assert mapped.teacher_layers[:2] == ("encoder.encoder.layer.3", "encoder.encoder.layer.5")
        assert list(mapped.projectors) == ["pair0", "pair1"]
    with bound(
        "minilm_relations", {"relation_heads": 2, "teacher_layer": 4}, student, teacher, ids, labels
    ) as (
        rel,
        _,
    ):
        assert rel.student_layers[0] == "encoder.encoder.layer.1.attention.self.query"
        assert rel.teacher_layers[2] == "encoder.encoder.layer.3.attention.self.value"


@pytest.mark.parametrize("name", [*ENCODER_OBJECTIVES, "embedding_distill", "embedding_distill:cosine"])
def test_one_step_trains_the_student_and_the_projector(encoders: Any, name: str) -> None:
    teacher, student, ids, labels = encoders
    name, _, metric = name.partition(":")
    params = {**PARAMS[name], **({"metric": metric} if metric else {})}
    student.train()
    with bound(name, params, student, teacher, ids, labels) as (objective, frozen):
        student.zero_grad()
        value = objective(step(objective, frozen, student, ids))
        assert value.dim() == 0 and torch.isfinite(value) and float(value.detach()) > 0
        value.backward()
    touched = [p.grad for p in student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert touched and all(torch.isfinite(g).all() for g in touched)
    last_query = student.encoder.encoder.layer[1].attention.self.query.weight
    if name != "tinybert_hidden" and "embedding" not in name:
        assert last_query.grad is not None and last_query.grad.abs().sum() > 0
    own = list(objective.parameters())
    if name in ("tinybert_hidden", "embedding_distill"):  # W_h / the embedding projection: 128 -> 384
        assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    else:
        assert not own
    assert not any(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("name", ENCODER_OBJECTIVES)
def test_teacher_and_student_features_at_padded_tokens_change_nothing(encoders: Any, name: str) -> None:
    teacher, student, ids, labels = encoders
    student.eval()
    with bound(name, PARAMS[name], student, teacher, ids, labels) as (objective, frozen), torch.no_grad():
        outputs = step(objective, frozen, student, ids)
        mask = outputs.student_features["token_mask"]
        assert not bool(mask.all())
        base = float(objective(outputs))
        for features in (outputs.student_features, outputs.teacher_features):
            for path, value in features.items():
                if value.dim() == 3:
                    features[path] = value.masked_fill(mask[..., None] == 0, 1e3)
        assert float(objective(outputs)) == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("name", ENCODER_OBJECTIVES)
def test_a_student_identical_to_its_teacher_scores_zero(encoders: Any, name: str) -> None:
    teacher, _, ids, labels = encoders
    twin = copy.deepcopy(teacher).eval().requires_grad_(True)
    with bound(name, {}, twin, teacher, ids, labels) as (objective, frozen), torch.no_grad():
        assert float(objective(step(objective, frozen, twin, ids))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", [*ENCODER_OBJECTIVES, "embedding_distill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_and_huge_features_stay_finite(encoders: Any, name: str, dtype: torch.dtype) -> None:
    """The numerics sweep of the feature objectives, on encoder shapes."""
    teacher, student, ids, labels = encoders
    with bound(name, PARAMS[name], student, teacher, ids, labels) as (objective, frozen), torch.no_grad():
        real = step(objective, frozen, student, ids)

    def fake(features: dict[str, Tensor], scale: float, g: torch.Generator) -> dict[str, Tensor]:
        return {
            p: v if p == "token_mask" else (scale * torch.randn(v.shape, generator=g)).to(dtype)
            for p, v in features.items()
        }

    for scale in (0.0, 1e4):
        g = torch.Generator().manual_seed(0)
        leaves = {
            p: v.requires_grad_(p != "token_mask") for p, v in fake(real.student_features, scale, g).items()
        }
        outputs = StepOutputs(
            real.student_logits,
            student_features=leaves,
            teacher_features=fake(real.teacher_features, scale, g),
        )
        value = objective(outputs)
        assert torch.isfinite(value), scale
        value.backward()
        if not (dtype == torch.float16 and scale > 1):  # fp16 gradients of 1e4-scale features overflow
            assert all(torch.isfinite(v.grad).all() for v in leaves.values() if v.grad is not None)


def test_attention_from_the_taps_is_the_attention_transformers_returns(encoders: Any) -> None:
    teacher, _, ids, _ = encoders
    encoder = teacher.encoder
    previous = encoder.config._attn_implementation
    mask = ids != 0
    paths = {i: teacher.attention_paths(i) for i in range(teacher.num_layers)}
    try:
        encoder.set_attn_implementation("eager")
        with (
            torch.no_grad(),
            FeatureHooks(teacher, [p[k] for p in paths.values() for k in ("query", "key")]) as h,
        ):
            returned = encoder(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions
            taps = dict(h.features)
    finally:
        encoder.set_attn_implementation(previous)
    assert len(returned) == teacher.num_layers
    for i, p in paths.items():
        ours = attention_probs(taps[p["query"]], taps[p["key"]], heads=teacher.num_heads, mask=mask)
        assert ours.shape == returned[i].shape
        assert torch.allclose(ours, returned[i], atol=1e-5), i


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("tinybert_hidden", {"layer_map": "uniform"}, r"params\.layer_map: must be a non-empty list"),
        ("tinybert_hidden", {"layer_map": [[1]]}, r"params\.layer_map"),
        ("tinybert_hidden", {"layer_map": [[1, -2]]}, r"params\.layer_map"),
        ("tinybert_attention", {"layer_map": [[0, 0]]}, r"params\.layer_map: .*blocks >= 1"),
        (
            "tinybert_hidden",
            {"shared_projection": "yes"},
            r"params\.shared_projection: must be true or false",
        ),
        ("tinybert_attention", {"relation_heads": 0}, r"params\.relation_heads: must be a whole number"),
        ("minilm_attention", {"teacher_layer": 0}, r"params\.teacher_layer: must be a whole number"),
        ("minilm_relations", {"relations": ["qq", "qx"]}, r"params\.relations: must be a non-empty list"),
        ("minilm_relations", {"relations": ["vv", "vv"]}, r"params\.relations"),
        ("embedding_distill", {"metric": "l1"}, r"params\.metric: must be one of mse, cosine"),
        ("minilm_attention", {"relation_head": 2}, r"did you mean 'relation_heads'"),
    ],
)
def test_bad_params_are_refused_in_one_line(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        build_objective(name, params)
    assert "\n" not in str(err.value)


def test_models_that_do_not_fit_are_refused_in_one_line(encoders: Any) -> None:
    from distill.models import build_model

    teacher, student, ids, labels = encoders
    cnn = build_model("small_cnn", num_classes=2, input_shape=(1, 8, 8), channels=[4, 8, 8])
    cases = [
        (
            "minilm_attention",
            {},
            student,
            teacher,
            "the student has 2 attention heads and the teacher 12; set ",
        ),
        ("minilm_relations", {}, student, teacher, "set relation_heads"),
        ("tinybert_attention", {}, student, teacher, "set relation_heads"),
        ("tinybert_hidden", {"layer_map": [[3, 1]]}, student, teacher, "the student has 2 blocks"),
        ("tinybert_hidden", {"layer_map": [[1, 7]]}, student, teacher, "the teacher has 6 blocks"),
        (
            "minilm_relations",
            {"teacher_layer": 7, "relation_heads": 2},
            student,
            teacher,
            "beyond the teacher's",
        ),
        ("minilm_relations", {}, student, None, "needs the live teacher model"),
        ("tinybert_hidden", {}, cnn, teacher, "reads a text encoder's blocks .* the student is a SmallCNN"),
    ]
    for name, params, s, t, match in cases:
        objective = build_objective(name, params)
        with pytest.raises(UserError, match=match) as err:
            bind_feature_objectives([objective], [name], s, t)
        assert "\n" not in str(err.value)
    for name, params, match in [
        (
            "minilm_relations",
            {"relation_heads": 12},
            r"12 heads do not divide the hidden sizes 128 \(student\) ",
        ),
        ("embedding_distill", {"student_layer": 1}, r"reads sentence embeddings \(B, D\)"),
    ]:
        with pytest.raises(UserError, match=match) as err, bound(name, params, student, teacher, ids, labels):
            pass
        assert "\n" not in str(err.value)

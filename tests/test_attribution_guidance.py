"""S02 attention-guided distillation: the attention injection (`distill.models.attention_injection`), the
teacher's attribution maps and the `attribution_guidance` objective
(`distill.objectives.attribution_guidance`)."""

from __future__ import annotations

import gc
import sys
from contextlib import nullcontext
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from data_helpers import missing_data, require_data
from distill.errors import UserError
from distill.models import build_model
from distill.models.attention_injection import (
    INJECTED,
    OPERATORS,
    AttentionInjection,
    attention_probabilities,
    compose,
)
from distill.models.hooks import FeatureHooks
from distill.objectives import StepOutputs, build_objective
from distill.objectives.attribution_guidance import (
    ATTRIBUTIONS,
    AttributionGuidance,
    CachedMaps,
    attribution_map,
    gradient_scores,
    teacher_logits,
    value_zeroing_map,
)
from distill.teachers import FrozenTeacher
from distill.train.feature_taps import bind_feature_objectives, probe_and_build

NAME = "attribution_guidance"
TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# No dropout (training and eval mode differ only by the injection); weights large enough to mix tokens.
QUIET = {
    "vocab_size": 100,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.3,
}


def tiny(seed: int = 0, **config: int | float) -> nn.Module:
    """A randomly initialised 2-block BERT classifier of hidden size 32."""
    torch.manual_seed(seed)
    settings = {**TINY, **QUIET, **config}
    return build_model("hf_encoder", num_classes=2, input_shape=(8,), config=settings, dropout=0.0)


def padded_ids() -> Tensor:
    """Three texts of 7, 4 and 2 tokens, right-padded with 0."""
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[1, 4:] = 0
    ids[2, 2:] = 0
    return ids


def bound(objective: AttributionGuidance, student: nn.Module, teacher: nn.Module, batch: Tensor) -> None:
    """Bind and build the objective the way the trainer does."""
    bind_feature_objectives([objective], [NAME], student, teacher)
    frozen = FrozenTeacher(teacher)
    frozen.attach("cpu", nullcontext, objective.teacher_layers)
    probe_and_build([objective], student, frozen, (batch, torch.zeros(len(batch))), lambda v: v, n_data=4)
    frozen.detach()


# ------------------------------------------------------------------------------------------ injection


def test_injection_without_a_map_gives_the_sdpa_models_logits() -> None:
    student = tiny().eval()
    ids = padded_ids()
    assert student.encoder.config._attn_implementation == "sdpa"
    plain = student(ids)
    injection = AttentionInjection(student, None, "replace")
    with injection.active(None):
        assert student.encoder.config._attn_implementation == INJECTED
        switched = student(ids)
        unpadded = student(ids[:, :2])  # no padding: transformers passes no mask
    assert student.encoder.config._attn_implementation == "sdpa"
    torch.testing.assert_close(switched, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(unpadded, student(ids[:, :2]), atol=1e-5, rtol=0)


def reference(scores: Tensor, guide: Tensor, operator: str, allowed: Tensor) -> Tensor:
    """The float64 composition written out (`distill.models.attention_injection`'s docstring)."""
    s = scores.double().masked_fill(~allowed, float("-inf"))
    m = guide.double()[:, None] * allowed
    if operator == "add":
        return torch.softmax(s + m, dim=-1)
    p = torch.softmax(s, dim=-1)
    mixed = {"multiply": p * m, "average": (p + m) / 2, "replace": m.expand_as(p)}[operator]
    return mixed / mixed.sum(-1, keepdim=True)


@pytest.mark.parametrize("operator", OPERATORS)
def test_each_operator_matches_a_float64_reference(operator: str) -> None:
    g = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(2, 3, 4, 5, generator=g)  # (B, H, Q, K)
    keys = torch.tensor([[True] * 5, [True, True, True, False, False]])
    allowed = keys[:, None, None, :]
    guide = torch.rand(2, 4, 5, generator=g) * keys[:, None, :]
    guide = guide / guide.sum(-1, keepdim=True)
    got = compose(scores, guide, operator, allowed)
    want = reference(scores, guide, operator, allowed)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert got.dtype == scores.dtype
    assert got[1, ..., 3:].abs().max() == 0  # padded keys get no weight
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 4))


@pytest.mark.parametrize("operator", OPERATORS)
def test_each_operator_runs_inside_the_model(operator: str) -> None:
    """With a one-head model, a map that the operator leaves unchanged reproduces the model: `replace` and
    `average` by the model's own attention, `multiply` by a uniform map, `add` by a constant shift of the
    scores; any other map changes the logits."""
    student = tiny(num_attention_heads=1).eval()
    ids = padded_ids()
    mask = ids != 0
    plain = student(ids)
    (own,) = attention_probabilities(student, ids, mask, [0])
    uniform = mask[:, None, :].float().expand(-1, 7, -1)
    uniform = uniform / uniform.sum(-1, keepdim=True)
    neutral = {"replace": own[:, 0], "average": own[:, 0], "multiply": uniform, "add": torch.ones(3, 7, 7)}
    injection = AttentionInjection(student, [0], operator)
    with injection.active(neutral[operator]):
        same = student(ids)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    peaked = torch.zeros(3, 7, 7)
    peaked[..., 0] = 5.0  # every query on the first token
    with injection.active(peaked):
        changed = student(ids)
    assert (changed - plain).abs().max() > 1e-4
    assert student.encoder.config._attn_implementation == "sdpa"


def test_attention_probabilities_are_the_eager_models() -> None:
    model = tiny()
    ids = padded_ids()
    mask = ids != 0
    got = attention_probabilities(model, ids, mask, [0, 1])
    model.encoder.config._attn_implementation = "eager"
    out = model.encoder(input_ids=ids, attention_mask=mask.long(), output_attentions=True)
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], out.attentions[layer], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ maps


def test_the_teachers_forward_without_trimming_is_its_forward() -> None:
    teacher = tiny().eval()
    ids = padded_ids()
    torch.testing.assert_close(teacher_logits(teacher, ids != 0, ids=ids), teacher(ids))


@pytest.mark.parametrize("method", ATTRIBUTIONS)
def test_each_attribution_is_a_finite_map_over_real_tokens(method: str) -> None:
    teacher = tiny().eval()
    ids = padded_ids()
    mask = ids != 0
    found = attribution_map(method, teacher, ids, mask, ig_steps=4)
    assert found.shape == (3, 7, 7) and found.dtype == torch.float32
    assert torch.isfinite(found).all() and (found >= 0).all()
    assert found[1, :, 4:].abs().max() == 0 and found[2, :, 2:].abs().max() == 0  # padded keys get 0
    torch.testing.assert_close(found.sum(-1), torch.ones(3, 7))
    assert not found.requires_grad
    assert found[0].std() > 0  # not uniform
    if method not in ("attention", "value_zeroing"):  # a token distribution, the same for every query
        torch.testing.assert_close(found, found[:, :1].expand_as(found))


def test_attention_map_is_the_head_averaged_attention() -> None:
    teacher = tiny()
    ids = padded_ids()
    mask = ids != 0
    (last,) = attention_probabilities(teacher, ids, mask, [1])
    torch.testing.assert_close(attribution_map("attention", teacher, ids, mask), last.mean(1))
    both = torch.stack(attention_probabilities(teacher, ids, mask, [0, 1])).mean((0, 2))
    torch.testing.assert_close(attribution_map("attention", teacher, ids, mask, layer="mean"), both)


def slow_value_zeroing(model: nn.Module, ids: Tensor, layer: int) -> Tensor:
    """Mohebbi et al.'s procedure, one text (no padding) and one zeroed token at a time."""
    encoder = model.encoder
    hidden = encoder(input_ids=ids[None], output_hidden_states=True).hidden_states
    block = encoder.encoder.layer[layer]
    length = ids.shape[0]
    scores = torch.zeros(length, length, dtype=hidden[0].dtype)
    for zeroed in range(length):

        def zero(_m: nn.Module, _a: object, out: Tensor, j: int = zeroed) -> Tensor:
            out = out.clone()
            out[:, j] = 0.0
            return out

        handle = block.attention.self.value.register_forward_hook(zero)
        try:
            changed = block(hidden[layer])
        finally:
            handle.remove()
        distance = 1 - nn.functional.cosine_similarity(changed[0], hidden[layer + 1][0], dim=-1)
        scores[:, zeroed] = distance
    return scores / scores.sum(-1, keepdim=True)


@torch.no_grad()
def test_value_zeroing_matches_the_one_text_at_a_time_procedure() -> None:
    """In float64, where `1 - cos` (the reference's distance) keeps its digits; the float32 map agrees."""
    model = tiny().eval().double()
    ids = padded_ids()
    mask = ids != 0
    lengths = mask.sum(1).tolist()
    for layer in (0, 1):
        batched = value_zeroing_map(model, ids, mask, layer)
        for b, n in enumerate(lengths):
            want = slow_value_zeroing(model, ids[b, :n], layer)
            torch.testing.assert_close(batched[b, :n, :n], want, atol=1e-9, rtol=1e-7)
        single = value_zeroing_map(model.float(), ids, mask, layer)
        torch.testing.assert_close(single, batched.float(), atol=1e-4, rtol=1e-3)
        model.double()
    both = (value_zeroing_map(model, ids, mask, 0) + value_zeroing_map(model, ids, mask, 1)) / 2
    torch.testing.assert_close(value_zeroing_map(model, ids, mask, "mean"), both)


def test_gradient_scores_are_the_gradients_norms() -> None:
    """Captum's saliency and gradient x activation on the word embeddings, against autograd."""
    teacher = tiny().eval()
    ids = padded_ids()
    mask = ids != 0
    embeds = teacher.encoder.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = teacher_logits(teacher, mask, embeds=embeds)
    target = logits.argmax(-1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), embeds)
    saliency = gradient_scores("saliency", teacher, ids, mask)
    torch.testing.assert_close(saliency, grad.norm(dim=-1) * mask)
    times = gradient_scores("layer_gradient_x_activation", teacher, ids, mask)
    torch.testing.assert_close(times, (grad * embeds).norm(dim=-1) * mask)


def test_integrated_gradients_match_a_float64_gauss_legendre_reference() -> None:
    """Captum's layer IG (its default Gauss-Legendre rule) against the integral written out in float64:
    `(e - b) * sum_k w_k grad F(b + a_k (e - b))` on the word embeddings, b the pad token's embedding."""
    import numpy as np

    teacher = tiny().eval().double()
    ids = padded_ids()
    mask = ids != 0
    steps = 6
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = (nodes + 1) / 2, weights / 2
    words = teacher.encoder.get_input_embeddings()
    embeds, baseline = words(ids).detach(), words(torch.zeros_like(ids)).detach()
    target = teacher_logits(teacher, mask, ids=ids).argmax(-1)
    total = torch.zeros_like(embeds)
    for alpha, weight in zip(alphas.tolist(), weights.tolist(), strict=True):
        point = (baseline + alpha * (embeds - baseline)).requires_grad_(True)
        logits = teacher_logits(teacher, mask, embeds=point)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), point)
        total += weight * grad
    want = ((embeds - baseline) * total).norm(dim=-1) * mask
    found = gradient_scores("integrated_gradients", teacher, ids, mask, ig_steps=steps)
    torch.testing.assert_close(found, want.float(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ cache


@pytest.mark.parametrize("method", ATTRIBUTIONS)
def test_cached_maps_are_the_uncached_maps(method: str) -> None:
    """A cache miss (texts sorted by length, computed 2 at a time, each cut to its longest) and a hit give
    the whole batch's map on real (query, key) pairs; a padded query's row is uniform over the real keys."""
    teacher = tiny().eval()
    ids = padded_ids()
    mask = ids != 0
    make = partial(attribution_map, method, ig_steps=4)
    whole = make(teacher, ids, mask)
    cache = CachedMaps(make, (method, "test"), pad_id=0, chunk=2)
    real = mask[:, :, None] & mask[:, None, :]
    for computed in (3, 3):  # the second call reads everything back
        found = cache(teacher, ids, mask)
        assert cache.computed == computed
        torch.testing.assert_close(found[real], whole[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found[1, 4:], torch.full((3, 7), 0.25) * mask[1])
    assert found.shape == whole.shape and found.dtype == whole.dtype


def test_the_cache_is_per_text_per_teacher_and_per_weights() -> None:
    teacher, other = tiny(0).eval(), tiny(1).eval()
    ids = padded_ids()
    make = partial(attribution_map, "attention")
    cache = CachedMaps(make, ("attention", "test-keys"), pad_id=0)
    cache(teacher, ids, ids != 0)
    swapped = ids[[2, 0]]  # texts already seen, in another batch shape: nothing to compute
    cache(teacher, swapped, swapped != 0)
    assert cache.computed == 3
    twice = torch.cat([ids[:1], ids[:1]])
    once = CachedMaps(make, ("attention", "test-twice"), pad_id=0)
    once(teacher, twice, twice != 0)
    assert once.computed == 1  # a text twice in one batch is computed once
    cache(other, ids, ids != 0)  # another teacher: its own maps
    assert cache.computed == 6
    with torch.no_grad():
        next(teacher.parameters()).add_(0.1)  # the teacher changed: its old maps are not served
    fresh = cache(teacher, ids, ids != 0)
    assert cache.computed == 9
    real = (ids != 0)[:, :, None] & (ids != 0)[:, None, :]
    torch.testing.assert_close(fresh[real], make(teacher, ids, ids != 0)[real], atol=1e-6, rtol=1e-5)


def test_the_objective_guides_the_same_with_and_without_the_cache() -> None:
    ids = padded_ids()
    outputs = []
    for cache_maps in (False, True, True):  # the second cached run reads the maps back
        student, teacher = tiny(0), tiny(1)
        objective = build_objective(NAME, {"attribution": "saliency", "cache_maps": cache_maps})
        bound(objective, student, teacher, ids)
        outputs.append(student.train()(ids))
        objective.release()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-5, rtol=1e-5)


def test_gradient_attributions_without_captum_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    ids = padded_ids()
    with pytest.raises(UserError, match=r"needs captum: pip install 'distill\[text\]'"):
        attribution_map("saliency", tiny(), ids, ids != 0)


# ------------------------------------------------------------------------------------------ objective


def test_the_objective_injects_only_in_training_and_goes_with_its_hooks() -> None:
    student, teacher = tiny(0), tiny(1)
    ids = padded_ids()
    plain = student.eval()(ids)
    objective = build_objective(NAME, {"operator": "replace", "student_layers": [1]})
    bound(objective, student, teacher, ids)
    assert objective.student_layers == objective.teacher_layers == ("encoder.embeddings",)
    torch.testing.assert_close(student.eval()(ids), plain, atol=0, rtol=0)  # eval: the student alone
    trained = student.train()(ids)  # no dropout in these models: only the injection can change it
    assert (trained - plain).abs().max() > 1e-4
    assert student.encoder.config._attn_implementation == "sdpa"
    del objective
    gc.collect()
    assert not student.encoder._forward_pre_hooks and not student.encoder._forward_hooks
    torch.testing.assert_close(student.train()(ids), plain, atol=1e-5, rtol=0)


def test_release_removes_the_injection() -> None:
    student, teacher = tiny(0), tiny(1)
    ids = padded_ids()
    plain = student.eval()(ids)
    objective = build_objective(NAME, {"attribution": "value_zeroing", "operator": "multiply"})
    bound(objective, student, teacher, ids)
    assert (student.train()(ids) - plain).abs().max() > 1e-4
    objective.release()
    torch.testing.assert_close(student.train()(ids), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"attribution": "deeplift"}, "params.attribution: must be one of attention, value_zeroing"),
        ({"operator": "sum"}, "params.operator: must be one of add, multiply, average, replace"),
        ({"student_layers": []}, "params.student_layers: must be 'all' or a non-empty list"),
        ({"student_layers": [True]}, "params.student_layers"),
        ({"attribution": "saliency", "teacher_layer": 2}, "params.teacher_layer: applies to attention"),
        ({"teacher_layer": "last"}, "params.teacher_layer: must be a block index or 'mean'"),
        ({"ig_steps": 0}, "params.ig_steps: must be a whole number from 1 to 1024"),
        ({"cache_maps": "yes"}, "params.cache_maps: must be true or false"),
        ({"steps": 4}, "has no parameter 'steps'"),
    ],
)
def test_bad_params_are_refused_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        build_objective(NAME, params)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("student", "teacher", "params", "message"),
    [
        ("tiny", None, {}, "needs the teacher model itself"),
        ("cnn", "tiny", {}, "the student must be an 'hf_encoder' model"),
        ("tiny", "tiny", {"student_layers": [2]}, "student_layers: block 2 is out of range"),
        ("tiny", "tiny", {"teacher_layer": -3}, "teacher_layer -3 is out of range"),
        ("tiny", "other_vocab", {}, "both need one tokenizer"),
    ],
)
def test_models_it_cannot_guide_are_refused_in_one_line(
    student: str, teacher: str | None, params: dict, message: str
) -> None:
    models = {
        "tiny": tiny,
        "other_vocab": lambda: tiny(vocab_size=120),
        "cnn": lambda: build_model("small_cnn", num_classes=2, input_shape=(1, 8, 8), channels=[4, 8, 8]),
    }
    objective = build_objective(NAME, params)
    with pytest.raises(UserError, match=message) as caught:
        bind_feature_objectives([objective], [NAME], models[student](), teacher and models[teacher]())
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------ real models


@pytest.mark.slow
def test_a_training_step_on_real_models_is_guided() -> None:
    """MiniLM teacher, a fresh 2-block student, four SMS texts (at most 32 tokens): the injection changes
    the student's training-mode output, not its eval-mode output; the step's loss backpropagates."""
    require_data("textcls/SMSSpamCollection.tsv")
    from distill.data import build_data
    from distill.pretrained import pretrained_folder

    try:
        pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))
    data = build_data("sms_spam", max_length=32)
    ids = torch.stack([data.train[i][0] for i in range(4)])
    labels = torch.stack([data.train[i][1] for i in range(4)])
    teacher = build_model("hf_encoder", num_classes=2, input_shape=(32,), path="all-MiniLM-L6-v2")
    torch.manual_seed(0)
    student = build_model(
        "hf_encoder",
        num_classes=2,
        input_shape=(32,),
        path="all-MiniLM-L6-v2",
        dropout=0.0,
        config={
            "num_hidden_layers": 2,
            "hidden_size": 128,
            "num_attention_heads": 2,
            "intermediate_size": 512,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    )
    plain = student.eval()(ids)
    objective = build_objective(NAME, {"attribution": "layer_gradient_x_activation", "operator": "average"})
    bound(objective, student, teacher, ids)
    torch.testing.assert_close(student.eval()(ids), plain, atol=1e-5, rtol=0)
    student.train()
    with FeatureHooks(student, objective.student_layers) as hooks:
        logits = student(ids)
        step = StepOutputs(
            student_logits=logits,
            labels=labels,
            student_features=dict(hooks.features),
            teacher_features={p: torch.zeros(1) for p in objective.teacher_layers},
        )
    assert (logits - plain).abs().max() > 1e-4
    value = objective(step)
    assert value.item() == 0.0
    (nn.functional.cross_entropy(logits, labels) + value).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert student.encoder.config._attn_implementation == "sdpa"
    torch.testing.assert_close(student.eval()(ids), plain, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_benchmarks_quick_run_writes_its_tables(tmp_path) -> None:
    """`benchmarks/text_attribution.py --quick`: timing, a two-cell sweep, the chosen pair against the student
    alone and KD; the cached and uncached maps agree."""
    require_data("textcls/SMSSpamCollection.tsv")
    import importlib.util
    from pathlib import Path

    from distill.pretrained import pretrained_folder

    try:
        pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "text_attribution.py"
    spec = importlib.util.spec_from_file_location("text_attribution_bench", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "quick.md"
    assert script.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## Cost of one batch of maps", "## Validation sweep (one seed)", "## Test split"):
        assert heading in text
    assert "| student alone |" in text and "| KD |" in text and "+ KD |" in text
    differences = [
        float(line.split("|")[-2]) for line in text.splitlines() if line.startswith("| saliency |")
    ]
    assert differences and max(differences) < 1e-4

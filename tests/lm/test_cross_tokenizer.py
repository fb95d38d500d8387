"""Issue 20: cross-tokenizer distillation. ULD and the aligned (GOLD) loss against float64 references written
here and against TRL's GOLD functions; hypothesis properties of ULD; the byte alignment; a recipe whose
teacher has its own tokenizer, end to end, and the refusals around it."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl

from distill.cli import main
from distill.data.token_alignment import (
    Retokenizer,
    align_groups,
    shared_token_pairs,
    token_bytes,
)
from distill.losses.cross_tokenizer import aligned_kd_loss, group_log_probs, uld_loss
from distill.objectives import StepOutputs, build_objective

# ------------------------------------------------------------------ float64 references


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sorted_l1(p: np.ndarray, q: np.ndarray) -> float:
    width = max(len(p), len(q))
    a = np.zeros(width)
    b = np.zeros(width)
    a[: len(p)] = np.sort(p)[::-1]
    b[: len(q)] = np.sort(q)[::-1]
    return float(np.abs(a - b).sum())


def _uld_reference(s, t, s_mask, t_mask, ts=1.0, tt=1.0) -> float:
    values = []
    for b in range(s.shape[0]):
        rows_s = [i for i in range(s.shape[1]) if s_mask[b, i]]
        rows_t = [i for i in range(t.shape[1]) if t_mask[b, i]]
        for i, j in zip(rows_s, rows_t, strict=False):  # truncated to the shorter
            values.append(_sorted_l1(_softmax(s[b, i] / ts), _softmax(t[b, j] / tt)))
    return sum(values) / max(len(values), 1)


def _group_reference(logits, labels, groups) -> list[np.ndarray]:
    """Chain rule per group, in probabilities: last position's distribution x earlier actual tokens."""
    out = []
    for positions in groups:
        probs = [_softmax(logits[b, i]) for b, i in positions]
        scalar = math.prod(p[labels[b, i]] for p, (b, i) in zip(probs[:-1], positions[:-1], strict=True))
        out.append(probs[-1] * scalar)
    return out


def _jsd_reference(t: np.ndarray, s: np.ndarray, beta: float) -> float:
    def kl(p, q):
        return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0))

    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = beta * t + (1 - beta) * s
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def _ids(groups: list[list[tuple[int, int]]], shape: tuple[int, int]) -> torch.Tensor:
    out = torch.full(shape, -1)
    for g, positions in enumerate(groups):
        for b, i in positions:
            out[b, i] = g
    return out


# ------------------------------------------------------------------ ULD


def test_uld_matches_a_float64_reference_with_truncation_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 6, 7, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    s_mask = torch.rand(3, 6, generator=g) > 0.3
    t_mask = torch.rand(3, 5, generator=g) > 0.3
    expected = _uld_reference(s.numpy(), t.numpy(), s_mask.numpy(), t_mask.numpy(), 2.0, 0.5)
    value = uld_loss(
        s.float(),
        t.float(),
        student_mask=s_mask,
        teacher_mask=t_mask,
        student_temperature=2.0,
        teacher_temperature=0.5,
    )
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    per_position = uld_loss(s, t, student_mask=s_mask, teacher_mask=t_mask, reduction="none")
    assert per_position.shape == (3, 6) and bool((per_position[~s_mask] == 0).all())


def test_uld_computes_in_float32_for_bfloat16_and_stays_finite_for_minus_inf() -> None:
    s = torch.randn(4, 9).bfloat16().requires_grad_()
    t = torch.randn(4, 5)
    t[:, 0] = -math.inf
    value = uld_loss(s, t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad.abs().sum() > 0


def test_uld_is_zero_without_counted_positions() -> None:
    s = torch.randn(2, 3, 5, requires_grad=True)
    value = uld_loss(s, torch.randn(2, 4, 6), student_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()


logit_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda v: st.tuples(
            st.lists(st.floats(-8, 8), min_size=n * v, max_size=n * v).map(
                lambda x: torch.tensor(x).reshape(n, v)
            ),
            st.lists(st.floats(-8, 8), min_size=n * v, max_size=n * v).map(
                lambda x: torch.tensor(x).reshape(n, v)
            ),
            st.permutations(list(range(v))),
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(logit_rows)
def test_uld_properties(rows: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    """0 between identical distributions, symmetric, and blind to any reordering of the vocabulary."""
    a, b, order = rows
    assert uld_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(a, b).item() == pytest.approx(uld_loss(b, a).item(), abs=1e-6)
    assert uld_loss(a[:, order], b).item() == pytest.approx(uld_loss(a, b).item(), abs=1e-6)
    wider = torch.cat([b, torch.full((b.shape[0], 3), -math.inf)], 1)  # zero-probability entries pad
    assert uld_loss(a, wider).item() == pytest.approx(uld_loss(a, b).item(), abs=1e-6)


# ------------------------------------------------------------------ the aligned (GOLD) loss

GROUPS_S = [[(0, 0)], [(0, 1), (0, 2)], [(0, 4)], [(1, 0), (1, 1), (1, 2)], [(1, 3)]]
GROUPS_T = [[(0, 0), (0, 1)], [(0, 2)], [(0, 3)], [(1, 1)], [(1, 2), (1, 3)]]


def _aligned_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 6, generator=g, dtype=dtype) * 2
    t = torch.randn(2, 4, 8, generator=g, dtype=dtype) * 2
    s_labels = torch.randint(0, 6, (2, 5), generator=g)
    t_labels = torch.randint(0, 8, (2, 4), generator=g)
    matched = torch.tensor([[0, 2], [3, 0], [5, 5], [7, 1]])
    return s, t, s_labels, t_labels, matched


@pytest.mark.parametrize(
    ("beta", "weights"), [(0.5, None), (0.0, (0.7, 0.2)), (1.0, None), (0.3, (1.0, 0.0))]
)
def test_aligned_loss_matches_a_float64_reference(beta: float, weights: tuple[float, float] | None) -> None:
    s, t, s_labels, t_labels, matched = _aligned_inputs()
    qs = _group_reference(s.numpy(), s_labels.numpy(), GROUPS_S)
    qt = _group_reference(t.numpy(), t_labels.numpy(), GROUPS_T)
    w_m, w_u = weights if weights is not None else (len(matched) / 8, 1 - len(matched) / 8)
    t_ids, s_ids = matched[:, 0].numpy(), matched[:, 1].numpy()
    s_rest = [i for i in range(6) if i not in s_ids]
    t_rest = [i for i in range(8) if i not in t_ids]
    expected = np.mean(
        [
            w_m * _jsd_reference(a[t_ids], b[s_ids], beta) + w_u * _sorted_l1(b[s_rest], a[t_rest])
            for a, b in zip(qt, qs, strict=True)
        ]
    )
    value = aligned_kd_loss(
        s.float(),
        t.float(),
        student_labels=s_labels,
        teacher_labels=t_labels,
        student_groups=_ids(GROUPS_S, (2, 5)),
        teacher_groups=_ids(GROUPS_T, (2, 4)),
        matched=matched,
        beta=beta,
        matched_weight=None if weights is None else weights[0],
        unmatched_weight=None if weights is None else weights[1],
    )
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    unmapped = aligned_kd_loss(
        s,
        t,
        student_labels=s_labels,
        teacher_labels=t_labels,
        student_groups=_ids(GROUPS_S, (2, 5)),
        teacher_groups=_ids(GROUPS_T, (2, 4)),
    )
    assert unmapped.item() == pytest.approx(np.mean([_sorted_l1(b, a) for a, b in zip(qt, qs, strict=True)]))


def test_aligned_loss_gradients_are_finite_with_minus_inf_logits() -> None:
    s, t, s_labels, t_labels, matched = _aligned_inputs(torch.float32)
    s = s.clone()
    t = t.clone()
    s[..., 3] = -math.inf  # a vocabulary entry masked out on both sides
    t[..., 4] = -math.inf
    s.requires_grad_()
    value = aligned_kd_loss(
        s.bfloat16(),
        t,
        student_labels=s_labels.clamp(max=2),
        teacher_labels=t_labels.clamp(max=3),
        student_groups=_ids(GROUPS_S, (2, 5)),
        teacher_groups=_ids(GROUPS_T, (2, 4)),
        matched=matched,
    )
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_aligned_kd_with_one_shared_tokenizer_is_the_generalized_jsd() -> None:
    from distill.losses import generalized_jsd

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    labels = torch.randint(0, 9, (2, 4), generator=g).masked_fill(~mask, -100)
    step = StepOutputs(student_logits=s, teacher_logits=t, labels=labels, mask=mask)
    value = build_objective("aligned_kd", {"beta": 0.5})(step)
    assert value.item() == pytest.approx(generalized_jsd(s, t, mask=mask, beta=0.5).item(), rel=1e-5)
    assert build_objective("uld")(step).item() == pytest.approx(
        uld_loss(s, t, student_mask=mask, teacher_mask=mask).item()
    )


# ------------------------------------------------------------------ against TRL's GOLD


def _gold(hybrid: bool, matched_weight: float | None = None, unmatched_weight: float | None = None):
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=True,
        uld_token_merge_strategy="bayesian",
        uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=matched_weight,
        uld_hybrid_unmatched_weight=unmatched_weight,
        beta=0.5,
    )
    return gold.ULDLoss(config)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.data())
def test_alignment_groups_match_golds_byte_walk(widths: list[int], data: st.DataObject) -> None:
    """Same total bytes, no zero-width tokens: the groups are GOLD's `_align_by_byte_offsets`."""
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    total = sum(widths)
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=total - 1)) if total > 1 else set())
    t_widths = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    def offsets(ws: list[int]) -> list[tuple[int, int]]:
        ends = np.cumsum(ws).tolist()
        return [(e - w, e) for w, e in zip(ws, ends, strict=True)]

    s_groups, t_groups = gold.ULDLoss._align_by_byte_offsets(offsets(widths), offsets(t_widths))
    ours_s, ours_t, count = align_groups(widths, t_widths)
    # ours drops groups holding a first token (nothing predicts it); GOLD's answer regions start later
    expected = [(s, t) for s, t in zip(s_groups, t_groups, strict=True) if 0 not in s and 0 not in t]
    got = [
        ([i for i, g in enumerate(ours_s) if g == k], [i for i, g in enumerate(ours_t) if g == k])
        for k in range(count)
    ]
    assert got == expected


def test_group_distributions_match_golds_bayesian_merge() -> None:
    loss = _gold(hybrid=False)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 6, 7, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 7, (6,), generator=g)
    groups = [[0], [1, 2, 3], [4, 5]]
    merged = loss._merge_probabilities_with_alignment_groups(
        torch.softmax(logits[0], -1), groups, tokens.tolist()
    )
    ids = _ids([[(0, i) for i in group] for group in groups], (1, 6))
    ours = group_log_probs(logits, tokens[None], ids).exp()
    torch.testing.assert_close(ours, merged)


def test_hybrid_loss_matches_golds_on_aligned_distributions() -> None:
    s_tok = bpe(addition_rows(100, seed=1), vocab_size=270)
    t_tok = bpe(addition_rows(100, seed=2), vocab_size=300)
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    config = SimpleNamespace(**{**vars(_config_namespace()), "uld_use_hybrid_loss": True})
    loss = gold.ULDLoss(config, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    g = torch.Generator().manual_seed(2)
    s_logits = torch.randn(1, 5, len(s_tok), generator=g, dtype=torch.float64)
    t_logits = torch.randn(1, 4, len(t_tok), generator=g, dtype=torch.float64)
    s_labels, t_labels = (
        torch.randint(0, len(s_tok), (1, 5), generator=g),
        torch.randint(0, len(t_tok), (1, 4), generator=g),
    )
    gs, gt = [[(0, 0), (0, 1)], [(0, 2)], [(0, 3), (0, 4)]], [[(0, 0)], [(0, 1), (0, 2)], [(0, 3)]]
    s_ids, t_ids = _ids(gs, (1, 5)), _ids(gt, (1, 4))
    qs = group_log_probs(s_logits, s_labels, s_ids).exp()
    qt = group_log_probs(t_logits, t_labels, t_ids).exp()
    expected = loss._compute_hybrid_uld_loss(qs, qt)
    matched = torch.tensor(sorted(loss._vocab_mapping.items()))
    value = aligned_kd_loss(
        s_logits,
        t_logits,
        student_labels=s_labels,
        teacher_labels=t_labels,
        student_groups=s_ids,
        teacher_groups=t_ids,
        matched=matched,
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    # our pairs: GOLD's string matches minus the special tokens (they spell no text)
    ours = {tuple(p) for p in shared_token_pairs(token_bytes(t_tok), token_bytes(s_tok)).tolist()}
    specials = set(t_tok.all_special_ids)
    assert ours == {(a, b) for a, b in loss._vocab_mapping.items() if a not in specials}


def _config_namespace() -> SimpleNamespace:
    return SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=False,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )


def test_uld_matches_golds_positional_uld() -> None:
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    loss = gold.ULDLoss(_config_namespace())
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(1, 7, 10, generator=g), torch.randn(1, 5, 14, generator=g)
    s_labels, t_labels = torch.randint(0, 10, (1, 7), generator=g), torch.randint(0, 14, (1, 5), generator=g)
    s_labels[0, :2], t_labels[0, :1] = -100, -100  # a prompt on each side
    expected = loss._compute_distillation_loss(s, t, s_labels, t_labels, s_labels, t_labels)
    # GOLD's "observed" slice reads the logits at the answer positions themselves: the same rows, masked
    value = uld_loss(s, t, student_mask=s_labels != -100, teacher_mask=t_labels != -100)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ alignment of real tokenizers


def test_retokenizer_groups_spell_the_same_text() -> None:
    text = [{"text": "the quick brown fox jumps over the lazy dog; then the fox sleeps by the river"}] * 30
    student, teacher = bpe(text, vocab_size=280), bpe(text, vocab_size=330)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    line = "then the quick dog sleeps over the brown river"
    ids = student(line, add_special_tokens=False)["input_ids"]
    assert b"".join(s_bytes[i] for i in ids) == line.encode()
    batch = Retokenizer.for_pair(student, teacher)(torch.tensor([ids]), None, None)
    t_ids = batch.input_ids[0].tolist()
    assert t_ids == teacher(line, add_special_tokens=False)["input_ids"]
    count = int(batch.student_groups.max()) + 1
    assert count == int(batch.teacher_groups.max()) + 1 and count > 3
    for k in range(count):  # position i predicts token i + 1
        s_tokens = [ids[i + 1] for i in (batch.student_groups[0] == k).nonzero().flatten().tolist()]
        t_tokens = [t_ids[i + 1] for i in (batch.teacher_groups[0] == k).nonzero().flatten().tolist()]
        assert b"".join(s_bytes[i] for i in s_tokens) == b"".join(t_bytes[i] for i in t_tokens)
    assert batch.mask[0, : len(t_ids) - 1].all() and not batch.mask[0, len(t_ids) - 1 :].any()


# ------------------------------------------------------------------ recipes


def _recipe(folder: Path, objectives: list[dict], **changes: object) -> dict:
    recipe = {
        "name": "cross-tokenizer",
        "data": {
            "name": "jsonl",
            "params": {
                "path": str(folder / "train.jsonl"),
                "tokenizer": str(folder / "tok"),
                "max_length": 48,
            },
            "batch_size": 8,
        },
        "teacher": {
            "name": "hf",
            "params": {"config": TEACHER, "tokenizer": str(folder / "teacher-tok")},
            "train": {"epochs": 1},
        },
        "student": {"name": "hf", "params": {"config": STUDENT}},
        "objectives": objectives,
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    recipe.update(changes)
    return recipe


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rows = addition_rows(32)
    write_jsonl(tmp_path / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(tmp_path / "tok"))
    # another corpus, another vocabulary: "= " and "####" are merged differently
    words = [{"prompt": "12 + 34 = ", "completion": "the sum is 46 #### 46, so 12 plus 34 makes 46"}] * 40
    bpe(words, vocab_size=300).save_pretrained(str(tmp_path / "teacher-tok"))
    return tmp_path


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recipe: dict, path: Path):
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(path), "--no-progress"])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("objectives", "message"),
    [
        ([{"name": "forward_kl"}], "distillation needs one shared tokenizer"),
        ([{"name": "uld"}, {"name": "forward_kl"}], "objective 'forward_kl' compares logits over one shared"),
    ],
)
def test_a_mismatched_pair_without_only_cross_tokenizer_objectives_is_refused(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    objectives: list[dict],
    message: str,
) -> None:
    code, lines = _run(monkeypatch, capsys, _recipe(folder, objectives), folder / "r.yaml")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert "teacher-tok" in lines[0]


def test_cross_tokenizer_objectives_read_only_the_data_set(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(folder, [{"name": "uld"}], source={"name": "teacher_generations"})
    code, lines = _run(monkeypatch, capsys, recipe, folder / "r.yaml")
    assert code == 2 and len(lines) == 1 and "source 'dataset'" in lines[0], lines


@pytest.mark.slow
def test_a_recipe_distils_across_tokenizers(folder: Path) -> None:
    """Prompt / completion rows (BOS, EOS: zero-width tokens) with a teacher of another vocabulary."""
    from rich.console import Console

    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    recipe = _recipe(folder, [])
    del recipe["objectives"]
    recipe["methods"] = [
        {"name": "uld", "objectives": [{"name": "cross_entropy"}, {"name": "uld"}]},
        {"name": "aligned", "objectives": [{"name": "aligned_kd", "params": {"beta": 0.0}}]},
    ]
    result = run_recipe(recipe_from_dict(recipe), console=Console(quiet=True))
    assert [m.name for m in result.methods] == ["uld", "aligned"]
    for method in result.methods:
        assert all(math.isfinite(run.result.final["perplexity"]) for run in method.runs)


# ------------------------------------------------------------------ the benchmark's quick mode


@pytest.mark.slow
def test_benchmark_quick_mode_writes_its_table(tmp_path: Path) -> None:
    from bench_helpers import load_benchmark
    from data_helpers import require_data

    require_data("text/tinyshakespeare.txt")
    out = tmp_path / "cross_tokenizer.md"
    assert load_benchmark("cross_tokenizer").main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Cross-tokenizer distillation") and "|---|" in text
    for row in ("student alone (CE)", "ULD (4k teacher)", "aligned / GOLD (4k teacher)", "same-tokenizer KD"):
        assert row in text
    assert (tmp_path / "cross_tokenizer.png").is_file()

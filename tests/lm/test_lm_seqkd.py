"""Sequence-level KD: teacher generations, cached by prompts, teacher and settings."""

from __future__ import annotations

import torch
from lm_helpers import TEACHER, addition_rows, bpe

from distill.data.text import build_lm_data
from distill.models.causal_lm import build_causal_lm, special_token_ids
from distill.sources.generations import GenerationSettings, generate, teacher_generations
from distill.tasks.causal_lm_eval import LMEvaluator


def test_generations_are_cached_and_reused_only_when_nothing_changed(tmp_path) -> None:
    tokenizer = bpe()
    data = build_lm_data(addition_rows(12), addition_rows(3, seed=1), tokenizer=tokenizer, max_length=64)
    torch.manual_seed(0)
    teacher = build_causal_lm(
        config=TEACHER, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
    )
    settings = GenerationSettings(do_sample=True, temperature=0.8, max_new_tokens=6, seed=3)
    first, info = teacher_generations(
        teacher, tokenizer, data.train.examples, settings, cache_dir=tmp_path, run_dir=tmp_path / "run"
    )
    assert not info["cached"] and (tmp_path / "run" / "generations" / f"{info['key']}.jsonl").exists()
    again, info2 = teacher_generations(teacher, tokenizer, data.train.examples, settings, cache_dir=tmp_path)
    assert info2["cached"] and info2["key"] == info["key"]
    assert [e.ids for e in again] == [e.ids for e in first]
    for example, original in zip(first, data.train.examples, strict=True):
        assert example.ids[: original.prompt_len] == original.ids[: original.prompt_len]
        assert 0 < len(example.ids) - original.prompt_len <= 6
        assert all(example.targets[original.prompt_len :]) and not any(example.targets[: original.prompt_len])
    changed = GenerationSettings(do_sample=True, temperature=0.5, max_new_tokens=6, seed=3)
    _, info3 = teacher_generations(teacher, tokenizer, data.train.examples, changed, cache_dir=tmp_path)
    assert info3["key"] != info["key"] and not info3["cached"]
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    _, info4 = teacher_generations(teacher, tokenizer, data.train.examples, settings, cache_dir=tmp_path)
    assert info4["key"] != info["key"]


def test_evaluator_reports_per_token_metrics_and_exact_match() -> None:
    tokenizer = bpe()
    data = build_lm_data(addition_rows(12), addition_rows(4, seed=1), tokenizer=tokenizer, max_length=64)
    torch.manual_seed(0)
    model = build_causal_lm(
        config=TEACHER, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
    )
    evaluator = LMEvaluator(data, batch_size=2)
    metrics = evaluator(model, model)
    assert abs(metrics["teacher_kl"]) < 1e-5 and metrics["agreement"] == 1.0
    assert abs(metrics["perplexity"] - torch.tensor(metrics["loss"]).exp().item()) < 1e-3
    assert metrics["exact_match"] == 0.0 and len(evaluator.samples) == 3
    assert metrics["tokens"] == data.test.counted_tokens()


def test_sampling_from_a_model_whose_scores_are_nan_does_not_raise() -> None:
    """A half-precision student whose weights overflowed gives NaN scores: its rollouts are drawn as if the
    scores were flat, so that the loss's non-finite check (one line) ends the run, not torch.multinomial."""
    tokenizer = bpe()
    torch.manual_seed(0)
    model = build_causal_lm(
        config=TEACHER, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    prompts = [tokenizer.encode("1+2=")] * 2
    out = generate(model, tokenizer, prompts, max_new_tokens=4, do_sample=True, fixed_length=True, seed=1)
    assert [len(row) for row in out] == [4, 4]
    assert all(0 <= token < len(tokenizer) for row in out for token in row)

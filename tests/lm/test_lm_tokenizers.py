"""Tokenizer agreement, padded vocabularies, the BPE cache, models from folders, LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe

from distill.data.tokenizers import load_tokenizer, shared_vocabulary, slice_logits
from distill.errors import UserError
from distill.models.causal_lm import build_causal_lm, special_token_ids


def _model(config, tokenizer, extra_rows=0):
    return build_causal_lm(
        config={**config, "vocab_size": len(tokenizer) + extra_rows},
        special_tokens=special_token_ids(tokenizer),
    )


def test_bpe_is_cached_by_corpus_and_reloaded(tmp_path) -> None:
    first = bpe(addition_rows(50, seed=7), vocab_size=270)
    second = bpe(addition_rows(50, seed=7), vocab_size=270)
    assert first.name_or_path == second.name_or_path  # the same cache folder
    other = bpe(addition_rows(50, seed=8), vocab_size=270)
    assert other.name_or_path != first.name_or_path
    assert first.decode(first("123+45= 6")["input_ids"]) == "123+45= 6"
    assert len(first("123")["input_ids"]) == 3  # digits one by one


def test_different_tokenizers_are_refused_naming_both() -> None:
    a = bpe(addition_rows(50, seed=1), vocab_size=270)
    words = [{"text": "the quick brown fox jumps over the lazy dog, then the fox sleeps"}] * 20
    b = load_tokenizer(bpe(words, vocab_size=300).name_or_path)
    with pytest.raises(UserError) as err:
        shared_vocabulary(a, b, _model(TEACHER, a), _model(STUDENT, b))
    message = str(err.value)
    assert "\n" not in message and a.name_or_path in message and b.name_or_path in message


def test_padding_rows_only_warn_once_and_logits_are_sliced() -> None:
    tokenizer = bpe()
    teacher, student = _model(TEACHER, tokenizer, extra_rows=24), _model(STUDENT, tokenizer, extra_rows=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        size = shared_vocabulary(tokenizer, tokenizer, teacher, student)
    assert size == len(tokenizer)
    assert len(caught) == 1 and "padding rows" in str(caught[0].message)
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    for model in (slice_logits(teacher, size), slice_logits(student, size)):
        assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_a_model_smaller_than_the_tokenizer_is_refused() -> None:
    tokenizer = bpe()
    with pytest.raises(UserError, match="output rows"):
        shared_vocabulary(None, tokenizer, None, _model(STUDENT, tokenizer, extra_rows=-10))


def test_models_load_from_save_pretrained_folders_in_another_dtype(tmp_path) -> None:
    tokenizer = bpe()
    model = _model(TEACHER, tokenizer)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    loaded = build_causal_lm(path=tmp_path / "teacher", dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(tmp_path / "teacher").get_vocab() == tokenizer.get_vocab()
    with pytest.raises(UserError, match="no config.json"):
        build_causal_lm(path=tmp_path)


def test_lora_student_trains_only_its_adapter() -> None:
    pytest.importorskip("peft")
    tokenizer = bpe()
    model = build_causal_lm(config=STUDENT, vocab_size=len(tokenizer), lora={"r": 2})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)

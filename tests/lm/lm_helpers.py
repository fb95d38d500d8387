"""Shared bits of the language-model tests: tiny Llama configs, a trained BPE tokenizer, data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

from distill.data.arithmetic import addition_record

TEACHER = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
STUDENT = {
    **TEACHER,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def addition_rows(n: int, seed: int = 0, digits: int = 2) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [addition_record(rng, digits) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bpe(rows: list[dict[str, str]] | None = None, vocab_size: int = 280):
    from distill.data.text import corpus_texts
    from distill.data.tokenizers import train_bpe

    return train_bpe(corpus_texts(rows or addition_rows(200)), vocab_size=vocab_size)


def lm_fixture(extra_teacher_rows: int = 0, teacher_dtype=None):
    """Eight prompt / completion pairs (one much longer, to force padding), a tiny teacher and student.
    `extra_teacher_rows`: that many padding rows more in the teacher's vocabulary (cut to the tokenizer's)."""
    import torch

    from distill.data.text import build_lm_data
    from distill.data.tokenizers import slice_logits
    from distill.models.causal_lm import build_causal_lm, special_token_ids

    tokenizer = bpe()
    rows = addition_rows(8, seed=3)
    rows[2]["completion"] += " and a much longer tail to force padding"
    data = build_lm_data(rows, rows[:1], tokenizer=tokenizer, max_length=64)
    special = special_token_ids(tokenizer)
    torch.manual_seed(0)
    teacher = build_causal_lm(
        config=TEACHER, vocab_size=len(tokenizer) + extra_teacher_rows, special_tokens=special
    )
    if teacher_dtype is not None:
        teacher.to(teacher_dtype)
    if extra_teacher_rows:
        slice_logits(teacher, len(tokenizer))
    torch.manual_seed(1)
    student = build_causal_lm(config=STUDENT, vocab_size=len(tokenizer), special_tokens=special)
    return data, teacher, student

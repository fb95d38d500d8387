"""A language model's teacher cache: per counted token, read back by sequence id; a student trains from it
without the teacher, and a cache from another tokenizer or data is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl

from distill.cache import TeacherCache
from distill.cache.build import make_cache
from distill.errors import UserError
from distill.experiment import run_recipe
from distill.recipe import recipe_from_dict


def _recipe(tmp_path: Path, teacher: dict, out: str) -> dict:
    return {
        "name": "lm-cache",
        "data": {
            "name": "jsonl",
            "params": {
                "path": str(tmp_path / "train.jsonl"),
                "tokenizer": str(tmp_path / "tok"),
                "max_length": 48,
            },
            "batch_size": 8,
            "eval_batch_size": 16,
        },
        "teacher": teacher,
        "student": {"name": "hf", "params": {"config": STUDENT}},
        "methods": [{"name": "forward KL", "objectives": [{"name": "forward_kl"}]}],
        "optimizer": {"lr": 0.005},
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "output": {"dir": str(tmp_path / out), "tensorboard": False},
    }


@pytest.mark.slow
def test_student_trains_from_a_top_k_cache_without_the_teacher(tmp_path):
    rows = addition_rows(64)
    write_jsonl(tmp_path / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(tmp_path / "tok"))
    live = _recipe(tmp_path, {"name": "hf", "params": {"config": TEACHER}, "train": {"epochs": 1}}, "live")
    manifest = make_cache(recipe_from_dict(live), tmp_path / "cache", k=8, progress=False)
    assert manifest["kind"] == "lm" and manifest["k"] == 8
    cache = TeacherCache(tmp_path / "cache")
    # one row per counted token of every training sequence
    assert sum(s.rows for s in cache.shards) == sum(e.counted for e in _train_examples(live))
    result = run_recipe(
        recipe_from_dict(_recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "cached")), progress=False
    )
    final = result.methods[0].runs[0].result.final
    assert final["perplexity"] > 1 and "teacher_kl" not in final  # no live teacher to compare with

    write_jsonl(tmp_path / "train.jsonl", addition_rows(64, seed=1))  # other data, same tokenizer
    with pytest.raises(UserError, match="made for another data"):
        run_recipe(
            recipe_from_dict(_recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "other")), progress=False
        )


def _train_examples(recipe: dict):
    from distill.data import build_data
    from distill.lm.tokenizers import load_tokenizer

    params = dict(recipe["data"]["params"])
    params["tokenizer"] = load_tokenizer(params["tokenizer"])
    return build_data("jsonl", **params).train.examples

"""A language model's teacher cache: per counted token, read back by sequence id; a student trains from it
without the teacher, and a cache from another tokenizer or data is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl

from distill.build_cache import make_cache
from distill.cache import TeacherCache
from distill.errors import UserError
from distill.experiment import run_recipe
from distill.objectives import OBJECTIVES, Objective
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
    fitted = result.methods[0].runs[0].result
    assert fitted.final["perplexity"] > 1 and "teacher_kl" not in fitted.final  # no live teacher to compare
    assert fitted.loss_path == "fused"  # the cached top-k rows go straight into the fused loss

    write_jsonl(tmp_path / "train.jsonl", addition_rows(64, seed=1))  # other data, same tokenizer
    with pytest.raises(UserError, match="made for another data"):
        run_recipe(
            recipe_from_dict(_recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "other")), progress=False
        )


def _train_examples(recipe: dict):
    from distill.data import build_data
    from distill.data.tokenizers import load_tokenizer

    params = dict(recipe["data"]["params"])
    params["tokenizer"] = load_tokenizer(params["tokenizer"])
    return build_data("jsonl", **params).train.examples


SEEN: dict[str, list] = {"features": []}


class _TeacherStates(Objective):
    """Stands in for a feature-distillation objective: records the teacher layer output it is handed."""

    teacher_layers = ("model.layers.0",)

    def forward(self, outputs):
        feature = outputs.teacher_features["model.layers.0"]
        SEEN["features"].append(feature[outputs.mask].detach().clone())
        return outputs.student_logits.float().sum() * 0


@pytest.mark.slow
def test_feature_objectives_read_cached_hidden_states_like_the_live_teachers(tmp_path):
    if "test_teacher_states" not in OBJECTIVES:
        OBJECTIVES.add("test_teacher_states", _TeacherStates, summary="test only", paper="-")
    rows = addition_rows(24)
    write_jsonl(tmp_path / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(tmp_path / "tok"))
    teacher = {"name": "hf", "params": {"config": TEACHER}, "train": {"epochs": 1}}
    methods = [{"name": "states", "objectives": [{"name": "test_teacher_states"}]}]
    live = _recipe(tmp_path, teacher, "live") | {"methods": methods}
    make_cache(recipe_from_dict(live), tmp_path / "cache", k=4, hidden=("model.layers.0",), progress=False)
    assert TeacherCache(tmp_path / "cache").hidden == ["model.layers.0"]
    seen = []
    for recipe in (
        live,
        _recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "cached") | {"methods": methods},
    ):
        SEEN["features"] = []
        run_recipe(recipe_from_dict(recipe), progress=False)
        seen.append(SEEN["features"])
    assert len(seen[0]) == len(seen[1]) == 3  # 24 sequences, batch 8
    for live_rows, cached_rows in zip(*seen, strict=True):  # same batches, same counted tokens
        assert cached_rows.shape == live_rows.shape
        assert torch.allclose(cached_rows, live_rows, rtol=2e-3, atol=2e-3)  # stored as float16

    # A registered feature objective with a learned projector reads the same cached states.
    fitnet = _recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "fitnet")
    layers = {"student_layer": "model.layers.0", "teacher_layer": "model.layers.0"}
    fitnet["methods"] = [{"name": "hint", "objectives": [{"name": "fitnet", "params": layers}]}]
    result = run_recipe(recipe_from_dict(fitnet), progress=False)
    assert all(math.isfinite(run.result.final["loss"]) for run in result.methods[0].runs)

    other = _recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "other")
    other["methods"] = methods
    _TeacherStates.teacher_layers = ("model.layers.1",)
    try:
        with pytest.raises(UserError, match="reads teacher layer 'model.layers.1'.*--hidden model.layers.1"):
            run_recipe(recipe_from_dict(other), progress=False)
    finally:
        _TeacherStates.teacher_layers = ("model.layers.0",)

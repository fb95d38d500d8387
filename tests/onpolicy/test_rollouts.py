"""Student rollouts as a batch transform: the batch convention is kept, GKD's mix picks a reproducible
fraction of rows, and a resumed run draws the same rollouts as an uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm"))
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe  # noqa: E402

from distill.data.text import build_lm_data  # noqa: E402
from distill.models.causal_lm import build_causal_lm, special_token_ids  # noqa: E402
from distill.objectives import Progress  # noqa: E402
from distill.sources import SourcePlan  # noqa: E402
from distill.sources.batching import PromptAwareDataset  # noqa: E402
from distill.sources.rollouts import RolloutSettings, StudentRollouts  # noqa: E402
from distill.train import fit  # noqa: E402


@pytest.fixture(scope="module")
def data():
    rows = addition_rows(40)
    return build_lm_data(rows[:32], rows[32:], tokenizer=bpe(rows), layout="prompt_completion", max_length=48)


def model(data, config=STUDENT, seed=0):
    torch.manual_seed(seed)
    return build_causal_lm(
        config=config, vocab_size=len(data.tokenizer), special_tokens=special_token_ids(data.tokenizer)
    )


def first_batch(data, n=8):
    dataset = PromptAwareDataset(data.train)
    return dataset.collate_fn([dataset[i] for i in range(n)])


def test_rollouts_keep_the_batch_convention(data) -> None:
    batch = first_batch(data)
    transform = StudentRollouts(RolloutSettings(), data.tokenizer, data.train.pad_id, run_seed=0)
    new = transform(batch, model(data), Progress(0, 10, 0.0))
    assert transform.chosen == list(range(8))
    for b in range(8):
        n, p = int(new["attention_mask"][b].sum()), int(new["prompt_len"][b])
        ids = new["input_ids"][b, :n]
        assert torch.equal(ids[:p], batch["input_ids"][b, :p])  # the prompt is untouched
        counted = new["mask"][b].nonzero().squeeze(1)
        assert counted.tolist() == list(range(p - 1, n - 1))  # every generated token counts, none before
        assert torch.equal(new["labels"][b, p - 1 : n - 1], ids[p:])  # labels[t] = input_ids[t + 1]
        assert n - p <= len(data.train.examples[b].ids) - data.train.examples[b].prompt_len  # equal budget


def test_mix_replaces_a_reproducible_fraction_of_rows(data) -> None:
    student = model(data)
    transform = StudentRollouts(RolloutSettings(mix=0.5), data.tokenizer, data.train.pad_id, run_seed=3)
    picks = []
    for step in range(40):
        transform(first_batch(data), student, Progress(step, 40, 0.0))
        picks.append(list(transform.chosen))
    fraction = sum(len(p) for p in picks) / (40 * 8)
    assert 0.4 < fraction < 0.6
    batch = first_batch(data)
    again = transform(batch, student, Progress(7, 40, 0.0))
    assert transform.chosen == picks[7]  # the same rows at the same step: resumable
    kept = [b for b in range(8) if b not in picks[7]]
    for b in kept:  # rows not chosen keep their data set completion
        assert torch.equal(again["labels"][b], batch["labels"][b])
    zero = StudentRollouts(RolloutSettings(mix=0.0), data.tokenizer, data.train.pad_id, run_seed=0)
    assert torch.equal(zero(batch, student, Progress(0, 1, 0.0))["labels"], batch["labels"])


def _fit(data, run_dir, **extra):
    plan = SourcePlan("student_rollouts", {"mix": 0.5}, "GKD", data=data, teacher=teacher_model(data))
    student = model(data)
    run = plan.start(student, 0, ["forward_kl"])
    result = fit(
        student,
        run.train_set,
        teacher=run.teacher,
        objectives=run.terms,
        batch_transform=run.batch_transform,
        epochs=2,
        batch_size=8,
        run_dir=run_dir,
        progress=False,
        tensorboard=False,
        device="cpu",
        **extra,
    )
    return student, result, run


_TEACHER = {}


def teacher_model(data):
    if "t" not in _TEACHER:
        _TEACHER["t"] = model(data, TEACHER, seed=1).eval().requires_grad_(False)
    return _TEACHER["t"]


def test_resumed_run_draws_the_same_rollouts(data, tmp_path) -> None:
    whole, result, run = _fit(data, tmp_path / "whole")
    assert run.finish(result, 2)["teacher_calls"] == 8  # 4 batches x 2 epochs: it scores, it never generates
    _, part, run = _fit(data, tmp_path / "parts", stop_after_steps=3)
    run.finish(part, 2)
    resumed, rest, run = _fit(data, tmp_path / "parts", resume=True)
    run.finish(rest, 2)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)

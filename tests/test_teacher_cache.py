"""The offline teacher: what the cache stores, how it is read back by sample id, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.build_cache import make_cache
from distill.cache import CacheWriter, IndexedDataset, TeacherCache
from distill.cache.targets import rows_with_tail_draws, topk_rows
from distill.errors import UserError
from distill.losses.sparse import SparseTargets
from distill.objectives import build_objective
from distill.objectives.base import StepOutputs
from distill.recipe import recipe_from_dict
from test_cli import assert_user_error, run_cli, tiny_recipe, write

HEADER = {
    "kind": "lm",
    "teacher": "t",
    "tokenizer": None,
    "data": "d",
    "k": 3,
    "vocab": 7,
    "temperature": 1.0,
    "hidden": [],
}


def _rows(samples: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (samples,), generator=generator).tolist()
    return torch.randn(sum(counts), 7, generator=generator), counts


def _write(
    folder: Path, logits: torch.Tensor, counts: list[int], *, shard_samples: int, stop: int | None = None
):
    writer = CacheWriter(
        folder, HEADER | {"samples": len(counts)}, shard_samples=shard_samples, overwrite=False
    )
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    for sample in range(writer.next_sample, stop if stop is not None else len(counts)):
        ids, logprobs, tail = topk_rows(logits[starts[sample] : starts[sample + 1]], 3, 1.0)
        writer.add(ids, logprobs, tail, torch.tensor([counts[sample]]))
    return writer


def test_lookup_by_id_in_any_order_returns_each_samples_rows(tmp_path):
    logits, counts = _rows(23)
    _write(tmp_path / "c", logits, counts, shard_samples=5).finish()
    cache = TeacherCache(tmp_path / "c")
    assert len(cache.shards) == 5
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))[:9]
    got = cache.targets(order, torch.tensor([counts[i] for i in order]))
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    expected = torch.cat([logits[starts[i] : starts[i + 1]] for i in order.tolist()])
    ids, logprobs, tail = topk_rows(expected, 3, 1.0)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.logprobs, logprobs, atol=2e-3, rtol=1e-3)  # float16 storage
    torch.testing.assert_close(got.tail_logmass, tail)


def test_an_interrupted_writer_resumes_and_matches_a_one_shot_cache(tmp_path):
    logits, counts = _rows(17)
    _write(tmp_path / "once", logits, counts, shard_samples=4).finish()
    # Dies with 2 shards written; its lock goes with it (a killed process's lock is released by the OS).
    _write(tmp_path / "twice", logits, counts, shard_samples=4, stop=10).close()
    resumed = _write(tmp_path / "twice", logits, counts, shard_samples=4)
    assert resumed.shards[0].sha256 == TeacherCache(tmp_path / "once").shards[0].sha256
    resumed.finish()
    a, b = TeacherCache(tmp_path / "once"), TeacherCache(tmp_path / "twice")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_refusals_are_one_line_user_errors(tmp_path):
    logits, counts = _rows(8)
    _write(tmp_path / "c", logits, counts, shard_samples=4).finish()
    cache = TeacherCache(tmp_path / "c")
    with pytest.raises(UserError, match="sample 2 has .* cached rows, the batch counts 99"):
        cache.targets(torch.tensor([2]), torch.tensor([99]))
    with pytest.raises(UserError, match="made for another data"):
        cache.check(data="other")
    with pytest.raises(UserError, match="another temperature"):
        CacheWriter(
            tmp_path / "c", HEADER | {"samples": 8, "temperature": 2.0}, shard_samples=4, overwrite=False
        )
    shard = tmp_path / "c" / cache.shards[1].file
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="fails its checksum"):
        TeacherCache(tmp_path / "c").targets(torch.tensor([5]))
    _write(tmp_path / "half", logits, counts, shard_samples=4, stop=5).close()
    with pytest.raises(UserError, match="incomplete"):
        TeacherCache(tmp_path / "half")


def test_logit_bytes_per_row_are_at_most_6k_plus_8(tmp_path):
    logits = torch.randn(4096, 512)
    writer = CacheWriter(
        tmp_path / "c", HEADER | {"samples": 4096, "k": 32, "vocab": 512}, shard_samples=1024, overwrite=False
    )
    for start in range(0, 4096, 256):
        writer.add(*topk_rows(logits[start : start + 256], 32, 1.0), torch.ones(256, dtype=torch.long))
    writer.finish()
    size = sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*"))
    assert size / 4096 <= 32 * 6 + 8


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 9),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
    name=st.sampled_from(["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "hinton_kd"]),
    seed=st.integers(0, 2**16),
)
def test_bucketed_divergence_is_exact_at_full_k_and_a_lower_bound_below(k, temperature, name, seed):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 6, 9, generator=generator).unbind(0)
    objective = build_objective(name, {"temperature": temperature})
    dense = objective(StepOutputs(student_logits=student, teacher_logits=teacher))
    sparse = objective(
        StepOutputs(student_logits=student, teacher_topk=SparseTargets(*topk_rows(teacher, k, temperature)))
    )
    assert torch.isfinite(sparse)
    if k == 9:
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    else:  # coarse-graining never increases an f-divergence
        assert sparse <= dense + 1e-5


def test_objectives_that_need_full_logits_refuse_a_cache(tmp_path):
    logits, counts = _rows(4)
    _write(tmp_path / "c", logits, counts, shard_samples=4).finish()
    cache = TeacherCache(tmp_path / "c")
    with pytest.raises(UserError, match="'dkd' needs the teacher's full logits"):
        cache.check_objectives(["dkd"], [build_objective("dkd")])
    with pytest.raises(UserError, match="temperature 4 .* cache again with --temperature 4"):
        cache.check_objectives(["hinton_kd"], [build_objective("hinton_kd", {"temperature": 4.0})])
    cache.check_objectives(["forward_kl"], [build_objective("forward_kl")])


def _cached_recipe(tmp_path: Path, cache: Path | None = None, **teacher) -> dict:
    data = tiny_recipe(tmp_path)
    data["methods"] = [{"name": "KL", "objectives": [{"name": "forward_kl"}]}]
    data["teacher"]["train"]["epochs"] = 2
    if cache is not None:
        data["teacher"] = {"cache": str(cache), **teacher}
    return data


@pytest.mark.slow
def test_classifier_from_a_full_cache_matches_the_live_teacher(tmp_path):
    live = recipe_from_dict(_cached_recipe(tmp_path))
    make_cache(live, tmp_path / "cache", k=None, progress=False)
    from distill.experiment import run_recipe

    cached = recipe_from_dict(
        _cached_recipe(tmp_path, tmp_path / "cache")
        | {"output": {"dir": str(tmp_path / "r2"), "tensorboard": False}}
    )
    a = run_recipe(live, progress=False).methods[0].runs[0].result
    b = run_recipe(cached, progress=False).methods[0].runs[0].result
    # Same student, data order and loss; only the float16 storage of the teacher's log-probabilities differs.
    assert abs(a.final["accuracy"] - b.final["accuracy"]) <= 0.01
    assert abs(a.final["loss"] - b.final["loss"]) <= 1e-2


@pytest.mark.slow
def test_cli_cache_then_train_and_refuse_a_mismatch(tmp_path):
    recipe = write(tmp_path / "teacher.yaml", _cached_recipe(tmp_path))
    done = run_cli("cache", str(recipe), "--out", str(tmp_path / "cache"), "--top-k", "4", "--no-progress")
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["k"] == 4 and manifest["complete"]
    student = write(tmp_path / "student.yaml", _cached_recipe(tmp_path, tmp_path / "cache"))
    done = run_cli("run", str(student), "--no-progress")
    assert done.returncode == 0, done.stderr
    other_data = _cached_recipe(tmp_path, tmp_path / "cache")
    other_data["data"]["params"]["split_seed"] = 1
    other_data["output"]["dir"] = str(tmp_path / "other")
    assert_user_error(
        run_cli("run", str(write(tmp_path / "o.yaml", other_data))), "was made for another data"
    )
    foreign = _cached_recipe(tmp_path, tmp_path / "cache", name="mlp", params={"hidden": [8]})
    foreign["output"]["dir"] = str(tmp_path / "foreign")
    assert_user_error(run_cli("run", str(write(tmp_path / "f.yaml", foreign))), "made by another teacher")
    dkd = _cached_recipe(tmp_path, tmp_path / "cache")
    dkd["methods"] = [{"name": "DKD", "objectives": [{"name": "dkd"}]}]
    dkd["output"]["dir"] = str(tmp_path / "dkd")
    assert_user_error(run_cli("run", str(write(tmp_path / "d.yaml", dkd))), "needs the teacher's full logits")
    assert not (tmp_path / "other").exists() and not (tmp_path / "dkd").exists()


def test_indexed_batches_carry_sample_ids():
    base = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = torch.utils.data.DataLoader(
        IndexedDataset(base), batch_size=4, shuffle=True, collate_fn=IndexedDataset(base).collate_fn
    )
    for batch in loader:
        assert torch.equal(batch["labels"], batch["index"])


@pytest.mark.parametrize("k", [0, 3])
def test_tail_draws_keep_the_head_exact_and_the_tail_unbiased(k):
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    teacher = torch.softmax(logits, -1)
    generator = torch.Generator().manual_seed(1)
    mean = torch.zeros_like(teacher)
    trials = 400
    for _ in range(trials):
        ids, logprobs, tail = rows_with_tail_draws(logits, k, 5, 1.0, generator)
        assert all(len(set(row.tolist())) == row.numel() for row in ids)  # no id twice
        assert torch.all(tail == float("-inf"))
        torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(2))  # all the mass, no tail bucket
        if k:
            torch.testing.assert_close(logprobs[:, :k].exp(), teacher.gather(-1, ids[:, :k]))
        mean += torch.zeros_like(teacher).scatter_add(-1, ids, logprobs.exp()) / trials
    torch.testing.assert_close(mean, teacher, atol=0.03, rtol=0)


def test_language_model_caches_default_to_half_exact_half_drawn_slots():
    from distill.cache.targets import default_slots

    assert default_slots("lm", 32, 1024, None) == (16, 16)
    assert default_slots("lm", 1, 1024, None) == (1, 0)
    assert default_slots("lm", 32, 1024, 0) == (32, 0)  # explicit: the plain tail bucket
    assert default_slots("lm", 32, 40, 20) == (32, 8)  # no more draws than tokens outside the top-k
    assert default_slots("lm", None, 1024, None) == (1024, 0)  # the full distribution
    assert default_slots("classification", 8, 100, None) == (8, 0)

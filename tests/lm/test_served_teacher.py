"""The served teacher: top-k targets fetched from a completions server equal the local model's top-k; retries,
timeouts and refusals end in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_helpers import lm_fixture
from served_server import Behaviour, serve
from torch.utils.data import DataLoader

from distill.cache.targets import topk_rows
from distill.errors import UserError
from distill.teachers.base import TeacherRequest
from distill.teachers.served import ServedTeacher, distinct_unused_slots
from distill.teachers.served_protocol import Endpoint, ServedTeacherError, call_endpoint, text_to_id

K = 5


@pytest.fixture(scope="module")
def fixture():
    data, teacher, _ = lm_fixture()
    teacher.eval()
    batch = next(iter(DataLoader(data.train, batch_size=8, collate_fn=data.train.collate_fn)))
    return data, teacher, batch


def _request(batch) -> TeacherRequest:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return TeacherRequest(inputs=inputs, mask=batch["mask"])


def _expected(teacher, batch):
    with torch.inference_mode():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return topk_rows(logits[batch["mask"]], K, 1.0)


def _no_sleep(seconds: float) -> None:
    pass


def test_vllm_targets_equal_the_local_top_k(fixture):
    data, teacher, batch = fixture
    with serve(teacher, data.tokenizer, "vllm") as url:
        served = ServedTeacher(Endpoint(url, "tiny", top_k=K), data.tokenizer, len(data.tokenizer))
        topk = served.outputs(_request(batch)).topk
    ids, logprobs, tail = _expected(teacher, batch)
    assert torch.equal(topk.ids, ids)
    torch.testing.assert_close(topk.logprobs, logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(topk.tail_logmass, tail, atol=1e-4, rtol=1e-4)


def test_openai_targets_are_the_local_top_k_of_unambiguous_texts(fixture):
    """Keyed by text, the legacy dialect loses the ids whose text another id shares (byte tokens all decode
    to U+FFFD): the rest of the local top-k comes back with the local log-probabilities, and the tail holds
    exactly the mass the kept ids leave."""
    data, teacher, batch = fixture
    with serve(teacher, data.tokenizer, "openai") as url:
        served = ServedTeacher(
            Endpoint(url, "tiny", top_k=K, protocol="openai"), data.tokenizer, len(data.tokenizer)
        )
        topk = served.outputs(_request(batch)).topk
    unambiguous = set(text_to_id(data.tokenizer.decode, len(data.tokenizer)).values())
    with torch.inference_mode():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    local = torch.log_softmax(logits[batch["mask"]].float(), -1)
    local_top = local.topk(K).indices
    for row in range(len(local)):
        kept = torch.isfinite(topk.logprobs[row])
        got = topk.ids[row][kept]
        assert set(local_top[row].tolist()) & unambiguous <= set(got.tolist()) <= unambiguous
        torch.testing.assert_close(topk.logprobs[row][kept], local[row, got], atol=1e-5, rtol=1e-5)
        rest = torch.log1p(-local[row, got].double().exp().sum()).float()
        torch.testing.assert_close(topk.tail_logmass[row], rest, atol=1e-4, rtol=1e-4)


def test_vllm_batches_prompts_per_request(fixture):
    data, teacher, batch = fixture
    behaviour = Behaviour()
    with serve(teacher, data.tokenizer, "vllm", behaviour) as url:
        endpoint = Endpoint(url, "tiny", top_k=K, prompts_per_request=3)
        ServedTeacher(endpoint, data.tokenizer, len(data.tokenizer)).outputs(_request(batch))
    assert [len(r["payload"]["prompt"]) for r in behaviour.requests] == [3, 3, 2]
    first = behaviour.requests[0]["payload"]["prompt"][0]
    assert first == batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()


def test_openai_dialect_skips_a_bos_token_the_server_adds(fixture):
    data, teacher, batch = fixture
    with serve(teacher, data.tokenizer, "openai", Behaviour(add_bos=True)) as url:
        served = ServedTeacher(
            Endpoint(url, "tiny", top_k=K, protocol="openai"), data.tokenizer, len(data.tokenizer)
        )
        topk = served.outputs(_request(batch)).topk
    ids, _, _ = _expected(teacher, batch)
    assert topk.ids.shape == ids.shape  # rows line up with the student's tokens, not the server's BOS


def test_transient_failures_are_retried_with_backoff(fixture):
    data, teacher, batch = fixture
    waits: list[float] = []
    with serve(teacher, data.tokenizer, "vllm", Behaviour(fail_with=[503, 429])) as url:
        endpoint = Endpoint(url, "tiny", top_k=K, retries=3, backoff_s=0.25, prompts_per_request=8)
        served = ServedTeacher(endpoint, data.tokenizer, len(data.tokenizer), sleep=waits.append)
        topk = served.outputs(_request(batch)).topk
    assert waits == [0.25, 0.5]
    assert torch.equal(topk.ids, _expected(teacher, batch)[0])


def test_retries_run_out_in_one_line(fixture):
    data, teacher, batch = fixture
    with serve(teacher, data.tokenizer, "vllm", Behaviour(fail_with=[503] * 5)) as url:
        served = ServedTeacher(
            Endpoint(url, "tiny", top_k=K, retries=2), data.tokenizer, 300, sleep=_no_sleep
        )
        with pytest.raises(ServedTeacherError) as error:
            served.outputs(_request(batch))
    message = str(error.value)
    assert "HTTP 503" in message and "after 3 tries" in message and "\n" not in message


def test_a_client_error_is_not_retried_and_quotes_the_server(fixture):
    data, teacher, batch = fixture
    behaviour = Behaviour(fail_with=[400])
    with serve(teacher, data.tokenizer, "vllm", behaviour) as url:
        served = ServedTeacher(Endpoint(url, "tiny", top_k=K), data.tokenizer, 300, sleep=_no_sleep)
        with pytest.raises(ServedTeacherError, match="HTTP 400 scripted failure"):
            served.outputs(_request(batch))
    assert len(behaviour.requests) == 1


def test_a_timeout_is_retried_then_reported(fixture):
    data, teacher, batch = fixture
    with serve(teacher, data.tokenizer, "vllm", Behaviour(delay_s=0.5)) as url:
        endpoint = Endpoint(url, "tiny", top_k=K, timeout_s=0.05, retries=1)
        served = ServedTeacher(endpoint, data.tokenizer, 300, sleep=_no_sleep)
        with pytest.raises(ServedTeacherError, match="timed out after 2 tries"):
            served.outputs(_request(batch))


def test_an_unreachable_server_is_one_line():
    endpoint = Endpoint("http://127.0.0.1:9/v1", "tiny", retries=0, timeout_s=2)
    with pytest.raises(ServedTeacherError, match=r"unreachable .* after 1 tries"):
        call_endpoint(endpoint, {"prompt": [[1]]})


def test_the_api_key_comes_from_the_environment(fixture, monkeypatch):
    data, teacher, batch = fixture
    endpoint_kwargs = {"top_k": K, "api_key_env": "DISTILL_TEST_KEY"}
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(ServedTeacherError, match="DISTILL_TEST_KEY is not set"):
        call_endpoint(Endpoint("http://127.0.0.1:9/v1", "tiny", **endpoint_kwargs), {})
    monkeypatch.setenv("DISTILL_TEST_KEY", "sekret")
    behaviour = Behaviour()
    with serve(teacher, data.tokenizer, "vllm", behaviour) as url:
        ServedTeacher(Endpoint(url, "tiny", **endpoint_kwargs), data.tokenizer, 300).outputs(_request(batch))
    assert behaviour.requests[0]["headers"]["Authorization"] == "Bearer sekret"


def test_a_server_with_another_tokenizer_is_refused(fixture):
    from lm_helpers import bpe

    data, teacher, batch = fixture
    other = bpe(vocab_size=261)
    with serve(teacher, other, "openai") as url:
        served = ServedTeacher(
            Endpoint(url, "tiny", top_k=K, protocol="openai"), data.tokenizer, len(data.tokenizer)
        )
        with pytest.raises(ServedTeacherError, match="tokenised the prompt otherwise"):
            served.outputs(_request(batch))


def test_objectives_that_need_full_logits_or_another_temperature_are_refused():
    from distill.objectives import build_objective

    served = ServedTeacher(Endpoint("http://x/v1", "m", top_k=2), None, 10)
    served.check_objectives(["forward_kl"], [build_objective("forward_kl", {})])
    with pytest.raises(UserError, match="full logits"):
        served.check_objectives(["dkd"], [build_objective("dkd", {})])
    with pytest.raises(UserError, match="temperature 2"):
        served.check_objectives(["forward_kl"], [build_objective("forward_kl", {"temperature": 2.0})])
    with pytest.raises(UserError, match="protocol 'grpc'"):
        ServedTeacher(Endpoint("http://x/v1", "m", protocol="grpc"), None, 10)
    with pytest.raises(UserError, match="top_k must be between 1 and"):
        ServedTeacher(Endpoint("http://x/v1", "m", top_k=11), None, 10)


def test_unused_slots_get_distinct_free_ids():
    ids = torch.tensor([[3, 0, 0], [1, 2, 0], [0, 0, 0]])
    logprobs = torch.tensor([[-0.1, -math.inf, -math.inf], [-0.5, -1.0, -math.inf], [-math.inf] * 3])
    filled = distinct_unused_slots(ids, logprobs, vocabulary=6)
    assert filled.tolist() == [[3, 0, 1], [1, 2, 0], [0, 1, 2]]
    for row in filled.tolist():
        assert len(set(row)) == len(row)


def test_text_to_id_leaves_out_ambiguous_texts():
    pieces = {0: "a", 1: "b", 2: "\ufffd", 3: "\ufffd"}
    assert text_to_id(lambda ids: pieces[ids[0]], 4) == {"a": 0, "b": 1}


# ----------------------------------------------- recorded from a real server: llama-cpp-python 0.3.36

RECORDED = Path(__file__).resolve().parents[1] / "data" / "llama_cpp_server"


def _replay(exchanges):
    """A `post` answering each request with the answer the real server gave to exactly that request."""

    def post(url, payload, headers, timeout):
        for exchange in exchanges:
            if exchange["request"] == payload:
                return exchange["answer"]
        raise AssertionError(f"a request the server was never asked: {payload}")

    return post


def _recorded_batch(tokenizer, exchanges):
    rows = [tokenizer(e["request"]["prompt"], add_special_tokens=False)["input_ids"] for e in exchanges]
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], attention[i, : len(row)] = torch.tensor(row), 1
    mask = attention.bool()
    for i, row in enumerate(rows):
        mask[i, len(row) - 1] = False  # the last token predicts nothing in the sequence
    return ids, attention, mask


def test_llama_cpp_answers_recorded_from_a_real_server_match_the_model():
    """llama-cpp-python's echo entries are shifted by one (entry i: the distribution after token i, entry 0
    null); read as `llama_cpp` they equal this model's log-probabilities (the server ran its f32 GGUF
    conversion), read as plain `openai` they do not: the dialect is needed."""
    from distill.data.tokenizers import load_tokenizer
    from distill.models.causal_lm import build_causal_lm

    recorded = json.loads((RECORDED / "exchanges.json").read_text())
    tokenizer = load_tokenizer(RECORDED)
    model = build_causal_lm(path=RECORDED).eval()
    ids, attention, mask = _recorded_batch(tokenizer, recorded["exchanges"])
    with torch.inference_mode():
        local = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)[mask]
    request = TeacherRequest(inputs={"input_ids": ids, "attention_mask": attention}, mask=mask)
    errors = {}
    for protocol in ("llama_cpp", "openai"):
        endpoint = Endpoint("http://recorded/v1", "tiny", top_k=5, protocol=protocol)
        post = _replay(recorded["exchanges"])
        topk = ServedTeacher(endpoint, tokenizer, len(tokenizer), post=post).outputs(request).topk
        kept = torch.isfinite(topk.logprobs)
        errors[protocol] = float((topk.logprobs[kept] - local.gather(1, topk.ids)[kept]).abs().max())
        if protocol == "llama_cpp":
            firsts = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)[:-1]])
            assert not kept[firsts].any()  # the server's null first entry: an empty row
            assert float(topk.tail_logmass[firsts].abs().max()) == 0.0  # log(1): all mass in the tail
            assert kept.sum() > 0.5 * kept.numel()
            expected_tail = torch.log1p(-local.gather(1, topk.ids).double().exp().mul(kept).sum(-1)).float()
            torch.testing.assert_close(topk.tail_logmass, expected_tail, atol=2e-3, rtol=0)
    assert errors["llama_cpp"] < 2e-3 < 1.0 < errors["openai"]


def test_a_recorded_server_error_is_one_line():
    import io
    import urllib.error

    error = json.loads((RECORDED / "exchanges.json").read_text())["errors"][0]

    def post(url, payload, headers, timeout):
        body = io.BytesIO(json.dumps(error["body"]).encode())
        raise urllib.error.HTTPError(url, error["status"], "Bad Request", {}, body)  # type: ignore[arg-type]

    endpoint = Endpoint("http://recorded/v1", "tiny", protocol="llama_cpp")
    with pytest.raises(ServedTeacherError) as raised:
        call_endpoint(endpoint, {}, post=post)
    message = str(raised.value)
    assert message.startswith("served teacher http://recorded/v1/completions: HTTP 400 This model's maximum")
    assert "\n" not in message


# ------------------------------------------------------------------------- recipes with a served teacher


def _served_recipe(tmp_path: Path, teacher: dict, out: str, objective: str = "forward_kl") -> dict:
    from lm_helpers import STUDENT

    return {
        "name": "lm-served",
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
        "methods": [{"name": "kd", "objectives": [{"name": objective}]}],
        "optimizer": {"lr": 0.005},
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "output": {"dir": str(tmp_path / out), "tensorboard": False},
    }


@pytest.mark.slow
def test_a_recipe_trains_from_a_served_teacher_live_and_through_a_cache(tmp_path):
    """`teacher.served` in a recipe: the student trains on the server's top-k; `distill cache` stores the same
    targets once, and a student trained from that cache follows the same path (same batches, same targets)."""
    from lm_helpers import TEACHER, addition_rows, bpe, write_jsonl

    from distill.build_cache import make_cache
    from distill.cache import TeacherCache
    from distill.experiment import run_recipe
    from distill.models.causal_lm import build_causal_lm, special_token_ids
    from distill.recipe import recipe_from_dict

    rows = addition_rows(32)
    write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = bpe(rows)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = build_causal_lm(
        config=TEACHER, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
    )
    behaviour = Behaviour()
    with serve(model.eval(), tokenizer, "vllm", behaviour) as url:
        served = {"served": {"url": url, "model": "tiny", "top_k": 8, "prompts_per_request": 4}}
        live = run_recipe(recipe_from_dict(_served_recipe(tmp_path, served, "live")), progress=False)
        asked = len(behaviour.requests)
        manifest = make_cache(
            recipe_from_dict(_served_recipe(tmp_path, served, "c")),
            tmp_path / "cache",
            k=None,
            progress=False,
        )
        with pytest.raises(UserError, match="needs the teacher's full logits"):
            run_recipe(recipe_from_dict(_served_recipe(tmp_path, served, "dkd", "dkd")), progress=False)
    assert asked >= 8  # 32 sequences, 4 per request, at least one epoch
    assert manifest["k"] == 8 and manifest["temperature"] == 1.0 and manifest["served"]["model"] == "tiny"
    assert TeacherCache(tmp_path / "cache").k == 8
    cached = run_recipe(
        recipe_from_dict(_served_recipe(tmp_path, {"cache": str(tmp_path / "cache")}, "cached")),
        progress=False,
    )
    live_run, cached_run = live.methods[0].runs[0].result, cached.methods[0].runs[0].result
    assert math.isfinite(live_run.final["loss"])
    assert live_run.final["perplexity"] == pytest.approx(cached_run.final["perplexity"], rel=1e-3)


def test_served_teacher_refusals_come_before_any_run(tmp_path):
    from distill.recipe import recipe_from_dict
    from distill.tasks import task_for

    served = {"served": {"url": "http://127.0.0.1:9/v1", "model": "m"}}
    recipe = _served_recipe(tmp_path, served, "x")
    recipe["methods"][0]["source"] = {"name": "teacher_generations"}
    with pytest.raises(UserError, match="a served teacher scores the data set's sequences"):
        task_for(recipe_from_dict(recipe)).check(recipe_from_dict(recipe))
    image = {
        "name": "digits-served",
        "data": {"name": "digits"},
        "teacher": served,
        "student": {"name": "mlp"},
        "methods": [{"name": "kd", "objectives": [{"name": "hinton_kd"}]}],
    }
    with pytest.raises(UserError, match="cannot use a served teacher"):
        task_for(recipe_from_dict(image)).check(recipe_from_dict(image))

"""A completions server for the served-teacher tests: a real HTTP server on a loopback port, answering from a
local causal LM in the two dialects `distill.teachers.served_protocol` speaks.

The answers follow the formats of vLLM's `/v1/completions` with `prompt_logprobs` (a list per prompt, None at
position 0, then {"<id>": {"logprob", "rank", "decoded_token"}} holding the top-k and the prompt's own
token) and of the legacy echo + logprobs form as llama.cpp's server writes it (`tests/lm/data/
llama_cpp_completion.json` is an answer recorded from one). Failures can be scripted: a list of HTTP
statuses to answer before the real answer, and a delay before each answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class Behaviour:
    def __init__(self, fail_with: list[int] | None = None, delay_s: float = 0.0, add_bos: bool = False):
        self.fail_with = list(fail_with or [])
        self.delay_s = delay_s
        self.add_bos = add_bos
        self.requests: list[dict[str, Any]] = []


def _distributions(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def vllm_answer(model: Any, tokenizer: Any, payload: dict[str, Any]) -> dict[str, Any]:
    k = int(payload["prompt_logprobs"])
    choices = []
    for index, prompt in enumerate(payload["prompt"]):
        logprobs = _distributions(model, prompt)
        entries: list[Any] = [None]
        for position in range(1, len(prompt)):
            row = logprobs[position - 1]
            ranks = torch.argsort(row, descending=True)
            entry = {}
            for rank, token in enumerate(ranks[:k].tolist(), start=1):
                entry[str(token)] = {
                    "logprob": row[token].item(),
                    "rank": rank,
                    "decoded_token": tokenizer.decode([token]),
                }
            actual = prompt[position]
            if str(actual) not in entry:  # vLLM adds the prompt's own token with its rank
                rank = int((row > row[actual]).sum()) + 1
                entry[str(actual)] = {"logprob": row[actual].item(), "rank": rank, "decoded_token": "x"}
            entries.append(entry)
        choices.append({"index": index, "text": "", "logprobs": None, "prompt_logprobs": entries})
    return {"id": "cmpl-test", "object": "text_completion", "model": payload["model"], "choices": choices}


def openai_answer(model: Any, tokenizer: Any, payload: dict[str, Any], add_bos: bool) -> dict[str, Any]:
    k = int(payload["logprobs"])
    ids = tokenizer(payload["prompt"], add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids]
    logprobs = _distributions(model, ids)
    generated = int(logprobs[-1].argmax())
    tokens = [tokenizer.decode([t]) for t in [*ids, generated]]
    top: list[Any] = [None]
    for position in range(1, len(ids) + 1):
        row = logprobs[position - 1]
        entry = {
            tokenizer.decode([t]): row[t].item() for t in torch.argsort(row, descending=True)[:k].tolist()
        }
        actual = ([*ids, generated])[position]
        entry.setdefault(tokenizer.decode([actual]), row[actual].item())
        top.append(entry)
    token_logprobs = [None] + [top[i][tokens[i]] for i in range(1, len(tokens))]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    logprobs_block = {
        "tokens": tokens,
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
    }
    choice = {
        "text": payload["prompt"] + tokens[-1],
        "index": 0,
        "logprobs": logprobs_block,
        "finish_reason": "length",
    }
    return {"id": "cmpl-test", "object": "text_completion", "model": payload["model"], "choices": [choice]}


@contextmanager
def serve(model: Any, tokenizer: Any, dialect: str, behaviour: Behaviour | None = None) -> Iterator[str]:
    """Serve on 127.0.0.1:<free port>; yields the API base URL (`http://127.0.0.1:PORT/v1`)."""
    behaviour = behaviour or Behaviour()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour.requests.append({"path": self.path, "headers": dict(self.headers), "payload": payload})
            time.sleep(behaviour.delay_s)
            if behaviour.fail_with:
                self._send(behaviour.fail_with.pop(0), {"error": {"message": "scripted failure"}})
                return
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if dialect == "vllm":
                self._send(200, vllm_answer(model, tokenizer, payload))
            else:
                self._send(200, openai_answer(model, tokenizer, payload, behaviour.add_bos))

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()

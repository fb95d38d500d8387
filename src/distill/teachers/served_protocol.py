"""Talking to a teacher served over an OpenAI-compatible completions endpoint (`POST {url}/completions`).

Two dialects give per-token top-k log-probabilities of a prompt, which is what distillation needs:

* ``vllm``: the prompt goes as token ids, several prompts per request; `prompt_logprobs: k` returns, for each
  prompt position j >= 1, the top-k of token j given the tokens before it, keyed by token id.
* ``openai``: the legacy form: the prompt goes as text, one per request; `echo: true, logprobs: k,
  max_tokens: 1` returns every prompt token with the top-k of its position (entry i: the alternatives to token
  i given the tokens before it), keyed by the token's text. Texts map back to ids through the student's
  tokenizer; a text several ids decode to (or none: llama.cpp writes a lone byte as "") is ambiguous and its
  mass joins the tail.
* ``llama_cpp``: the same request to llama-cpp-python's server (`python -m llama_cpp.server`, recorded from
  0.3.36), whose echo entries are shifted by one: entry i is the distribution *after* token i (it pairs each
  token with the logits its own position produced), and entry 0 is blanked to null, so the first position's
  targets are lost (that row is left empty: all mass in the tail, where every divergence is 0).

Row i of what `parse_*` returns is the teacher's distribution of token i + 1 given tokens 0..i, the same
row a local model's logits give at position i. The last row predicts past the prompt, which no counted token
reads (labels are the next tokens of the sequence): vllm leaves it empty (all mass in the tail).

Failures end in one line (`ServedTeacherError`); transient ones (no connection, timeouts, 408 / 429 / 5xx)
are retried with exponential back-off first.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.errors import UserError, clipped

PROTOCOLS = ("vllm", "openai", "llama_cpp")
RETRIED_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class ServedTeacherError(UserError):
    """The served teacher could not be reached or answered something unusable (one line)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the teacher is served and how to ask it."""

    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str
    top_k: int = 20
    protocol: str = "vllm"
    timeout_s: float = 60.0
    retries: int = 3  # further tries after the first, for transient failures only
    backoff_s: float = 0.5  # first wait; doubles at each retry
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key)
    prompts_per_request: int = 8  # vllm only: the openai dialect takes one prompt per request


@dataclass
class TopK:
    """Top-k of each position of one prompt: `ids` (n, k) int64, `logprobs` (n, k) float32 (-inf marks an
    unused slot), `tail_logmass` (n,), log of the mass outside the ids."""

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor


Post = Callable[[str, dict[str, Any], dict[str, str], float], dict[str, Any]]


def post_json(url: str, payload: dict[str, Any], headers: dict[str, str], timeout: float) -> dict[str, Any]:
    """One HTTP POST of JSON; raises urllib's errors as they come."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (URL from the recipe)
        return json.loads(response.read())


def call_endpoint(
    endpoint: Endpoint,
    payload: dict[str, Any],
    *,
    post: Post = post_json,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST `payload` to the endpoint's completions, retrying transient failures; one-line errors."""
    url = endpoint.url.rstrip("/") + "/completions"
    headers = {}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise ServedTeacherError(
                f"served teacher: environment variable {endpoint.api_key_env} is not set"
            )
        headers["Authorization"] = f"Bearer {key}"
    tries = endpoint.retries + 1
    for attempt in range(tries):
        try:
            return post(url, payload, headers, endpoint.timeout_s)
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code} {_server_message(error)}"
            if error.code not in RETRIED_STATUS:
                raise ServedTeacherError(f"served teacher {url}: {reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            cause = getattr(error, "reason", error)
            reason = "timed out" if isinstance(cause, TimeoutError) else f"unreachable ({cause})"
        except json.JSONDecodeError:
            raise ServedTeacherError(f"served teacher {url}: the answer is not JSON") from None
        if attempt + 1 < tries:
            sleep(endpoint.backoff_s * 2**attempt)
    raise ServedTeacherError(f"served teacher {url}: {clipped(reason, 160)} after {tries} tries")


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(error.read() or b"{}")
        message = answer.get("error", answer)
        message = message.get("message", message) if isinstance(message, dict) else message
        return clipped(str(message), 120)
    except (ValueError, AttributeError, OSError):
        return error.reason or ""


# -------------------------------------------------------------------------------------------- requests


def vllm_payload(endpoint: Endpoint, prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
    return {
        "model": endpoint.model,
        "prompt": [list(map(int, p)) for p in prompts],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": endpoint.top_k,
    }


def openai_payload(endpoint: Endpoint, text: str) -> dict[str, Any]:
    return {
        "model": endpoint.model,
        "prompt": text,
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": endpoint.top_k,
    }


# -------------------------------------------------------------------------------------------- answers


def _choices(answer: dict[str, Any], expected: int, url: str) -> list[dict[str, Any]]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != expected:
        got = len(choices) if isinstance(choices, list) else "no"
        raise ServedTeacherError(f"served teacher {url}: expected {expected} choice(s), got {got}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def _rows(distributions: Sequence[Mapping[int, float]], k: int) -> TopK:
    """Fixed-width rows from per-position {id: logprob}: the k most likely ids, -inf in unused slots."""
    n = len(distributions)
    ids = torch.zeros(n, k, dtype=torch.int64)
    logprobs = torch.full((n, k), float("-inf"))
    for i, distribution in enumerate(distributions):
        best = sorted(distribution.items(), key=lambda item: -item[1])[:k]
        for slot, (token, logprob) in enumerate(best):
            ids[i, slot], logprobs[i, slot] = token, logprob
    mass = logprobs.double().exp().sum(-1).clamp(max=1.0)
    tail = torch.log1p(-mass).float()  # -inf when the ids hold everything
    return TopK(ids, logprobs, tail)


def parse_vllm(answer: dict[str, Any], lengths: Sequence[int], k: int, url: str) -> list[TopK]:
    """Top-k rows of each prompt (row i predicts token i + 1) from a vLLM completions answer."""
    out = []
    for choice, length in zip(_choices(answer, len(lengths), url), lengths, strict=True):
        prompt = choice.get("prompt_logprobs")
        if not isinstance(prompt, list) or len(prompt) != length:
            raise ServedTeacherError(
                f"served teacher {url}: no prompt_logprobs of {length} tokens in the answer (is it vLLM, "
                "and was the prompt tokenised as sent?)"
            )
        rows = [_by_id(entry, url) for entry in prompt[1:]]
        rows.append({})  # past the prompt: read by no counted token
        out.append(_rows(rows, k))
    return out


def _by_id(entry: Mapping[str, Any] | None, url: str) -> dict[int, float]:
    if not isinstance(entry, Mapping):
        raise ServedTeacherError(f"served teacher {url}: a prompt position has no log-probabilities")
    return {int(token): float(value["logprob"]) for token, value in entry.items()}


def parse_openai(
    answer: dict[str, Any],
    pieces: Sequence[str],
    text_ids: Mapping[str, int],
    k: int,
    url: str,
    *,
    shifted: bool = False,
) -> TopK:
    """Top-k rows of one prompt from a legacy echo + logprobs answer. `pieces`: the text of each prompt token
    as the student's tokenizer decodes it; `text_ids`: text -> id for the texts exactly one id decodes to.

    The server's echoed tokens must be `pieces`, optionally after a beginning-of-sequence token the server
    added and before the one token it generated (llama.cpp leaves that out when it is the end of text); a
    mismatch means it tokenised the text otherwise, and the rows would not line up. `shifted`: llama-cpp-
    python's entries, each the distribution after its own token (module docstring)."""
    logprobs = (_choices(answer, 1, url)[0].get("logprobs")) or {}
    tokens, top = logprobs.get("tokens"), logprobs.get("top_logprobs")
    n = len(pieces)
    if not isinstance(tokens, list) or not isinstance(top, list) or len(top) != len(tokens):
        raise ServedTeacherError(f"served teacher {url}: the answer has no echoed tokens with top_logprobs")
    # The server may prepend a BOS token, and may or may not list the token it generated after the prompt.
    start = next((s for s in (0, 1) if list(tokens[s : s + n]) == list(pieces)), None)
    if start is None or len(tokens) > start + n + 1:
        shown = clipped(repr(tokens[: min(len(tokens), 6)]), 60)
        raise ServedTeacherError(
            f"served teacher {url}: it tokenised the prompt otherwise than the student's tokenizer ({shown} "
            f"...); a served teacher must share the student's tokenizer"
        )
    rows = []
    first = start if shifted else start + 1
    for position in range(first, first + n):
        entry = top[position] if position < len(top) else {}  # past the prompt: read by no counted token
        if shifted and position == start and entry is None:
            entry = {}  # llama-cpp-python blanks the distribution after the first token
        if not isinstance(entry, Mapping):
            raise ServedTeacherError(f"served teacher {url}: a prompt position has no top_logprobs")
        rows.append(
            {text_ids[t]: float(lp) for t, lp in entry.items() if t in text_ids and math.isfinite(lp)}
        )
    return _rows(rows, k)


def text_to_id(decode: Callable[[list[int]], str], vocabulary: int) -> dict[str, int]:
    """Text -> id for every id whose decoded text no other id shares (an ambiguous text is left out, and so is
    the empty text, which a server writes for a lone byte)."""
    seen: dict[str, int] = {}
    ambiguous = {""}
    for token in range(vocabulary):
        text = decode([token])
        if text in seen:
            ambiguous.add(text)
        seen[text] = token
    return {text: token for text, token in seen.items() if text not in ambiguous}

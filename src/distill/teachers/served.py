"""A teacher reached over an OpenAI-compatible completions endpoint (vLLM, llama.cpp's server, ...).

No model is held locally: each micro-batch's sequences are sent to the server, whose per-token top-k
log-probabilities become sparse targets (`SparseTargets`), the same targets a teacher cache holds. So the
objectives that take a cache's top-k take a served teacher, at temperature 1 (the server's log-probabilities
are of the plain softmax). The server must share the student's tokenizer: ids are sent as they are (vllm)
or the server's echoed tokens are checked against the student's (openai).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.sparse import SparseTargets
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest
from distill.teachers.served_protocol import (
    PROTOCOLS,
    Endpoint,
    Post,
    TopK,
    call_endpoint,
    openai_payload,
    parse_openai,
    parse_vllm,
    post_json,
    text_to_id,
    vllm_payload,
)


class ServedTeacher(Teacher):
    kind = "served"

    def __init__(
        self,
        endpoint: Endpoint,
        tokenizer: Any,
        vocabulary: int,
        *,
        post: Post = post_json,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if endpoint.protocol not in PROTOCOLS:
            raise UserError(
                f"served teacher: protocol '{endpoint.protocol}' is not one of {', '.join(PROTOCOLS)}"
            )
        if not 1 <= endpoint.top_k <= vocabulary:
            raise UserError(f"served teacher: top_k must be between 1 and the vocabulary's {vocabulary}")
        self.endpoint, self.tokenizer, self.vocabulary = endpoint, tokenizer, vocabulary
        self._post, self._sleep = post, sleep
        self._text_ids: dict[str, int] | None = None  # openai dialect: built on first use

    def check_objectives(self, names: list[str], objectives: Sequence[Any]) -> None:
        """Every teacher-reading objective must take top-k targets at temperature 1 and read no layer."""
        for name, objective in zip(names, objectives, strict=True):
            if not objective.needs_teacher:
                continue
            if getattr(objective, "teacher_layers", ()):
                raise UserError(f"objective '{name}' reads teacher layers; a served teacher gives only top-k")
            if not getattr(objective, "accepts_topk", False):
                raise UserError(
                    f"objective '{name}' needs the teacher's full logits; a served teacher gives its top-"
                    f"{self.endpoint.top_k} (use a top-k objective, `distill list objectives`)"
                )
            temperature = float(getattr(objective, "temperature", 1.0))
            if abs(temperature - 1.0) > 1e-9:
                raise UserError(
                    f"objective '{name}' softens at temperature {temperature:g}; a served teacher's "
                    "log-probabilities are at temperature 1"
                )

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        inputs = request.inputs
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise UserError("a served teacher serves language models (batches of input_ids)")
        ids = inputs["input_ids"].cpu()
        attention = inputs.get("attention_mask")
        lengths = attention.cpu().sum(1) if attention is not None else torch.full((len(ids),), ids.shape[1])
        sequences = [row[: int(n)].tolist() for row, n in zip(ids, lengths, strict=True)]
        per_sequence = self.top_k(sequences)
        k = self.endpoint.top_k
        full_ids = torch.zeros(*ids.shape, k, dtype=torch.int64)
        full_logprobs = torch.full((*ids.shape, k), float("-inf"))
        full_tail = torch.zeros(ids.shape)
        for row, result in enumerate(per_sequence):
            n = len(result.ids)
            full_ids[row, :n], full_logprobs[row, :n], full_tail[row, :n] = (
                result.ids,
                result.logprobs,
                result.tail_logmass,
            )
        mask = request.mask.cpu() if request.mask is not None else torch.ones(ids.shape, dtype=torch.bool)
        targets = _within_vocabulary(full_ids[mask], full_logprobs[mask], full_tail[mask], self.vocabulary)
        targets.ids = distinct_unused_slots(targets.ids, targets.logprobs, self.vocabulary)
        device = inputs["input_ids"].device
        return TeacherOutputs(
            topk=SparseTargets(
                targets.ids.to(device), targets.logprobs.to(device), targets.tail_logmass.to(device)
            )
        )

    def top_k(self, sequences: Sequence[list[int]]) -> list[TopK]:
        """The server's top-k rows for each sequence of token ids (row i predicts token i + 1)."""
        endpoint = self.endpoint
        if endpoint.protocol == "vllm":
            out: list[TopK] = []
            step = max(1, endpoint.prompts_per_request)
            for start in range(0, len(sequences), step):
                chunk = sequences[start : start + step]
                answer = call_endpoint(
                    endpoint, vllm_payload(endpoint, chunk), post=self._post, sleep=self._sleep
                )
                out += parse_vllm(answer, [len(s) for s in chunk], endpoint.top_k, endpoint.url)
            return out
        if self._text_ids is None:
            self._text_ids = text_to_id(self.tokenizer.decode, self.vocabulary)
        results = []
        for sequence in sequences:
            pieces = [self.tokenizer.decode([token]) for token in sequence]
            text = self.tokenizer.decode(sequence)
            answer = call_endpoint(
                endpoint, openai_payload(endpoint, text), post=self._post, sleep=self._sleep
            )
            shifted = endpoint.protocol == "llama_cpp"
            results.append(
                parse_openai(answer, pieces, self._text_ids, endpoint.top_k, endpoint.url, shifted=shifted)
            )
        return results


def _within_vocabulary(ids: Tensor, logprobs: Tensor, tail: Tensor, vocabulary: int) -> TopK:
    """Drop ids the student's (sliced) vocabulary lacks; their mass joins the tail."""
    outside = ids >= vocabulary
    if not outside.any():
        return TopK(ids, logprobs, tail)
    logprobs = logprobs.masked_fill(outside, float("-inf"))
    ids = ids.masked_fill(outside, 0)
    mass = logprobs.double().exp().sum(-1).clamp(max=1.0)
    return TopK(ids, logprobs, torch.log1p(-mass).float())


def distinct_unused_slots(ids: Tensor, logprobs: Tensor, vocabulary: int) -> Tensor:
    """Give each unused slot (-inf) an id no other slot of its row holds, the smallest free ones: the sparse
    losses gather the student's mass at every slot, and a repeated id would count that mass twice."""
    unused = torch.isneginf(logprobs)
    if not unused.any():
        return ids
    k = ids.shape[1]
    # k <= vocabulary, so at least k of the first min(2k, vocabulary) ids are free in every row.
    candidates = torch.arange(min(2 * k, vocabulary), device=ids.device).expand(len(ids), -1)
    held = torch.where(unused, torch.full_like(ids, -1), ids)
    taken = (candidates[:, :, None] == held[:, None, :]).any(-1)
    # Free candidates first, in increasing order (a stable sort on the taken flag).
    free = candidates.gather(1, torch.sort(taken.to(torch.int8), dim=1, stable=True).indices)
    rank_among_unused = unused.cumsum(1) - 1
    return torch.where(unused, free.gather(1, rank_among_unused.clamp(min=0)), ids)

"""MixSD: mixed contextual self-distillation for knowledge injection ("MixSD: Mixed Contextual
Self-Distillation for Knowledge Injection", Liu et al., 2026). Instead of fine-tuning on fixed targets, the
supervision sequence is decoded, token by token, from a mixture of two conditionals of the base model
itself: the expert one, which sees the fact in its context (`{solution}` of the context template), and the
naive one, which sees the question alone,

    y_t ~ m(. | y_<t),   m = alpha p(. | fact, x, y_<t) + (1 - alpha) p(. | x, y_<t),

(greedy: y_t = argmax m); the model is then fine-tuned (cross-entropy, question-only context) on
(x, y). Where the expert is sure (the fact's tokens) the mixture follows it; elsewhere it stays close to the
model's own prior, so the targets have low NLL under the base model and fine-tuning moves it less. The
paper's exact mixing schedule is not reproduced; alpha is a setting. The sequences are decoded once, from
the student as it starts (the base model), per seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.data.text import Example
from distill.models.adapters import logits_of
from distill.sources.context import DEFAULT_TEMPLATE, check_template
from distill.sources.settings import require


@dataclass(frozen=True)
class MixSDSettings:
    """`source: {name: mixsd, params: ...}`."""

    alpha: float = 0.5  # the expert conditional's weight in the mixture
    context: str = DEFAULT_TEMPLATE
    do_sample: bool = False
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None: each example's own completion length
    seed: int = 0
    batch_size: int = 64

    def check(self) -> None:
        require(0.0 <= self.alpha <= 1.0, f"alpha must lie in [0, 1], got {self.alpha}")
        require(self.temperature > 0, "temperature must be positive")
        require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        check_template(self.context)


class _Stream:
    """Incremental decoding of left-padded prompts with a KV cache."""

    def __init__(
        self, model: nn.Module, prompts: Sequence[list[int]], pad: int, device: torch.device
    ) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        self.model = model
        self.attention = attention.to(device)
        self.position = (self.attention.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(device),
            attention_mask=self.attention,
            position_ids=self.position,
            use_cache=True,
        )
        self.cache = out.cache  # transformers 5: `cache` (formerly `past_key_values`)
        self.logits = logits_of(out)[:, -1].float()
        self.position = self.position[:, -1:]

    def push(self, tokens: Tensor) -> None:
        self.attention = torch.cat([self.attention, torch.ones_like(tokens[:, None])], dim=1)
        self.position = self.position + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention,
            position_ids=self.position,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.logits = logits_of(out)[:, -1].float()


@torch.inference_mode()
def mixed_generate(
    model: nn.Module,
    tokenizer: Any,
    naive_prompts: Sequence[list[int]],
    expert_prompts: Sequence[list[int]],
    budgets: Sequence[int],
    *,
    alpha: float,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Completions decoded from alpha * expert + (1 - alpha) * naive next-token distributions, cut after
    the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    log_a = math.log(alpha) if alpha > 0 else -math.inf
    log_b = math.log1p(-alpha) if alpha < 1 else -math.inf
    out: list[list[int]] = []
    try:
        for start in range(0, len(naive_prompts), batch_size):
            end = min(start + batch_size, len(naive_prompts))
            naive = _Stream(model, naive_prompts[start:end], pad, device)
            expert = _Stream(model, expert_prompts[start:end], pad, device)
            budget = list(budgets[start:end])
            rows: list[list[int]] = [[] for _ in range(end - start)]
            done = torch.zeros(end - start, dtype=torch.bool)
            for step in range(max(budget)):
                mix = torch.logaddexp(
                    log_a + torch.log_softmax(expert.logits / temperature, -1),
                    log_b + torch.log_softmax(naive.logits / temperature, -1),
                )
                if do_sample:
                    tokens = torch.multinomial(mix.exp().cpu(), 1, generator=generator).squeeze(1)
                else:
                    tokens = mix.argmax(-1).cpu()
                for row, token in enumerate(tokens.tolist()):
                    if not done[row] and step < budget[row]:
                        rows[row].append(token)
                        done[row] = token == eos or len(rows[row]) >= budget[row]
                if bool(done.all()):
                    break
                tokens = tokens.to(device)
                naive.push(tokens)
                expert.push(tokens)
            out += rows
    finally:
        model.train(was_training)
    return out


def mixed_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    contexts: Sequence[list[int]],
    settings: MixSDSettings,
    *,
    seed: int,
) -> list[Example]:
    """The training examples with their completions replaced by the mixed decoding."""
    prompts = [e.ids[: e.prompt_len] for e in examples]
    budgets = [settings.max_new_tokens or max(1, len(e.ids) - e.prompt_len) for e in examples]
    completions = mixed_generate(
        model,
        tokenizer,
        prompts,
        contexts,
        budgets,
        alpha=settings.alpha,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        seed=seed,
        batch_size=settings.batch_size,
    )
    return [
        Example(p + c, [False] * len(p) + [True] * len(c), len(p), e.reference)
        for e, p, c in zip(examples, prompts, completions, strict=True)
    ]

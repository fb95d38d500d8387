"""A given map composed into a Hugging Face encoder's self-attention probabilities (S02's attention injection,
Nourbakhsh et al., "Evaluating Explainable AI Attribution Methods in Neural Machine Translation via
Attention-Guided Knowledge Distillation"), and the eager attention probabilities of an encoder read out.

Mechanism: transformers' `AttentionInterface`. The implementation `INJECTED` is registered once (with sdpa's
boolean mask builder in `AttentionMaskInterface`, so that the model hands it `(B, 1, Q, K)` masks of the keys
that count, or None when no text is padded). A model runs it only while `AttentionInjection.active()` (or
`attention_probabilities`) has switched its config's `_attn_implementation` to it, and is switched back on
exit, even on an error: outside those blocks the model is exactly the model it was (config, weights and
`state_dict` untouched, so what is evaluated or exported never sees an injection). Inside, a self-attention
module with a map set for it computes eager attention and composes (`compose`); one whose probabilities are
being read computes eager attention; every other module runs transformers' sdpa attention, so a switched
model with no map set gives the sdpa model's outputs.

Composition (`compose`, `OPERATORS`): `M` is `(B, Q, K)`, one map for every head of the layer (Inseq's
maps, aggregated as by default, have no head dimension), rows normalised over the real keys. With `S` the
scaled scores `Q K^T / sqrt(d)` masked on padded keys and `P = softmax(S)`:

- `add`:      `softmax(S + M)`, the map added to the scores before the softmax: a mild bias, as `M`'s
  entries are at most 1 (added to `P` and renormalised, it would equal `average` for maps whose rows sum
  to one, as ours do);
- `multiply`: `P * M`, renormalised over the real keys;
- `average`:  `(P + M) / 2`, renormalised over the real keys;
- `replace`:  `M`, renormalised over the real keys.

A row left without mass (`P * M` with disjoint supports, a map row of zeros) keeps `P`. Padded keys get no
weight; attention dropout (training only) applies to the composed probabilities, as to `P` in eager
attention. Which operator acts before the softmax, and the renormalisation, are our reading: the paper's
text beyond its abstract and its code could not be obtained here.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError, shown

INJECTED = "distill_injected"
OPERATORS = ("add", "multiply", "average", "replace")
_TINY = 1e-12


@dataclass
class _Guide:
    map: Tensor  # (B, Q, K)
    operator: str


# Per self-attention module, never stored on the module itself: a map to compose, or a list collecting its
# probabilities. Weak keys: a model that is dropped takes its entries with it.
_GUIDES: weakref.WeakKeyDictionary[nn.Module, _Guide] = weakref.WeakKeyDictionary()
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, list[Tensor]] = weakref.WeakKeyDictionary()
_registered = False


def check_operator(operator: Any) -> str:
    if operator not in OPERATORS:
        raise UserError(
            f"attention injection: operator must be one of {', '.join(OPERATORS)}, got {shown(operator)}"
        )
    return operator


# ------------------------------------------------------------------------------------------ the maths


def _renormalised(weights: Tensor, fallback: Tensor) -> Tensor:
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > _TINY, weights / total.clamp_min(_TINY), fallback)


def compose(scores: Tensor, guide: Tensor, operator: str, allowed: Tensor | None = None) -> Tensor:
    """Attention probabilities from the scaled scores `scores` `(B, H, Q, K)` and a map `guide` `(B, Q, K)`
    (shared by the heads) under `operator` (see the module docstring). `allowed` is a boolean mask
    broadcastable to the scores (True: the key counts), or None when every key counts. Computed in float32
    (or the scores' dtype if wider) and returned in the scores' dtype."""
    check_operator(operator)
    dtype = scores.dtype
    work = torch.promote_types(dtype, torch.float32)
    scores = scores.to(work)
    guide = guide.to(device=scores.device, dtype=work)[:, None]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(work).min)
        guide = guide * allowed
    if operator == "add":
        return torch.softmax(scores + guide, dim=-1).to(dtype)
    probs = torch.softmax(scores, dim=-1)
    if operator == "multiply":
        mixed = probs * guide
    elif operator == "average":
        mixed = (probs + guide.expand_as(probs)) / 2
    else:
        mixed = guide.expand_as(probs)
    if allowed is not None:
        mixed = mixed * allowed
    return _renormalised(mixed, probs).to(dtype)


def _allowed(attention_mask: Tensor | None, scores: Tensor) -> Tensor | None:
    """The boolean mask of keys that count, from what transformers passes (sdpa's boolean mask, or an
    additive float mask), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def injected_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The `INJECTED` attention function (transformers' attention-interface signature; `query`, `key`,
    `value` are `(B, H, T, d)`)."""
    guide = _GUIDES.get(module)
    capture = _CAPTURES.get(module)
    if guide is None and capture is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.shape[1] != query.shape[1]:  # grouped keys / values: one copy per query head
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    allowed = _allowed(attention_mask, scores)
    if guide is not None:
        b, q, k = scores.shape[0], scores.shape[2], scores.shape[3]
        if tuple(guide.map.shape) != (b, q, k):
            raise RuntimeError(
                f"attention injection: the map is {tuple(guide.map.shape)}, the attention is ({b}, {q}, {k})"
            )
        probs = compose(scores, guide.map, guide.operator, allowed)
    else:
        masked = scores if allowed is None else scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
    if capture is not None:
        capture.append(probs.detach())
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, probs


def register() -> None:
    """Register `INJECTED` with transformers (once; transformers is imported only now)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(INJECTED, injected_attention)
    AttentionMaskInterface.register(INJECTED, sdpa_mask)
    _registered = True


# ------------------------------------------------------------------------------------------ models


def hf_encoder(model: nn.Module, role: str) -> nn.Module:
    """The transformers encoder inside `model` (an `hf_encoder` classifier); refuses a model whose attention
    does not go through transformers' attention interface."""
    encoder = getattr(model, "encoder", None)
    if not hasattr(getattr(encoder, "config", None), "_attn_implementation") or not hasattr(
        encoder, "get_input_embeddings"
    ):
        raise UserError(
            f"attention injection: the {role} must be an 'hf_encoder' model (a transformers encoder), "
            f"got {type(model).__name__}"
        )
    can_switch = getattr(encoder, "_can_set_attn_implementation", None)
    if can_switch is not None and not can_switch():
        raise UserError(
            f"attention injection: the {role}'s encoder ({type(encoder).__name__}) does not use "
            "transformers' attention interface, so its attention cannot be replaced"
        )
    return encoder


def self_attention_modules(model: nn.Module, role: str) -> list[nn.Module]:
    """The self-attention module of every block of an `hf_encoder` classifier, in order (the parent of the
    block's query projection, `EncoderClassifier.attention_paths`)."""
    hf_encoder(model, role)
    paths = getattr(model, "attention_paths", None)
    count = getattr(model, "num_layers", None)
    if paths is None or not isinstance(count, int):
        raise UserError(f"attention injection: the {role} ({type(model).__name__}) names no attention blocks")
    modules = dict(model.named_modules())
    found = []
    for index in range(count):
        path = paths(index)["query"].rpartition(".")[0]
        if path not in modules:
            raise UserError(f"attention injection: the {role} has no attention module '{path}'")
        found.append(modules[path])
    return found


@contextmanager
def switched(encoder: nn.Module) -> Iterator[None]:
    """`encoder` runs `INJECTED` inside the block; its previous implementation is restored on exit."""
    register()
    previous = encoder.config._attn_implementation
    encoder.config._attn_implementation = INJECTED
    try:
        yield
    finally:
        encoder.config._attn_implementation = previous


class AttentionInjection:
    """Maps composed into chosen self-attention blocks of one `hf_encoder` classifier (`layers`: block
    indices, None for all) under `operator`. `set_map` gives the `(B, T, T)` map of the next forward passes
    (None: none); `active()` (or `switch_on` / `switch_off`) is where the model runs the injection. `remove`
    forgets every map. Holds the model weakly."""

    def __init__(self, model: nn.Module, layers: Sequence[int] | None, operator: str) -> None:
        self.operator = check_operator(operator)
        modules = self_attention_modules(model, "student")
        chosen = list(range(len(modules))) if layers is None else list(layers)
        bad = [i for i in chosen if not -len(modules) <= i < len(modules)]
        if bad or not chosen:
            raise UserError(
                f"attention injection: layers must be block indices in 0..{len(modules) - 1}, "
                f"got {shown(layers)}"
            )
        self.layers = sorted({i % len(modules) for i in chosen})
        self._modules = [weakref.ref(modules[i]) for i in self.layers]
        self._encoder = weakref.ref(hf_encoder(model, "student"))
        self._previous: str | None = None

    def _live(self) -> list[nn.Module]:
        return [m for m in (ref() for ref in self._modules) if m is not None]

    def set_map(self, guide: Tensor | None) -> None:
        for module in self._live():
            if guide is None:
                _GUIDES.pop(module, None)
            else:
                _GUIDES[module] = _Guide(guide, self.operator)

    def switch_on(self) -> None:
        encoder = self._encoder()
        if encoder is None or self._previous is not None:
            return
        register()
        self._previous = encoder.config._attn_implementation
        encoder.config._attn_implementation = INJECTED

    def switch_off(self) -> None:
        encoder = self._encoder()
        if encoder is not None and self._previous is not None:
            encoder.config._attn_implementation = self._previous
        self._previous = None

    @contextmanager
    def active(self, guide: Tensor | None) -> Iterator[None]:
        self.set_map(guide)
        self.switch_on()
        try:
            yield
        finally:
            self.switch_off()
            self.set_map(None)

    def remove(self) -> None:
        self.switch_off()
        self.set_map(None)


@torch.no_grad()
def attention_probabilities(
    model: nn.Module, ids: Tensor, mask: Tensor, layers: Sequence[int]
) -> list[Tensor]:
    """The eager attention probabilities `(B, H, T, T)` of blocks `layers` of an `hf_encoder` classifier on
    token ids `ids` `(B, T)` with the boolean mask `mask` of real tokens (no trimming here)."""
    modules = self_attention_modules(model, "teacher")
    encoder = hf_encoder(model, "teacher")
    taken: list[list[Tensor]] = []
    for index in layers:
        taken.append([])
        _CAPTURES[modules[index]] = taken[-1]
    try:
        with switched(encoder):
            encoder(input_ids=ids, attention_mask=mask.long())
    finally:
        for index in layers:
            _CAPTURES.pop(modules[index], None)
    return [probs[-1] for probs in taken]

"""The trainer's fused large-vocabulary path: output-layer inputs in place of (tokens x vocabulary) logits.

When every objective can compute its value from hidden states and output layers (`Objective.fused_capable`:
the divergences of `fused_linear_divergence`, cross-entropy through `linear_cross_entropy`), the models run
with their output layer fed zero positions; the hidden state the layer would have read is kept, and the
losses multiply it into the layer chunk by chunk. The logits never exist whole: at a 128k vocabulary the
dense path needs several float32 (tokens x vocabulary) copies.

A model qualifies when `get_output_embeddings()` (Hugging Face causal LMs, PEFT-wrapped ones) is a plain
`nn.Linear` and a probe on one sequence confirms that the model's logits are exactly that layer's output: a
model that post-processes its logits (Cohere's logit scale; Gemma 2's soft-capping, refused by its config)
fails the probe and keeps the dense path. FSDP-sharded output layers keep the dense path too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from distill.models.adapters import logits_of
from distill.objectives import HeadInputs

PROBE_TOKENS = 16


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain, unsharded `nn.Linear`, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    layer = getter() if callable(getter) else None
    if type(layer) is not nn.Linear:  # a LoRA-wrapped or quantised head computes something else
        return None
    if type(layer.weight.data) is not Tensor:  # a DTensor: FSDP shards the layer
        return None
    return layer


def vocabulary_rows(model: nn.Module, layer: nn.Linear) -> int:
    """How many output rows the model's logits keep (a padding-only vocabulary mismatch cuts the rest)."""
    return int(getattr(model, "_distill_vocab_slice", None) or layer.weight.shape[0])


def _narrowed(hidden: Tensor) -> Tensor:
    return hidden.narrow(-2, 0, 0) if hidden.dim() >= 2 else hidden[:0]


@contextmanager
def hidden_only(layer: nn.Linear) -> Iterator[list[Tensor]]:
    """Within the block, `layer` keeps its inputs in the yielded list and computes on zero positions."""
    kept: list[Tensor] = []

    def keep_and_skip(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        kept.append(args[0])
        return (_narrowed(args[0]), *args[1:])

    handle = layer.register_forward_pre_hook(keep_and_skip)
    try:
        yield kept
    finally:
        handle.remove()


def head_inputs(model: nn.Module, layer: nn.Linear, kept: list[Tensor], *, detach: bool) -> HeadInputs:
    """The one hidden state `hidden_only` kept, with the layer's (vocabulary-cut) weight and bias."""
    if len(kept) != 1:
        raise RuntimeError(f"the output layer ran {len(kept)} times in one forward pass; expected once")
    rows = vocabulary_rows(model, layer)
    weight, bias = layer.weight[:rows], None if layer.bias is None else layer.bias[:rows]
    hidden = kept[0]
    if detach:  # the teacher: tensors made in inference mode are cloned so that autograd may save them
        hidden, weight = hidden.clone(), weight.detach()
        bias = None if bias is None else bias.detach()
    return HeadInputs(hidden, weight, bias)


def _probe_inputs(inputs: Any) -> Any:
    """The first sequence of a batch, cut to its first few positions."""
    if isinstance(inputs, dict):
        return {k: _probe_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, Tensor) and inputs.dim() >= 2:
        return inputs[:1, :PROBE_TOKENS]
    return inputs


def logits_come_from_layer(model: nn.Module, layer: nn.Linear, inputs: Any) -> bool:
    """Whether the model's logits on (a slice of) `inputs` are its output layer's output, unchanged.

    The layer is a plain `nn.Linear` (`output_layer`), so its output is `hidden @ weight.T + bias` in
    whatever precision the model runs it; what this catches is post-processing after it (a scale, a cap).
    A soft-capping config is refused outright: on small logits the cap is within rounding of the identity,
    on a trained model's it is not."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        return False
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            sample = _probe_inputs(inputs)
            output = model(**sample) if isinstance(sample, dict) else model(sample)
            logits = logits_of(output)
    finally:
        handle.remove()
    if len(seen) != 1:
        return False
    expected = seen[0][..., : vocabulary_rows(model, layer)]
    if expected.shape != logits.shape:
        return False
    scale = float(expected.float().abs().max().clamp(min=1.0))
    return bool(torch.allclose(logits.float(), expected.float(), rtol=1e-5, atol=1e-6 * scale))


def call_model(model: nn.Module, inputs: Any) -> Any:
    """A model on its inputs: a dict (a language-model batch) is passed as keyword arguments."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)

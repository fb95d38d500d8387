"""S02 attention-guided distillation (Nourbakhsh, Lamsiyah, Danilov & Schommer, 2026, "Evaluating Explainable
AI Attribution Methods in Neural Machine Translation via Attention-Guided Knowledge Distillation",
arXiv:2603.11342): attribution maps of the frozen teacher, one per training batch, injected into the
student's self-attention under one of four composition operators (`distill.models.attention_injection`).

The paper extracts the maps with Inseq from Marian-MT / mBART teachers and injects them into a seq2seq
student; Attention, Value Zeroing and Layer Gradient x Activation help most, Saliency, Integrated Gradients
(and DeepLIFT, Input x Gradient, GradientShap, not offered here) less. Here: encoder classifiers
(`hf_encoder`), so a map is `(B, T, T)` over the text's own tokens (queries x keys) and goes into the
student's self-attention. Maps (`attribution_map`), every row normalised over the real tokens (padded keys
get 0):

- `attention`: the teacher's attention probabilities of block `teacher_layer`, averaged over its heads
  (`teacher_layer: mean` also averages the blocks: Inseq's default aggregation of attention);
- `value_zeroing` (Mohebbi et al., 2023, "Quantifying Context Mixing in Transformers"): block
  `teacher_layer` is run again on its own input with the value vector of token j zeroed in every head; the
  score of (i, j) is the cosine distance between token i's output then and its original output; rows
  normalised to sum to one (their official code's normalisation). Written here (Captum has none), batched:
  every (text, token) pair is one copy of the text;
- `layer_gradient_x_activation`, `saliency`, `integrated_gradients`: Captum's `LayerGradientXActivation`
  on the teacher's word-embedding layer, `Saliency` on the word embeddings (the encoder's `inputs_embeds`),
  `LayerIntegratedGradients` on the word-embedding layer (`ig_steps` steps, baseline: the pad token's
  embedding at every position, the real-token mask kept), each towards the class the teacher predicts.
  A token's score is the L2 norm of its attribution vector over the embedding dimension (Inseq's default
  aggregation of gradient methods), and the map is that token distribution broadcast over the query rows:
  `M[b, i, j] = s[b, j] / sum_k s[b, k]` over real tokens j, k, for every row i.

The objective (`attribution_guidance`): `resolve_paths` keeps the live teacher (weakly) and puts two hooks on
the student's encoder: before its forward, only in training mode, the teacher's map for the batch's token
ids (already cut to the batch's longest text) is computed and set for `student_layers` (all blocks by
default, every head); after it (even on an error) the injection is switched off. In eval mode (evaluation,
export, deployment) the student runs alone and unmodified. `release()` (or dropping the objective) removes
the hooks. Its own loss is zero (a tensor connected to the student's graph): the abstract names no loss
for the maps, which shape the student's forward pass while the recipe's other terms (cross-entropy, KD)
train it.

Cache (`cache_maps`, on by default; `CachedMaps`): a map depends only on the frozen teacher and the text
(eval mode, padded keys masked, no text sees another), so each text's map over its real tokens is kept,
keyed by its token ids, per teacher module and state of its weights (an in-place update to the teacher's
tensors starts afresh). Epochs after the first, further seeds and the other operators of the same teacher
in one process read the maps back; texts not yet seen are computed sorted by length, 8 at a time, each chunk
cut to its longest text. Cached and uncached maps agree on real (query, key) pairs to float rounding (a
test); a padded query's row is uniform over the real keys. The store grows with the training set (at most
`T x T` floats a text, about 10 MB for SMS spam) and lives as long as the teacher; `cache_maps: false`
computes every batch afresh. Measured cost per batch: `benchmarks/results/text_attribution.md`.

Deviations from the paper: an encoder's self-attention instead of a seq2seq student's attention over
source-target maps; maps computed on the fly from the frozen teacher instead of extracted beforehand with
Inseq; attribution towards the teacher's predicted class (the gold label is not known before the student's
forward pass); no map at evaluation. The paper's student, by our reading of its abstract, gets maps when it
is evaluated too (the teacher's, or those its Attributor transformer predicts); neither is done here, so a
student trained with `replace` (or a sharp `multiply`) relies on maps it will not get, while `add` and
`average` keep its own attention in play. How each operator composes (before / after the softmax, the
renormalisation) is our reading, written in `distill.models.attention_injection`: the paper's text beyond
its abstract, and its code (on GitHub per the abstract), could not be obtained here. Every default is ours.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distill.errors import UserError
from distill.models.attention_injection import (
    OPERATORS,
    AttentionInjection,
    attention_probabilities,
    hf_encoder,
    self_attention_modules,
)
from distill.objectives.base import ParamError, StepOutputs, flag, shown, whole_number
from distill.objectives.features import FeatureObjective, register_feature_objective

NAME = "attribution_guidance"
ATTRIBUTIONS = (
    "attention",
    "value_zeroing",
    "layer_gradient_x_activation",
    "saliency",
    "integrated_gradients",
)
LAYERWISE = ("attention", "value_zeroing")  # the attributions of one teacher block (`teacher_layer`)
ALL_LAYERS = "all"
MEAN = "mean"
EMBEDDINGS = "encoder.embeddings"  # the paths the objective reads (see `AttributionGuidance.forward`)
_TINY = 1e-12
_COPIES = 1 << 14  # value zeroing: about this many tokens per batched re-run of a block


# ------------------------------------------------------------------------------------------ maps


def teacher_logits(
    teacher: nn.Module, mask: Tensor, ids: Tensor | None = None, embeds: Tensor | None = None
) -> Tensor:
    """An `hf_encoder` classifier's logits for token ids `ids` (or word embeddings `embeds`, `(B, T, H)`)
    with the boolean mask of real tokens `mask`: its forward pass without cutting the batch to its longest
    text and without reading the mask from the ids (attribution baselines are not real texts)."""
    encoder = hf_encoder(teacher, "teacher")
    if embeds is not None:
        hidden = encoder(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
    else:
        hidden = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    if teacher.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.to(hidden.dtype)
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    return teacher.head(teacher.dropout(pooled))


def normalised_rows(raw: Tensor, mask: Tensor) -> Tensor:
    """`raw` `(B, Q, K)` clamped at 0, zero on padded keys, every row divided by its sum over the real keys;
    a row without mass becomes uniform over the real keys. Float32, or `raw`'s dtype if wider."""
    dtype = torch.promote_types(raw.dtype, torch.float32)
    keys = mask[:, None, :].to(dtype)
    weights = raw.to(dtype).clamp_min(0) * keys
    total = weights.sum(-1, keepdim=True)
    uniform = keys / keys.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(total > _TINY, weights / total.clamp_min(_TINY), uniform.expand_as(weights))


def token_map(scores: Tensor, mask: Tensor) -> Tensor:
    """Token scores `(B, T)` as a `(B, T, T)` map: the same row for every query, normalised over real keys."""
    return normalised_rows(scores[:, None, :].expand(-1, scores.shape[1], -1), mask)


def _layers(teacher: nn.Module, layer: int | str) -> list[int]:
    count = len(self_attention_modules(teacher, "teacher"))
    return list(range(count)) if layer == MEAN else [int(layer) % count]


def attention_map(teacher: nn.Module, ids: Tensor, mask: Tensor, layer: int | str = -1) -> Tensor:
    """The teacher's attention probabilities of block `layer` (or the mean of all blocks), head-averaged."""
    probs = attention_probabilities(teacher, ids, mask, _layers(teacher, layer))
    mean = torch.stack([p.to(torch.float32).mean(1) for p in probs]).mean(0)
    return normalised_rows(mean, mask)


class _BlockDone(Exception):
    """Stops the teacher's forward pass once value zeroing has what it needs."""


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """`1 - cos(a, b)` over the last dimension, as `|a / |a| - b / |b||^2 / 2`: exact to rounding for nearly
    parallel vectors, where `1 - cos` would lose its digits (value zeroing's distances are often 1e-5)."""
    work = torch.promote_types(a.dtype, torch.float32)
    a = nn.functional.normalize(a.to(work), dim=-1)
    b = nn.functional.normalize(b.to(work), dim=-1)
    return (a - b).pow(2).sum(-1) / 2


def _batch_indexed(value: Any, rows: Tensor, batch: int) -> Any:
    """`value` with its batch rows `rows` taken, when it is a tensor with `batch` rows; else as is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


@torch.no_grad()
def value_zeroing_scores(teacher: nn.Module, ids: Tensor, mask: Tensor, layer: int) -> Tensor:
    """Value zeroing's raw scores `(B, T, T)` of block `layer`: `[b, i, j]` is the cosine distance between
    token i's output of the block and its output when the block reruns on the same input with token j's
    value vector zeroed in every head; 0 for padded keys j."""
    encoder = hf_encoder(teacher, "teacher")
    layer = _layers(teacher, layer)[0]
    modules = dict(teacher.named_modules())
    block = modules[teacher.layer_path(layer)]
    value_projection = modules[teacher.attention_paths(layer)["value"]]
    seen: dict[str, Any] = {}

    def take_inputs(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    def take_output(_module: nn.Module, _args: Any, output: Any) -> None:
        seen["output"] = output[0] if isinstance(output, tuple) else output
        raise _BlockDone  # the blocks above are not needed

    handles = [
        block.register_forward_pre_hook(take_inputs, with_kwargs=True),
        block.register_forward_hook(take_output),
    ]
    try:
        encoder(input_ids=ids, attention_mask=mask.long())
    except _BlockDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    hidden, *rest = seen["args"]
    original: Tensor = seen["output"]
    batch, length = ids.shape
    pairs = mask.nonzero()  # (n, 2): (text, zeroed token), real tokens only
    dtype = torch.promote_types(original.dtype, torch.float32)
    scores = torch.zeros(batch, length, length, dtype=dtype, device=ids.device)
    keep: dict[str, Tensor] = {}

    def zero_values(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        return output * keep["mask"][..., None].to(output.dtype)

    handle = value_projection.register_forward_hook(zero_values)
    try:
        step = max(1, _COPIES // max(length, 1))
        for start in range(0, pairs.shape[0], step):
            rows, zeroed = pairs[start : start + step].unbind(1)
            keep["mask"] = torch.ones(rows.shape[0], length, device=ids.device)
            keep["mask"][torch.arange(rows.shape[0], device=ids.device), zeroed] = 0.0
            args = [_batch_indexed(a, rows, batch) for a in rest]
            kwargs = {k: _batch_indexed(v, rows, batch) for k, v in seen["kwargs"].items()}
            output = block(hidden.index_select(0, rows), *args, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            scores[rows, :, zeroed] = cosine_distance(output, original.index_select(0, rows))
    finally:
        handle.remove()
    return scores


def value_zeroing_map(teacher: nn.Module, ids: Tensor, mask: Tensor, layer: int | str = -1) -> Tensor:
    """Value zeroing's map of block `layer` (or the mean of every block's normalised map)."""
    maps = [
        normalised_rows(value_zeroing_scores(teacher, ids, mask, i), mask) for i in _layers(teacher, layer)
    ]
    return torch.stack(maps).mean(0)


def _captum(method: str) -> Any:
    try:
        import captum.attr
    except ImportError as err:
        raise UserError(
            f"objective '{NAME}': attribution '{method}' needs captum: pip install 'distill[text]'"
        ) from err
    return captum.attr


def gradient_scores(method: str, teacher: nn.Module, ids: Tensor, mask: Tensor, ig_steps: int = 16) -> Tensor:
    """Token scores `(B, T)` of a Captum gradient attribution on the teacher's word embeddings (see the module
    docstring), towards the class the teacher predicts: the L2 norm over the embedding dimension."""
    attr = _captum(method)
    encoder = hf_encoder(teacher, "teacher")
    embedding = encoder.get_input_embeddings()
    with torch.inference_mode(False), torch.enable_grad():
        ids, mask = ids.clone(), mask.clone()
        with torch.no_grad():
            target = teacher_logits(teacher, mask, ids=ids).argmax(-1)

        def by_ids(token_ids: Tensor, real: Tensor) -> Tensor:
            return teacher_logits(teacher, real, ids=token_ids)

        if method == "layer_gradient_x_activation":
            found = attr.LayerGradientXActivation(by_ids, embedding).attribute(
                ids, target=target, additional_forward_args=(mask,)
            )
        elif method == "saliency":

            def by_embeds(embeds: Tensor, real: Tensor) -> Tensor:
                return teacher_logits(teacher, real, embeds=embeds)

            embeds = embedding(ids).detach().requires_grad_(True)
            found = attr.Saliency(by_embeds).attribute(embeds, target=target, additional_forward_args=(mask,))
        elif method == "integrated_gradients":
            pad = int(getattr(teacher, "pad_id", 0))
            found = attr.LayerIntegratedGradients(by_ids, embedding).attribute(
                ids,
                baselines=torch.full_like(ids, pad),
                target=target,
                additional_forward_args=(mask,),
                n_steps=ig_steps,
                internal_batch_size=ids.shape[0] * min(ig_steps, 8),
            )
        else:
            raise UserError(f"objective '{NAME}': {shown(method)} is not a gradient attribution")
    scores = found.detach().to(torch.float32).norm(dim=-1)
    return scores * mask.to(scores.dtype)


def attribution_map(
    method: str, teacher: nn.Module, ids: Tensor, mask: Tensor, *, layer: int | str = -1, ig_steps: int = 16
) -> Tensor:
    """The teacher's `(B, T, T)` map of `method` (one of `ATTRIBUTIONS`) for token ids `ids` `(B, T)` and the
    boolean mask of real tokens `mask`; float32 (float64 for a float64 teacher), no graph, rows normalised
    over real keys."""
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        if method == "attention":
            found = attention_map(teacher, ids, mask, layer)
        elif method == "value_zeroing":
            found = value_zeroing_map(teacher, ids, mask, layer)
        else:
            found = token_map(gradient_scores(method, teacher, ids, mask, ig_steps), mask)
    finally:
        teacher.train(teacher_was_training)
    return found.detach()


# ------------------------------------------------------------------------------------------ cache


MapMaker = Callable[[nn.Module, Tensor, Tensor], Tensor]
# Per teacher module (weak keys: a dropped teacher takes its maps with it), per map recipe and state of the
# teacher's weights: every text's map over its real tokens, keyed by the bytes of those tokens' ids.
_MAPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], dict[bytes, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _weights_state(teacher: nn.Module) -> tuple[int, ...]:
    """The version counters of the teacher's tensors: any in-place update (an optimiser step) changes them,
    so maps of a teacher that trained since are not served."""
    return tuple(t._version for t in (*teacher.parameters(), *teacher.buffers()))


def _text_key(ids: Tensor) -> bytes:
    return ids.detach().to("cpu", torch.int64).numpy().tobytes()


class CachedMaps:
    """`make_map` with each text's map kept: a map depends only on the frozen teacher and the text (eval
    mode, padded keys masked, no text sees another), so the second epoch, the next seed and the other
    operators of one teacher in the same process read it back. Texts not yet seen are computed sorted by
    length, `chunk` at a time, each chunk cut to its longest text (less padding than the whole batch), the
    real tokens packed to the left: the positions a right-padded batch (the text data's collate) gives them.

    Returned maps equal `make_map`'s on the real (query, key) pairs up to float rounding; a padded query's
    row is uniform over the real keys (the student's padded queries feed nothing that is read)."""

    def __init__(self, make_map: MapMaker, recipe: tuple[Any, ...], pad_id: int, chunk: int = 8) -> None:
        self.make_map = make_map
        self.recipe = recipe
        self.pad_id = pad_id
        self.chunk = chunk
        self.computed = 0  # texts whose map was computed (not read back): for tests and benchmarks

    def store(self, teacher: nn.Module) -> dict[bytes, Tensor]:
        per_teacher = _MAPS.setdefault(teacher, {})
        return per_teacher.setdefault((*self.recipe, _weights_state(teacher)), {})

    def __call__(self, teacher: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
        store = self.store(teacher)
        texts = [ids[b][mask[b]] for b in range(ids.shape[0])]
        keys = [_text_key(t) for t in texts]
        missing = sorted(
            {k: b for b, k in enumerate(keys) if k not in store}.values(), key=lambda b: len(texts[b])
        )
        for start in range(0, len(missing), self.chunk):
            rows = missing[start : start + self.chunk]
            longest = max(1, max(len(texts[b]) for b in rows))
            packed = torch.full((len(rows), longest), self.pad_id, dtype=ids.dtype, device=ids.device)
            real = torch.zeros(len(rows), longest, dtype=torch.bool, device=ids.device)
            for r, b in enumerate(rows):
                packed[r, : len(texts[b])] = texts[b]
                real[r, : len(texts[b])] = True
            found = self.make_map(teacher, packed, real)
            for r, b in enumerate(rows):
                n = len(texts[b])
                store[keys[b]] = found[r, :n, :n].clone()
            self.computed += len(rows)
        dtype = next(iter(store.values())).dtype if store else torch.float32
        keys_mask = mask.to(dtype)
        out = (keys_mask / keys_mask.sum(-1, keepdim=True).clamp_min(1.0))[:, None, :].repeat(
            1, ids.shape[1], 1
        )
        for b, key in enumerate(keys):
            where = mask[b].nonzero().squeeze(-1)
            if where.numel():
                out[b, where[:, None], where[None, :]] = store[key].to(device=out.device, dtype=dtype)
        return out


# ------------------------------------------------------------------------------------------ objective


class _Guidance:
    """What the student's hooks hold: the teacher (weakly), the injection and how to make the map. Not an
    `nn.Module`, so that neither model joins the objective's parameters or state."""

    def __init__(
        self,
        teacher: nn.Module,
        injection: AttentionInjection,
        make_map: MapMaker,
        pad_id: int,
    ) -> None:
        self.teacher = weakref.ref(teacher)
        self.injection = injection
        self.make_map = make_map
        self.pad_id = pad_id
        self.handles: list[RemovableHandle] = []

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        teacher = self.teacher()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if teacher is None or not isinstance(ids, Tensor):
            return
        mask = kwargs.get("attention_mask")
        mask = ids != self.pad_id if mask is None else mask.bool()
        self.injection.set_map(self.make_map(teacher, ids, mask))
        self.injection.switch_on()

    def after(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.injection.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.injection.remove()


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ParamError(NAME, key, f"must be one of {', '.join(valid)}, got {shown(value)}")
    return value


class AttributionGuidance(FeatureObjective):
    """S02: the teacher's `attribution` map composed into the student's attention of `student_layers` by
    `operator` during training (see the module docstring). Zero loss of its own."""

    needs_teacher_logits = False

    def __init__(
        self,
        *,
        attribution: str = "attention",
        operator: str = "average",
        student_layers: Any = ALL_LAYERS,
        teacher_layer: Any = None,
        ig_steps: int = 16,
        cache_maps: bool = True,
    ) -> None:
        super().__init__(NAME)
        self.attribution = _check_choice("attribution", attribution, ATTRIBUTIONS)
        self.operator = _check_choice("operator", operator, OPERATORS)
        if student_layers != ALL_LAYERS and not (
            isinstance(student_layers, list | tuple)
            and student_layers
            and all(isinstance(i, int) and not isinstance(i, bool) for i in student_layers)
        ):
            raise ParamError(
                NAME,
                "student_layers",
                f"must be '{ALL_LAYERS}' or a non-empty list of block indices, got {shown(student_layers)}",
            )
        self.student_blocks: list[int] | None = None if student_layers == ALL_LAYERS else list(student_layers)
        if teacher_layer is not None and self.attribution not in LAYERWISE:
            raise ParamError(
                NAME,
                "teacher_layer",
                f"applies to {' and '.join(LAYERWISE)} only; {attribution} attributes to the word embeddings",
            )
        if (
            teacher_layer is not None
            and teacher_layer != MEAN
            and (not isinstance(teacher_layer, int) or isinstance(teacher_layer, bool))
        ):
            raise ParamError(
                NAME, "teacher_layer", f"must be a block index or '{MEAN}', got {shown(teacher_layer)}"
            )
        self.teacher_layer: int | str = -1 if teacher_layer is None else teacher_layer
        self.ig_steps = whole_number(NAME, "ig_steps", ig_steps, 1, 1024)
        self.cache_maps = flag(NAME, "cache_maps", cache_maps)
        self._guidance: _Guidance | None = None
        self._finalizer: weakref.finalize | None = None

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        if teacher is None:
            raise UserError(f"objective '{NAME}' needs the teacher model itself (not a teacher cache)")
        try:
            student_blocks = len(self_attention_modules(student, "student"))
            teacher_blocks = len(self_attention_modules(teacher, "teacher"))
        except UserError as err:
            raise UserError(f"objective '{NAME}': {str(err).removeprefix('attention injection: ')}") from None
        bad = [i for i in self.student_blocks or [] if not -student_blocks <= i < student_blocks]
        if bad:
            raise UserError(
                f"objective '{NAME}': student_layers: block {bad[0]} is out of range (the student has "
                f"{student_blocks} blocks)"
            )
        if isinstance(self.teacher_layer, int) and not -teacher_blocks <= self.teacher_layer < teacher_blocks:
            raise UserError(
                f"objective '{NAME}': teacher_layer {self.teacher_layer} is out of range (the teacher has "
                f"{teacher_blocks} blocks)"
            )
        student_pad, teacher_pad = getattr(student, "pad_id", None), getattr(teacher, "pad_id", None)
        sizes = [hf_encoder(m, r).config.vocab_size for m, r in ((student, "student"), (teacher, "teacher"))]
        if student_pad != teacher_pad or sizes[0] != sizes[1]:
            raise UserError(
                f"objective '{NAME}': the teacher reads the student's token ids, so both need one tokenizer "
                f"(vocabulary {sizes[1]} vs {sizes[0]}, pad id {teacher_pad} vs {student_pad})"
            )
        self.release()  # bound again: the new models replace the old hooks
        injection = AttentionInjection(student, self.student_blocks, self.operator)
        # The hooks must not hold the objective (dropping it removes them): the map's recipe, not a method.
        make_map: MapMaker = partial(
            attribution_map, self.attribution, layer=self.teacher_layer, ig_steps=self.ig_steps
        )
        if self.cache_maps:
            recipe = (self.attribution, self.teacher_layer, self.ig_steps)
            make_map = CachedMaps(make_map, recipe, int(student_pad or 0))
        guidance = _Guidance(teacher, injection, make_map, int(student_pad or 0))
        encoder = hf_encoder(student, "student")
        guidance.handles = [
            encoder.register_forward_pre_hook(guidance.before, with_kwargs=True),
            encoder.register_forward_hook(guidance.after, always_call=True),
        ]
        self._guidance = guidance
        self._finalizer = weakref.finalize(self, guidance.remove)
        # The embeddings: the student's carries the zero loss's graph; naming the teacher's lets a teacher
        # that serves only this objective stop after its embeddings (its logits are not read).
        return [EMBEDDINGS], [EMBEDDINGS]

    def release(self) -> None:
        """Remove the hooks from the student; the student then always runs alone."""
        if self._finalizer is not None:
            self._finalizer()  # calls `_Guidance.remove` once
        self._guidance = None
        self._finalizer = None

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), _ = self.features(outputs)
        return (student.float() * 0.0).sum()  # zero first: a sum of large fp16 values overflows to inf

    def extra_repr(self) -> str:
        layers = ALL_LAYERS if self.student_blocks is None else self.student_blocks
        return f"{NAME}({self.attribution}, {self.operator}, student layers {layers})"


register_feature_objective(
    NAME,
    AttributionGuidance,
    summary="teacher attribution maps (attention, value zeroing, Captum gradients) injected into the "
    "student's attention by add / multiply / average / replace during training (hf_encoder models)",
    paper="Nourbakhsh et al., 2026, Evaluating Explainable AI Attribution Methods in NMT via "
    "Attention-Guided Knowledge Distillation (S02)",
)

"""Text-encoder objectives (`distill.models.encoders`): TinyBERT's hidden-state and attention losses, MiniLM's
deep self-attention distillation, MiniLMv2's self-attention relations, and sentence-embedding distillation.

The losses are in `distill.losses.encoders`; these objectives own which blocks they read and the learned
projections. Except for `embedding_distill`, they derive their module paths from the models themselves
(`resolve_paths`): each block's output (`layer_path`), its query / key / value projections
(`attention_paths`) and, on both sides, the `(B, T)` mask of real tokens (`MASK_TAP`), so padded tokens
count nowhere. They need a live teacher model (a teacher cache holds no attention projections).

Blocks are numbered as in TinyBERT: 0 is the embedding layer's output, 1..M the student's blocks, 1..N the
teacher's. `layer_map` pairs them: `[[student, teacher], ...]`; by default TinyBERT's uniform mapping
g(m) = m * N / M (rounded down when M does not divide N; the official code requires it to).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.losses.encoders import (
    MINILMV2_RELATIONS,
    RELATIONS,
    attention_kl,
    attention_mse,
    embedding_cosine,
    embedding_mse,
    hidden_mse,
    scaled_dot,
    self_attention_relations,
    value_relation_kl,
)
from distill.objectives.base import ParamError, StepOutputs, flag, shown, whole_number
from distill.objectives.feature_methods import choice
from distill.objectives.features import (
    FeatureObjective,
    layer_ref,
    project,
    register_feature_objective,
    sample_mask,
)

MAX_LAYER = 1 << 12
MAX_HEADS = 1 << 12
ENCODER_API = ("num_layers", "num_heads", "layer_path", "attention_paths", "feature_layers")


def encoder_of(objective: str, model: nn.Module | None, role: str) -> Any:
    """The model, checked to be a text encoder classifier (`EncoderClassifier` or one with its API)."""
    if model is None:
        raise UserError(
            f"objective '{objective}' needs the live teacher model (it reads its blocks' outputs and "
            "attention projections); a teacher cache holds none"
        )
    if not all(hasattr(model, name) for name in ENCODER_API):
        raise UserError(
            f"objective '{objective}' reads a text encoder's blocks (model 'hf_encoder'); the {role} is a "
            f"{type(model).__name__}"
        )
    return model


def layer_pairs(objective: str, value: Any, low: int) -> list[tuple[int, int]] | None:
    """A recipe's `layer_map`: None, or a non-empty list of [student block, teacher block] pairs."""
    if value is None:
        return None
    problem = (
        f"must be a non-empty list of [student, teacher] block pairs (blocks >= {low}), got {shown(value)}"
    )
    if not isinstance(value, list | tuple) or not value:
        raise ParamError(objective, "layer_map", problem)
    pairs = []
    for pair in value:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and low <= i <= MAX_LAYER for i in pair)
        ):
            raise ParamError(objective, "layer_map", problem)
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def uniform_map(student_layers: int, teacher_layers: int, start: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform strategy: student block m to teacher block g(m) = m * N / M, for m from `start`
    (0: the embedding layer as well) to M."""
    return [(m, m * teacher_layers // student_layers) for m in range(start, student_layers + 1)]


def checked_pairs(
    objective: str, pairs: list[tuple[int, int]], student: Any, teacher: Any
) -> list[tuple[int, int]]:
    for s, t in pairs:
        for block, model, role in ((s, student, "student"), (t, teacher, "teacher")):
            if block > model.num_layers:
                raise UserError(
                    f"objective '{objective}': layer_map names {role} block {block}, but the {role} has "
                    f"{model.num_layers} blocks (1..{model.num_layers}; 0 = embeddings)"
                )
    return pairs


def hidden_path(model: Any, block: int) -> str:
    """The module whose output is block `block`'s hidden states (0: the embedding layer)."""
    return model.feature_layers()[0] if block == 0 else model.layer_path(block - 1)


def optional_heads(objective: str, value: Any) -> int | None:
    return None if value is None else whole_number(objective, "relation_heads", value, 1, MAX_HEADS)


def optional_block(objective: str, key: str, value: Any) -> int | None:
    return None if value is None else whole_number(objective, key, value, 1, MAX_LAYER)


def heads_for(objective: str, relation_heads: int | None, student: Any, teacher: Any) -> int:
    """The number of heads both sides are split into: `relation_heads`, else the models' own head count,
    which must then agree."""
    if relation_heads is not None:
        return relation_heads
    if student.num_heads != teacher.num_heads:
        raise UserError(
            f"objective '{objective}': the student has {student.num_heads} attention heads and the teacher "
            f"{teacher.num_heads}; set relation_heads (both sides re-split into that many heads, as MiniLMv2 "
            "does) to a divisor of both hidden sizes"
        )
    return int(student.num_heads)


def check_heads(objective: str, heads: int, student: torch.Size, teacher: torch.Size) -> None:
    """Both projections' widths split into `heads` heads, or a one-line refusal naming the valid counts."""
    ws, wt = int(student[-1]), int(teacher[-1])
    if ws % heads or wt % heads:
        common = math.gcd(ws, wt)
        valid = [d for d in range(1, common + 1) if common % d == 0]
        raise UserError(
            f"objective '{objective}': {heads} heads do not divide the hidden sizes {ws} (student) and {wt} "
            f"(teacher); relation_heads must be one of {valid}"
        )


class EncoderObjective(FeatureObjective):
    """Base: paths from the models (`groups`), grouped per layer pair, plus the token mask on both sides."""

    # Module paths per layer pair on each side (e.g. one block output, or its query and key projections).
    group_size = 1

    def groups(self, student: Any, teacher: Any) -> tuple[list[list[str]], list[list[str]]]:
        raise NotImplementedError

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> tuple[list[str], list[str]]:
        from distill.models.encoders import MASK_TAP

        s = encoder_of(self.loss_name, student, "student")
        t = encoder_of(self.loss_name, teacher, "teacher")
        student_groups, teacher_groups = self.groups(s, t)
        return (
            [p for group in student_groups for p in group] + [MASK_TAP],
            [p for group in teacher_groups for p in group] + [MASK_TAP],
        )

    def pairs_of(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> list[Any]:
        """The probed shapes per layer pair, checked to be token sequences (B, T, H)."""
        for shape, path in zip(
            [*student_shapes[:-1], *teacher_shapes[:-1]],
            [*self.student_layers[:-1], *self.teacher_layers[:-1]],
            strict=True,
        ):
            if len(shape) != 3:
                raise UserError(
                    f"objective '{self.loss_name}' reads token sequences (B, T, H); '{path}' gives "
                    f"{tuple(shape[1:])} per sample"
                )
        n = self.group_size
        count = (len(student_shapes) - 1) // n
        return [
            (student_shapes[i * n : (i + 1) * n], teacher_shapes[i * n : (i + 1) * n]) for i in range(count)
        ]

    def grouped(self, outputs: StepOutputs) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor]:
        """The student's and the teacher's features per layer pair, and the mask of real tokens."""
        students, teachers = self.features(outputs)
        mask = students[-1]
        if teachers[-1].shape != mask.shape:
            raise UserError(
                f"objective '{self.loss_name}': the student sees {tuple(mask.shape)} tokens, the teacher "
                f"{tuple(teachers[-1].shape)}; both must read the same token ids"
            )
        n = self.group_size
        count = (len(students) - 1) // n
        return (
            [students[i * n : (i + 1) * n] for i in range(count)],
            [teachers[i * n : (i + 1) * n] for i in range(count)],
            mask,
        )


class TinyBertHidden(EncoderObjective):
    """TinyBERT's embedding-layer and hidden-state distillation (Jiao et al., 2020, Eq. 4-5): the sum over
    layer pairs of MSE(H_s W_h, H_t) over real tokens. Default pairs: the embeddings (0 -> 0) and every
    student block m -> teacher block m * N / M, as the official `task_distill.py` does. W_h is one learned
    linear map shared by every pair (the official code's `fit_dense`, applied to the embedding output as well;
    the paper writes a separate W_e) unless `shared_projection` is false (one per pair); none where the widths
    agree."""

    def __init__(self, *, layer_map: Any = None, shared_projection: bool = True) -> None:
        super().__init__("tinybert_hidden")
        self.layer_map = layer_pairs(self.loss_name, layer_map, 0)
        self.shared_projection = flag(self.loss_name, "shared_projection", shared_projection)
        self.projectors = nn.ModuleDict()
        self.projector_keys: list[str] = []

    def groups(self, student: Any, teacher: Any) -> tuple[list[list[str]], list[list[str]]]:
        pairs = self.layer_map or uniform_map(student.num_layers, teacher.num_layers, 0)
        pairs = checked_pairs(self.loss_name, pairs, student, teacher)
        self.pairs = pairs
        return [[hidden_path(student, s)] for s, _ in pairs], [[hidden_path(teacher, t)] for _, t in pairs]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        self.projectors = nn.ModuleDict()
        self.projector_keys = []
        for index, ((s,), (t,)) in enumerate(self.pairs_of(student_shapes, teacher_shapes)):
            ws, wt = int(s[-1]), int(t[-1])
            key = f"{ws}_to_{wt}" if self.shared_projection else f"pair{index}"
            if key not in self.projectors:
                self.projectors[key] = nn.Identity() if ws == wt else nn.Linear(ws, wt)
            self.projector_keys.append(key)
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, teachers, mask = self.grouped(outputs)
        total = torch.zeros((), device=mask.device)
        for key, (s,), (t,) in zip(self.projector_keys, students, teachers, strict=True):
            total = total + hidden_mse(project(self.projectors[key], s), t, mask=mask)
        return total


class TinyBertAttention(EncoderObjective):
    """TinyBERT's attention-based distillation (Jiao et al., 2020, Eq. 3): the sum over block pairs of the
    MSE between unnormalised attention scores Q K^T / sqrt(d_head), over heads, real query rows and real
    keys (see `distill.losses.encoders.attention_mse` for the official code's masking and our deviations).
    Default pairs: student block m -> teacher block m * N / M, m = 1..M. Heads must agree in number, or
    `relation_heads` re-splits both sides' queries and keys into that many heads (MiniLMv2's device; TinyBERT
    itself keeps the teacher's head count)."""

    group_size = 2

    def __init__(self, *, layer_map: Any = None, relation_heads: Any = None) -> None:
        super().__init__("tinybert_attention")
        self.layer_map = layer_pairs(self.loss_name, layer_map, 1)
        self.relation_heads = optional_heads(self.loss_name, relation_heads)
        self.heads = 0

    def groups(self, student: Any, teacher: Any) -> tuple[list[list[str]], list[list[str]]]:
        pairs = self.layer_map or uniform_map(student.num_layers, teacher.num_layers, 1)
        pairs = checked_pairs(self.loss_name, pairs, student, teacher)
        self.heads = heads_for(self.loss_name, self.relation_heads, student, teacher)

        def qk(model: Any, block: int) -> list[str]:
            paths = model.attention_paths(block - 1)
            return [paths["query"], paths["key"]]

        return [qk(student, s) for s, _ in pairs], [qk(teacher, t) for _, t in pairs]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        for s, t in self.pairs_of(student_shapes, teacher_shapes):
            check_heads(self.loss_name, self.heads, s[0], t[0])
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, teachers, mask = self.grouped(outputs)
        total = torch.zeros((), device=mask.device)
        for (qs, ks), (qt, kt) in zip(students, teachers, strict=True):
            scores_s = scaled_dot(qs, ks, heads=self.heads)
            scores_t = scaled_dot(qt, kt, heads=self.heads)
            total = total + attention_mse(scores_s, scores_t, mask=mask)
        return total


class SelfAttentionObjective(EncoderObjective):
    """One block pair: the student's last block and a teacher block (the last by default), read as their
    query, key and value projections."""

    group_size = 3

    def __init__(self, name: str, teacher_layer: Any, relation_heads: Any) -> None:
        super().__init__(name)
        self.teacher_layer = optional_block(name, "teacher_layer", teacher_layer)
        self.relation_heads = optional_heads(name, relation_heads)
        self.heads = 0

    def groups(self, student: Any, teacher: Any) -> tuple[list[list[str]], list[list[str]]]:
        block = teacher.num_layers if self.teacher_layer is None else self.teacher_layer
        if block > teacher.num_layers:
            raise UserError(
                f"objective '{self.loss_name}': teacher_layer {block} is beyond the teacher's "
                f"{teacher.num_layers} blocks"
            )
        self.heads = heads_for(self.loss_name, self.relation_heads, student, teacher)

        def qkv(model: Any, index: int) -> list[str]:
            paths = model.attention_paths(index - 1)
            return [paths["query"], paths["key"], paths["value"]]

        return [qkv(student, student.num_layers)], [qkv(teacher, block)]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        for s, t in self.pairs_of(student_shapes, teacher_shapes):
            check_heads(self.loss_name, self.heads, s[0], t[0])
        super().build(student_shapes, teacher_shapes, n_data)


class MiniLMAttention(SelfAttentionObjective):
    """MiniLM's deep self-attention distillation (Wang et al., 2020, Eq. 7-10): on the student's last block
    and the teacher's last block (`teacher_layer` picks another), KL(A_t || A_s) of the attention
    distributions softmax(Q K^T / sqrt(d_head)) plus KL(VR_t || VR_s) of the value relations
    softmax(V V^T / sqrt(d_head)), each averaged over heads and real query rows, summed with weight 1 as in
    the paper. MiniLM needs equal head counts; `relation_heads` re-splits both sides as MiniLMv2 does."""

    def __init__(self, *, teacher_layer: Any = None, relation_heads: Any = None) -> None:
        super().__init__("minilm_attention", teacher_layer, relation_heads)

    def forward(self, outputs: StepOutputs) -> Tensor:
        ((qs, ks, vs),), ((qt, kt, vt),), mask = self.grouped(outputs)
        attention = attention_kl(
            scaled_dot(qs, ks, heads=self.heads), scaled_dot(qt, kt, heads=self.heads), mask=mask
        )
        return attention + value_relation_kl(vs, vt, heads=self.heads, mask=mask)


class MiniLMRelations(SelfAttentionObjective):
    """MiniLMv2's multi-head self-attention relation distillation (Wang et al., 2021): the Q-Q, K-K and V-V
    relations softmax(X_r X_r^T / sqrt(d_r)) of the student's last block and one teacher block (the last by
    default; the paper picks an upper-middle block of large teachers), both sides' queries, keys and values
    re-split into `relation_heads` relation heads (default: the models' own head count, which must then
    agree), KL(R_t || R_s) summed over the relations with weight 1."""

    def __init__(
        self, *, teacher_layer: Any = None, relation_heads: Any = None, relations: Any = MINILMV2_RELATIONS
    ) -> None:
        super().__init__("minilm_relations", teacher_layer, relation_heads)
        if (
            not isinstance(relations, list | tuple)
            or not relations
            or any(r not in RELATIONS for r in relations)
            or len(set(relations)) != len(relations)
        ):
            raise ParamError(
                self.loss_name,
                "relations",
                f"must be a non-empty list of distinct relations from {', '.join(RELATIONS)}, "
                f"got {shown(relations)}",
            )
        self.relations = tuple(relations)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,), mask = self.grouped(outputs)
        return self_attention_relations(
            student, teacher, heads=self.heads, mask=mask, relations=self.relations
        )


class EmbeddingDistill(FeatureObjective):
    """Sentence-embedding distillation (Reimers & Gurevych, 2020, "Making Monolingual Sentence Embeddings
    Multilingual using Knowledge Distillation"): the student's sentence embedding pulled to the teacher's,
    `metric` "mse" (the paper's) or "cosine" (1 - cos). Reads the pooled vector by default (feature tap -1:
    an encoder's mean- or CLS-pooled `pooled` tap); a learned linear projection maps the student's width to
    the teacher's when they differ (the paper's student and teacher share a width)."""

    def __init__(self, *, metric: str = "mse", student_layer: Any = -1, teacher_layer: Any = -1) -> None:
        super().__init__("embedding_distill")
        self.metric = choice(self.loss_name, "metric", metric, ("mse", "cosine"))
        self.student_refs = [layer_ref(self.loss_name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(self.loss_name, "teacher_layer", teacher_layer)]
        self.projector: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        s, t = student_shapes[0], teacher_shapes[0]
        for shape, path in ((s, self.student_layers[0]), (t, self.teacher_layers[0])):
            if len(shape) != 2:
                raise UserError(
                    f"objective '{self.loss_name}' reads sentence embeddings (B, D); '{path}' gives "
                    f"{tuple(shape[1:])} per sample (name the pooled tap)"
                )
        self.projector = nn.Identity() if s[-1] == t[-1] else nn.Linear(int(s[-1]), int(t[-1]))
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        loss = embedding_mse if self.metric == "mse" else embedding_cosine
        return loss(project(self.projector, student), teacher, mask=sample_mask(teacher, outputs.mask))


_TINYBERT = "Jiao et al., 2020, TinyBERT: Distilling BERT for Natural Language Understanding"
_MINILM = (
    "Wang et al., 2020, MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of "
    "Pre-Trained Transformers"
)
_MINILMV2 = (
    "Wang et al., 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing "
    "Pretrained Transformers"
)
_SBERT = (
    "Reimers & Gurevych, 2020, Making Monolingual Sentence Embeddings Multilingual using Knowledge "
    "Distillation"
)

register_feature_objective(
    "tinybert_hidden",
    TinyBertHidden,
    summary="text encoders: MSE of projected student hidden states (and embeddings) to mapped teacher blocks",
    paper=_TINYBERT,
)
register_feature_objective(
    "tinybert_attention",
    TinyBertAttention,
    summary="text encoders: MSE of attention scores (before softmax) of mapped blocks, padding masked",
    paper=_TINYBERT,
)
register_feature_objective(
    "minilm_attention",
    MiniLMAttention,
    summary="text encoders: last-block attention KL + value-relation KL (MiniLM v1)",
    paper=_MINILM,
)
register_feature_objective(
    "minilm_relations",
    MiniLMRelations,
    summary="text encoders: Q-Q, K-K, V-V self-attention relation KL over relation heads (MiniLMv2)",
    paper=_MINILMV2,
)
register_feature_objective(
    "embedding_distill",
    EmbeddingDistill,
    summary="sentence embeddings: MSE (or 1 - cos) of the projected student pooled vector to the teacher's",
    paper=_SBERT,
)

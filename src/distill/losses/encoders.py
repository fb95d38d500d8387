"""Text-encoder losses: TinyBERT's hidden-state and attention-score MSE, MiniLM's attention and value-relation
KL, MiniLMv2's multi-head self-attention relations, and sentence-embedding distillation.

Pure functions of tensors (student first, teacher second). Conventions beyond `distill.losses._common`:

* Hidden states, queries, keys and values are ``(B, T, H)`` token sequences (a block's output, or the output
  of its query / key / value projection before the split into heads); pairwise maps (attention scores,
  relations) are ``(B, A, T, T)``: batch, heads, query position, key position.
* ``mask`` is one ``(B, T)`` tensor, bool or float, True / 1 = a real token (0 = padding). A padded *query*
  row is dropped before any computation; a padded *key* column is taken out of every softmax (its score is
  -inf) or, for TinyBERT's score MSE, set to 0 on both sides. Changing anything at a padded position
  changes neither the value nor the gradient of a real one (padded positions get zero gradient).
* Math runs in float32 whatever the input dtype (bf16 / fp16 are upcast; float64 stays float64 for
  ``gradcheck``). Every loss is a mean over what counts; with nothing counted it is 0, never NaN.
* Heads. A model's attention with A heads splits its ``(B, T, H)`` projections into A heads of width
  ``H / A``. MiniLMv2's *relation heads* re-split both models' concatenated projections into the same number
  R of heads (width ``H_s / R`` and ``H_t / R``), so that per-head maps compare even when the models' head
  counts differ; with R equal to both models' head count this is exactly their own attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses._common import compute_dtype, kl_from_log_probs

RELATIONS = ("qq", "qk", "qv", "kq", "kk", "kv", "vq", "vk", "vv")
MINILMV2_RELATIONS = ("qq", "kk", "vv")


def real_tokens(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor | None:
    """The ``(B, T)`` boolean mask of real tokens (True = real), or None when there is no mask."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tokens' shape {(batch, length)}")
    return (mask != 0).to(device)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, T, H)`` -> ``(B, heads, T, H / heads)``: the concatenated heads split again (BERT's
    ``transpose_for_scores``; MiniLMv2's relation heads)."""
    if x.dim() != 3:
        raise ValueError(f"expected a (B, T, H) token sequence, got shape {tuple(x.shape)}")
    if heads < 1 or x.shape[-1] % heads:
        raise ValueError(f"hidden size {x.shape[-1]} is not a multiple of {heads} heads")
    b, t, h = x.shape
    return x.reshape(b, t, heads, h // heads).transpose(1, 2)


def scaled_dot(x: Tensor, y: Tensor, *, heads: int) -> Tensor:
    """Per head, ``x_a y_a^T / sqrt(d)`` with ``d = H / heads``: ``(B, heads, T, T)`` in float32.

    With ``x`` the queries and ``y`` the keys these are the raw attention scores of "Attention Is All You
    Need" (before the padding mask); with ``x = y`` the values, MiniLM's value relation."""
    if x.shape != y.shape:
        raise ValueError(f"the two sequences differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = compute_dtype(x, y)
    xs, ys = split_heads(x.to(dtype), heads), split_heads(y.to(dtype), heads)
    return torch.matmul(xs, ys.transpose(-1, -2)) / math.sqrt(xs.shape[-1])


def attention_scores(query: Tensor, key: Tensor, *, heads: int, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention scores ``Q_a K_a^T / sqrt(d_head)`` per head, ``(B, heads, T, T)``,
    with padded keys at -inf (the additive padding mask of BERT, exactly)."""
    scores = scaled_dot(query, key, heads=heads)
    real = real_tokens(mask, query.shape[0], query.shape[1], scores.device)
    if real is not None:
        scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    return scores


def attention_probs(query: Tensor, key: Tensor, *, heads: int, mask: Tensor | None = None) -> Tensor:
    """Attention distributions ``A = softmax(Q K^T / sqrt(d_head) + mask)`` per head, ``(B, heads, T, T)``.

    Padded keys get probability 0; every query row (padded ones too, as in BERT) is a distribution over the
    real keys. A sample without any real token has all-zero rows (BERT's would be uniform)."""
    scores = attention_scores(query, key, heads=heads, mask=mask)
    alive = torch.isfinite(scores).any(-1, keepdim=True)
    probs = torch.softmax(torch.where(alive, scores, torch.zeros_like(scores)), dim=-1)
    return torch.where(alive, probs, torch.zeros_like(probs))


def _query_rows(
    student: Tensor, teacher: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pairwise maps ``(B, A, T, T)`` -> the real query rows ``(n, A, T)`` of both, and each row's real keys
    ``(n, T)`` (None without a mask)."""
    if student.dim() != 4 or student.shape[-1] != student.shape[-2]:
        raise ValueError(f"expected (B, heads, T, T) maps, got shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student maps {tuple(student.shape)} and teacher maps {tuple(teacher.shape)} differ in shape "
            "(per-head maps need as many heads on both sides: re-split both into relation heads)"
        )
    dtype = compute_dtype(student, teacher)
    b, a, t, _ = student.shape
    s, tt = student.to(dtype).transpose(1, 2), teacher.to(dtype).transpose(1, 2)  # (B, T, A, T)
    real = real_tokens(mask, b, t, student.device)
    if real is None:
        return s.reshape(b * t, a, t), tt.reshape(b * t, a, t), None
    keys = real[:, None, :].expand(b, t, t)
    return s[real], tt[real], keys[real]


def attention_mse(student_scores: Tensor, teacher_scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """TinyBERT's attention loss: the MSE between the student's and the teacher's *unnormalised* attention
    scores, ``mean (S_s - S_t)^2`` over heads, real query rows and real keys.

    From "TinyBERT: Distilling BERT for Natural Language Understanding" (Jiao et al., 2020), Eq. 3 with the
    official code's scores (``task_distill.py`` / ``general_distill.py``: the scores Q K^T / sqrt(d_head)
    plus the -1e4 padding mask, every entry <= -100 then set to 0 on each side, ``MSELoss``). Here padded
    keys are set to 0 on both sides, and so is any -inf score a caller passes (the official code's effect).
    Deliberate deviations: padded *query* rows are dropped (the official code compares them: their scores
    against real keys are not masked), the mean runs over the real entries (the official ``MSELoss`` divides
    by B * A * T^2 with T the fixed padded length, so its value shrinks with padding), and a real score below
    -100 keeps its value. Heads must agree in number (``(B, A, T, T)`` on both sides).
    """
    s, t, keys = _query_rows(student_scores, teacher_scores, mask)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s = torch.where(s == float("-inf"), zero, s)
    t = torch.where(t == float("-inf"), zero, t)
    if keys is None:
        return (s - t).pow(2).sum() / max(s.numel(), 1)
    real = keys[:, None, :]
    s, t = torch.where(real, s, zero), torch.where(real, t, zero)
    count = keys.sum() * s.shape[1]
    return (s - t).pow(2).sum() / count.clamp_min(1)


def attention_kl(student_scores: Tensor, teacher_scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """MiniLM's attention transfer: ``KL(softmax(S_t) || softmax(S_s))`` per head and query row, averaged
    over heads and real query rows, from attention *scores* (``(B, A, T, T)``, before the softmax).

    From "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers" (Wang et al., 2020), Eq. 7: ``L_AT = 1 / (A |x|) sum_a sum_t KL(A_t[a, t] || A_s[a, t])``.
    Padded keys are taken out of both softmaxes (-inf scores, whose zero-probability terms add exactly 0);
    -inf scores the caller passes are allowed where the teacher's probability is 0. The batch's value is the
    mean over every real query row of every text (a long text weighs more than a short one; MiniLMv2
    re-implementations that average per text first agree when the texts have equal length). Heads must agree
    in number: re-split both sides into relation heads when the models' head counts differ.
    """
    s, t, keys = _query_rows(student_scores, teacher_scores, mask)
    if keys is not None:
        padded = ~keys[:, None, :]
        s = s.masked_fill(padded, float("-inf"))
        t = t.masked_fill(padded, float("-inf"))
    alive = torch.isfinite(t).any(-1, keepdim=True)  # a teacher row with no finite score has no target
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s, t = torch.where(alive, s, zero), torch.where(alive, t, zero)
    kl = kl_from_log_probs(torch.log_softmax(t, dim=-1), torch.log_softmax(s, dim=-1))
    kl = torch.where(alive.squeeze(-1), kl, zero)
    return kl.sum() / max(kl.numel(), 1)


def value_relation_kl(
    student_values: Tensor, teacher_values: Tensor, *, heads: int, mask: Tensor | None = None
) -> Tensor:
    """MiniLM's value-relation transfer: ``VR = softmax(V_a V_a^T / sqrt(d_head))`` per head, and
    ``KL(VR_t || VR_s)`` averaged over heads and real query rows (``attention_kl`` of the value relations).

    From MiniLM (Wang et al., 2020), Eq. 8-9. ``student_values`` / ``teacher_values`` are the value
    projections ``(B, T, H_s)`` / ``(B, T, H_t)``, each split into ``heads`` heads of its own width (MiniLM
    needs equal head counts; MiniLMv2's relation heads give any common count)."""
    student = scaled_dot(student_values, student_values, heads=heads)
    teacher = scaled_dot(teacher_values, teacher_values, heads=heads)
    return attention_kl(student, teacher, mask=mask)


def self_attention_relations(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    *,
    heads: int,
    mask: Tensor | None = None,
    relations: Sequence[str] = MINILMV2_RELATIONS,
) -> Tensor:
    """MiniLMv2's multi-head self-attention relation distillation: for each relation ``xy`` (``"qq"``,
    ``"kk"``, ``"vv"`` by default; any pair of q, k, v), ``R = softmax(X_r Y_r^T / sqrt(d_r))`` per relation
    head r, and the sum over relations of ``KL(R_t || R_s)`` averaged over relation heads and real query rows.

    From "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained
    Transformers" (Wang et al., 2021), Eq. 5-8: the queries, keys and values (``student`` / ``teacher`` =
    ``(q, k, v)``, each ``(B, T, H)``) are concatenated over the attention heads (as the projections output
    them) and split into ``heads`` relation heads of width ``d_r = H / heads`` on each side; the paper uses
    the Q-Q, K-K and V-V relations with weight 1 each (their sum)."""
    if len(student) != 3 or len(teacher) != 3:
        raise ValueError("student and teacher must each be (queries, keys, values)")
    if not relations or any(r not in RELATIONS for r in relations):
        raise ValueError(f"relations must be a non-empty selection of {RELATIONS}, got {list(relations)}")
    index = {"q": 0, "k": 1, "v": 2}
    total: Tensor | None = None
    for relation in relations:
        a, b = index[relation[0]], index[relation[1]]
        s = scaled_dot(student[a], student[b], heads=heads)
        t = scaled_dot(teacher[a], teacher[b], heads=heads)
        term = attention_kl(s, t, mask=mask)
        total = term if total is None else total + term
    assert total is not None
    return total


def hidden_mse(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """TinyBERT's hidden-state (and embedding-layer) loss: ``MSE(H_s W_h, H_t)``, the mean of the squared
    difference over real tokens and hidden dimensions.

    From TinyBERT (Jiao et al., 2020), Eq. 4 (hidden states) and Eq. 5 (embeddings, with W_e). ``student``
    is the *projected* student sequence ``H_s W_h`` (the projection is the objective's module), of the
    teacher's shape ``(B, T, H_t)``. Deviation: the official code's ``MSELoss`` also averages over padded
    positions; here they are dropped.
    """
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"hidden states must be (B, T, H) of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)} (project the student to the teacher's width first)"
        )
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    real = real_tokens(mask, s.shape[0], s.shape[1], s.device)
    if real is not None:
        s, t = s[real], t[real]
    rows = s.reshape(-1, s.shape[-1])
    return (rows - t.reshape(-1, t.shape[-1])).pow(2).mean(-1).sum() / max(rows.shape[0], 1)


def _embedding_rows(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"sentence embeddings must be (N, D) of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)} (project the student to the teacher's width first)"
        )
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if mask is not None:
        if tuple(mask.shape) != (s.shape[0],):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the {s.shape[0]} embeddings")
        keep = (mask != 0).to(s.device)
        s, t = s[keep], t[keep]
    return s, t


def embedding_mse(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Sentence-embedding distillation: ``mean (s - t)^2`` over embeddings and dimensions.

    From "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation" (Reimers &
    Gurevych, 2020), Eq. 1 (sentence-transformers' ``MSELoss``, i.e. ``nn.MSELoss`` on the ``(N, D)``
    embeddings). ``student`` is already projected to the teacher's width when the widths differ (the paper
    keeps equal widths; the projection is the objective's). ``mask`` ``(N,)`` drops rows.
    """
    s, t = _embedding_rows(student, teacher, mask)
    return (s - t).pow(2).mean(-1).sum() / max(s.shape[0], 1)


def embedding_cosine(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """``mean (1 - cos(s, t))`` over embeddings: the direction of the teacher's sentence embedding, not its
    scale (a zero vector has cosine 0 with anything, and finite gradients)."""
    s, t = _embedding_rows(student, teacher, mask)
    cosine = (F.normalize(s, dim=-1, eps=eps) * F.normalize(t, dim=-1, eps=eps)).sum(-1)
    return (1 - cosine).sum() / max(s.shape[0], 1)

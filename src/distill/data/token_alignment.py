"""Two tokenizations of one text, aligned by byte offsets (cross-tokenizer distillation).

A student batch's token ids are turned back into the bytes they stand for (`token_bytes`), the text is
tokenized again by the teacher's tokenizer, and both token sequences are cut into *groups*: the shortest
runs of tokens that end at the same byte on both sides, where the two tokenizers agree on a split (TRL's
GOLD walks both offset lists the same way). A group's tokens on each side spell the same string, after the
same prefix, so the chain rule gives each model's probability of that string (`distill.losses.
cross_tokenizer.aligned_kd_loss`).

A group is kept when every token in it has a predicting position (not a sequence's first token), every
student token in it counts in the loss, the teacher's tokens fit in its context, and no zero-width token
(a special token: BOS, EOS, chat markers, which the teacher's text does not hold) lies inside it.

Token bytes are exact for byte-level BPE tokenizers (GPT-2's byte-to-unicode table, as every tokenizer
trained here); for others a token's bytes are its decoded string's UTF-8, which is approximate where a
decoder strips or adds spaces (SentencePiece's leading space): such groups rarely close and are dropped.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

FEATURE_PREFIX = "cross_tokenizer."


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for; b"" for special tokens (they spell no text)."""
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    table = byte_decoder()
    byte_level = _is_byte_level(tokenizer)
    out: list[bytes] = []
    for index, token in enumerate(tokens):
        if index in special or token is None:
            out.append(b"")
        elif byte_level and all(c in table for c in token):
            out.append(bytes(table[c] for c in token))
        else:
            out.append(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return out


def shared_token_pairs(teacher_bytes: Sequence[bytes], student_bytes: Sequence[bytes]) -> Tensor:
    """(M, 2) [teacher id, student id] of the tokens whose bytes both vocabularies hold (the first id of a
    string held twice); special tokens (no bytes) are never matched."""
    student_ids: dict[bytes, int] = {}
    for index, value in enumerate(student_bytes):
        if value:
            student_ids.setdefault(value, index)
    pairs, seen = [], set()
    for index, value in enumerate(teacher_bytes):
        if value and value in student_ids and value not in seen:
            seen.add(value)
            pairs.append((index, student_ids[value]))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def _spans(widths: Sequence[int], start: int = 0) -> list[tuple[int, int]]:
    spans, position = [], start
    for width in widths:
        spans.append((position, position + width))
        position += width
    return spans


def align_groups(
    student_widths: Sequence[int],
    teacher_widths: Sequence[int],
    *,
    student_counted: Sequence[bool] | None = None,
    teacher_start: int = 0,
) -> tuple[list[int], list[int], int]:
    """Group ids per token (-1: in no kept group) of the student's and the teacher's tokens, and the number
    of groups. `*_widths`: each token's length in bytes; `student_counted[i]`: student token i counts as a
    target; `teacher_start`: the byte where the teacher's text starts in the student's."""
    s_spans, t_spans = _spans(student_widths), _spans(teacher_widths, teacher_start)
    ends = {e for (a, e) in s_spans if e > a} & {e for (a, e) in t_spans if e > a}
    common = sorted(ends)
    starts_agree = bool(s_spans) and bool(t_spans) and s_spans[0][0] == t_spans[0][0]
    count = len(common)

    def interval(a: int) -> int:
        k = bisect_right(common, a)
        return k if k < count and (k > 0 or starts_agree) else -1

    valid = [True] * count
    members: list[list[list[int]]] = [[[], []] for _ in range(count)]
    for side, spans in ((0, s_spans), (1, t_spans)):
        for index, (a, b) in enumerate(spans):
            k = interval(a)
            if b == a:  # a special token inside a group breaks its chain rule
                low = common[k - 1] if k > 0 else (spans[0][0] if spans else 0)
                if k >= 0 and index > 0 and a > low:
                    valid[k] = False
                continue
            if k < 0:
                continue
            members[k][side].append(index)
            counted = (student_counted is None or student_counted[index]) if side == 0 else True
            if index == 0 or not counted:
                valid[k] = False
    s_groups, t_groups = [-1] * len(s_spans), [-1] * len(t_spans)
    kept = 0
    for k in range(count):
        if not valid[k] or not members[k][0] or not members[k][1]:
            continue
        for index in members[k][0]:
            s_groups[index] = kept
        for index in members[k][1]:
            t_groups[index] = kept
        kept += 1
    return s_groups, t_groups, kept


@dataclass
class CrossTokenBatch:
    """The teacher's view of a student batch: its inputs, and what the cross-tokenizer losses read.

    Group ids and masks are per prediction position (position i predicts token i + 1), like the batch's
    `labels` and `mask` (`distill.data.text`)."""

    input_ids: Tensor  # (B, T_t) the teacher's tokens of the same text, right-padded
    attention_mask: Tensor  # (B, T_t)
    labels: Tensor  # (B, T_t) the teacher token each position predicts, -100 at padding / last position
    mask: Tensor  # (B, T_t) teacher positions whose target bytes all count on the student side
    student_groups: Tensor  # (B, T_s) group ids, -1 = none
    teacher_groups: Tensor  # (B, T_t)
    matched: Tensor  # (M, 2) [teacher id, student id] of tokens both vocabularies hold

    def features(self) -> dict[str, Tensor]:
        keys = ("labels", "mask", "student_groups", "teacher_groups", "matched")
        return {FEATURE_PREFIX + key: getattr(self, key) for key in keys}

    @staticmethod
    def from_features(features: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """What `features` carried (labels, mask, groups, matched), or None for a same-tokenizer teacher."""
        found = {k[len(FEATURE_PREFIX) :]: v for k, v in features.items() if k.startswith(FEATURE_PREFIX)}
        return found or None


def _utf8_edges(data: bytes) -> tuple[int, int]:
    """Bytes to drop at the start (continuation bytes) and end (a cut multi-byte character) of a block cut
    out of UTF-8 text at token boundaries, so that the rest decodes exactly."""
    lead = 0
    while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:
        lead += 1
    trail = 0
    for back in range(1, min(4, len(data) - lead) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        trail = back if need > back else 0
        break
    return lead, trail


@dataclass
class Retokenizer:
    """Turns student batches into `CrossTokenBatch`es for one (student, teacher) tokenizer pair."""

    student_bytes: list[bytes]
    teacher_bytes: list[bytes]
    teacher_tokenizer: Any
    student_bos: int | None
    teacher_bos: int | None
    teacher_pad: int
    max_length: int | None = None  # the teacher's context (learned positions), or None

    @classmethod
    def for_pair(cls, student: Any, teacher: Any, max_length: int | None = None) -> Retokenizer:
        pad = teacher.pad_token_id if teacher.pad_token_id is not None else 0
        return cls(
            token_bytes(student), token_bytes(teacher), teacher, student.bos_token_id, teacher.bos_token_id,
            pad, max_length,
        )  # fmt: skip

    def matched(self) -> Tensor:
        return shared_token_pairs(self.teacher_bytes, self.student_bytes)

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None, mask: Tensor | None
    ) -> CrossTokenBatch:
        rows = []
        for b in range(input_ids.shape[0]):
            length = int(attention_mask[b].sum()) if attention_mask is not None else input_ids.shape[1]
            ids = input_ids[b, :length].tolist()
            counted = [False] + (
                mask[b, : length - 1].tolist() if mask is not None else [True] * (length - 1)
            )
            rows.append(self._row(ids, counted))
        width = max(1, max(len(r[0]) for r in rows))
        batch, t_s = len(rows), input_ids.shape[1]
        t_ids = torch.full((batch, width), self.teacher_pad, dtype=torch.long)
        t_attention = torch.zeros((batch, width), dtype=torch.long)
        t_labels = torch.full((batch, width), -100, dtype=torch.long)
        t_mask = torch.zeros((batch, width), dtype=torch.bool)
        s_groups = torch.full((batch, t_s), -1, dtype=torch.long)
        t_groups = torch.full((batch, width), -1, dtype=torch.long)
        offset = 0
        for b, (ids, s_group, t_group, t_counted, kept) in enumerate(rows):
            n = len(ids)
            if n:
                t_ids[b, :n] = torch.tensor(ids)
                t_attention[b, :n] = 1
            if n > 1:
                t_labels[b, : n - 1] = torch.tensor(ids[1:])
                t_mask[b, : n - 1] = torch.tensor(t_counted[1:])
            # the group of token i is read at the position that predicts it, i - 1
            for index, g in enumerate(s_group):
                if g >= 0:
                    s_groups[b, index - 1] = g + offset
            for index, g in enumerate(t_group):
                if g >= 0:
                    t_groups[b, index - 1] = g + offset
            offset += kept
        device = input_ids.device
        return CrossTokenBatch(
            t_ids.to(device), t_attention.to(device), t_labels.to(device), t_mask.to(device),
            s_groups.to(device), t_groups.to(device), self.matched().to(device),
        )  # fmt: skip

    def _row(
        self, ids: list[int], counted: list[bool]
    ) -> tuple[list[int], list[int], list[int], list[bool], int]:
        widths = [len(self.student_bytes[i]) if 0 <= i < len(self.student_bytes) else 0 for i in ids]
        data = b"".join(self.student_bytes[i] for i in ids if 0 <= i < len(self.student_bytes))
        lead, trail = _utf8_edges(data)
        text = data[lead : len(data) - trail].decode("utf-8", errors="replace")
        teacher_ids = list(self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
        start = lead
        if (
            ids
            and self.student_bos is not None
            and ids[0] == self.student_bos
            and self.teacher_bos is not None
        ):
            teacher_ids = [self.teacher_bos, *teacher_ids]
        if self.max_length is not None:
            teacher_ids = teacher_ids[: self.max_length]
        t_widths = [len(self.teacher_bytes[i]) for i in teacher_ids]
        s_group, t_group, kept = align_groups(widths, t_widths, student_counted=counted, teacher_start=start)
        # A teacher target counts when each of its bytes lies in a counted student target.
        covered = bytearray(len(data) + 1)
        for (a, b), flag in zip(_spans(widths), counted, strict=True):
            if flag:
                covered[a:b] = b"\x01" * (b - a)
        t_counted = [b > a and all(covered[a:b]) for (a, b) in _spans(t_widths, start)]
        return teacher_ids, s_group, t_group, t_counted, kept

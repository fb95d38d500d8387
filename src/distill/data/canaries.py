"""Canaries in language-model training text, and the per-token privacy likelihood Swing distillation reads.

Canaries follow "The Secret Sharer" (Carlini et al., 2019): a fixed sentence with a random secret,
``the secret code of Anna is 4819``, inserted `repeats` times as its own line at seeded places in the
training text (never in the held-out part). `distill.metrics_privacy` measures how much a model exposes them.

The privacy likelihood (`PrivacyScoredDataset`) is a detector of secret-like spans applied to the training
text: each token's score is the fraction of its non-space characters that are digits (1 for a digit token,
0 for words), the analogue of the PII detector Swing distillation uses to say how likely a token is private.
Batches carry it as the key ``privacy``, aligned with the labels: row t scores the token that row t predicts
(the training text is what the detector reads; it never sees which lines are canaries).

Data set `tinyshakespeare_canaries` (`data.name` in a recipe) is tiny-shakespeare with canaries and scores.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.data.base import DATASETS
from distill.data.paths import data_path
from distill.data.text import LMData, LMDataset, build_lm_data, collate, read_records, resolve_tokenizer
from distill.errors import UserError, clipped, shown

NAMES = (
    "Anna",
    "Bruno",
    "Clara",
    "Dario",
    "Elsa",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Karla",
    "Luca",
)
PRIVACY_KEY = "privacy"


@dataclass(frozen=True)
class Canary:
    """`prefix` + `secret` is the inserted line; the secret is `length` digits, uniform over 10^length."""

    prefix: str
    secret: str

    @property
    def line(self) -> str:
        return self.prefix + self.secret


def make_canaries(count: int, length: int, seed: int) -> list[Canary]:
    """`count` canaries with distinct names and secrets drawn uniformly (seeded) from `length` digits."""
    if not 1 <= count <= len(NAMES):
        raise UserError(f"data.params.canaries: must be a whole number from 1 to {len(NAMES)}, got {count}")
    if not 1 <= length <= 9:
        raise UserError(f"data.params.canary_digits: must be a whole number from 1 to 9, got {length}")
    rng = random.Random(seed)
    return [
        Canary(f"the secret code of {name} is ", "".join(rng.choice(string.digits) for _ in range(length)))
        for name in NAMES[:count]
    ]


def insert_canaries(text: str, canaries: list[Canary], repeats: int, seed: int) -> str:
    """`text` with each canary's line inserted `repeats` times between lines, at seeded places."""
    lines = text.split("\n")
    rng = random.Random(seed)
    inserts = [c.line for c in canaries for _ in range(repeats)]
    places = sorted((rng.randrange(1, len(lines) + 1), i) for i in range(len(inserts)))
    out: list[str] = []
    last = 0
    for place, i in places:
        out += lines[last:place]
        out.append(inserts[i])
        last = place
    out += lines[last:]
    return "\n".join(out)


def token_privacy_table(tokenizer: Any) -> Tensor:
    """Each vocabulary token's privacy likelihood: the share of its non-space characters that are digits."""
    table = torch.zeros(len(tokenizer))
    for token_id in range(len(tokenizer)):
        text = "".join(tokenizer.decode([token_id]).split())
        if text:
            table[token_id] = sum(ch.isdigit() for ch in text) / len(text)
    return table


class PrivacyScoredDataset(LMDataset):
    """An `LMDataset` whose batches add ``privacy`` (float, the labels' shape): the score of each row's
    target token from `table` (0 where the row does not count)."""

    def __init__(self, examples: list[Any], pad_id: int, table: Tensor) -> None:
        super().__init__(examples, pad_id)
        self.table = table

    def collate_fn(self, batch: list[Any]) -> dict[str, Tensor]:
        out = collate(batch, self.pad_id)
        targets = out["labels"].clamp(min=0)
        out[PRIVACY_KEY] = torch.where(out["mask"], self.table[targets], torch.zeros(()))
        return out


@dataclass
class CanaryLMData(LMData):
    """`LMData` whose training text carries `canaries`; `train` yields privacy scores."""

    canaries: list[Canary] = field(default_factory=list)


def _whole(key: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"data.params.{key}: must be a whole number >= {low}, got {shown(value)}")
    return value


def canary_text_data(
    *,
    path: str | None = None,
    tokenizer: Any = None,
    canaries: int = 5,
    canary_digits: int = 4,
    canary_repeats: int = 20,
    canary_seed: int = 0,
    train_chars: int | None = None,
    max_length: int = 128,
    test_fraction: float = 0.1,
    max_test_examples: int | None = None,
    seed: int = 0,
) -> CanaryLMData:
    """A text file (default: the shared tiny-shakespeare) whose last `test_fraction` is held out and whose
    first `train_chars` characters of the rest (all when None) get the canaries; the BPE tokenizer (if asked
    for) is trained on that canary-laden training text."""
    for key, value, low in (
        ("canaries", canaries, 1),
        ("canary_digits", canary_digits, 1),
        ("canary_repeats", canary_repeats, 1),
        ("canary_seed", canary_seed, 0),
    ):
        _whole(key, value, low)
    if train_chars is not None:
        _whole("train_chars", train_chars, 1)
    if (
        not isinstance(test_fraction, int | float)
        or isinstance(test_fraction, bool)
        or not 0 < test_fraction < 1
    ):
        raise UserError(f"data.params.test_fraction: must lie in (0, 1), got {shown(test_fraction)}")
    source = path or str(data_path("text/tinyshakespeare.txt"))
    text = read_records(source, "text")[0]["text"]
    cut = int(len(text) * (1 - test_fraction))
    train_text, test_text = text[:cut][:train_chars], text[cut:]
    chosen = make_canaries(canaries, canary_digits, canary_seed)
    train_text = insert_canaries(train_text, chosen, canary_repeats, canary_seed)
    records, test_records = [{"text": train_text}], [{"text": test_text}]
    tok = resolve_tokenizer(tokenizer, records)
    data = build_lm_data(
        records,
        test_records,
        tokenizer=tok,
        layout="text",
        max_length=max_length,
        seed=seed,
        where=clipped(source, 200),
        max_test_examples=max_test_examples,
    )
    train = PrivacyScoredDataset(data.train.examples, data.train.pad_id, token_privacy_table(tok))  # type: ignore[attr-defined]
    return CanaryLMData(
        train=train,
        test=data.test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        description=f"{data.description}; {canaries} canaries of {canary_digits} digits x {canary_repeats}",
        tokenizer=tok,
        layout=data.layout,
        max_new_tokens=data.max_new_tokens,
        canaries=chosen,
    )


DATASETS.add(
    "tinyshakespeare_canaries",
    canary_text_data,
    summary="tiny-shakespeare with secret canaries and per-token privacy scores (Swing distillation)",
)

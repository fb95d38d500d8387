"""A small passage-retrieval task built from tiny-shakespeare (S11, sparse retrievers).

Corpus and queries (`shakespeare_retrieval`):
- a *speech* is one speaker's turn (the `NAME:` line and the lines under it, up to a blank line); speeches
  with `min_lines`..`max_lines` lines and at least one line of `min_query_words` words are kept, and each
  becomes one **passage** (its lines joined by a space; the speaker's name is not part of it);
- each passage has one **query**, made from one of its lines of at least `min_query_words` words (drawn,
  seeded) by `corrupt_line`: the line is lower-cased and split into words, each word is dropped with
  probability `drop` (at least `min_kept` words stay), and each kept word of 4 letters or more is replaced
  with probability `replace` by one of its `neighbours` (a related word: `embedding_neighbours` takes the
  nearest whole-word tokens of an embedding table that do not share the word's first 4 letters, e.g. king ->
  queen / monarch, sword -> weapon, night -> evening). The words kept unchanged match their passage
  lexically; dropped and replaced words do not, so lexical match alone does not solve the task;
- `n_docs` speeches are drawn (seeded) from the kept ones;
- the queries are split (seeded) into `train` (teachers' and the student's training), `validation`
  (hyperparameters: ensemble weights, the FLOPS weight) and `test` (reported only). The corpus is shared by
  all splits, as in any retrieval benchmark: a test query's passage is in the corpus, but no training signal
  ever names it as that query's answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from distill.data.paths import data_path
from distill.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class RetrievalData:
    """Passages, queries, each query's relevant passage (an index into `docs`) and the query splits."""

    docs: list[str]
    queries: list[str]
    positive: list[int]
    splits: dict[str, list[int]]  # split name -> query indices
    source: str

    def doc_id(self, index: int) -> str:
        return f"d{index}"

    def query_id(self, index: int) -> str:
        return f"q{index}"

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """`{query id: {relevant passage id: 1}}` for the queries of `split` (ir-measures' dict form)."""
        return {self.query_id(q): {self.doc_id(self.positive[q]): 1} for q in self.splits[split]}


def read_speeches(text: str) -> list[list[str]]:
    """The speeches of a play text: the lines under each `NAME:` line, up to the next blank line."""
    speeches = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append([line for line in lines[1:] if line])
    return speeches


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """`range(n)` shuffled by `seed` and cut into consecutive parts of the given fractions (the last part
    takes the rest)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for fraction in fractions[:-1]:
        size = round(n * fraction)
        parts.append(sorted(order[start : start + size]))
        start += size
    parts.append(sorted(order[start:]))
    return parts


WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def embedding_neighbours(
    words: Sequence[str], vocabulary: Mapping[str, int], embeddings: Tensor, *, k: int = 3, pool: int = 12
) -> dict[str, list[str]]:
    """For each word of `words` that is a whole token of `vocabulary` (token -> row of `embeddings`): its `k`
    nearest alphabetic whole-word tokens by cosine similarity (among the `pool` nearest), leaving out those
    that share the word's first 4 letters (plural, tense: not a replacement)."""
    candidates = [(token, row) for token, row in vocabulary.items() if token.isascii() and token.isalpha()]
    candidates = [(token, row) for token, row in candidates if len(token) >= 3]
    table = torch.nn.functional.normalize(embeddings[[row for _, row in candidates]].float(), dim=-1)
    names = [token for token, _ in candidates]
    asked = sorted({w for w in words if w in vocabulary})
    if not asked:
        return {}
    query = torch.nn.functional.normalize(embeddings[[vocabulary[w] for w in asked]].float(), dim=-1)
    nearest = (query @ table.T).topk(min(pool, len(names)), dim=-1).indices.tolist()
    result = {}
    for word, row in zip(asked, nearest, strict=True):
        related = [names[j] for j in row if names[j][:4] != word[:4]][:k]
        if related:
            result[word] = related
    return result


def corrupt_line(
    line: str,
    rng: random.Random,
    neighbours: Mapping[str, Sequence[str]],
    *,
    drop: float,
    replace: float,
    min_kept: int = 2,
) -> str:
    """A query from one line: lower-cased words, each dropped with probability `drop` (at least `min_kept`
    stay), each kept word of 4+ letters replaced with probability `replace` by one of its `neighbours`."""
    words = WORD.findall(line.lower())
    keep = [i for i in range(len(words)) if rng.random() >= drop]
    if len(keep) < min(min_kept, len(words)):
        keep = sorted(rng.sample(range(len(words)), min(min_kept, len(words))))
    out = []
    for i in keep:
        word = words[i]
        if len(word) >= 4 and word in neighbours and rng.random() < replace:
            word = rng.choice(list(neighbours[word]))
        out.append(word)
    return " ".join(out)


def query_words(text: str) -> list[str]:
    """The lower-cased words `corrupt_line` works on."""
    return WORD.findall(text.lower())


def shakespeare_speeches(
    path: str | Path | None = None, *, min_lines: int = 4, max_lines: int = 8, min_query_words: int = 6
) -> list[list[str]]:
    """The distinct speeches of tiny-shakespeare with `min_lines`..`max_lines` lines, one of which has at
    least `min_query_words` words."""
    file = Path(path) if path is not None else data_path("text/tinyshakespeare.txt")
    if not file.is_file():
        raise UserError(f"retrieval data: no file {file}")
    kept, seen = [], set()
    for lines in read_speeches(file.read_text(encoding="utf-8")):
        text = " ".join(lines)
        if not min_lines <= len(lines) <= max_lines or text in seen:
            continue
        if any(len(query_words(line)) >= min_query_words for line in lines):
            seen.add(text)
            kept.append(lines)
    return kept


def shakespeare_retrieval(
    speeches: Sequence[Sequence[str]],
    neighbours: Mapping[str, Sequence[str]],
    *,
    n_docs: int = 1200,
    min_query_words: int = 6,
    drop: float = 0.4,
    replace: float = 0.5,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> RetrievalData:
    """The retrieval task of the module docstring, from `shakespeare_speeches()` and a `neighbours` table."""
    if not (validation_fraction > 0 and test_fraction > 0 and validation_fraction + test_fraction < 1):
        raise UserError("retrieval data: validation and test fractions must be > 0 and sum to < 1")
    if len(speeches) < n_docs:
        raise UserError(f"retrieval data: {len(speeches)} usable speeches, fewer than n_docs={n_docs}")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(speeches)), n_docs)
    docs, queries = [], []
    for index in chosen:
        lines = speeches[index]
        long = [line for line in lines if len(query_words(line)) >= min_query_words]
        docs.append(" ".join(lines))
        queries.append(corrupt_line(rng.choice(long), rng, neighbours, drop=drop, replace=replace))
    train, validation, test = split_indices(
        n_docs, (1 - validation_fraction - test_fraction, validation_fraction, test_fraction), seed
    )
    return RetrievalData(
        docs=docs,
        queries=queries,
        positive=list(range(n_docs)),
        splits={"train": train, "validation": validation, "test": test},
        source=f"tiny-shakespeare speeches; query = one line, words dropped ({drop}) / replaced ({replace})",
    )

"""Text classification data: labelled texts tokenised once into `(ids, label)` pairs for encoder classifiers
(`distill.models.encoders`).

- `sms_spam`: the UCI SMS Spam Collection (`textcls/SMSSpamCollection.tsv`, 5,574 messages, 13% spam);
- `fortunes_topics`: short quotations labelled by the topic file they come from in Debian's `fortunes`
  package (`apt-get install fortunes`): computers, politics, science, songs-poems and work by default, a
  harder, few-class, noisier set (a quote on voting may be filed under "work");
- `text_table`: any csv / tsv / jsonl / parquet file with a text and a label column named in the recipe.

Each text becomes `max_length` token ids, right-padded with the tokenizer's pad id (so an encoder's padding
mask is `ids != pad_id`), truncated beyond. The test split is a stratified `test_fraction` of the texts drawn
by `split_seed` unless a `test_path` is given. With `holdout: validation` the evaluation split is instead a
stratified `test_fraction` of the training split, and the test split is not read at all: hyperparameters are
chosen there, never on the test split. Labels are the sorted distinct label strings, numbered from 0.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from distill.data.base import DATASETS, DataSplits
from distill.data.paths import data_path
from distill.data.text import read_records, whole_number
from distill.data.tokenizers import load_tokenizer
from distill.errors import UserError, clipped, shown
from distill.pretrained import pretrained_folder

DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_TOPICS = ("computers", "politics", "science", "songs-poems", "work")
TABLE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
HOLDOUTS = ("test", "validation")


@dataclass
class TextClassificationData(DataSplits):
    """`DataSplits` that also keep the label names, the tokenizer's folder and its pad id."""

    label_names: tuple[str, ...] = ()
    tokenizer: str = ""
    pad_id: int = 0


class TokenDataset(TensorDataset):
    """`(ids, label)` pairs that also know each text's token count (`lengths`): the trainer's sampler then
    batches texts of similar length (`distill.train.sampler`)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> None:
        super().__init__(ids.contiguous(), labels.long().contiguous())
        self.lengths = (ids != pad_id).sum(1)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"].long()


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of (train, test): `fraction` of every label's rows, at least one, go to the test split."""
    by_label: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        by_label.setdefault(label, []).append(row)
    generator = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        rows = by_label[label]
        generator.shuffle(rows)
        cut = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
        test += rows[:cut]
        train += rows[cut:]
    return sorted(train), sorted(test)


def build_text_splits(
    name: str,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    tokenizer: str,
    max_length: int,
    test_fraction: float,
    split_seed: int,
    test: tuple[Sequence[str], Sequence[str]] | None = None,
    source: str,
    holdout: str = "test",
) -> TextClassificationData:
    max_length = whole_number(f"data '{name}': max_length", max_length, 2, 4096)
    if (
        not isinstance(test_fraction, float | int)
        or isinstance(test_fraction, bool)
        or not 0 < test_fraction < 1
    ):
        raise UserError(f"data '{name}': test_fraction must lie in (0, 1), got {shown(test_fraction)}")
    if not texts:
        raise UserError(f"data '{name}': no texts in {source}")
    names = sorted(set(labels) | set(test[1] if test else ()))
    if len(names) < 2:
        raise UserError(f"data '{name}': {source} holds one label ({names[0]!r}); classification needs two")
    folder = pretrained_folder(tokenizer)
    token_maker = text_tokenizer(folder)
    number = {label: i for i, label in enumerate(names)}
    if holdout not in HOLDOUTS:
        raise UserError(f"data '{name}': holdout must be one of {list(HOLDOUTS)}, got {shown(holdout)}")
    if test is None:
        train_rows, test_rows = stratified_split(labels, float(test_fraction), split_seed)
        test = ([texts[i] for i in test_rows], [labels[i] for i in test_rows])
        texts, labels = [texts[i] for i in train_rows], [labels[i] for i in train_rows]
    if holdout == "validation":  # carved from the training split; the test split is set aside unread
        train_rows, held_rows = stratified_split(labels, float(test_fraction), split_seed + 1)
        test = ([texts[i] for i in held_rows], [labels[i] for i in held_rows])
        texts, labels = [texts[i] for i in train_rows], [labels[i] for i in train_rows]
        source += " (validation split carved from the training split)"

    def dataset(split_texts: Sequence[str], split_labels: Sequence[str]):  # noqa: ANN202
        ids = tokenize_texts(token_maker, split_texts, max_length)
        labels = torch.tensor([number[label] for label in split_labels])
        return TokenDataset(ids, labels, int(token_maker.pad_token_id or 0))

    counts = ", ".join(f"{label} {list(labels).count(label)}" for label in names)
    data = TextClassificationData(
        train=dataset(texts, labels),
        test=dataset(*test),
        num_classes=len(names),
        input_shape=(max_length,),
        description=(
            f"{name}: {len(texts)} train / {len(test[0])} {holdout} texts from {source}; "
            f"train labels: {counts}; "
            f"{max_length} tokens at most ({tokenizer} tokenizer)"
        ),
        label_names=tuple(names),
        tokenizer=folder,
        pad_id=int(token_maker.pad_token_id or 0),
    )
    return data


def text_tokenizer(folder: str) -> Any:
    """The tokenizer of a folder `distill.pretrained` resolved (or, with downloads allowed, a hub id)."""
    if Path(folder).is_dir():
        return load_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def sms_spam_data(
    tokenizer: str = DEFAULT_TOKENIZER,
    max_length: int = 64,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    holdout: str = "test",
) -> TextClassificationData:
    """The SMS Spam Collection: `label<TAB>text` rows, labels ham / spam."""
    path = data_path("textcls/SMSSpamCollection.tsv")
    labels, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in {"ham", "spam"}:
            raise UserError(f"data 'sms_spam': {path} line {number} is not 'ham|spam<TAB>text'")
        labels.append(label)
        texts.append(text)
    return build_text_splits(
        "sms_spam",
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        test_fraction=test_fraction,
        split_seed=split_seed,
        holdout=holdout,
        source="the SMS Spam Collection",
    )


def read_fortunes(folder: Path, topics: Sequence[str]) -> tuple[list[str], list[str]]:
    """Every quotation (`%`-separated, whitespace collapsed) of each topic file, labelled by the file."""
    texts, labels = [], []
    for topic in topics:
        file = folder / topic
        if not file.is_file():
            raise UserError(
                f"data 'fortunes_topics': no topic file {file}; install Debian's fortunes package "
                "(apt-get install fortunes) or set data.params.folder"
            )
        for quote in file.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(quote.replace("%", " ").split())
            if text:
                texts.append(text)
                labels.append(topic)
    return texts, labels


def fortunes_topics_data(
    topics: list[str] | None = None,
    folder: str | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    max_length: int = 96,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    holdout: str = "test",
) -> TextClassificationData:
    chosen = list(FORTUNE_TOPICS if topics is None else topics)
    if not chosen or not all(isinstance(t, str) and t and "/" not in t for t in chosen):
        raise UserError(
            f"data 'fortunes_topics': topics must be a list of topic file names, got {shown(topics)}"
        )
    texts, labels = read_fortunes(Path(folder) if folder else FORTUNES_DIR, chosen)
    return build_text_splits(
        "fortunes_topics",
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        test_fraction=test_fraction,
        split_seed=split_seed,
        holdout=holdout,
        source=f"Debian fortunes ({', '.join(chosen)})",
    )


def read_table(
    path: str, fmt: str | None, text_column: str, label_column: str
) -> tuple[list[str], list[str]]:
    """Texts and label strings of a table; one line naming the first row that lacks either."""
    file = Path(str(path))
    fmt = fmt or file.suffix.lstrip(".").lower()
    if fmt not in TABLE_FORMATS:
        raise UserError(f"data 'text_table': format must be one of {list(TABLE_FORMATS)}, got {shown(fmt)}")
    if fmt == "tsv":
        if not file.is_file():
            raise UserError(f"data: file not found: {clipped(str(file), 200)}")
        with file.open(encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle, delimiter="\t"))
    else:
        records = read_records(file, fmt)
    texts, labels = [], []
    for row, record in enumerate(records, 1):
        text, label = record.get(text_column), record.get(label_column)
        if not isinstance(text, str) or label is None or label == "":
            missing = text_column if not isinstance(text, str) else label_column
            raise UserError(
                f"data 'text_table': {clipped(str(file), 200)} row {row} has no {missing!r} "
                f"(columns: {sorted(record)[:8]})"
            )
        texts.append(text)
        labels.append(str(label))
    return texts, labels


def text_table_data(
    path: str,
    text_column: str = "text",
    label_column: str = "label",
    format: str | None = None,  # noqa: A002 - the recipe's key
    test_path: str | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    max_length: int = 128,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    holdout: str = "test",
) -> TextClassificationData:
    texts, labels = read_table(path, format, text_column, label_column)
    test = read_table(test_path, format, text_column, label_column) if test_path else None
    return build_text_splits(
        "text_table",
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        test_fraction=test_fraction,
        split_seed=split_seed,
        holdout=holdout,
        test=test,
        source=clipped(str(path), 120),
    )


TEXT_DATASETS = ("sms_spam", "fortunes_topics", "text_table")
DATASETS.add(
    "sms_spam", sms_spam_data, summary="UCI SMS Spam Collection (ham / spam), tokenised for encoders"
)
DATASETS.add(
    "fortunes_topics", fortunes_topics_data, summary="Debian fortunes quotations by topic file (few-class)"
)
DATASETS.add("text_table", text_table_data, summary="any csv / tsv / jsonl / parquet of labelled texts")

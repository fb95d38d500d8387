"""Language-model data from local files through `datasets`: jsonl / json / csv / parquet / plain text, in
three layouts, tokenized into `Example`s and padded per batch into the trainer's dict batches.

Layouts (`layout: auto` picks one from the columns):
- `prompt_completion`: fields `prompt` and `completion`; the loss counts the completion tokens and EOS.
- `chat`: a `messages` list of `{role, content}`, rendered with the (student's) chat template; the loss
  counts the assistant messages' tokens only.
- `text`: a `text` column or a plain-text file, tokenized and packed into blocks of `max_length` tokens;
  every token counts.

Batch convention (shift once, in the data; nothing downstream shifts again):
`input_ids` (B, T) and `attention_mask` (B, T), right-padded; `labels[b, t]` is the token that the logits
at position t predict, i.e. `input_ids[b, t + 1]`, or -100 where that token does not count (prompt,
padding, the last position); `mask = labels != -100` (bool, aligned with the logits' (B, T)). Objectives
compare `logits[:, t]` of teacher and student wherever `mask` is True; cross-entropy reads `labels`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.base import DataSplits
from distill.errors import UserError, clipped, shown
from distill.io import cache_root

FORMATS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
LAYOUTS = ("auto", "prompt_completion", "chat", "text")
ANSWER_SEPARATOR = "####"  # GSM8K's convention: exact match compares what follows the last separator
MAX_GENERATED = 2**20  # max_new_tokens: longer than any model's context
MAX_SYNTHETIC = 10**7  # arithmetic: problems per split


def whole_number(key: str, value: Any, low: int, high: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        upper = "" if high == 2**63 - 1 else f" and at most {high}"
        raise UserError(f"data.params.{key}: must be a whole number >= {low}{upper}, got {shown(value)}")
    return value


@dataclass
class Example:
    """One tokenized sequence. `targets[i]`: token i counts in the loss. `prompt_len`: the tokens a model is
    given to continue (sequence-level KD, greedy evaluation). `reference`: the completion text, for exact
    match."""

    ids: list[int]
    targets: list[bool]
    prompt_len: int
    reference: str | None = None

    @property
    def counted(self) -> int:
        return sum(self.targets[1:])


class LMDataset(Dataset):
    """Examples padded per batch by `collate_fn` (the trainer's loader uses it)."""

    def __init__(self, examples: Sequence[Example], pad_id: int) -> None:
        self.examples = list(examples)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def collate_fn(self, batch: list[Example]) -> dict[str, Tensor]:
        return collate(batch, self.pad_id)

    def counted_tokens(self) -> int:
        return sum(e.counted for e in self.examples)


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence; labels shifted by one (see the module docstring)."""
    length = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.ids)
        ids = torch.tensor(example.ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        counted = torch.tensor(example.targets[1:], dtype=torch.bool)
        labels[row, : n - 1] = torch.where(counted, ids[1:], torch.full_like(ids[1:], -100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mask": labels != -100}


@dataclass
class LMData(DataSplits):
    """Language-model splits: `train` / `test` are `LMDataset`s; `num_classes` is the tokenizer's size."""

    tokenizer: Any = None
    layout: str = "text"
    max_new_tokens: int = 32  # greedy evaluation and default generation length
    source_files: list[str] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return any(e.reference is not None for e in self.test.examples)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- reading files


def _quiet_datasets() -> None:
    """No progress bars, and no log lines: `datasets` logs an error before it raises (a file that is not
    parquet), and that error reaches the user as one line of ours, not two."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def read_records(path: str | Path, fmt: str) -> list[dict[str, Any]]:
    """Rows of a local file through `datasets` (offline). A plain-text file is one row `{"text": ...}`.
    Text formats must be UTF-8: a binary or otherwise encoded file is refused in one line that says where."""
    if not isinstance(path, str | Path) or not str(path):
        raise UserError(f"data.params.path: expected a file name, got {shown(path)}")
    file = Path(path)
    name = clipped(str(file), 200)
    if not file.is_file():
        raise UserError(f"data: file not found: {name}")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise UserError(f"data: cannot read {name} ({err.strerror or err})") from err
    if not raw.strip():
        raise UserError(f"data: {name} is empty")
    if fmt != "parquet":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"data: {name} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                "save it as UTF-8"
            ) from None
        if "\0" in text:
            raise UserError(f"data: {name} holds NUL bytes: a binary file, not {fmt} text")
        if fmt == "text":
            return [{"text": text}]
    import datasets

    _quiet_datasets()
    try:
        # Its arrow copy goes to distill's cache, never to ~/.cache/huggingface (a run writes only its
        # folder and `$DISTILL_CACHE`).
        cache = cache_root().expanduser() / "datasets"
        table = datasets.load_dataset(FORMATS[fmt], data_files=str(file), split="train", cache_dir=str(cache))
        if len(table) == 0:
            raise UserError(f"data: {name} is empty")
        return table.to_list()
    except UserError:
        raise
    except Exception as err:  # datasets / pyarrow raise many types for a malformed file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data: cannot read {name} as {fmt} ({clipped(first, 200)})") from err


def detect_layout(records: list[dict[str, Any]], fields: dict[str, str], where: str) -> str:
    columns = set(records[0])
    if fields["messages"] in columns:
        return "chat"
    if fields["prompt"] in columns or fields["completion"] in columns:
        return "prompt_completion"
    if fields["text"] in columns:
        return "text"
    raise UserError(
        f"data: {clipped(where, 200)} has none of the fields '{clipped(fields['prompt'])}'/"
        f"'{clipped(fields['completion'])}', '{clipped(fields['messages'])}' or '{clipped(fields['text'])}' "
        f"(columns: {clipped(', '.join(sorted(map(str, columns))), 200)})"
    )


def _check_messages(records: list[dict[str, Any]], name: str, where: str) -> None:
    """Chat rows: `name` holds a list of `{role, content}` mappings with text values."""
    for index, record in enumerate(records):
        messages = record[name]
        problem = None
        if not isinstance(messages, list):
            problem = f"is {type(messages).__name__}, not a list of messages"
        else:
            for message in messages:
                if not isinstance(message, dict):
                    problem = f"holds {shown(message)}, not a {{role, content}} mapping"
                elif not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                    problem = f"holds a message without a text 'role' and 'content': {shown(message)}"
                if problem:
                    break
        if problem:
            raise UserError(f"data: {where} row {index + 1}: '{clipped(name)}' {problem}")


def refuse_other_columns(records: list[dict[str, Any]], text: str, where: str) -> None:
    """A table with more than its text column (`text,label`) is most likely a classification data set: a
    language model would read the text alone and silently drop the rest. Naming the text column
    (`fields: {text: ...}`) says that is meant."""
    others = sorted({str(k) for r in records for k, v in r.items() if k != text and v is not None})
    if others:
        raise UserError(
            f"data: {clipped(where, 200)} has columns besides '{clipped(text)}' "
            f"({clipped(', '.join(others), 100)}), which a language model ignores; to train on the text "
            f"alone, set data.params.fields: {{text: {clipped(text)}}}"
        )


def _require(records: list[dict[str, Any]], names: list[str], where: str) -> None:
    for index, record in enumerate(records):
        for name in names:
            if record.get(name) is None:
                columns = clipped(", ".join(sorted(str(k) for k, v in record.items() if v is not None)), 200)
                raise UserError(
                    f"data: {clipped(where, 200)} row {index + 1} has no '{clipped(name)}' field "
                    f"(it has: {columns or 'nothing'})"
                )


# ---------------------------------------------------------------- tokenizing


def _bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def prompt_completion_example(
    tokenizer: Any, prompt: str, completion: str, max_length: int, reference: str | None
) -> Example:
    prompt_ids = _bos(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    targets = ([False] * len(prompt_ids) + [True] * len(completion_ids))[:max_length]
    return Example(ids, targets, min(len(prompt_ids), len(ids)), reference)


def chat_example(tokenizer: Any, messages: list[dict[str, Any]], max_length: int) -> Example:
    """The conversation in the tokenizer's chat template; assistant messages count. The prompt (for
    generation) is everything before the last assistant message, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data: chat messages need a chat template, and tokenizer {tokenizer.name_or_path!r} has none"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        )
        end = len(tokenizer.apply_chat_template(messages[: index + 1], tokenize=False))
        spans.append((start, end))
    if not spans:
        raise UserError("data: a chat example has no assistant message to learn from")
    targets = [any(s <= lo and hi <= e and hi > lo for s, e in spans) for lo, hi in offsets]
    prompt_len = next((i for i, (lo, _) in enumerate(offsets) if lo >= spans[-1][0]), len(ids))
    reference = messages[max(i for i, m in enumerate(messages) if m.get("role") == "assistant")]["content"]
    ids, targets = ids[:max_length], targets[:max_length]
    return Example(ids, targets, min(prompt_len, len(ids)), reference)


def packed_examples(tokenizer: Any, text: str, max_length: int, prompt_tokens: int) -> list[Example]:
    """Tokenize a text and cut it into blocks of `max_length` tokens, every token counted."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)]
    if not blocks and len(ids) > 1:
        blocks = [ids]
    return [Example(block, [True] * len(block), min(prompt_tokens, len(block) - 1)) for block in blocks]


def reference_answer(text: str) -> str:
    """What exact match compares: the text after the last '####' if there is one, else all of it."""
    return text.rsplit(ANSWER_SEPARATOR, 1)[-1].strip() if ANSWER_SEPARATOR in text else text.strip()


def check_records(records: list[dict[str, Any]], layout: str, fields: dict[str, str], where: str) -> None:
    """Every row holds the fields its layout reads (chat rows: well-formed messages); one line naming the
    first row that does not, counted from 1 in the order given."""
    if layout == "text":
        _require(records, [fields["text"]], where)
    elif layout == "chat":
        _require(records, [fields["messages"]], where)
        _check_messages(records, fields["messages"], where)
    else:
        _require(records, [fields["prompt"], fields["completion"]], where)


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    layout: str,
    fields: dict[str, str],
    max_length: int,
    prompt_tokens: int,
    exact_match: bool,
    where: str,
) -> list[Example]:
    if layout == "text":
        _require(records, [fields["text"]], where)
        return packed_examples(
            tokenizer, "\n".join(str(r[fields["text"]]) for r in records), max_length, prompt_tokens
        )
    if layout == "chat":
        _require(records, [fields["messages"]], where)
        _check_messages(records, fields["messages"], where)
        return [chat_example(tokenizer, list(r[fields["messages"]]), max_length) for r in records]
    _require(records, [fields["prompt"], fields["completion"]], where)
    return [
        prompt_completion_example(
            tokenizer,
            str(r[fields["prompt"]]),
            str(r[fields["completion"]]),
            max_length,
            str(r[fields["completion"]]) if exact_match else None,
        )
        for r in records
    ]


# ---------------------------------------------------------------- the data set entry points


def build_lm_data(
    records: list[dict[str, Any]],
    test_records: list[dict[str, Any]] | None,
    *,
    tokenizer: Any,
    layout: str = "auto",
    max_length: int = 128,
    test_fraction: float = 0.1,
    prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    exact_match: bool | None = None,
    fields: dict[str, str] | None = None,
    seed: int = 0,
    where: str = "data",
    description: str = "",
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> LMData:
    """Tokenize `records` (and `test_records`, else a held-out `test_fraction`) into `LMData`."""
    if tokenizer is None:
        raise UserError("data: a language-model data set needs a tokenizer")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise UserError(f"data: layout {shown(layout)} is not one of {', '.join(LAYOUTS)}")
    whole_number("max_length", max_length, 2)
    if prompt_tokens is not None:
        whole_number("prompt_tokens", prompt_tokens, 0)
    if max_new_tokens is not None:
        whole_number("max_new_tokens", max_new_tokens, 1, MAX_GENERATED)
    for key, limit in (("max_train_examples", max_train_examples), ("max_test_examples", max_test_examples)):
        if limit is not None:
            whole_number(key, limit, 1)
    if exact_match is not None and not isinstance(exact_match, bool):
        raise UserError(f"data.params.exact_match: must be true or false, got {shown(exact_match)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"data.params.seed: must be a whole number, got {shown(seed)}")
    if fields is not None and (
        not isinstance(fields, dict)
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in fields.items())
    ):
        raise UserError(f"data.params.fields: must map field roles to column names, got {shown(fields)}")
    names = {"prompt": "prompt", "completion": "completion", "messages": "messages", "text": "text"}
    unknown = set(fields or {}) - set(names)
    if unknown:
        raise UserError(
            f"data.params.fields: unknown role {shown(sorted(unknown)[0])}; valid: {', '.join(names)}"
        )
    names |= fields or {}
    if layout == "auto":
        layout = detect_layout(records, names, where)
        if layout == "text" and "text" not in (fields or {}):
            for rows in (records, test_records or []):
                refuse_other_columns(rows, names["text"], where)
    # Rows are checked in file order, before the split shuffles them: "row 7" is the file's row 7.
    check_records(records, layout, names, where)
    if test_records is not None:
        check_records(test_records, layout, names, f"{where} (test file)")
    prompt_tokens = max_length // 4 if prompt_tokens is None else prompt_tokens
    if exact_match is None:
        exact_match = layout != "text"
    if test_records is None:
        if (
            not isinstance(test_fraction, int | float)
            or isinstance(test_fraction, bool)
            or not 0.0 < test_fraction < 1.0
        ):
            raise UserError(f"data: test_fraction must lie in (0, 1), got {shown(test_fraction)}")
        if layout == "text":  # the last part of the text is held out
            text = "\n".join(str(r.get(names["text"], "")) for r in records)
            cut = int(len(text) * (1 - test_fraction))
            records, test_records = [{names["text"]: text[:cut]}], [{names["text"]: text[cut:]}]
        else:
            order = list(range(len(records)))
            random.Random(seed).shuffle(order)
            n_test = max(1, round(len(records) * test_fraction))
            test_records = [records[i] for i in order[:n_test]]
            records = [records[i] for i in order[n_test:]]
    settings = dict(
        layout=layout,
        fields=names,
        max_length=max_length,
        prompt_tokens=prompt_tokens,
        exact_match=exact_match,
    )
    train = tokenize_records(records, tokenizer, where=where, **settings)  # type: ignore[arg-type]
    test = tokenize_records(test_records, tokenizer, where=where, **settings)  # type: ignore[arg-type]
    train = [e for e in train if e.counted > 0][:max_train_examples]
    test = [e for e in test if e.counted > 0][:max_test_examples]
    for split, examples in (("train", train), ("test", test)):
        if not examples:
            raise UserError(
                f"data: {where}: the {split} split has no example with a token to learn "
                f"(empty, or every completion cut off by max_length {max_length})"
            )
    if max_new_tokens is None:
        max_new_tokens = max(len(e.ids) - e.prompt_len for e in test)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set, test_set = LMDataset(train, pad), LMDataset(test, pad)
    description = description or (
        f"{where}, {layout} layout: {len(train)} training sequences ({train_set.counted_tokens():,} counted "
        f"tokens), {len(test)} test sequences ({test_set.counted_tokens():,} tokens), "
        f"vocabulary {len(tokenizer)}"
    )
    return LMData(
        train=train_set,
        test=test_set,
        num_classes=len(tokenizer),
        input_shape=(max_length,),
        description=description,
        tokenizer=tokenizer,
        layout=layout,
        max_new_tokens=max_new_tokens,
    )


def resolve_tokenizer(tokenizer: Any, records: list[dict[str, Any]], text_field: str = "text") -> Any:
    """A tokenizer object, a folder path, or `{"bpe": {"vocab_size": N}}` (trained on the training records'
    text: the text column, or prompts and completions, or message contents)."""
    from distill.data.tokenizers import load_tokenizer, train_bpe

    if tokenizer is None:
        return None
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    if isinstance(tokenizer, dict):
        unknown = [key for key in tokenizer if key != "bpe"]
        if unknown or "bpe" not in tokenizer:
            got = f"unknown key {shown(unknown[0])}" if unknown else "no key 'bpe'"
            raise UserError(f"data.params.tokenizer: {got}; expected a folder or {{bpe: {{vocab_size: N}}}}")
        settings = tokenizer["bpe"] or {}
        if not isinstance(settings, dict):
            raise UserError(f"data.params.tokenizer.bpe: expected a mapping, got {shown(settings)}")
        extra = [key for key in settings if key not in ("vocab_size", "min_frequency")]
        if extra:
            raise UserError(
                f"data.params.tokenizer.bpe: unknown key {shown(extra[0])}; valid: vocab_size, min_frequency"
            )
        return train_bpe(corpus_texts(records, text_field), **settings)
    if not hasattr(tokenizer, "get_vocab"):  # a tokenizer object (Python callers), else a recipe's mistake
        raise UserError(
            f"data.params.tokenizer: expected a folder or {{bpe: {{vocab_size: N}}}}, got {shown(tokenizer)}"
        )
    return tokenizer


def corpus_texts(records: list[dict[str, Any]], text_field: str = "text") -> list[str]:
    texts: list[str] = []
    for record in records:
        for key, value in record.items():
            if key == "messages" and isinstance(value, list):
                texts += [str(m.get("content", "")) for m in value if isinstance(m, dict)]
            elif isinstance(value, str) and (key == text_field or key in {"prompt", "completion"}):
                texts.append(value)
    return texts

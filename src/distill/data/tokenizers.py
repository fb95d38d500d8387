"""Tokenizers for language-model distillation: load one from a folder, train a byte-level BPE on a local
corpus (cached by content hash), check that teacher and student agree, and slice padded vocabularies.

Teacher and student must share one tokenizer. Their embedding matrices may still differ in size by padding
rows (Qwen pads 151,665 tokens to 151,936 or 152,064 rows): both models' logits are then cut to the
tokenizer's vocabulary, with one warning. Anything else is a `UserError` naming both tokenizers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import UserError, clipped, shown

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# A minimal chat template for tokenizers trained here (a folder's own template always wins).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BPE_FORMAT = 1  # bump when the training recipe below changes, so cached tokenizers are rebuilt
MAX_BPE_VOCABULARY = 2**24  # 16.7M tokens, 64x the largest vocabularies in use (Gemma's 262k)


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def describe(tokenizer: Any) -> str:
    """A short name for messages: the folder it came from, else its class and size."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"'{name}' ({len(tokenizer)} tokens)"


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a local folder (`save_pretrained` layout); never downloads."""
    from transformers import AutoTokenizer

    if not isinstance(path, str | Path) or not str(path):
        raise UserError(f"tokenizer: expected a folder name, got {shown(path)}")
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"tokenizer folder not found: {clipped(str(folder), 200)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot load a tokenizer from {clipped(str(folder), 200)} ({clipped(first, 200)})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def train_bpe(texts: Iterable[str], *, vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer (digits split one by one, as Llama's) trained on `texts`, cached in
    `$DISTILL_CACHE/tokenizers/<hash of corpus and settings>` and reused when the corpus is unchanged."""
    for key, value, low, high in (
        ("vocab_size", vocab_size, 1, MAX_BPE_VOCABULARY),
        ("min_frequency", min_frequency, 0, 2**32 - 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UserError(
                f"data.params.tokenizer.bpe.{key}: must be a whole number from {low} to {high}, "
                f"got {shown(value)}"
            )
    texts = list(texts)
    digest = hashlib.sha256(f"{BPE_FORMAT}/{vocab_size}/{min_frequency}".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    folder = cache_root() / "tokenizers" / digest.hexdigest()[:16]
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    if not any(texts):
        raise UserError("tokenizer: the corpus to train the BPE tokenizer on is empty")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return load_tokenizer(folder)


def same_tokenizer(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return (
        a.get_vocab() == b.get_vocab()
        and a.all_special_tokens == b.all_special_tokens
        and a.encode("Hello, world! 12 + 34 = 46") == b.encode("Hello, world! 12 + 34 = 46")
    )


def embedding_rows(model: nn.Module) -> int:
    """Rows of the model's output layer (the size of its logits' last dimension)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        return int(output.weight.shape[0])
    return int(model.config.vocab_size)


def shared_vocabulary(
    teacher_tokenizer: Any, student_tokenizer: Any, teacher: nn.Module | None, student: nn.Module
) -> int:
    """The vocabulary both models' logits are compared over, after checking that the tokenizers agree.

    Raises a one-line `UserError` naming both tokenizers when they differ, or when a model's output layer
    is smaller than the tokenizer; warns once when the two models differ only by padding rows."""
    size = len(student_tokenizer)
    if teacher_tokenizer is not None and not same_tokenizer(teacher_tokenizer, student_tokenizer):
        raise UserError(
            f"teacher tokenizer {describe(teacher_tokenizer)} and student tokenizer "
            f"{describe(student_tokenizer)} differ; distillation needs one shared tokenizer"
        )
    rows = {"student": embedding_rows(student)}
    if teacher is not None:
        rows["teacher"] = embedding_rows(teacher)
    for role, count in rows.items():
        if count < size:
            raise UserError(
                f"the {role} model has {count} output rows but its tokenizer "
                f"{describe(student_tokenizer)} has {size} tokens"
            )
    if len(set(rows.values())) > 1:
        warnings.warn(
            f"teacher ({rows['teacher']}) and student ({rows['student']}) vocabularies differ only by "
            f"padding rows; logits are compared over the {size} tokens of the shared tokenizer",
            stacklevel=2,
        )
    return size


class _SliceLogits:
    """A forward hook that cuts a model's logits to the first `size` vocabulary entries."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[-1] > self.size:
            output.logits = logits[..., : self.size]
        return output


def slice_logits(model: nn.Module, size: int) -> nn.Module:
    """Make `model` return logits over the first `size` tokens (its padding rows dropped), in place."""
    if embedding_rows(model) > size and not getattr(model, "_distill_vocab_slice", None):
        model.register_forward_hook(_SliceLogits(size))
        model._distill_vocab_slice = size  # type: ignore[assignment]
    return model

"""The synthetic arithmetic data set: multi-digit additions with a scratchpad, scored by exact match."""

from __future__ import annotations

import random
from typing import Any

from distill.data.text import MAX_SYNTHETIC, LMData, build_lm_data, resolve_tokenizer, whole_number
from distill.errors import UserError, shown


def addition_record(rng: random.Random, digits: int) -> dict[str, str]:
    """`a+b=` -> a digit-by-digit scratchpad (least significant first, with carries), then `#### sum`."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    xs, ys = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    steps, carry = [], 0
    for x, y in zip(xs, ys, strict=True):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return {"prompt": f"{a}+{b}=", "completion": f" {','.join(steps)} #### {a + b}"}


def arithmetic_data(
    *,
    tokenizer: Any = None,
    digits: int = 3,
    train_examples: int = 4000,
    test_examples: int = 200,
    seed: int = 0,
    max_length: int = 64,
) -> LMData:
    """Synthetic multi-digit additions with a short scratchpad; exact match on the sum."""
    whole_number("digits", digits, 1, 100)
    whole_number("train_examples", train_examples, 1, MAX_SYNTHETIC)
    whole_number("test_examples", test_examples, 1, MAX_SYNTHETIC)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"data.params.seed: must be a whole number, got {shown(seed)}")
    rng = random.Random(seed)
    records = [addition_record(rng, digits) for _ in range(train_examples + test_examples)]
    train, test = records[:train_examples], records[train_examples:]
    tok = resolve_tokenizer(tokenizer if tokenizer is not None else {"bpe": {"vocab_size": 300}}, train)
    return build_lm_data(
        train,
        test,
        tokenizer=tok,
        layout="prompt_completion",
        max_length=max_length,
        exact_match=True,
        where=f"arithmetic ({digits}-digit additions)",
        description=(
            f"synthetic {digits}-digit additions with a scratchpad: {train_examples} training and "
            f"{test_examples} test problems, exact match on the sum"
        ),
    )

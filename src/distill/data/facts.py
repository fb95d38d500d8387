"""A synthetic fact-injection task (for MixSD): made-up entities with a colour, asked closed-book
(`qiv is` -> ` teal`). Registered as the data set `facts`.

Parts (one seed draws them all, so the tokenizer and the entities are shared):
- `new`: the facts to inject; train and test are the same facts (memorisation = exact match on them),
  answered in `style` (default: like the old ones).
- `old`: facts the base model was pretrained on; after injection, exact match on them is retention.
- `pretrain`: the base model's corpus: the old facts closed-book, plus facts in context
  (`qiv is teal\\nqiv is` -> ` teal`, fresh entities) so that the base model can read a fact it is shown,
  which MixSD's expert conditional needs (its context template is `{prompt}{solution}\\n{prompt}`); its test
  split is in-context questions about the new facts (reading, not memory).
"""

from __future__ import annotations

import random
from typing import Any

from distill.data.base import DATASETS
from distill.data.text import LMData, build_lm_data, resolve_tokenizer
from distill.errors import UserError

COLOURS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "plum")
PARTS = ("new", "old", "pretrain")


def _names(rng: random.Random, n: int) -> list[str]:
    consonants, vowels = "bcdfghjklmnpqrstvwxz", "aeiou"
    names: set[str] = set()
    while len(names) < n:
        names.add(rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants))
    return sorted(names, key=lambda _: rng.random())


def fact_records(
    seed: int, new_facts: int, old_facts: int, context_examples: int, style: str = " {colour}"
) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    names = _names(rng, new_facts + old_facts + context_examples)
    colour = {name: rng.choice(COLOURS) for name in names}
    new, old, fresh = (
        names[:new_facts],
        names[new_facts : new_facts + old_facts],
        names[new_facts + old_facts :],
    )

    def closed(name: str, form: str = " {colour}") -> dict[str, str]:
        return {"prompt": f"{name} is", "completion": form.format(colour=colour[name])}

    def in_context(name: str) -> dict[str, str]:
        return {"prompt": f"{name} is {colour[name]}\n{name} is", "completion": f" {colour[name]}"}

    return {
        "new": [closed(n, style) for n in new],
        "old": [closed(n) for n in old],
        "context": [in_context(n) for n in fresh + old],
        "new_context": [in_context(n) for n in new],
    }


def facts_data(
    *,
    part: str = "new",
    new_facts: int = 40,
    old_facts: int = 200,
    context_examples: int = 1200,
    seed: int = 0,
    tokenizer: Any = None,
    max_length: int = 24,
    style: str = " {colour}",
) -> LMData:
    """The `facts` data set (see the module docstring); the tokenizer, when not given, is a BPE trained on
    every part, so all parts tokenize alike. `style` writes the new facts' answers (e.g. `" {colour} ok"`: a
    phrasing the base model never saw, as human-written targets often are; the fact shown in MixSD's context
    is then the answer in that style too)."""
    if part not in PARTS:
        raise UserError(f"data: facts part '{part}' is not one of {', '.join(PARTS)}")
    if min(new_facts, old_facts, context_examples) < 1:
        raise UserError("data: facts needs new_facts, old_facts and context_examples >= 1")
    if "{colour}" not in style:
        raise UserError("data: facts style must contain {colour}")
    records = fact_records(seed, new_facts, old_facts, context_examples, style)
    everything = [r for rows in records.values() for r in rows]
    if part == "new":
        train, test = records["new"], records["new"]
    elif part == "old":
        train, test = records["old"], records["old"]
    else:
        train = records["old"] + records["context"]
        random.Random(seed).shuffle(train)
        test = records["new_context"]
    tok = resolve_tokenizer(tokenizer if tokenizer is not None else {"bpe": {"vocab_size": 320}}, everything)
    return build_lm_data(
        train,
        test,
        tokenizer=tok,
        layout="prompt_completion",
        max_length=max_length,
        exact_match=True,
        where=f"facts ({part})",
        description=(
            f"synthetic facts, part '{part}': {len(train)} training and {len(test)} test questions "
            f"({new_facts} new facts, {old_facts} old, {context_examples} in-context), exact match on "
            "the colour"
        ),
    )


DATASETS.add("facts", facts_data, summary="synthetic fact injection (MixSD): new / old / pretrain parts")

"""Privileged contexts: the same model, shown more. OPSD's teacher and MixSD's expert conditional both read
the example's prompt with its verified solution (or injected fact) in front, rendered by a template with
`{prompt}` and `{solution}`; the model then continues the same completion tokens as the student, whose
context is the prompt alone. The last part of the template should be the prompt again, so the completion
follows it as it follows the student's prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distill.data.text import Example
from distill.errors import UserError

DEFAULT_TEMPLATE = "{prompt}{solution}\n{prompt}"


def _bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def render(tokenizer: Any, template: str, prompt: str, solution: str) -> list[int]:
    try:
        text = template.format(prompt=prompt, solution=solution)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"context template {template!r}: only {{prompt}} and {{solution}} may appear ({err})"
        ) from err
    return _bos(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])


def privileged_prompts(tokenizer: Any, examples: Sequence[Example], template: str) -> list[list[int]]:
    """Per example, the token ids of its privileged context (the solution is the example's own completion,
    special tokens dropped)."""
    out = []
    for e in examples:
        prompt = tokenizer.decode(e.ids[: e.prompt_len], skip_special_tokens=True)
        solution = tokenizer.decode(e.ids[e.prompt_len :], skip_special_tokens=True)
        out.append(render(tokenizer, template, prompt, solution))
    return out


def check_template(template: str) -> None:
    if "{prompt}" not in template or "{solution}" not in template:
        raise ValueError("context must contain {prompt} and {solution}, e.g. '{prompt}{solution}\\n{prompt}'")

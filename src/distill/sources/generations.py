"""Generation, and sequence-level knowledge distillation ("Sequence-Level Knowledge Distillation", Kim &
Rush, EMNLP 2016; S33 in "A Survey on Knowledge Distillation of Large Language Models"): the teacher
completes the training prompts, and the student learns from those completions (with plain cross-entropy,
or with token-level KD on top, since the teacher's logits are still computed on the new sequences).

Generations are cached as jsonl, keyed by a hash of the prompts, the teacher's weights, the tokenizer and
the sampling settings: `$DISTILL_CACHE/generations/<key>.jsonl`, copied next to the run as
`<run>/generations/<key>.jsonl`; an unchanged key reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data.text import Example
from distill.errors import UserError
from distill.io import atomic_write_text
from distill.sources.settings import refuse_nonfinite

GENERATION_FORMAT = 1


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher completes prompts. `max_new_tokens` None: as long as each example's own completion
    (so the token budget stays that of the data); `fixed_length`: never stop early at EOS (packed text)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    fixed_length: bool = False
    seed: int = 0
    batch_size: int = 32

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerationSettings:
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(
                f"source.params: unknown setting '{sorted(unknown)[0]}'; "
                f"valid: {', '.join(cls.__dataclass_fields__)}"
            )
        refuse_nonfinite(params, "source.params")
        settings = cls(**params)
        try:
            valid = settings.temperature > 0 and 0 < settings.top_p <= 1 and settings.top_k >= 0
            counts = [v for v in (settings.max_new_tokens, settings.seed) if v is not None]
            valid = valid and all(isinstance(v, int) and not isinstance(v, bool) for v in counts)
        except TypeError:
            valid = False
        if not valid:
            raise UserError(
                "source.params: need temperature > 0, 0 < top_p <= 1, top_k >= 0 and whole numbers for "
                "max_new_tokens and seed"
            )
        return settings


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights (every element up to 50M parameters, a strided sample beyond)."""
    digest = hashlib.sha256()
    total = sum(p.numel() for p in model.state_dict().values())
    stride = max(1, total // 50_000_000)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().flatten()[::stride].float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int | Sequence[int],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    fixed_length: bool = False,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Completions (new token ids, cut after the first EOS) of `prompts`, in batches left-padded; prompts
    of equal length and budget are batched together. Greedy unless `do_sample`."""
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], len(prompts[i])))
    out: list[list[int]] = [[] for _ in prompts]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            budget = max(lengths[i] for i in chunk)
            if budget <= 0:
                continue
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                attention[row, width - n :] = 1
            # A student whose half-precision weights overflowed gives NaN scores: sample from them as if they
            # were flat (transformers' InfNanRemoveLogitsProcessor) and let the loss's non-finite check end
            # the run in one line, instead of torch.multinomial raising inside `generate`.
            settings: dict[str, Any] = dict(
                max_new_tokens=budget,
                do_sample=do_sample,
                pad_token_id=pad,
                use_cache=True,
                remove_invalid_values=True,
            )
            if do_sample:
                settings |= dict(temperature=temperature, top_k=top_k, top_p=top_p)
            else:
                settings |= dict(temperature=None, top_k=None, top_p=None)
            if fixed_length:
                settings |= dict(min_new_tokens=budget, eos_token_id=None)
            else:
                settings["eos_token_id"] = eos
            result = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), **settings)
            for row, i in enumerate(chunk):
                new = result[row, width:].tolist()[: lengths[i]]
                if not fixed_length and eos is not None and eos in new:
                    new = new[: new.index(eos) + 1]
                out[i] = new
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


def teacher_generations(
    teacher: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: GenerationSettings,
    *,
    cache_dir: Path,
    run_dir: Path | None = None,
) -> tuple[list[Example], dict[str, Any]]:
    """The training examples with their completions replaced by the teacher's; returns them and facts
    about the generation (cache hit, seconds, path)."""
    import time

    prompts = [e.ids[: e.prompt_len] for e in examples]
    budgets = [
        settings.max_new_tokens if settings.max_new_tokens is not None else len(e.ids) - e.prompt_len
        for e in examples
    ]
    key = hashlib.sha256(
        json.dumps(
            {
                "prompts": prompts,
                "budgets": budgets,
                "teacher": model_fingerprint(teacher),
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "settings": asdict(settings),
                "format": GENERATION_FORMAT,
            }
        ).encode()
    ).hexdigest()[:16]
    cached = cache_dir / "generations" / f"{key}.jsonl"
    started = time.perf_counter()
    hit = cached.exists()
    completions: list[list[int]] | None = None
    if hit:
        rows = [json.loads(line) for line in cached.read_text().splitlines() if line]
        if len(rows) == len(prompts) and all(
            r["prompt_ids"] == p for r, p in zip(rows, prompts, strict=True)
        ):
            completions = [r["completion_ids"] for r in rows]
        else:
            hit = False
    if completions is None:
        completions = generate(
            teacher,
            tokenizer,
            prompts,
            max_new_tokens=budgets,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            fixed_length=settings.fixed_length,
            seed=settings.seed,
            batch_size=settings.batch_size,
        )
        lines = [
            json.dumps({"prompt_ids": p, "completion_ids": c, "completion": tokenizer.decode(c)})
            for p, c in zip(prompts, completions, strict=True)
        ]
        atomic_write_text(cached, "".join(line + "\n" for line in lines))
    if run_dir is not None:
        (run_dir / "generations").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, run_dir / "generations" / cached.name)
    new_examples = []
    for example, prompt, completion in zip(examples, prompts, completions, strict=True):
        targets = list(example.targets[: example.prompt_len]) + [True] * len(completion)
        new_examples.append(Example(prompt + completion, targets, example.prompt_len, example.reference))
    info = {"key": key, "cached": hit, "seconds": time.perf_counter() - started, "path": str(cached)}
    return [e for e in new_examples if e.counted > 0], info

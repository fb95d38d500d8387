"""Held-out evaluation of a language model, per counted token: cross-entropy and perplexity, next-token
accuracy, KL(teacher || student) and top-1 agreement with the teacher; exact match of greedy generations
for tasks with answers; a few greedy samples for the report."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.data.text import LMData, reference_answer
from distill.sources.generations import generate

# Bytes of float32 logits one evaluation batch may hold: the student's and the teacher's, and a log-softmax
# of each. At a 128k vocabulary and 512 tokens one sequence is already 1 GB of them.
EVAL_LOGITS_BUDGET = 1 << 30


def logits_batch_size(requested: int, sequence_length: int, vocab: int) -> int:
    """Sequences per evaluation batch: `requested`, fewer when their logits would exceed the budget."""
    per_sequence = 4 * 4 * max(1, sequence_length) * max(1, vocab)
    return max(1, min(requested, EVAL_LOGITS_BUDGET // per_sequence))


class LMEvaluator:
    """`evaluator(student, teacher) -> metrics`, for `fit(..., evaluator=...)`.

    Metrics: `loss` (mean cross-entropy in nats per counted token), `perplexity` (exp of it), `accuracy`
    (next-token top-1 accuracy), with a teacher `teacher_kl` and `agreement`, and `exact_match` (fraction of
    the first `exact_match_examples` test prompts whose greedy completion gives the reference answer) when
    the data has answers. `samples` holds the last few greedy generations. Batches of the per-token metrics
    shrink below `batch_size` when their logits would pass `EVAL_LOGITS_BUDGET` (large vocabularies)."""

    def __init__(
        self,
        data: LMData,
        *,
        batch_size: int = 32,
        exact_match_examples: int = 200,
        samples: int = 3,
    ) -> None:
        self.data = data
        longest = max((len(e.ids) for e in data.test.examples), default=1)  # type: ignore[attr-defined]
        self.logits_batch_size = logits_batch_size(batch_size, longest, data.num_classes)
        self.loader = DataLoader(
            data.test,
            batch_size=self.logits_batch_size,
            collate_fn=data.test.collate_fn,  # type: ignore[attr-defined]
        )
        self.batch_size = batch_size  # generation keeps the requested size: it holds one position's logits
        self.exact_match_examples = exact_match_examples
        self.n_samples = samples
        self.samples: list[dict[str, str]] = []

    @torch.inference_mode()
    def __call__(self, student: nn.Module, teacher: nn.Module | None = None) -> dict[str, float]:
        was_training = student.training
        student.eval()
        device = next(student.parameters()).device
        nll = correct = agree = tokens = 0.0
        kl = 0.0
        for batch in self.loader:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            mask = batch["mask"].to(device)
            labels = batch["labels"].to(device)[mask]
            logits = student(**inputs).logits[mask].float()
            log_q = torch.log_softmax(logits, -1)
            nll += -log_q.gather(-1, labels[:, None]).sum().item()
            correct += (logits.argmax(-1) == labels).sum().item()
            tokens += int(mask.sum())
            if teacher is not None:
                log_p = torch.log_softmax(teacher(**inputs).logits[mask].float(), -1)
                kl += (log_p.exp() * (log_p - log_q)).sum().item()
                agree += (log_p.argmax(-1) == logits.argmax(-1)).sum().item()
        n = max(1.0, tokens)
        metrics = {
            "loss": nll / n,
            "perplexity": math.exp(min(nll / n, 50.0)),
            "accuracy": correct / n,
            "tokens": tokens,
        }
        if teacher is not None:
            metrics |= {"teacher_kl": kl / n, "agreement": agree / n}
        metrics |= self._generations(student)
        student.train(was_training)
        return metrics

    def _generations(self, model: nn.Module) -> dict[str, float]:
        examples = self.data.test.examples  # type: ignore[attr-defined]
        tokenizer = self.data.tokenizer
        answered = [e for e in examples if e.reference is not None][: self.exact_match_examples]
        chosen = answered if answered else examples[: self.n_samples]
        if not chosen:
            return {}
        budget = self.data.max_new_tokens
        completions = generate(
            model,
            tokenizer,
            [e.ids[: e.prompt_len] for e in chosen],
            max_new_tokens=budget,
            batch_size=self.batch_size,
        )
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        self.samples = [
            {
                "prompt": tokenizer.decode(e.ids[: e.prompt_len], skip_special_tokens=True),
                "reference": e.reference
                if e.reference is not None
                else tokenizer.decode(e.ids[e.prompt_len :], skip_special_tokens=True),
                "generated": text,
            }
            for e, text in zip(chosen[: self.n_samples], texts, strict=False)
        ]
        if not answered:
            return {}
        hits = [
            reference_answer(text) == reference_answer(e.reference)
            for e, text in zip(answered, texts, strict=True)
        ]
        return {"exact_match": sum(hits) / len(hits)}


def describe_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"ppl {metrics['perplexity']:.2f}", f"acc {metrics['accuracy']:.3f}"]
    if "teacher_kl" in metrics:
        parts += [f"KL {metrics['teacher_kl']:.3f}", f"agree {metrics['agreement']:.3f}"]
    if "exact_match" in metrics:
        parts.append(f"EM {metrics['exact_match']:.3f}")
    return ", ".join(parts)

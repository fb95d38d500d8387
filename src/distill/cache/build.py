"""`distill cache`: run a recipe's teacher once over its training data and store its top-k targets; and the
runners' side, opening a recipe's `teacher: {cache: DIR}` with every identity check."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from distill.cache.indexed import rows_per_sample
from distill.cache.store import CacheWriter, TeacherCache
from distill.errors import UserError
from distill.experiment import TeacherInfo, teacher_spec_identity
from distill.io import fingerprint
from distill.losses.sparse import LOG_TINY, topk_targets
from distill.models.adapters import logits_of
from distill.models.hooks import FeatureHooks
from distill.objectives import build_objective
from distill.recipe.schema import Recipe
from distill.train.trainer import split_batch

DEFAULT_SHARD_ROWS = 1 << 16  # rows (samples or tokens) per shard, about k * 6 * 64k bytes


@dataclass
class CacheSource:
    """What a cache is made from and checked against: the training set, the teacher, identities."""

    train: Dataset
    teacher: nn.Module | None
    teacher_info: TeacherInfo | None
    kind: str  # "classification" | "lm"
    vocab: int
    data: str  # fingerprint of the training samples
    tokenizer: str | None


def dataset_fingerprint(dataset: Dataset) -> str:
    """A hash of every training sample (token ids and counted positions, or tensors and labels)."""
    digest = hashlib.sha256()
    examples = getattr(dataset, "examples", None)
    if examples is not None:  # language-model examples
        for example in examples:
            digest.update(torch.tensor(example.ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(example.targets, dtype=torch.bool).numpy().tobytes())
        return digest.hexdigest()[:16]
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # a TensorDataset: hash the tensors whole
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
    for index in range(len(dataset)):  # type: ignore[arg-type]
        for part in dataset[index]:
            digest.update(torch.as_tensor(part).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def recipe_temperature(recipe: Recipe) -> float:
    """The temperature every teacher-reading objective of the recipe softens with (they must agree)."""
    temperatures = set()
    for method in recipe.method_list():
        for term in method.objectives:
            objective = build_objective(term.name, term.params)
            if objective.needs_teacher:
                temperatures.add(float(getattr(objective, "temperature", 1.0)))
    if len(temperatures) > 1:
        shown = ", ".join(f"{t:g}" for t in sorted(temperatures))
        raise UserError(f"the recipe's objectives soften at temperatures {shown}; pass --temperature")
    return temperatures.pop() if temperatures else 1.0


def cache_source(recipe: Recipe, *, progress: bool, console: Console, workdir: Path) -> CacheSource:
    """The recipe's training set and its live teacher, prepared exactly as a training run prepares them."""
    if recipe.teacher is None or recipe.teacher.name is None:
        raise UserError("distill cache needs a recipe whose teacher is a model (teacher.name)")
    from distill.lm import is_lm_recipe

    if is_lm_recipe(recipe):
        from distill.lm.experiment import prepare_lm_run
        from distill.lm.seqkd import tokenizer_fingerprint

        setup = prepare_lm_run(recipe, workdir, progress=progress, console=console)
        assert setup.teacher is not None
        return CacheSource(
            setup.data.train,
            setup.teacher,
            setup.teacher_info,
            "lm",
            setup.vocabulary or len(setup.tokenizer),
            dataset_fingerprint(setup.data.train),
            tokenizer_fingerprint(setup.tokenizer),
        )
    from distill.data import build_data
    from distill.experiment import obtain_teacher
    from distill.runfolder import RunFolder

    data = build_data(recipe.data.name, **recipe.data.params)
    refuse_augmented(data.train)
    teacher, info = obtain_teacher(recipe, data, RunFolder(workdir), progress)
    return CacheSource(
        data.train, teacher, info, "classification", data.num_classes, dataset_fingerprint(data.train), None
    )


def refuse_augmented(dataset: Dataset) -> None:
    if getattr(dataset, "augment", False):
        raise UserError(
            "the training data is augmented (random crops / flips): a cache holds one view per sample, "
            "which is not the view the student sees; set the data's augment: false or use the live teacher"
        )


def teacher_identity(recipe: Recipe, teacher: nn.Module) -> str:
    """The teacher's spec and a hash of its weights: a cache is tied to both."""
    from distill.lm.seqkd import model_fingerprint

    assert recipe.teacher is not None
    return f"{fingerprint(teacher_spec_identity(recipe.teacher))}-{model_fingerprint(teacher)}"


def topk_rows(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids and log-probabilities at `temperature`, and the log of the mass outside them (-inf when the
    top-k holds all of it): `distill.losses.sparse.topk_targets`, with the cache's -inf for an empty tail."""
    targets = topk_targets(logits.float(), min(k, logits.shape[-1]), temperature)
    empty = targets.tail_logmass <= LOG_TINY
    tail = targets.tail_logmass.masked_fill(empty, float("-inf"))
    return targets.ids, targets.logprobs, tail


def rows_with_tail_draws(
    logits: Tensor, k: int, draws: int, temperature: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-k, then the tail mass r carried by `draws` tokens drawn (with replacement) from the tail
    itself: slot log-probability log(r * count / draws), unused slots -inf, no tail bucket left. Exact on the
    head and unbiased on the tail: the stored distribution's expectation is the teacher's, so a forward-KL
    gradient against it is unbiased. k = 0 is plain sampling, as in "Sparse Logit Sampling: Accelerating
    Knowledge Distillation in LLMs" (Anshumann et al., ACL 2025)."""
    ids, logprobs, tail = topk_rows(logits, k, temperature) if k else (None, None, None)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    tail_log = torch.zeros(len(logits)) if tail is None else tail
    if ids is not None:
        probs = probs.scatter(-1, ids, 0.0)
    empty = probs.sum(-1, keepdim=True) <= 0  # the head holds everything: draws carry no mass
    picked = torch.multinomial(
        torch.where(empty, torch.ones_like(probs), probs), draws, True, generator=generator
    )
    counts = torch.zeros_like(probs).scatter_add_(1, picked, torch.ones_like(picked, dtype=probs.dtype))
    if ids is not None:
        counts = counts.scatter(-1, ids, -1.0)  # never pick a head id again (a duplicate would count twice)
    kept, drawn = counts.topk(min(draws, counts.shape[-1] - k), dim=-1)
    drawn_log = tail_log[:, None] + torch.log(kept.clamp(min=0.0) / draws)
    none = torch.full((len(logits),), float("-inf"))
    if ids is None:
        return drawn, drawn_log, none
    return torch.cat([ids, drawn], -1), torch.cat([logprobs, drawn_log], -1), none


def default_slots(kind: str, k: int | None, vocab: int, tail_draws: int | None) -> tuple[int, int]:
    """(exact top ids, tail draws) per row. Without `tail_draws`, a language model's k slots are split
    into k - k // 2 exact ids and k // 2 draws from the tail: on lm_shakespeare a plain top-32 bucket
    costs 16 % perplexity against the live teacher, top-16 + 16 draws none
    (benchmarks/results/teacher_cache.md). Classifiers keep the plain top-k."""
    if k is None or k >= vocab:
        return vocab, 0
    if tail_draws is None:
        tail_draws = k // 2 if kind == "lm" else 0
        k -= tail_draws
    return k, min(tail_draws, vocab - k)


def make_cache(
    recipe: Recipe,
    out: Path,
    *,
    k: int | None,
    tail_draws: int | None = None,
    temperature: float | None = None,
    hidden: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> dict[str, Any]:
    """Write (or finish) the cache of `recipe`'s teacher in `out`; returns its manifest. `k=None`: the full
    distribution (k = vocabulary size). `tail_draws=m` adds m draws from the teacher's tail to the top-k
    (`rows_with_tail_draws`) in place of the tail bucket; None: `default_slots`."""
    console = console or Console(stderr=True)
    if (k is not None and k < 0) or (tail_draws or 0) < 0 or (k == 0 and not tail_draws):
        raise UserError("--top-k and --tail-draws must be >= 0, and one of them positive")
    temperature = recipe_temperature(recipe) if temperature is None else temperature
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError("--temperature must be a positive number")
    with tempfile.TemporaryDirectory(prefix="distill-cache-") as workdir:
        source = cache_source(recipe, progress=progress, console=console, workdir=Path(workdir))
    teacher = source.teacher
    assert teacher is not None
    k, draws = default_slots(source.kind, k, source.vocab, tail_draws)
    per_sample_rows = 1 if source.kind == "classification" else None
    header = {
        "kind": source.kind,
        "teacher": teacher_identity(recipe, teacher),
        "tokenizer": source.tokenizer,
        "data": source.data,
        "samples": len(source.train),  # type: ignore[arg-type]
        "k": k + draws,
        "targets": f"top-{k}" + (f"+{draws}-tail-draws" if draws else ""),
        "vocab": source.vocab,
        "temperature": temperature,
        "hidden": list(hidden),
        "teacher_metrics": source.teacher_info.metrics if source.teacher_info else {},
        "teacher_parameters": source.teacher_info.parameters if source.teacher_info else 0,
    }
    batch_size = recipe.data.eval_batch_size
    # Shards end on batch boundaries: a whole number of batches of samples per shard.
    samples_per_shard = max(batch_size, (shard_rows // (per_sample_rows or _mean_rows(source.train))))
    samples_per_shard -= samples_per_shard % batch_size
    writer = CacheWriter(out, header, shard_samples=samples_per_shard, overwrite=overwrite)
    start = writer.next_sample
    remaining = Subset(source.train, range(start, len(source.train)))  # type: ignore[arg-type]
    loader = DataLoader(
        remaining, batch_size=batch_size, collate_fn=getattr(source.train, "collate_fn", None)
    )
    hooks = FeatureHooks(teacher, sorted(hidden), detach=True) if hidden else None
    generator = torch.Generator().manual_seed(start)  # a resumed cache draws its own, still seeded, samples
    teacher.eval()
    bar = Progress(
        TextColumn("[bold]caching the teacher"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    )
    with bar, torch.inference_mode():
        task = bar.add_task("cache", total=len(source.train), completed=start)  # type: ignore[arg-type]
        for batch in loader:
            inputs, _, mask = split_batch(batch)
            logits = logits_of(teacher(**inputs) if isinstance(inputs, dict) else teacher(inputs))
            rows = logits[mask] if mask is not None else logits
            if draws:
                ids, logprobs, tail = rows_with_tail_draws(rows, k, draws, temperature, generator)
            else:
                ids, logprobs, tail = topk_rows(rows, k, temperature)
            states = {}
            if hooks is not None:
                states = {
                    name: (value[mask] if mask is not None else value)
                    for name, value in hooks.features.items()
                }
                hooks.clear()
            writer.add(ids, logprobs, tail, rows_per_sample(mask, len(logits)), **states)
            bar.update(task, advance=len(logits))
    manifest = writer.finish()
    console.print(
        f"teacher cache: {manifest['samples']:,} samples, {manifest['targets']} at T={temperature:g}, "
        f"{len(manifest['shards'])} shards -> {out}"
    )
    return manifest


def _mean_rows(dataset: Dataset) -> int:
    examples = getattr(dataset, "examples", None)
    if not examples:
        return 1
    return max(1, sum(e.counted for e in examples) // len(examples))


def open_recipe_cache(recipe: Recipe, *, data: str, vocab: int, tokenizer: str | None = None) -> TeacherCache:
    """The recipe's `teacher.cache`, checked against this run's data, vocabulary and tokenizer."""
    assert recipe.teacher is not None and recipe.teacher.cache is not None
    cache = TeacherCache(recipe.teacher.cache)
    cache.check(data=data, vocab=vocab, tokenizer=tokenizer)
    made_by = str(cache.manifest.get("teacher", "")).split("-")[0]
    # A named teacher too: the cache must be that teacher's.
    if recipe.teacher.name is not None and made_by != fingerprint(teacher_spec_identity(recipe.teacher)):
        raise UserError(
            f"teacher cache {cache.folder} was made by another teacher than the recipe's "
            f"'{recipe.teacher.name}'; make the cache again or drop teacher.name"
        )
    return cache


def cache_teacher_info(cache: TeacherCache) -> TeacherInfo:
    return TeacherInfo(
        "offline",
        int(cache.manifest.get("teacher_parameters", 0)),
        cache.manifest.get("teacher_metrics", {}),
        0.0,
        [],
    )

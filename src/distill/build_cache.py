"""`distill cache`: run a recipe's teacher once over its training data and store its top-k targets.

The recipe's task prepares the training set and the live teacher exactly as a training run would
(`Task.cache_source`); `distill.cache` stores what this module computes.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from distill.cache.indexed import rows_per_sample
from distill.cache.targets import default_slots, rows_with_tail_draws, topk_rows
from distill.cache.writer import CacheWriter
from distill.errors import UserError
from distill.heads import call_model
from distill.io import fingerprint
from distill.models.adapters import logits_of
from distill.models.hooks import FeatureHooks
from distill.objectives import build_objective
from distill.recipe.schema import Recipe
from distill.runfolder import RunFolder
from distill.tasks import task_for
from distill.tasks.teacher_cache import CacheSource
from distill.tasks.teacher_store import teacher_spec_identity
from distill.teachers import TeacherRequest
from distill.teachers.served import ServedTeacher
from distill.train.batches import split_batch

DEFAULT_SHARD_ROWS = 1 << 16  # rows (samples or tokens) per shard, about k * 6 * 64k bytes


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


def teacher_identity(recipe: Recipe, teacher: nn.Module | ServedTeacher) -> str:
    """The teacher's spec and a hash of its weights: a cache is tied to both. A served teacher's weights are
    out of reach: its endpoint, model name and dialect stand for them."""
    from distill.sources.generations import model_fingerprint

    assert recipe.teacher is not None
    if isinstance(teacher, ServedTeacher):
        served = teacher.endpoint
        return f"served-{fingerprint([served.url, served.model, served.protocol, served.top_k])}"
    return f"{fingerprint(teacher_spec_identity(recipe.teacher))}-{model_fingerprint(teacher)}"


def _check_served(top_k: int, k: int | None, tail_draws: int | None, temperature: float | None) -> None:
    """A served teacher gives its top_k at temperature 1, and no tail to draw from."""
    if k is not None and not 0 < k <= top_k:
        raise UserError(f"--top-k {k}: the served teacher gives its top {top_k} (teacher.served.top_k)")
    if tail_draws:
        raise UserError("--tail-draws: a served teacher gives only its top-k, no tail to draw from")
    if temperature is not None and abs(temperature - 1.0) > 1e-9:
        raise UserError("--temperature: a served teacher's log-probabilities are at temperature 1")


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
    if recipe.teacher is None or (recipe.teacher.name is None and recipe.teacher.served is None):
        raise UserError("distill cache needs a recipe whose teacher is a model (teacher.name) or served")
    if recipe.teacher.served is not None:
        _check_served(recipe.teacher.served.top_k, k, tail_draws, temperature)
    with tempfile.TemporaryDirectory(prefix="distill-cache-") as workdir:
        source = task_for(recipe).cache_source(
            recipe, RunFolder(Path(workdir)), progress=progress, console=console
        )
    teacher = source.teacher
    assert teacher is not None
    if isinstance(teacher, ServedTeacher):
        k, draws = (teacher.endpoint.top_k if k is None else k), 0
    else:
        k, draws = default_slots(source.kind, k, source.vocab, tail_draws)
    per_sample_rows = 1 if source.kind == "classification" else None
    header = {
        "kind": source.kind,
        "teacher": teacher_identity(recipe, teacher),
        **({"served": recipe.teacher.served.model_dump()} if recipe.teacher.served is not None else {}),
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
    with CacheWriter(out, header, shard_samples=samples_per_shard, overwrite=overwrite) as writer:
        manifest = _fill(writer, source, teacher, batch_size, k, draws, temperature, hidden, progress)
    console.print(
        f"teacher cache: {manifest['samples']:,} samples, {manifest['targets']} at T={temperature:g}, "
        f"{len(manifest['shards'])} shards -> {out}"
    )
    return manifest


def _fill(
    writer: CacheWriter,
    source: CacheSource,
    teacher: nn.Module | ServedTeacher,
    batch_size: int,
    k: int,
    draws: int,
    temperature: float,
    hidden: tuple[str, ...],
    progress: bool,
) -> dict[str, Any]:
    """Run the teacher over the samples the writer does not hold yet; returns the finished manifest."""
    start = writer.next_sample
    remaining = Subset(source.train, range(start, len(source.train)))  # type: ignore[arg-type]
    loader = DataLoader(
        remaining, batch_size=batch_size, collate_fn=getattr(source.train, "collate_fn", None)
    )
    served = teacher if isinstance(teacher, ServedTeacher) else None
    if served is not None and hidden:
        raise UserError("--hidden: a served teacher gives only its top-k log-probabilities, no layer")
    hooks = FeatureHooks(teacher, sorted(hidden), detach=True) if hidden and served is None else None
    generator = torch.Generator().manual_seed(start)  # a resumed cache draws its own, still seeded, samples
    if served is None:
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
            if served is not None:
                topk = served.outputs(TeacherRequest(inputs=inputs, mask=mask)).topk
                ids, logprobs, tail = topk.ids[:, :k], topk.logprobs[:, :k], topk.tail_logmass
                if k < served.endpoint.top_k:  # the slots beyond k join the tail
                    dropped = topk.logprobs[:, k:].double().exp().sum(-1)
                    tail = torch.logaddexp(tail.double(), dropped.log()).float()
                samples = len(inputs["input_ids"])
                writer.add(ids, logprobs, tail, rows_per_sample(mask, samples))
                bar.update(task, advance=samples)
                continue
            logits = logits_of(call_model(teacher, inputs))
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
    return writer.finish()


def _mean_rows(dataset: Dataset) -> int:
    examples = getattr(dataset, "examples", None)
    if not examples:
        return 1
    return max(1, sum(e.counted for e in examples) // len(examples))

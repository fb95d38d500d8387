"""The on-policy sources of a language-model recipe, independent of the objective (one module each in
`distill.sources`, this one ties them together):

- `student_rollouts` (`rollouts`): the student's own completions (a `mix` fraction of each batch; GKD, the
  2x2 grid's student-prefix cells, the length curriculum); any token-level objective, scored by the teacher.
- `opsd`: student rollouts scored by the student itself given a privileged context (objective `opsd`).
- `soda`: teacher responses paired with a static snapshot of the student's outputs (objective `soda`).
- `mixsd`: targets decoded once from the base model's expert / naive mixture (objective `cross_entropy`).

`distill.tasks.causal_lm` builds one `SourcePlan` per method (what is shared by its seeds: teacher responses,
privileged contexts) and asks it, per seed, for a `SeedRun`: the training set, the teacher the trainer sees,
the objectives (some bound to the source) and the batch transform. `SeedRun.finish` adds the cost columns
(teacher forward passes, tokens generated and tokens per second, student tokens) to the run's metrics.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from distill.data.text import Example, LMData, LMDataset
from distill.errors import UserError
from distill.objectives.base import build_objective
from distill.objectives.opsd import OPSDObjective
from distill.objectives.terms import BatchTransform, Term, TermLike, as_term
from distill.sources.batching import PromptAwareDataset, seed_for
from distill.sources.context import privileged_prompts
from distill.sources.counting import CallCounter, GenerationStats
from distill.sources.mixsd import MixSDSettings, mixed_examples
from distill.sources.opsd import OPSDRollouts, OPSDSettings, PrivilegedTeacher
from distill.sources.rollouts import LengthCurriculum, RolloutSettings, StudentRollouts
from distill.sources.settings import from_params
from distill.sources.soda import PairDataset, SODASettings

SETTINGS: dict[str, type] = {
    "student_rollouts": RolloutSettings,
    "opsd": OPSDSettings,
    "soda": SODASettings,
    "mixsd": MixSDSettings,
}
ONPOLICY_SOURCES = tuple(SETTINGS)


def source_settings(name: str, params: dict[str, Any], where: str | None = None) -> Any:
    return from_params(SETTINGS[name], params, where or name)


def check_source(name: str, params: dict[str, Any]) -> None:
    """Validate a source's params (the recipe schema calls this); raises `UserError` with one line."""
    if name in SETTINGS:
        source_settings(name, params)


@dataclass
class SeedRun:
    """What one seed of a method trains with, and how its costs are reported."""

    train_set: Dataset
    teacher: nn.Module | None
    terms: list[Term]
    batch_transform: BatchTransform | None = None
    counters: dict[str, CallCounter] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> callable returning a dict, or a dict
    static_tokens: int | None = None  # counted tokens per epoch of a fixed training set

    def finish(self, result: Any, epochs: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, counter in self.counters.items():
            out[f"{name}_calls"] = float(counter.calls)
            out[f"{name}_tokens"] = float(counter.tokens)
            counter.remove()
        for value in self.metrics.values():
            out |= value() if callable(value) else value
        tokens = out.get("student_tokens")
        if tokens is None and self.static_tokens is not None:
            tokens = out["student_tokens"] = float(self.static_tokens * epochs)
        if tokens is not None and result.train_seconds > 0:
            out["tokens_per_second"] = tokens / result.train_seconds
        for row in (result.final, result.best):
            row.update(out)
        return out


def _bind_terms(terms: list[Term], kind: str, bind: Any) -> tuple[list[Term], int]:
    """Build the objectives named `kind` and bind them to the source; the others pass unchanged."""
    out, bound = [], 0
    for term in terms:
        if isinstance(term.objective, str) and term.objective == kind:
            objective = build_objective(kind, term.params)
            out.append(Term(bind(objective), term.weight, None, term.warmup_epochs, term.label or kind))
            bound += 1
        else:
            out.append(term)
    return out, bound


class SourcePlan:
    """One method's on-policy source (see the module docstring)."""

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        method: str,
        *,
        data: LMData,
        teacher: nn.Module | None,
        out_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.method = method
        self.where = f"method '{method}': source '{name}'"
        self.settings = source_settings(name, params, self.where)
        self.data = data
        self.tokenizer = data.tokenizer
        self.teacher = teacher
        self.pad_id: int = data.train.pad_id  # type: ignore[attr-defined]
        self.examples: list[Example] = list(data.train.examples)  # type: ignore[attr-defined]
        self.info: dict[str, Any] = {}
        self.contexts: list[list[int]] | None = None
        self.chosen: list[Example] | None = None
        if name in ("opsd", "mixsd"):
            self.contexts = privileged_prompts(self.tokenizer, self.examples, self.settings.context)
        if name == "soda":
            self.chosen = self._responses(out_dir, cache_dir)
        self.train_set: Dataset = PromptAwareDataset(data.train)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ shared by the seeds
    def _responses(self, out_dir: Path | None, cache_dir: Path | None) -> list[Example]:
        settings: SODASettings = self.settings
        if settings.responses == "dataset":
            return self.examples
        if self.teacher is None:
            raise UserError(f"{self.where}: teacher responses need a teacher (or responses: dataset)")
        from distill.data.tokenizers import cache_root
        from distill.sources.generations import GenerationSettings, teacher_generations

        generation = GenerationSettings.from_params(settings.teacher)
        counter = CallCounter(self.teacher)
        try:
            examples, info = teacher_generations(
                self.teacher,
                self.tokenizer,
                self.examples,
                generation,
                cache_dir=cache_dir or cache_root(),
                run_dir=out_dir,
            )
        finally:
            counter.remove()
        if len(examples) != len(self.examples):
            raise UserError(f"{self.where}: the teacher generated no token for some prompts")
        self.info = info | {"teacher_calls": counter.calls}
        return examples

    # ------------------------------------------------------------------ one seed
    def start(self, student: nn.Module, seed: int, terms: list[TermLike]) -> SeedRun:
        run = getattr(self, f"_start_{self.name}")(student, seed, [as_term(t) for t in terms])
        if self.teacher is not None and run.teacher is self.teacher:
            run.counters["teacher"] = CallCounter(self.teacher, while_training=student)
        return run

    def _rollouts(
        self, settings: RolloutSettings, seed: int, curriculum: LengthCurriculum | None
    ) -> StudentRollouts:
        return StudentRollouts(settings, self.tokenizer, self.pad_id, run_seed=seed, curriculum=curriculum)

    def _start_student_rollouts(self, student: nn.Module, seed: int, terms: list[Term]) -> SeedRun:
        settings: RolloutSettings = self.settings
        curriculum = None
        if settings.curriculum is not None:
            budget = settings.max_new_tokens or max(len(e.ids) - e.prompt_len for e in self.examples)
            curriculum = LengthCurriculum(settings.curriculum, budget)
            terms.append(Term(curriculum, 0.0, None, 0.0, "length_curriculum"))
        rollouts = self._rollouts(settings, seed, curriculum)
        return SeedRun(self.train_set, self.teacher, terms, rollouts, metrics={"rollouts": rollouts.metrics})

    def _start_opsd(self, student: nn.Module, seed: int, terms: list[Term]) -> SeedRun:
        assert self.contexts is not None
        privileged = PrivilegedTeacher(self.contexts, self.pad_id)
        terms, bound = _bind_terms(
            terms, "opsd", lambda o: o.bind(privileged) if isinstance(o, OPSDObjective) else o
        )
        if not bound:
            raise UserError(f"{self.where} needs the objective 'opsd' (the self-teacher's divergence)")
        rollouts = self._rollouts(self.settings, seed, None)
        follow = self.settings.teacher_weights == "current"
        if not follow:  # a frozen copy of the model as it starts
            privileged.model = copy.deepcopy(student).eval().requires_grad_(False)

        def metrics() -> dict[str, float]:
            return rollouts.metrics() | {"self_teacher_calls": float(privileged.calls)}

        transform = OPSDRollouts(rollouts, privileged, follow=follow)
        return SeedRun(self.train_set, self.teacher, terms, transform, metrics={"m": metrics})

    def _start_soda(self, student: nn.Module, seed: int, terms: list[Term]) -> SeedRun:
        from distill.sources.generations import generate

        settings: SODASettings = self.settings
        assert self.chosen is not None
        if not any(t.objective == "soda" for t in terms):
            raise UserError(f"{self.where} needs the objective 'soda' (SFT + preference over the snapshot)")
        others = [t.objective for t in terms if isinstance(t.objective, str) and t.objective != "soda"]
        if any(build_objective(name).needs_teacher for name in others):
            raise UserError(f"{self.where}: the teacher slot holds the DPO reference; only 'soda' may use it")
        prompts = [e.ids[: e.prompt_len] for e in self.examples]
        budgets = [settings.max_new_tokens or max(1, len(e.ids) - e.prompt_len) for e in self.examples]
        stats = GenerationStats()
        started = time.perf_counter()
        snapshot = generate(
            student,
            self.tokenizer,
            prompts,
            max_new_tokens=budgets,
            seed=seed_for("snapshot", seed, settings.seed),
            **settings.sampling(),
        )
        stats.add(snapshot, started)
        rejected = [
            Example(p + c, [False] * len(p) + [True] * len(c), len(p), e.reference)
            for e, p, c in zip(self.examples, prompts, snapshot, strict=True)
        ]
        pairs = PairDataset(self.chosen, rejected, self.pad_id)
        reference = copy.deepcopy(student).eval().requires_grad_(False)
        info = {"teacher_generation_calls": float(self.info.get("teacher_calls", 0))}
        return SeedRun(
            pairs,
            reference,
            terms,
            metrics={"snapshot": stats.as_metrics("snapshot"), "info": info},
            static_tokens=pairs.counted_tokens(),
        )

    def _start_mixsd(self, student: nn.Module, seed: int, terms: list[Term]) -> SeedRun:
        settings: MixSDSettings = self.settings
        assert self.contexts is not None
        stats = GenerationStats()
        started = time.perf_counter()
        examples = mixed_examples(
            student,
            self.tokenizer,
            self.examples,
            self.contexts,
            settings,
            seed=seed_for("mixsd", seed, settings.seed),
        )
        stats.add([e.ids[e.prompt_len :] for e in examples], started)
        train = LMDataset([e for e in examples if e.counted > 0], self.pad_id)
        return SeedRun(
            train,
            self.teacher,
            terms,
            metrics={"mixed": stats.as_metrics("mixed")},
            static_tokens=train.counted_tokens(),
        )

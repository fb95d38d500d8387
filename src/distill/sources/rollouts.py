"""Student rollouts as a source: the student completes each batch's prompts, the teacher scores those
sequences in the trainer's usual forward pass (it never generates), and any token-level objective applies.

- GKD's mixing ("On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", Agarwal
  et al., ICLR 2024): a fraction `mix` (their lambda) of the batch's sequences is replaced by the student's
  rollouts, the rest keep their dataset (or teacher) completions. Which rows, and the sampling noise, come
  from a seed derived from (run seed, optimizer step, example ids), so a resumed run draws the same ones.
- The entropy-gated length curriculum ("Decoupling KL and Trajectories: A Unified Perspective for SFT,
  DAgger, Offline RL, and OPD in LLM Distillation", 2025): rollouts start short and the length cap grows by
  `step` tokens once the student's mean token entropy on its rollouts (an exponential moving average) has
  settled at or below `entropy_threshold` for `min_steps` steps, i.e. the current horizon is learnt without
  pushing on while the student is still uncertain. The paper gives the idea, not this exact rule; the
  state lives in buffers of a zero-weight objective, so checkpoints carry it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill import losses
from distill.objectives.base import Objective, Progress, StepOutputs
from distill.sources.batching import EXAMPLE_INDEX, Row, batch_rows, completion_row, rows_batch, seed_for
from distill.sources.counting import GenerationStats
from distill.sources.settings import from_params, require


@dataclass(frozen=True)
class CurriculumSettings:
    start: int = 8  # the first length cap (new tokens)
    step: int = 4  # tokens added at each stage
    limit: int | None = None  # the last cap; None: the rollouts' own budget
    entropy_threshold: float = 0.5  # nats per token: at or below it the stage counts as learnt
    min_steps: int = 10  # optimizer steps spent at a stage before it may grow
    ema: float = 0.9  # smoothing of the entropy signal

    def check(self) -> None:
        require(self.start >= 1 and self.step >= 1, "length_curriculum needs start >= 1 and step >= 1")
        require(self.limit is None or self.limit >= self.start, "length_curriculum.limit must be >= start")
        require(
            self.entropy_threshold >= 0 and self.min_steps >= 1, "need entropy_threshold >= 0, min_steps >= 1"
        )
        require(0.0 <= self.ema < 1.0, "length_curriculum.ema must lie in [0, 1)")


@dataclass(frozen=True)
class RolloutSettings:
    """`source: {name: student_rollouts, params: ...}`."""

    mix: float = 1.0  # fraction of sequences replaced by student rollouts (GKD's lambda)
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: as long as each example's own completion (equal budget)
    seed: int = 0
    length_curriculum: dict[str, Any] | None = None
    curriculum: CurriculumSettings | None = field(default=None, init=False, repr=False)

    def check(self) -> None:
        require(0.0 <= self.mix <= 1.0, f"mix must lie in [0, 1], got {self.mix}")
        require(
            self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0,
            "need temperature > 0, 0 < top_p <= 1 and top_k >= 0",
        )
        require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        if self.length_curriculum is not None:
            if not isinstance(self.length_curriculum, dict):
                raise ValueError("length_curriculum must be a mapping (start, step, entropy_threshold, ...)")
            curriculum = from_params(CurriculumSettings, self.length_curriculum, "length_curriculum")
            object.__setattr__(self, "curriculum", curriculum)

    def sampling(self) -> dict[str, Any]:
        return dict(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )


ROLLOUT_KEYS = tuple(f for f in RolloutSettings.__dataclass_fields__ if f != "curriculum")


def rollout_settings(params: dict[str, Any], where: str) -> RolloutSettings:
    return from_params(RolloutSettings, params, where)


class LengthCurriculum(Objective):
    """Zero-weight term that watches the student's token entropy and holds the rollout length cap."""

    needs_teacher = False

    def __init__(self, settings: CurriculumSettings, budget: int) -> None:
        super().__init__()
        self.settings = settings
        self.limit = settings.limit if settings.limit is not None else budget
        self.register_buffer("length", torch.tensor(min(settings.start, self.limit), dtype=torch.long))
        self.register_buffer("entropy", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("stage_steps", torch.tensor(0, dtype=torch.long))
        self._sum, self._count = 0.0, 0

    def forward(self, outputs: StepOutputs) -> Tensor:
        with torch.no_grad():
            value = losses.student_entropy(outputs.student_logits.detach(), mask=outputs.mask)
        self._sum += float(value)
        self._count += 1
        return value

    def after_step(self, progress: Progress, loss: float) -> None:
        observed = self._sum / self._count if self._count else loss
        self._sum, self._count = 0.0, 0
        previous = float(self.entropy)
        ema = (
            observed
            if math.isnan(previous)
            else self.settings.ema * previous + (1 - self.settings.ema) * observed
        )
        self.entropy.fill_(ema)
        self.stage_steps += 1
        learnt = ema <= self.settings.entropy_threshold
        if learnt and int(self.stage_steps) >= self.settings.min_steps and int(self.length) < self.limit:
            self.length.fill_(min(self.limit, int(self.length) + self.settings.step))
            self.stage_steps.zero_()

    def extra_repr(self) -> str:
        return f"length={int(self.length)}, entropy={float(self.entropy):.3f}"


class StudentRollouts:
    """The batch transform: a `mix` fraction of rows gets the student's continuation of its prompt."""

    def __init__(
        self,
        settings: RolloutSettings,
        tokenizer: Any,
        pad_id: int,
        *,
        run_seed: int,
        curriculum: LengthCurriculum | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.run_seed = run_seed
        self.curriculum = curriculum
        self.stats = GenerationStats()
        self.rows: list[Row] = []  # the last batch's rows, after the rollouts
        self.chosen: list[int] = []  # and which of them are the student's
        self.student_tokens = 0  # counted tokens the student trained on

    def budget(self, row: Row) -> int:
        budget = self.settings.max_new_tokens or max(1, len(row.completion))
        if self.curriculum is not None:
            budget = min(budget, int(self.curriculum.length))
        return budget

    def __call__(self, batch: dict[str, Tensor], student: nn.Module, progress: Progress) -> dict[str, Tensor]:
        from distill.sources.generations import generate

        rows = batch_rows(batch)
        ids = batch[EXAMPLE_INDEX].tolist()
        s = self.settings
        rng = random.Random(seed_for("mix", self.run_seed, s.seed, progress.step, ids))
        chosen = [i for i in range(len(rows)) if s.mix >= 1.0 or rng.random() < s.mix]
        if chosen:
            started = time.perf_counter()
            completions = generate(
                student,
                self.tokenizer,
                [rows[i].prompt for i in chosen],
                max_new_tokens=[self.budget(rows[i]) for i in chosen],
                seed=seed_for("sample", self.run_seed, s.seed, progress.step, ids),
                batch_size=len(chosen),
                **s.sampling(),
            )
            self.stats.add(completions, started)
            for i, completion in zip(chosen, completions, strict=True):
                rows[i] = completion_row(rows[i].prompt, completion)
        self.rows, self.chosen = rows, chosen
        new = rows_batch(rows, self.pad_id, batch)
        self.student_tokens += int(new["mask"].sum())
        return new

    def metrics(self) -> dict[str, float]:
        out = self.stats.as_metrics("rollout") | {"student_tokens": float(self.student_tokens)}
        if self.curriculum is not None:
            out["curriculum_length"] = float(self.curriculum.length)
        return out

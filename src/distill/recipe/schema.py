"""The recipe: a YAML file validated by pydantic. Data only: a recipe never executes code.

Every section forbids unknown keys (a misspelt key is named with the nearest valid one) and every number
must be finite. Ranges that are not obvious from the field (each with a regression test in
`tests/test_recipe_values.py`):

- seeds (`seeds`, `teacher.train.seed`): 0 .. 2**32 - 1, what NumPy's and torch's seeding both accept;
- `optimizer.betas`: each in [0, 1), as Adam's running averages need;
- `optimizer.weight_decay`: 0 .. 1000 (`MAX_WEIGHT_DECAY`); AdamW shrinks the weights by lr * wd per step and
  SGD adds wd * w to the gradient, so beyond that every learning rate zeroes or blows up the weights;
- `optimizer.lr`, and the peak the schedule reaches (lr x gamma^milestones when gamma > 1): at most 1e6
  (`MAX_LR`); torch keeps the rate in float32, which a larger one overflows;
- `data.batch_size`, `data.eval_batch_size`: at most 2**31 (`MAX_BATCH`);
- `trainer.threads`: 1 .. max(1024, 4 x the CPU count) (`MAX_THREADS`): far above any machine's useful
  count, far below where creating OpenMP threads fails (torch crashes at about 16k);
- names: the recipe's name (a folder name under `runs/`) at most 100 characters; a method's name at most
  120, and its folder name (`method_slug`) at most 200 bytes (file systems allow 255);
- a method whose every objective has weight 0 would train nothing, and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

MAX_SEED = 2**32 - 1
MAX_WEIGHT_DECAY = 1e3
MAX_LR = 1e6  # the learning rate, and its peak over the schedule (float32 overflows near 3.4e38)
MAX_BATCH = 2**31  # samples per batch
FLOAT_SETTINGS = ("temperature", "top_p")  # sampling settings transformers takes only as floats
MAX_THREADS = max(1024, 4 * (os.cpu_count() or 1))
MAX_NAME = 100  # the recipe's name, and names of registered things (models, data sets, objectives)
MAX_METHOD_NAME = 120
MAX_SLUG_BYTES = 200

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def method_slug(name: str) -> str:
    """The folder name of a method's runs (`methods/<slug>/seed-N`)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "method"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class ModelSpec(Section):
    """A model from the zoo by name, with its constructor parameters."""

    name: str = Field(max_length=MAX_NAME)
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = Field(default=None, description="safetensors weights to start from")


def refuse_overflowing_lr(optimizer: OptimizerSpec, schedule: ScheduleSpec, where: str) -> None:
    """A step schedule with gamma > 1 raises the rate at each milestone: its peak must stay under `MAX_LR`."""
    if schedule.name == "step" and schedule.gamma > 1 and schedule.milestones:
        try:
            peak = optimizer.lr * schedule.gamma ** len(schedule.milestones)
        except OverflowError:
            peak = float("inf")
        if peak > MAX_LR:
            raise ValueError(
                f"{where}gamma: the learning rate would reach {peak:.3g} after {len(schedule.milestones)} "
                f"milestone(s) (at most {MAX_LR:g})"
            )


class TeacherTraining(Section):
    """How to train the teacher when no checkpoint is given. The result is cached by content."""

    epochs: PositiveInt = 30
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec())
    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec())
    seed: Seed = 0
    cache: bool = True

    @model_validator(mode="after")
    def _peak_lr(self) -> TeacherTraining:
        refuse_overflowing_lr(self.optimizer, self.schedule, "schedule.")
        return self


class TeacherSpec(ModelSpec):
    """The teacher: a model (`name`, `params`, `checkpoint`), or `cache`, a folder written by `distill cache`,
    whose top-k targets replace the teacher (no model is loaded). With both, the cache must come from that
    teacher."""

    name: str | None = Field(default=None, max_length=MAX_NAME)  # type: ignore[assignment]
    train: TeacherTraining = Field(default_factory=TeacherTraining)
    cache: Path | None = Field(default=None, description="a teacher cache folder (`distill cache`)")

    @model_validator(mode="after")
    def _model_or_cache(self) -> TeacherSpec:
        if self.name is None and self.cache is None:
            raise ValueError("give the teacher's model (name) or a teacher cache (cache: DIR)")
        return self


class DataSpec(Section):
    name: str = Field(default="digits", max_length=MAX_NAME)
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = Field(default=64, le=MAX_BATCH)
    eval_batch_size: PositiveInt = Field(default=512, le=MAX_BATCH)


class SourceSpec(Section):
    """Where inputs come from. `dataset`: the training split as it is. `teacher_generations` (language
    models): the teacher completes the training prompts (sequence-level KD); `params` are its sampling
    settings (`do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens`, `fixed_length`, `seed`).
    On-policy sources (language models; `distill.onpolicy.sources`): `student_rollouts` (`mix`: GKD's
    lambda, sampling settings, `length_curriculum`), `opsd`, `soda`, `mixsd`."""

    name: Literal["dataset", "teacher_generations", "student_rollouts", "opsd", "soda", "mixsd"] = "dataset"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _float_settings(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Sampling settings written as whole numbers (`temperature: 2`) are read as floats: transformers'
        `generate` refuses an int temperature, mid-run. SODA's `teacher` settings likewise."""

        def floats(mapping: dict[str, Any]) -> dict[str, Any]:
            out = dict(mapping)
            for key, value in mapping.items():
                if key in FLOAT_SETTINGS and isinstance(value, int) and not isinstance(value, bool):
                    try:
                        out[key] = float(value)
                    except OverflowError:
                        raise ValueError(f"{key}: {str(value)[:20]}... is too large a number") from None
                elif key == "teacher" and isinstance(value, dict):
                    out[key] = floats(value)
            return out

        return floats(params)

    @model_validator(mode="after")
    def _onpolicy_params(self) -> SourceSpec:
        if self.name not in ("dataset", "teacher_generations"):
            from distill.errors import UserError
            from distill.recipe.check import check_param_values
            from distill.sources import check_source
            from distill.sources.generations import GenerationSettings
            from distill.sources.plan import SETTINGS
            from distill.sources.rollouts import CurriculumSettings

            try:
                # the types first: the sources' own checks compare values, and take `inf` for a count
                check_param_values(SETTINGS[self.name], self.params, "params")
                for key, kind in (("length_curriculum", CurriculumSettings), ("teacher", GenerationSettings)):
                    if isinstance(self.params.get(key), dict):
                        check_param_values(kind, self.params[key], f"params.{key}")
                check_source(self.name, self.params)
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
            except (TypeError, ValueError, OverflowError) as err:  # a check met a value of a wrong type
                problem = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise ValueError(f"source '{self.name}': {problem}") from None
        return self


class ObjectiveSpec(Section):
    name: str = Field(max_length=MAX_NAME)
    weight: float = Field(default=1.0, ge=0.0)
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="ramp the weight linearly from 0")


def refuse_all_zero_weights(objectives: list[ObjectiveSpec], owner: str) -> None:
    if all(term.weight == 0 for term in objectives):
        raise ValueError(f"every objective of {owner} has weight 0: it would train nothing")


class MethodSpec(Section):
    """One way to train the student: a named list of weighted objectives."""

    name: str = Field(max_length=MAX_METHOD_NAME)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    source: SourceSpec | None = Field(default=None, description="this method's source; None: the recipe's")

    @field_validator("name")
    @classmethod
    def _folder_name_fits(cls, name: str) -> str:
        size = len(method_slug(name).encode())
        if size > MAX_SLUG_BYTES:
            raise ValueError(
                f"the method's folder name would be {size} bytes (at most {MAX_SLUG_BYTES}); shorten the name"
            )
        return name

    @model_validator(mode="after")
    def _trains_something(self) -> MethodSpec:
        refuse_all_zero_weights(self.objectives, f"method '{self.name}'")
        return self


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = Field(default=1e-3, le=MAX_LR)
    weight_decay: float = Field(default=0.0, ge=0.0, le=MAX_WEIGHT_DECAY)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[Beta, Beta] = (0.9, 0.999)


class ScheduleSpec(Section):
    """Learning-rate schedule: linear warm-up, then constant, cosine, or step decay at epoch milestones."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    milestones: list[PositiveFloat] = Field(default_factory=list, description="epochs at which lr *= gamma")
    gamma: PositiveFloat = 0.1


class TrainerSpec(Section):
    epochs: PositiveInt = 10
    grad_accum: PositiveInt = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: PositiveFloat | None = None
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps; 0 = end of each epoch")
    keep_checkpoints: PositiveInt = 2
    eval_every: PositiveInt = 1
    log_every: PositiveInt = 10
    nonfinite: Literal["stop", "skip"] = "stop"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = Field(
        default=None, le=MAX_THREADS, description="torch CPU threads; None = torch's default"
    )
    fused_loss: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="language models: losses from hidden states and the output layer, never the whole "
        "logits, when every objective allows it (auto), always (on: else an error) or never (off)",
    )


class EvaluationSpec(Section):
    rule: Literal["last", "best"] = Field(
        default="last", description="which epoch the headline accuracy comes from; both are reported"
    )
    latency: bool = True


class OutputSpec(Section):
    dir: Path | None = Field(default=None, description="None: runs/<name>/<date-time>, always a new folder")
    tensorboard: bool = True


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME)
    description: str = ""
    task: str | None = Field(
        default=None,
        description="the kind of problem (`distill.tasks`: classification, causal_lm, ...); None: the task "
        "that claims the recipe's data and student, else classification",
    )
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec | None = None
    student: ModelSpec
    source: SourceSpec = Field(default_factory=SourceSpec)
    objectives: list[ObjectiveSpec] | None = None
    methods: list[MethodSpec] | None = None
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    _source_file: Path | None = PrivateAttr(default=None)  # the YAML file it was read from, if any

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @model_validator(mode="after")
    def _peak_lr(self) -> Recipe:
        refuse_overflowing_lr(self.optimizer, self.schedule, "schedule.")
        return self

    @field_validator("objectives")
    @classmethod
    def _objectives_train_something(
        cls, objectives: list[ObjectiveSpec] | None
    ) -> list[ObjectiveSpec] | None:
        if objectives:
            refuse_all_zero_weights(objectives, "the recipe")
        return objectives

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @model_validator(mode="after")
    def _one_way_to_name_methods(self) -> Recipe:
        if (self.objectives is None) == (self.methods is None):
            raise ValueError(
                "give either 'objectives' (one method) or 'methods' (several), not both or neither"
            )
        if self.methods is not None:
            names = [m.name for m in self.methods]
            if len(set(names)) != len(names):
                raise ValueError("method names must be distinct")
            folders: dict[str, str] = {}
            for name in names:
                other = folders.setdefault(method_slug(name), name)
                if other != name:
                    raise ValueError(
                        f"methods '{other}' and '{name}' would share the folder methods/{method_slug(name)}; "
                        "rename one"
                    )
        return self

    def method_list(self) -> list[MethodSpec]:
        if self.methods is not None:
            return self.methods
        assert self.objectives is not None
        return [MethodSpec(name="distill", objectives=self.objectives)]


TeacherTraining.model_rebuild()
TeacherSpec.model_rebuild()

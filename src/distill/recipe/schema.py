"""The recipe: a YAML file validated by pydantic. Data only: a recipe never executes code.

Every section forbids unknown keys (a misspelt key is named with the nearest valid one) and every number
must be finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


def method_slug(name: str) -> str:
    """The folder name of a method's runs (`methods/<slug>/seed-N`)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "method"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class ModelSpec(Section):
    """A model from the zoo by name, with its constructor parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = Field(default=None, description="safetensors weights to start from")


class TeacherTraining(Section):
    """How to train the teacher when no checkpoint is given. The result is cached by content."""

    epochs: PositiveInt = 30
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec())
    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec())
    seed: int = 0
    cache: bool = True


class TeacherSpec(ModelSpec):
    """The teacher: a model (`name`, `params`, `checkpoint`), or `cache`, a folder written by `distill cache`,
    whose top-k targets replace the teacher (no model is loaded). With both, the cache must come from that
    teacher."""

    name: str | None = None  # type: ignore[assignment]
    train: TeacherTraining = Field(default_factory=TeacherTraining)
    cache: Path | None = Field(default=None, description="a teacher cache folder (`distill cache`)")

    @model_validator(mode="after")
    def _model_or_cache(self) -> TeacherSpec:
        if self.name is None and self.cache is None:
            raise ValueError("give the teacher's model (name) or a teacher cache (cache: DIR)")
        return self


class DataSpec(Section):
    name: str = "digits"
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 512


class SourceSpec(Section):
    """Where inputs come from. `dataset`: the training split as it is. `teacher_generations` (language
    models): the teacher completes the training prompts (sequence-level KD); `params` are its sampling
    settings (`do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens`, `fixed_length`, `seed`).
    On-policy sources (language models; `distill.onpolicy.sources`): `student_rollouts` (`mix`: GKD's
    lambda, sampling settings, `length_curriculum`), `opsd`, `soda`, `mixsd`."""

    name: Literal["dataset", "teacher_generations", "student_rollouts", "opsd", "soda", "mixsd"] = "dataset"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _onpolicy_params(self) -> SourceSpec:
        if self.name not in ("dataset", "teacher_generations"):
            from distill.errors import UserError
            from distill.sources import check_source

            try:
                check_source(self.name, self.params)
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
        return self


class ObjectiveSpec(Section):
    name: str
    weight: float = Field(default=1.0, ge=0.0)
    params: dict[str, Any] = Field(default_factory=dict)
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="ramp the weight linearly from 0")


class MethodSpec(Section):
    """One way to train the student: a named list of weighted objectives."""

    name: str
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    source: SourceSpec | None = Field(default=None, description="this method's source; None: the recipe's")


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


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
    threads: PositiveInt | None = Field(default=None, description="torch CPU threads; None = torch's default")
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
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    _source_file: Path | None = PrivateAttr(default=None)  # the YAML file it was read from, if any

    @property
    def source_file(self) -> Path | None:
        return self._source_file

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

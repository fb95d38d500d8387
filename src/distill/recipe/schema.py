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

# Where a method's training inputs come from (`source.name`), each with its one-line summary.
SOURCES = {
    "dataset": "the training split as it is",
    "teacher_generations": "the teacher completes the training prompts (sequence-level KD; language models)",
    "student_rollouts": "the student's own completions scored by the teacher (GKD's mix, length curriculum)",
    "opsd": "the student's rollouts scored by itself given a privileged context (objective opsd)",
    "soda": "teacher responses paired with a snapshot of the student's outputs (objective soda)",
    "mixsd": "targets decoded once from the base model's expert / naive mixture (objective cross_entropy)",
    "mixup": "each batch mixed, lam x_i + (1 - lam) x_j and labels alike, teacher fed the mix (S37; images)",
    "cutmix": "a box of x_j pasted into x_i, labels mixed by area, teacher fed the mix (S37; images)",
    "llkd": "unlabelled rows kept per batch where the teacher is confident and the student uncertain (S05)",
    "random_subset": "a fixed random share of the unlabelled rows, the labelled ones kept (LLKD's baseline)",
    "kd3": "transfer rows kept per batch where the teacher-student combined prediction is confident (S35)",
}


def unset(value: Any) -> bool:
    """A setting added after recipes were first fingerprinted is left out of the recipe's dump while unset:
    the recipe then dumps as before it existed, and the fingerprints of earlier runs (the same-recipe check of
    `--resume`, their checkpoints, `distill export`) still hold."""
    return value is None or value == []


def method_slug(name: str) -> str:
    """The folder name of a method's runs (`methods/<slug>/seed-N`)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "method"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class ModelSpec(Section):
    """A model from the zoo by name, with its constructor parameters."""

    name: str = Field(
        max_length=MAX_NAME,
        description="a registered model (`distill list models`), or `torchvision:<arch>` / `timm:<arch>`",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the model's constructor parameters")
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

    epochs: PositiveInt = Field(default=30, description="epochs of cross-entropy training")
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: OptimizerSpec(), description="the teacher's optimizer"
    )
    schedule: ScheduleSpec = Field(
        default_factory=lambda: ScheduleSpec(), description="the teacher's learning-rate schedule"
    )
    seed: Seed = Field(default=0, description="seed of the teacher's initial weights and data order")
    cache: bool = Field(
        default=True,
        description="keep the trained teacher in `$DISTILL_CACHE` and reuse it while model, data and "
        "training are the same",
    )

    @model_validator(mode="after")
    def _peak_lr(self) -> TeacherTraining:
        refuse_overflowing_lr(self.optimizer, self.schedule, "schedule.")
        return self


class ServedTeacherSpec(Section):
    """A teacher reached over an OpenAI-compatible completions endpoint (`distill.teachers.served`): its
    per-token top-k log-probabilities are the targets. Language models only; it must share the student's
    tokenizer."""

    url: str = Field(
        max_length=2000,
        pattern=r"^https?://\S+$",
        description="the API base, e.g. http://127.0.0.1:8000/v1 (`/completions` is appended)",
    )
    model: str = Field(max_length=MAX_NAME * 3, description="the served model's name")
    top_k: int = Field(default=20, ge=1, le=1000, description="log-probabilities per position")
    protocol: Literal["vllm", "openai", "llama_cpp"] = Field(
        default="vllm",
        description="vllm (`prompt_logprobs`, token ids), openai (legacy echo + logprobs, text), or "
        "llama_cpp (llama-cpp-python's server, whose echo entries are shifted by one)",
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="seconds to wait for one answer")
    retries: int = Field(default=3, ge=0, le=20, description="further tries after a transient failure")
    backoff_s: float = Field(default=0.5, ge=0, le=60, description="first wait between tries; doubles")
    api_key_env: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable holding the API key (the key never goes in a recipe)",
    )
    prompts_per_request: int = Field(default=8, ge=1, le=1024, description="vllm: sequences per request")


class TeacherSpec(ModelSpec):
    """The teacher: a model (`name`, `params`, `checkpoint`), or `cache`, a folder written by `distill cache`,
    whose top-k targets replace the teacher (no model is loaded), or `served`, an endpoint that answers with
    top-k log-probabilities. With a model and a cache, the cache must come from that teacher."""

    name: str | None = Field(  # type: ignore[assignment]
        default=None,
        max_length=MAX_NAME,
        description="the teacher's model, as `student.name`; None with `cache`: no model is loaded",
    )
    train: TeacherTraining = Field(
        default_factory=TeacherTraining,
        description="how to train the teacher when neither a checkpoint nor a trained model is given",
    )
    cache: Path | None = Field(default=None, description="a teacher cache folder (`distill cache`)")
    served: ServedTeacherSpec | None = Field(
        default=None, description="a teacher served over an OpenAI-compatible endpoint (language models)"
    )

    @model_validator(mode="after")
    def _model_or_cache(self) -> TeacherSpec:
        if self.served is not None and (self.name is not None or self.cache is not None):
            raise ValueError("a served teacher stands alone: drop the teacher's name and cache")
        if self.name is None and self.cache is None and self.served is None:
            raise ValueError(
                "give the teacher's model (name), a teacher cache (cache: DIR) or a served teacher (served)"
            )
        return self


# How a method's teacher is made (`methods[].teacher.kind`), each with its one-line summary.
TEACHER_KINDS = {
    "ensemble": "several teachers (the recipe's, trained with other seeds, and others), outputs aggregated",
    "online": "a peer trained beside the student, each learning from the other (DML, online BD-KD)",
    "ema": "the student's exponential moving average (mean teacher)",
    "self": "iterative self-distillation: each generation learns from the last and the labels (S22)",
    "mixture": "MST-Distill: masked members as specialised teachers, one routed per sample by a gate (S25)",
}


class EnsembleTeacherSpec(Section):
    """Several teachers as one (`distill.teachers.ensemble`): the recipe's teacher trained with each of
    `seeds`, and the `members` (each trained and cached like the recipe's teacher when it has no
    checkpoint); their outputs mixed as `combine` says after each is put on one scale (`normalise`)."""

    kind: Literal["ensemble"] = Field(description=TEACHER_KINDS["ensemble"])
    seeds: list[Seed] = Field(
        default_factory=list,
        description="train seeds of the recipe's teacher, one member each (its own seed included or not)",
    )
    members: list[TeacherSpec] = Field(default_factory=list, description="further teachers")
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(
        default=None, description="one per member (seeds first, then members); default: equal"
    )
    combine: Literal["probabilities", "logits"] = Field(
        default="probabilities", description="mean of probabilities, or of (normalised) logits"
    )
    normalise: Literal["none", "standard", "minmax"] = Field(
        default="none", description="each member's scores per row before a logit mean (S11)"
    )

    @model_validator(mode="after")
    def _two_or_more(self) -> EnsembleTeacherSpec:
        count = len(self.seeds) + len(self.members)
        if count < 2:
            raise ValueError(f"an ensemble needs at least two teachers (seeds + members), got {count}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("ensemble seeds must be distinct")
        if self.weights is not None and len(self.weights) != count:
            raise ValueError(f"give one weight per member ({count}), got {len(self.weights)}")
        if self.weights is not None and sum(self.weights) <= 0:
            raise ValueError("ensemble weights are all zero")
        if self.combine == "probabilities" and self.normalise != "none":
            raise ValueError("normalise applies to combine: logits (probabilities share one scale)")
        return self


class OnlineTeacherSpec(Section):
    """A peer trained beside the student (`distill.teachers.cotrained`): both learn every step from the
    other's detached outputs, the peer with its own `objectives` in which it is the "student" and the
    student its "teacher" (deep mutual learning; online BD-KD with `bdkd` on both sides)."""

    kind: Literal["online"] = Field(description=TEACHER_KINDS["online"])
    model: ModelSpec | None = Field(
        default=None, description="the peer's model; None: the student's architecture (DML)"
    )
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [
            ObjectiveSpec(name="cross_entropy"),
            ObjectiveSpec(name="forward_kl"),
        ],
        min_length=1,
        description="the peer's own weighted terms (default: cross-entropy + KL towards the student)",
    )
    lr: PositiveFloat | None = Field(default=None, le=MAX_LR, description="None: the student's")
    weight_decay: float | None = Field(
        default=None, ge=0.0, le=MAX_WEIGHT_DECAY, description="None: the student's"
    )


class EMATeacherSpec(Section):
    """The student's exponential moving average: theta_T <- decay theta_T + (1 - decay) theta_S."""

    kind: Literal["ema"] = Field(description=TEACHER_KINDS["ema"])
    decay: float = Field(default=0.999, ge=0.0, lt=1.0, description="the average's decay per optimizer step")


class SelfTeacherSpec(Section):
    """Iterative self-distillation with ground-truth weighting (S22): generation 1 trains on the label terms
    alone; generation g > 1 starts afresh and learns from generation g - 1 (frozen) with the label terms
    weighted alpha and the teacher terms 1 - alpha. The seed's result is the last generation's."""

    kind: Literal["self"] = Field(description=TEACHER_KINDS["self"])
    generations: int = Field(default=3, ge=2, le=20, description="students trained in turn (the first alone)")
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["estimate"] = Field(
        default="estimate",
        description="weight of the labels from generation 2 on; `estimate`: S22's estimate per generation, "
        "from a student trained with alpha 0 and the first generation, on `held_out` of the training set",
    )
    held_out: float = Field(
        default=0.1,
        gt=0.0,
        lt=0.5,
        description="with alpha `estimate`: the fraction of the training set set aside (seeded) to estimate "
        "alpha on; every generation trains on the rest",
    )


class MixtureTeacherSpec(Section):
    """MST-Distill (S25, `distill.teachers.mixture`; docs/mst_distill.md): each member (trained and cached
    like the recipe's teacher) with a learned mask on one of its layers is a specialised teacher; a gate on
    the student's logits picks the top `k` of them per sample. The student first learns from the members'
    mean for `warmup_epochs`; then the masks fit the student's outputs for `mask_epochs` (the student and the
    members frozen) and stay fixed; then the gate routes. Defaults: the official code
    (github.com/Gray-OREO/MST-Distill, main-MST-Distill.py, KD_methods/MST.py)."""

    kind: Literal["mixture"] = Field(description=TEACHER_KINDS["mixture"])
    members: list[TeacherSpec] = Field(
        min_length=2, description="the teachers (cross-modal and multimodal), each a full teacher spec"
    )
    layers: list[list[str]] | None = Field(
        default=None,
        description="per member, the modules whose outputs are masked, one specialised teacher each; None: "
        "each member's last `mask_layers` feature taps",
    )
    mask_layers: int = Field(
        default=2, ge=1, le=8, description="masked layers per member when `layers` is None"
    )
    k: int = Field(default=1, ge=1, description="specialised teachers the student learns from per sample")
    temperature: PositiveFloat = Field(default=4.0, description="of the masks' loss and the routed mixture")
    heads: int = Field(default=3, ge=1, le=64, description="attention heads of each mask network")
    hidden_factor: int = Field(
        default=2,
        ge=1,
        le=64,
        description="a mask network's width is features // (hidden_factor x heads) x heads",
    )
    balance: Literal["kl", "cv"] = Field(
        default="kl",
        description="the gate's load-balancing loss: KL to uniform use, or coefficient of variation",
    )
    balance_weight: float = Field(default=1.0, ge=0.0, description="its weight")
    balance_decay: float = Field(
        default=0.9, gt=0.0, le=1.0, description="its weight's factor every 10 epochs of routing"
    )
    warmup_epochs: int = Field(
        default=1, ge=0, description="epochs the student learns from the members' mean before the masks fit"
    )
    mask_epochs: int = Field(
        default=1, ge=1, le=20, description="passes over the training set fitting the masks"
    )
    mask_lr: PositiveFloat = Field(default=1e-4, le=MAX_LR, description="the masks' Adam learning rate")
    lr: PositiveFloat | None = Field(default=None, le=MAX_LR, description="the gate's; None: the student's")
    weight_decay: float | None = Field(
        default=None, ge=0.0, le=MAX_WEIGHT_DECAY, description="the gate's; None: the student's"
    )

    @model_validator(mode="after")
    def _experts(self) -> MixtureTeacherSpec:
        if self.layers is not None:
            if len(self.layers) != len(self.members) or not all(self.layers):
                raise ValueError(f"layers: give a non-empty list per member ({len(self.members)})")
            experts = sum(len(paths) for paths in self.layers)
        else:
            experts = len(self.members) * self.mask_layers
        if self.k > experts:
            raise ValueError(
                f"k is {self.k}, but there are {experts} specialised teachers (members x layers)"
            )
        return self


TeacherRegime = Annotated[
    EnsembleTeacherSpec | OnlineTeacherSpec | EMATeacherSpec | SelfTeacherSpec | MixtureTeacherSpec,
    Field(discriminator="kind"),
]


class DataSpec(Section):
    """The data set: a registered name and its parameters, and the batch sizes."""

    name: str = Field(
        default="digits", max_length=MAX_NAME, description="a registered data set (`distill list datasets`)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the data set's parameters (files, sizes, tokenizer, ...)"
    )
    batch_size: PositiveInt = Field(
        default=64, le=MAX_BATCH, description="training samples per batch and process (per micro-batch)"
    )
    eval_batch_size: PositiveInt = Field(
        default=512, le=MAX_BATCH, description="samples per evaluation batch"
    )


class SourceSpec(Section):
    """Where inputs come from. `dataset`: the training split as it is. `teacher_generations` (language
    models): the teacher completes the training prompts (sequence-level KD); `params` are its sampling
    settings (`do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens`, `fixed_length`, `seed`).
    On-policy sources (language models; `distill.sources`): `student_rollouts` (`mix`: GKD's
    lambda, sampling settings, `length_curriculum`), `opsd`, `soda`, `mixsd`. Batch sources (image and
    feature classification; `distill.sources.mixup`, S37): `mixup` and `cutmix`, params `alpha` (lam ~
    Beta(alpha, alpha), > 0, default 1.0), `probability` (of mixing a batch, 0..1, default 1.0) and
    `per_sample` (lam per row, default false); labels become mixed class distributions. Selection sources
    (classification with `unlabelled: true` data; `distill.sources.selection`, S05): `llkd` keeps the
    unlabelled rows where the teacher is confident and the student uncertain, params `momentum` (of the
    adaptive thresholds, [0, 1), default 0.999), `class_thresholds` (default true) and `pseudo_labels`
    (default true); `random_subset` keeps a random `fraction` (0..1] of them, drawn by `seed` (default: the
    run seed). `kd3` (classification; `distill.sources.kd3`, S35) keeps per batch the rows whose combined
    teacher-student prediction reaches `threshold` (default 0.5), the student's share growing to
    `student_share` (default 0.5); `pseudo_labels` (default true) labels them with its argmax."""

    name: Literal[
        "dataset",
        "teacher_generations",
        "student_rollouts",
        "opsd",
        "soda",
        "mixsd",
        "mixup",
        "cutmix",
        "llkd",
        "random_subset",
        "kd3",
    ] = Field(default="dataset", description="where the training inputs come from (`SOURCES`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the source's settings")

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
        if self.name in ("mixup", "cutmix"):
            from distill.errors import UserError
            from distill.recipe.check import check_param_values
            from distill.sources.mixup import MixSettings
            from distill.sources.settings import from_params

            where = f"source '{self.name}'"
            try:
                check_param_values(MixSettings, self.params, f"{where}: params")
                from_params(MixSettings, self.params, where)
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
        elif self.name in ("llkd", "random_subset"):
            from distill.errors import UserError
            from distill.recipe.check import check_param_values
            from distill.sources.selection import LLKDSettings, SubsetSettings
            from distill.sources.settings import from_params

            kind = LLKDSettings if self.name == "llkd" else SubsetSettings
            where = f"source '{self.name}'"
            try:
                check_param_values(kind, self.params, f"{where}: params")
                from_params(kind, self.params, where)
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
        elif self.name == "kd3":
            from distill.errors import UserError
            from distill.recipe.check import check_param_values
            from distill.sources.kd3 import KD3Settings
            from distill.sources.settings import from_params

            try:
                check_param_values(KD3Settings, self.params, "source 'kd3': params")
                from_params(KD3Settings, self.params, "source 'kd3'")
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
        elif self.name not in ("dataset", "teacher_generations"):
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
    """One weighted term of the training loss."""

    name: str = Field(max_length=MAX_NAME, description="a registered objective (`distill list objectives`)")
    weight: float = Field(default=1.0, ge=0.0, description="its weight in the sum of the method's terms")
    params: dict[str, Any] = Field(default_factory=dict, description="the objective's parameters")
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="ramp the weight linearly from 0")


def refuse_all_zero_weights(objectives: list[ObjectiveSpec], owner: str) -> None:
    if all(term.weight == 0 for term in objectives):
        raise ValueError(f"every objective of {owner} has weight 0: it would train nothing")


class MethodSpec(Section):
    """One way to train the student: a named list of weighted objectives."""

    name: str = Field(
        max_length=MAX_METHOD_NAME,
        description="the method's name in reports; its runs go to `methods/<slug>/seed-N`",
    )
    objectives: list[ObjectiveSpec] = Field(min_length=1, description="the weighted terms, summed")
    source: SourceSpec | None = Field(default=None, description="this method's source; None: the recipe's")
    teacher: TeacherRegime | None = Field(
        default=None,
        exclude_if=unset,
        description="how this method's teacher is made (`kind`: ensemble, online, ema, self); None: the "
        "recipe's teacher as it is",
    )

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
    """The optimizer of the trained parameters."""

    name: Literal["adamw", "sgd"] = Field(default="adamw", description="AdamW or SGD")
    lr: PositiveFloat = Field(default=1e-3, le=MAX_LR, description="the peak learning rate")
    weight_decay: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_WEIGHT_DECAY,
        description="decoupled (AdamW) or added to the gradient (SGD)",
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only")
    nesterov: bool = Field(default=False, description="SGD only: Nesterov momentum")
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.999), description="AdamW only: its running averages")
    decay_biases_and_norms: bool = Field(
        default=True,
        exclude_if=lambda decays: decays,  # the default dumps as before the setting existed (see `unset`)
        description="false: no weight decay on biases and normalisation weights (every parameter of one "
        "dimension), as BERT, MAE and timm train",
    )


class ScheduleSpec(Section):
    """Learning-rate schedule: linear warm-up, then constant, cosine, or step decay at epoch milestones."""

    name: Literal["constant", "cosine", "step"] = Field(
        default="cosine", description="after the warm-up; cosine ends at the run's last optimizer step"
    )
    warmup_epochs: float = Field(
        default=0.0, ge=0.0, description="linear warm-up, in epochs (fractions allowed)"
    )
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="cosine's floor, a fraction of lr")
    milestones: list[PositiveFloat] = Field(default_factory=list, description="epochs at which lr *= gamma")
    gamma: PositiveFloat = Field(default=0.1, description="step decay's factor at each milestone")


class TrainerSpec(Section):
    """How each student trains: its length, accumulation, precision, checkpoints and logs."""

    epochs: PositiveInt = Field(
        default=10, description="passes over the training set (max_steps, when given, replaces it)"
    )
    max_steps: PositiveInt | None = Field(
        default=None,
        exclude_if=unset,
        description="the run's length in optimizer steps, in place of epochs (the last epoch possibly cut); "
        "the schedule's total steps follow it",
    )
    max_tokens: PositiveInt | None = Field(
        default=None,
        exclude_if=unset,
        description="language models: end after the first optimizer step at which the counted (masked) "
        "tokens trained on, over every process, reach this many; the schedule still spans epochs or "
        "max_steps",
    )
    grad_accum: PositiveInt = Field(default=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no", description="autocast's precision (the weights stay float32)"
    )
    max_grad_norm: PositiveFloat | None = Field(
        default=None, description="clip the gradients' norm to this; None = no clipping"
    )
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps; 0 = end of each epoch")
    keep_checkpoints: PositiveInt = Field(default=2, description="the newest checkpoints kept per run")
    eval_every: PositiveInt = Field(default=1, description="evaluate every this many epochs, and at the end")
    log_every: PositiveInt = Field(
        default=10, description="a training row in metrics.jsonl every this many optimizer steps"
    )
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop", description="a NaN or infinite objective ends the run (stop) or drops its step (skip)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when available")
    threads: PositiveInt | None = Field(
        default=None, le=MAX_THREADS, description="torch CPU threads; None = torch's default"
    )
    fused_loss: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="language models: losses from hidden states and the output layer, never the whole "
        "logits, when every objective allows it (auto), always (on: else an error) or never (off)",
    )


class EvaluationSpec(Section):
    """What the report measures."""

    rule: Literal["last", "best"] = Field(
        default="last", description="which epoch the headline accuracy comes from; both are reported"
    )
    latency: bool = Field(default=True, description="time the student and teacher per batch on the CPU")


class OutputSpec(Section):
    """Where a run writes, and what it logs to."""

    dir: Path | None = Field(default=None, description="None: runs/<name>/<date-time>, always a new folder")
    tensorboard: bool = Field(
        default=True, description="TensorBoard event files in each run folder, when tensorboard is installed"
    )
    trackers: list[Literal["wandb", "mlflow"]] = Field(
        default_factory=list,
        exclude_if=unset,
        description="experiment trackers, through Accelerate: Weights & Biases, MLflow (each must be "
        "installed; set up by its own environment variables); a run per method and seed, in a project "
        "named after the recipe",
    )

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError("name each tracker once")
        if trackers:
            from distill.errors import UserError
            from distill.train.trackers import refuse_unusable_trackers

            try:
                refuse_unusable_trackers(trackers)
            except UserError as err:  # pydantic adds where in the recipe
                raise ValueError(str(err)) from None
        return trackers


class Recipe(Section):
    """A recipe: data, teacher, student, the methods that train the student, and how they train."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=MAX_NAME,
        description="the run's name (its folder under `runs/`)",
    )
    description: str = Field(default="", description="free text, shown at the top of the report")
    task: str | None = Field(
        default=None,
        description="the kind of problem (`distill.tasks`: classification, causal_lm, ...); None: the task "
        "that claims the recipe's data and student, else classification",
    )
    data: DataSpec = Field(default_factory=DataSpec, description="the data set")
    teacher: TeacherSpec | None = Field(
        default=None, description="None: no teacher (objectives that need one are refused)"
    )
    student: ModelSpec = Field(description="the model the methods train")
    source: SourceSpec = Field(
        default_factory=SourceSpec, description="where training inputs come from, unless a method says"
    )
    objectives: list[ObjectiveSpec] | None = Field(
        default=None, description="one method's weighted objectives (give this or `methods`)"
    )
    methods: list[MethodSpec] | None = Field(
        default=None, description="several methods, each trained once per seed (give this or `objectives`)"
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="the students' optimizer")
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec, description="the students' learning-rate schedule"
    )
    trainer: TrainerSpec = Field(default_factory=TrainerSpec, description="how each student trains")
    seeds: list[Seed] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="each method trains once per seed; reports give mean ± std over them",
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="what the report measures")
    output: OutputSpec = Field(default_factory=OutputSpec, description="where the run writes")
    _source_file: Path | None = PrivateAttr(default=None)  # the YAML file it was read from, if any

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @model_validator(mode="after")
    def _peak_lr(self) -> Recipe:
        refuse_overflowing_lr(self.optimizer, self.schedule, "schedule.")
        return self

    @model_validator(mode="after")
    def _tokens_of_a_language_model(self) -> Recipe:
        from distill.recipe.check import LM_MODELS  # imported here: check imports this module

        if self.trainer.max_tokens is not None and self.student.name not in LM_MODELS:
            raise ValueError(
                f"trainer.max_tokens counts a language model's tokens, and student '{self.student.name}' is "
                "not one; give trainer.max_steps"
            )
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
OnlineTeacherSpec.model_rebuild()
EnsembleTeacherSpec.model_rebuild()
MixtureTeacherSpec.model_rebuild()
MethodSpec.model_rebuild()

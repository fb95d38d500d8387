"""Causal language models: any Hugging Face `AutoModelForCausalLM` (a folder, a config, LoRA), text / jsonl /
chat data tokenised with the student's tokenizer, per-token metrics, and the sources a method may train on:
the data set, the teacher's generations (sequence-level KD) or the on-policy sources of `distill.sources`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distill.cache import IndexedDataset, TeacherCache
from distill.data import build_data
from distill.data.text import LMData, LMDataset
from distill.data.token_alignment import Retokenizer
from distill.data.tokenizers import (
    describe,
    load_tokenizer,
    same_tokenizer,
    shared_vocabulary,
    slice_logits,
)
from distill.errors import UserError, shown
from distill.io import atomic_write_json, cache_root, fingerprint, load_tensors
from distill.models import count_parameters
from distill.models.causal_lm import build_causal_lm, refuse_other_architectures, special_token_ids
from distill.objectives import build_objective
from distill.objectives.cross_tokenizer import CROSS_TOKENIZER_OBJECTIVES
from distill.recipe.schema import MethodSpec, ModelSpec, Recipe, SourceSpec
from distill.runfolder import RunFolder
from distill.sources import ONPOLICY_SOURCES, SourcePlan
from distill.sources.generations import GenerationSettings, teacher_generations, tokenizer_fingerprint
from distill.tasks.base import TASKS, MethodPlan, SeedPlan, Task, TaskSetup
from distill.tasks.causal_lm_eval import LMEvaluator, describe_metrics
from distill.tasks.results import ExperimentResult, TeacherInfo
from distill.tasks.teacher_cache import (
    CacheSource,
    cache_teacher_info,
    dataset_fingerprint,
    open_recipe_cache,
)
from distill.tasks.teacher_store import fit_or_load_teacher, load_weights, teacher_spec_identity
from distill.teachers import CachedTeacher
from distill.teachers.cross_tokenizer import CrossTokenizerTeacher
from distill.teachers.served import ServedTeacher
from distill.teachers.served_protocol import Endpoint
from distill.train import FitResult, Term
from distill.train.seeding import seed_everything

LM_DATA_SETS = ("text", "jsonl", "json", "csv", "parquet", "arithmetic", "tinyshakespeare")
LM_MODELS = ("hf", "causal_lm")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TEACHER_FORMAT = 1


def _model_tokenizer(spec: ModelSpec | None, *, trained_here: bool = False) -> Any:
    """The tokenizer a model spec names (`params.tokenizer`, a folder) or that its folder holds; None if
    neither. `trained_here`: a teacher's `{bpe: {...}}` is allowed (None here: `prepare_lm_run` trains it on
    the data); a student's tokenizer trained here is the data's (`data.params.tokenizer`)."""
    if spec is None:
        return None
    if isinstance(spec.params.get("tokenizer"), dict):
        if trained_here:
            return None
        raise UserError(
            "params.tokenizer {bpe: ...} is a teacher's own tokenizer; the student's tokenizer trained here "
            "is data.params.tokenizer ({bpe: {vocab_size: N}}), or give a folder"
        )
    if spec.params.get("tokenizer") is not None:
        return load_tokenizer(spec.params["tokenizer"])
    path = spec.params.get("path")  # anything but a string: `build_causal_lm` refuses it in one line
    if isinstance(path, str) and any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return load_tokenizer(path)
    return None


def refuse_other_models(spec: ModelSpec | None, role: str) -> None:
    """A classifier's name (`mlp`, `small_cnn`, a zoo name) in a language-model recipe is a mistake, never
    a request for a causal LM: refused by name rather than built as one."""
    if spec is None or spec.name is None or spec.name in LM_MODELS:
        return
    raise UserError(
        f"{role}: {shown(spec.name)} is not a language model; a language-model recipe's {role} is "
        f"{' or '.join(LM_MODELS)} (a Hugging Face causal LM from params.config or params.path)"
    )


def refuse_other_folders(spec: ModelSpec | None, role: str) -> None:
    """A model folder whose config names no causal LM (a BERT encoder), refused from its config alone, so
    that `distill validate` says so too (loading it would fill a random head)."""
    path = spec.params.get("path") if spec is not None else None
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return  # no folder, or none there yet: building the model says what is wrong in one line
    try:
        refuse_other_architectures(Path(path))
    except UserError as err:
        raise UserError(f"{role}: {err}") from None


def build_lm_model(spec: ModelSpec, tokenizer: Any, role: str, *, for_training: bool = False) -> nn.Module:
    """The model of a recipe spec; a config takes its vocabulary size and special ids from the tokenizer.
    `for_training` builds a teacher in float32 (its `dtype` applies after training)."""
    refuse_other_models(spec, role)
    params = {k: v for k, v in spec.params.items() if k != "tokenizer"}
    if for_training:
        params.pop("dtype", None)
    unknown = set(params) - {"config", "path", "dtype", "lora"}
    if unknown:
        raise UserError(
            f"{role}.params: unknown key '{sorted(unknown)[0]}'; valid: config, path, dtype, lora, tokenizer"
        )
    try:
        model = build_causal_lm(
            **params, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
        )
    except UserError as err:  # say which model's config or folder it is
        raise UserError(f"{role}: {err}") from err
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, role)
    return model


def check_context(model: nn.Module, data: LMData, role: str) -> None:
    """A model with a learned table of positions (GPT-2's `wpe`; rotary models have none) cannot read a
    sequence longer than that table: refuse now what would be an index error at the first step."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    words = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not any(
        isinstance(m, nn.Embedding) and m is not words and m.num_embeddings == positions
        for m in model.modules()
    ):
        return
    examples = [*data.train.examples, *data.test.examples]  # type: ignore[attr-defined]
    longest = max(
        max(len(e.ids) for e in examples),
        max(e.prompt_len for e in data.test.examples) + data.max_new_tokens,  # type: ignore[attr-defined]
    )
    if longest > positions:
        raise UserError(
            f"{role}: hf model config: max_position_embeddings ({positions}) is shorter than the data's "
            f"sequences ({longest} tokens with the generated ones); raise it or lower data.params.max_length"
        )


def _teacher_key(recipe: Recipe, tokenizer: Any, train: LMDataset) -> str:
    spec = recipe.teacher
    assert spec is not None
    return fingerprint(
        {
            "model": teacher_spec_identity(spec),
            "data": recipe.data.model_dump(mode="json"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "content": dataset_fingerprint(train),  # a rewritten data file trains a new teacher
            "format": TEACHER_FORMAT,
        }
    )


def obtain_lm_teacher(
    recipe: Recipe, data: LMData, folder: RunFolder, progress: bool, evaluator: LMEvaluator
) -> tuple[nn.Module, TeacherInfo]:
    """A folder's or checkpoint's teacher as it is; a config's teacher trained with cross-entropy on the
    training split (cached by content in `$DISTILL_CACHE/lm-teachers`)."""
    spec = recipe.teacher
    assert spec is not None
    tokenizer = data.tokenizer
    seed_everything(spec.train.seed)
    if spec.params.get("path") is not None or spec.checkpoint is not None:
        teacher = build_lm_model(spec, tokenizer, "teacher")
        return teacher, TeacherInfo("checkpoint", count_parameters(teacher), {}, 0.0, [])
    teacher = build_lm_model(spec, tokenizer, "teacher", for_training=True)
    key = _teacher_key(recipe, tokenizer, data.train)
    cached = cache_root() / "lm-teachers" / key
    info = fit_or_load_teacher(
        teacher,
        recipe,
        data.train,
        cached,
        folder,
        progress,
        load=lambda model, weights: model.load_state_dict(load_tensors(weights), strict=False),
        eval_every=spec.train.epochs,
        evaluator=evaluator,
    )
    dtype = spec.params.get("dtype")
    if dtype is not None:
        teacher = teacher.to({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32))
    return teacher, info


# The sources a language-model recipe takes; the others (mixup, cutmix, sample selection) serve classifiers.
LM_SOURCES = ("dataset", "teacher_generations", "student_rollouts", "opsd", "soda", "mixsd")


def _source_data(
    source: SourceSpec,
    data: LMData,
    teacher: nn.Module | None,
    out_dir: Path,
    cache: dict[str, tuple[LMDataset, dict[str, Any]]],
    method: str,
) -> tuple[LMDataset, dict[str, Any]]:
    if source.name == "dataset":
        return data.train, {}  # type: ignore[return-value]
    if teacher is None:
        raise UserError(f"method '{method}': source 'teacher_generations' needs a teacher")
    settings = GenerationSettings.from_params(source.params)
    key = json.dumps(source.params, sort_keys=True)
    if key not in cache:
        if settings.max_new_tokens is None and data.layout == "text":
            settings = GenerationSettings(**{**source.params, "fixed_length": True})
        examples, info = teacher_generations(
            teacher,
            data.tokenizer,
            data.train.examples,  # type: ignore[attr-defined]
            settings,
            cache_dir=cache_root(),
            run_dir=out_dir,
        )
        if not examples:
            raise UserError(f"method '{method}': the teacher generated no token to learn from")
        cache[key] = (LMDataset(examples, data.train.pad_id), info)  # type: ignore[attr-defined]
    return cache[key]


@dataclass
class LMSetup:
    """What every language-model run (and `distill cache`) starts from."""

    data: LMData
    tokenizer: Any
    teacher: nn.Module | None
    teacher_info: TeacherInfo | None
    vocabulary: int | None
    evaluator: LMEvaluator
    cache: TeacherCache | None = None  # the recipe's teacher cache, standing in for `teacher`
    # A teacher with its own tokenizer (cross-tokenizer objectives): how it reads the student's batches.
    retokenizer: Retokenizer | None = None
    served: ServedTeacher | None = None  # a teacher behind an endpoint (`teacher.served`), standing in


def _cross_tokenizer_methods(recipe: Recipe, student: Any, teacher: Any) -> list[str]:
    """The methods that distil across the two tokenizers (with `uld` / `aligned_kd`). Any other method that
    needs the teacher is refused, as are sources and caches that need the teacher in the student's tokens;
    an empty list (no cross-tokenizer objective at all) leaves the refusal to `shared_vocabulary`."""
    methods = recipe.method_list()
    crossing = [m.name for m in methods if any(o.name in CROSS_TOKENIZER_OBJECTIVES for o in m.objectives)]
    if not crossing:
        return []
    where = f"teacher tokenizer {describe(teacher)} and student tokenizer {describe(student)} differ"
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        raise UserError(f"{where}: a teacher cache needs one shared tokenizer; run the teacher live")
    for method in methods:
        source = method.source or recipe.source
        if source.name != "dataset" and method.name in crossing:
            raise UserError(
                f"method '{method.name}': {where}; cross-tokenizer objectives read the data set's text "
                f"(source 'dataset'), not '{source.name}'"
            )
        for term in method.objectives:
            if term.name in CROSS_TOKENIZER_OBJECTIVES:
                continue
            if build_objective(term.name, term.params).needs_teacher:
                raise UserError(
                    f"method '{method.name}': objective '{term.name}' compares logits over one shared "
                    f"vocabulary, but the {where}; use {' or '.join(CROSS_TOKENIZER_OBJECTIVES)}"
                )
    return crossing


def prepare_lm_run(recipe: Recipe, folder: RunFolder | Path, *, progress: bool, console: Console) -> LMSetup:
    """Tokenizer -> data -> vocabulary checks -> the frozen teacher (loaded, cached or trained). `folder`: the
    run folder (claimed before a teacher trains into it) or, for `distill cache`, a scratch folder."""
    run_folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    out_dir = run_folder.path
    student_tokenizer = _model_tokenizer(recipe.student)
    teacher_tokenizer = _model_tokenizer(recipe.teacher, trained_here=True)
    params = dict(recipe.data.params)
    if student_tokenizer is not None:
        params["tokenizer"] = student_tokenizer
    elif params.get("tokenizer") is None:
        if teacher_tokenizer is None:
            raise UserError(
                "no tokenizer: give student.params.tokenizer (a folder), a student folder with one, or "
                "data.params.tokenizer (a folder or {bpe: {vocab_size: N}})"
            )
        params["tokenizer"] = teacher_tokenizer
    data = build_data(recipe.data.name, **params)
    if not isinstance(data, LMData):
        raise UserError(f"data '{recipe.data.name}' is not a language-model data set")
    tokenizer = data.tokenizer
    teacher_data = None  # the same text in the teacher's tokens, when its tokenizer is its own
    if recipe.teacher is not None and isinstance(recipe.teacher.params.get("tokenizer"), dict):
        teacher_data = _teacher_data(recipe, params, recipe.teacher.params["tokenizer"])  # trained here
        teacher_tokenizer = teacher_data.tokenizer
    crossing = (
        teacher_tokenizer is not None
        and not same_tokenizer(teacher_tokenizer, tokenizer)
        and bool(_cross_tokenizer_methods(recipe, tokenizer, teacher_tokenizer))
    )
    if crossing and teacher_data is None:
        teacher_data = _teacher_data(recipe, params, teacher_tokenizer)
    console.print(f"[bold]{recipe.name}[/] -> {out_dir}\n{data.description}")
    if recipe.teacher is not None and recipe.teacher.served is not None:
        return _prepare_served(recipe, data, console)
    if crossing:
        return _prepare_cross_tokenizer(recipe, data, teacher_data, run_folder, progress, console)

    evaluator = LMEvaluator(data, batch_size=recipe.data.eval_batch_size)
    # Tokenizers and vocabulary sizes are checked before any teacher is trained or loaded.
    probe = build_lm_model(recipe.student, tokenizer, "student")
    from_cache = recipe.teacher is not None and recipe.teacher.cache is not None
    from_folder = recipe.teacher is not None and recipe.teacher.params.get("path") is not None
    probe_teacher = (
        build_lm_model(recipe.teacher, tokenizer, "teacher", for_training=True)
        if recipe.teacher is not None and not (from_folder or from_cache)
        else None
    )
    for role, model in (("student", probe), ("teacher", probe_teacher)):
        if model is not None:
            check_context(model, data, role)
    vocabulary = shared_vocabulary(teacher_tokenizer, tokenizer, probe_teacher, probe)
    del probe_teacher
    teacher, teacher_info = None, None
    if from_cache:
        cache = open_recipe_cache(
            recipe,
            data=dataset_fingerprint(data.train),
            vocab=vocabulary,
            tokenizer=tokenizer_fingerprint(tokenizer),
        )
        return LMSetup(data, tokenizer, None, cache_teacher_info(cache), vocabulary, evaluator, cache)
    if recipe.teacher is not None:
        teacher, teacher_info = obtain_lm_teacher(recipe, data, run_folder, progress, evaluator)
    if from_folder:
        vocabulary = shared_vocabulary(teacher_tokenizer, tokenizer, teacher, probe)
    if teacher is not None:
        slice_logits(teacher, vocabulary)
        if teacher_info is not None and not teacher_info.metrics:
            teacher_info.metrics = evaluator(teacher)
        teacher.eval().requires_grad_(False)
    del probe
    return LMSetup(data, tokenizer, teacher, teacher_info, vocabulary, evaluator)


def _prepare_served(recipe: Recipe, data: LMData, console: Console) -> LMSetup:
    """A teacher behind an endpoint (`distill.teachers.served`): it shares the student's tokenizer, so the
    vocabulary is the student's; nothing is trained or loaded here."""
    assert recipe.teacher is not None and recipe.teacher.served is not None
    served = recipe.teacher.served
    evaluator = LMEvaluator(data, batch_size=recipe.data.eval_batch_size)
    probe = build_lm_model(recipe.student, data.tokenizer, "student")
    check_context(probe, data, "student")
    vocabulary = shared_vocabulary(None, data.tokenizer, None, probe)
    del probe
    teacher = ServedTeacher(Endpoint(**served.model_dump()), data.tokenizer, vocabulary)
    console.print(f"served teacher: {served.model} at {served.url} ({served.protocol}, top-{served.top_k})")
    info = TeacherInfo("served", 0, {}, 0.0, [])
    return LMSetup(data, data.tokenizer, None, info, vocabulary, evaluator, served=teacher)


def _teacher_data(recipe: Recipe, params: dict[str, Any], tokenizer: Any) -> LMData:
    """The recipe's data in the teacher's tokens (a tokenizer, a folder, or `{bpe: ...}` trained here on the
    training split): what a teacher with its own tokenizer trains and is evaluated on."""
    data = build_data(recipe.data.name, **{**params, "tokenizer": tokenizer})
    if not isinstance(data, LMData):
        raise UserError(f"data '{recipe.data.name}' is not a language-model data set")
    return data


def _prepare_cross_tokenizer(
    recipe: Recipe,
    data: LMData,
    teacher_data: LMData,
    folder: RunFolder,
    progress: bool,
    console: Console,
) -> LMSetup:
    """A teacher with its own tokenizer: trained (or loaded) on the text in its own tokens, evaluated there,
    and wrapped so that it reads each student batch's text in its tokens (`CrossTokenizerTeacher`)."""
    assert recipe.teacher is not None
    tokenizer, teacher_tokenizer = data.tokenizer, teacher_data.tokenizer
    console.print(
        f"cross-tokenizer: teacher tokenizer {describe(teacher_tokenizer)}, student {describe(tokenizer)}"
    )
    evaluator = LMEvaluator(data, batch_size=recipe.data.eval_batch_size)
    teacher_evaluator = LMEvaluator(teacher_data, batch_size=recipe.data.eval_batch_size)
    probe = build_lm_model(recipe.student, tokenizer, "student")
    check_context(probe, data, "student")
    vocabulary = shared_vocabulary(None, tokenizer, None, probe)
    del probe
    from_folder = recipe.teacher.params.get("path") is not None
    if not from_folder:
        check_context(
            build_lm_model(recipe.teacher, teacher_tokenizer, "teacher", for_training=True),
            teacher_data,
            "teacher",
        )
    teacher, teacher_info = obtain_lm_teacher(recipe, teacher_data, folder, progress, teacher_evaluator)
    slice_logits(teacher, shared_vocabulary(None, teacher_tokenizer, None, teacher))
    if not teacher_info.metrics:
        teacher_info.metrics = teacher_evaluator(teacher)
    teacher.eval().requires_grad_(False)
    positions = getattr(getattr(teacher, "config", None), "max_position_embeddings", None)
    retokenizer = Retokenizer.for_pair(
        tokenizer, teacher_tokenizer, positions if isinstance(positions, int) else None
    )
    return LMSetup(data, tokenizer, teacher, teacher_info, vocabulary, evaluator, retokenizer=retokenizer)


class CausalLMTask(Task):
    name = "causal_lm"
    serves_served_teacher = True

    def claims(self, recipe: Recipe) -> bool:
        """A recipe is a language model's when its data set or its student is one."""
        return recipe.data.name in LM_DATA_SETS or recipe.student.name in LM_MODELS

    def check(self, recipe: Recipe) -> None:
        """Student and teacher must be causal LMs; the language-model sources only (`LM_SOURCES`; the schema
        validated their parameters); no method's teacher regime (those need a classifier's peer)."""
        for spec, role in ((recipe.student, "student"), (recipe.teacher, "teacher")):
            refuse_other_models(spec, role)
            refuse_other_folders(spec, role)
        served = recipe.teacher is not None and recipe.teacher.served is not None
        for method in recipe.method_list():
            source = method.source or recipe.source
            if served and source.name != "dataset":
                raise UserError(
                    f"method '{method.name}': a served teacher scores the data set's sequences; source "
                    f"'{source.name}' needs a local teacher"
                )
            if source.name not in LM_SOURCES:
                raise UserError(
                    f"method '{method.name}': source '{source.name}' serves classifiers; a language model "
                    f"takes {', '.join(LM_SOURCES)}"
                )
            if method.teacher is not None:
                raise UserError(
                    f"method '{method.name}': teacher kind '{method.teacher.kind}' is not available for "
                    "language models yet; use the recipe's teacher"
                )

    def prepare(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> TaskSetup:
        lm = prepare_lm_run(recipe, folder, progress=progress, console=console)
        teacher: Any = CachedTeacher(lm.cache) if lm.cache is not None else lm.teacher
        if lm.served is not None:
            teacher = lm.served
        if lm.retokenizer is not None and lm.teacher is not None:
            teacher = CrossTokenizerTeacher(lm.teacher, lm.retokenizer)
        return TaskSetup(
            lm.data,
            lm.data.train,
            teacher,
            lm.teacher_info,
            fit_settings={"evaluator": lm.evaluator},
            extra={"lm": lm, "sources": {}, "samples": {}, "generations": {}},
        )

    def build_student(self, recipe: Recipe, setup: TaskSetup) -> nn.Module:
        lm: LMSetup = setup.extra["lm"]
        return slice_logits(build_lm_model(recipe.student, lm.tokenizer, "student"), lm.vocabulary)

    def student_parameters(self, student: nn.Module) -> int:
        return count_parameters(student, trainable_only=True)

    def plan_method(
        self, recipe: Recipe, method: MethodSpec, setup: TaskSetup, folder: RunFolder
    ) -> MethodPlan:
        lm: LMSetup = setup.extra["lm"]
        source = method.source or recipe.source
        onpolicy = None  # student rollouts, OPSD, SODA, MixSD: `distill.sources`
        if source.name in ONPOLICY_SOURCES:
            onpolicy = SourcePlan(
                source.name, source.params, method.name, data=lm.data, teacher=lm.teacher, out_dir=folder.path
            )
            train_set, generation = onpolicy.train_set, onpolicy.info
        else:
            train_set, generation = _source_data(
                source, lm.data, lm.teacher, folder.path, setup.extra["sources"], method.name
            )
        if generation:
            setup.extra["generations"][method.name] = generation
        train_tokens = train_set.counted_tokens()
        if lm.cache is not None:
            if train_set is not lm.data.train:
                raise UserError(
                    f"method '{method.name}': a teacher cache covers the data set, not '{source.name}'"
                )
            train_set = IndexedDataset(train_set)
        epochs = recipe.trainer.epochs

        def start(student: nn.Module, seed: int, terms: list[Term]) -> SeedPlan:
            lm.evaluator.samples = []  # this student's generations only, never the teacher's
            run = onpolicy.start(student, seed, terms) if onpolicy is not None else None

            def finish(result: FitResult, epochs_: int) -> None:
                seconds = max(result.train_seconds, 1e-9)
                for row in (result.final, result.best):
                    row["tokens_per_second"] = train_tokens * epochs / seconds
                if run is not None:  # the tokens actually trained on, generation and teacher costs
                    run.finish(result, epochs_)

            if run is None:
                return SeedPlan(train_set, setup.teacher, terms, finish=finish)
            return SeedPlan(run.train_set, run.teacher, run.terms, run.batch_transform, finish)

        return MethodPlan(train_set, generation, start)

    def finish_seed(self, recipe: Recipe, method: MethodSpec, result: FitResult, setup: TaskSetup) -> None:
        """The student's greedy samples for the report: from its last evaluation, kept beside its checkpoints
        so that a resumed run whose student was already finished reports them too."""
        samples = list(setup.extra["lm"].evaluator.samples)
        stored = result.run_dir / "samples.json" if result.run_dir is not None else None
        if samples and stored is not None:
            atomic_write_json(stored, samples)
        elif stored is not None and stored.exists():
            samples = json.loads(stored.read_text())
        setup.extra["samples"][method.name] = samples

    def describe(self, metrics: dict[str, float]) -> str:
        return describe_metrics(metrics) if "perplexity" in metrics else "not evaluated"

    def result_extra(self, setup: TaskSetup) -> dict[str, Any]:
        lm: LMSetup = setup.extra["lm"]
        return {
            "samples": setup.extra["samples"],
            "generations": setup.extra["generations"],
            "vocabulary": lm.vocabulary,
        }

    def cache_source(
        self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console
    ) -> CacheSource:
        lm = prepare_lm_run(recipe, folder, progress=progress, console=console)
        teacher: Any = lm.served if lm.served is not None else lm.teacher
        assert teacher is not None
        if lm.retokenizer is not None:
            raise UserError(
                "a teacher with its own tokenizer cannot be cached; it runs live (uld, aligned_kd)"
            )
        return CacheSource(
            lm.data.train,
            teacher,
            lm.teacher_info,
            "lm",
            lm.vocabulary or len(lm.tokenizer),
            dataset_fingerprint(lm.data.train),
            tokenizer_fingerprint(lm.tokenizer),
        )

    def write_report(self, result: ExperimentResult) -> Path:
        from distill.tasks.causal_lm_report import write_lm_report

        return write_lm_report(result)

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        from distill.tasks.causal_lm_report import print_lm_table

        print_lm_table(result, console)


TASKS.add("causal_lm", CausalLMTask, summary="causal language models (per-token metrics, generation)")

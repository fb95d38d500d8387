"""`distill search`: rank candidate students for a recipe's teacher without training them (S18 DisWOT).

"DisWOT: Student Architecture Search for Distillation WithOut Training" (Dong, Li & Wei, CVPR 2023). Each
candidate (a student config in the recipe's `student` schema) is built at random initialisation and fed
one mini-batch of the recipe's training data beside the teacher; the score is minus the sum of two
distances (`distill.losses.diswot`): between the sample Gram matrices of the two models' last feature maps
(relation) and between the class Gram matrices of their classifiers' cross-entropy gradients (semantic).
A higher score predicts a better student after distillation. Nothing is trained, unless `teacher="trained"`
asks for the recipe's teacher as `distill run` gets it (checkpoint, run cache, or trained now and cached).

As in the official code, every convolution and linear weight is redrawn from N(0, 1) (biases 0, norm layers
1 / 0) before a model is read (`init="gaussian"`; `"default"` keeps the zoo's own initialisation), and a
random-initialised model is read with batch statistics (its norm layers in training mode, dropout off); a
trained teacher is read in eval mode. The features read are a model's last two feature taps
(`feature_layers()`: the last stage's map and the classifier's input); the classifier must be linear on
the latter (true of the whole zoo).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import ValidationError
from rich.console import Console
from torch import Tensor, nn

from distill.errors import UserError, clipped, shown
from distill.io import atomic_write_text
from distill.losses.diswot import diswot_relation, diswot_semantic, linear_classifier_gradient
from distill.models import count_parameters
from distill.models.cifar import feature_layers_of
from distill.models.hooks import FeatureHooks
from distill.recipe.load import RecipeLoader, describe_validation_error, expanded_size
from distill.recipe.schema import ModelSpec, Recipe
from distill.registry import nearest
from distill.runfolder import RunFolder, holds_run, read_manifest
from distill.tables import markdown_table, rich_table

PAPER = "DisWOT: Student Architecture Search for Distillation WithOut Training (Dong, Li & Wei, CVPR 2023)"
TEACHER_MODES = ("random", "trained")
INITS = ("gaussian", "default")
MAX_CANDIDATES = 1000
SEARCH_FILE = "search.md"
HEADERS = ["rank", "candidate", "parameters", "score", "semantic M_s", "relation M_r"]


@dataclass(frozen=True)
class SearchSettings:
    """How candidates are scored: the mini-batch size, the teacher (`random`: the paper's random-initialised
    teacher; `trained`: the recipe's), the initialisation, the seed of the batch and of the random draws, and
    how many independent draws each score averages (the official code: 1)."""

    batch_size: int = 64
    teacher: Literal["random", "trained"] = "random"
    init: Literal["gaussian", "default"] = "gaussian"
    seed: int = 0
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_MODES:
            raise UserError(
                f"--teacher: expected one of {', '.join(TEACHER_MODES)}, got {shown(self.teacher)}"
            )
        if self.init not in INITS:
            raise UserError(f"--init: expected one of {', '.join(INITS)}, got {shown(self.init)}")
        if not 2 <= self.batch_size <= 100_000:
            raise UserError(f"--batch-size: expected a whole number from 2 to 100000, got {self.batch_size}")
        if not 1 <= self.repeats <= 100:
            raise UserError(f"--repeats: expected a whole number from 1 to 100, got {self.repeats}")


# ------------------------------------------------------------------------------------------ candidates


def parse_candidates(text: str, source: str) -> list[ModelSpec]:
    """A YAML list of student configs (`{name, params}` as in a recipe's `student`), validated; a mistake is
    one line naming the item."""
    try:
        loader = RecipeLoader(text)
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({clipped(str(err).splitlines()[0], 200)})") from None
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node, {}, set()) > 50_000:
            raise UserError(f"{source}: the file expands to too many values through its aliases")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}{where}: {err.problem or err}".rstrip()) from None
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{source}: the file nests too deeply") from None
    except Exception as err:  # other YAML errors, an alias that contains itself
        raise UserError(
            f"{source}: not readable YAML ({clipped(str(err), 200) or type(err).__name__})"
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, list) or not data:
        got = "nothing" if data is None else ("an empty list" if data == [] else type(data).__name__)
        raise UserError(f"{source}: expected a YAML list of student configs (- name: resnet8 ...), got {got}")
    if len(data) > MAX_CANDIDATES:
        raise UserError(f"{source}: {len(data)} candidates; at most {MAX_CANDIDATES} per search")
    specs = []
    for index, item in enumerate(data):
        where = f"{source}: candidates[{index}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping with name (and params), got {shown(item)}")
        try:
            spec = ModelSpec.model_validate(item)
        except ValidationError as err:
            raise UserError(candidate_error(err, where)) from None
        if spec.checkpoint is not None:
            raise UserError(f"{where}: checkpoint: a candidate is scored at random initialisation; remove it")
        specs.append(spec)
    return specs


def candidate_error(err: ValidationError, where: str) -> str:
    """One line for the first problem pydantic found in a candidate (unknown keys get a hint)."""
    first = err.errors()[0]
    if first["type"] == "extra_forbidden":
        key = clipped(str(first["loc"][-1]))
        hint = nearest(key, list(ModelSpec.model_fields))
        return f"{where}: {key}: unknown key" + (f"; did you mean '{hint}'?" if hint else "")
    return describe_validation_error(err, where)


def load_candidates(path: Path) -> list[ModelSpec]:
    if not path.exists():
        raise UserError(f"candidates file not found: {clipped(str(path), 200)}")
    if path.is_dir():
        raise UserError(f"candidates {clipped(str(path), 200)} is a folder; give a YAML file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"candidates {clipped(str(path), 200)} is not UTF-8 text: give a YAML file") from None
    except OSError as err:
        raise UserError(f"cannot read candidates {path}: {err.strerror}") from None
    return parse_candidates(text, str(path))


def candidate_label(spec: ModelSpec) -> str:
    """`resnet8`, `small_cnn channels=[16, 32]`: the name and its parameters, short."""
    params = " ".join(f"{key}={value}" for key, value in spec.params.items())
    return clipped(f"{spec.name} {params}".strip(), 80)


# ------------------------------------------------------------------------------------------ scoring


def gaussian_init_(model: nn.Module) -> nn.Module:
    """The official code's re-initialisation: conv and linear weights N(0, 1), biases 0, norm layers 1 / 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                nn.init.normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
    return model


@dataclass
class Probe:
    """What DisWOT reads of one model on the batch: the last feature map, the classifier input, the logits."""

    feature_map: Tensor
    pooled: Tensor
    logits: Tensor


def taps_of(model: nn.Module, role: str) -> tuple[str, str]:
    taps = feature_layers_of(model)
    if len(taps) < 2:
        raise UserError(
            f"{role} ({type(model).__name__}) names no feature taps (feature_layers); DisWOT reads a model's "
            "last feature map and its classifier's input"
        )
    return taps[-2], taps[-1]


def probe(model: nn.Module, inputs: Tensor, role: str, *, batch_statistics: bool) -> Probe:
    """Run `model` once on `inputs` and keep its last two feature taps and logits (no gradient)."""
    last_map, pooled = taps_of(model, role)
    was_training = model.training
    model.eval()
    if batch_statistics:  # random weights: normalise with the batch's statistics, as the official code does
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    try:
        with FeatureHooks(model, [last_map, pooled], detach=True) as hooks, torch.no_grad():
            logits = model(inputs)
            features = dict(hooks.features)
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise UserError(f"{role}: expected (N, classes) logits, got {type(logits).__name__}")
    return Probe(features[last_map], features[pooled].flatten(1), logits)


def distances(student: Probe, teacher: Probe, labels: Tensor) -> tuple[float, float]:
    """(semantic M_s, relation M_r) of a student's probe against the teacher's."""
    if student.logits.shape[1] != teacher.logits.shape[1]:
        raise UserError(
            f"a candidate predicts {student.logits.shape[1]} classes, the teacher {teacher.logits.shape[1]}"
        )
    semantic = diswot_semantic(
        linear_classifier_gradient(student.pooled, student.logits, labels),
        linear_classifier_gradient(teacher.pooled, teacher.logits, labels),
    )
    relation = diswot_relation(student.feature_map, teacher.feature_map, labels)
    return float(semantic), float(relation)


def draw_seed(seed: int, repeat: int, index: int) -> int:
    """The torch seed of one model's random draw (the teacher is index -1)."""
    return (seed * 1_000_003 + repeat * 10_007 + index + 1) % (2**63)


def drawn(
    build: Callable[[ModelSpec], nn.Module], spec: ModelSpec, settings: SearchSettings, seed: int
) -> nn.Module:
    """A fresh model of `spec` drawn with torch seed `seed` (redrawn N(0, 1) under `init="gaussian"`)."""
    torch.manual_seed(seed)
    model = build(spec)
    return gaussian_init_(model) if settings.init == "gaussian" else model


def score_candidates(
    build: Callable[[ModelSpec], nn.Module],
    candidates: Sequence[ModelSpec],
    teacher: nn.Module | ModelSpec,
    inputs: Tensor,
    labels: Tensor,
    settings: SearchSettings,
) -> list[tuple[float, float]]:
    """(semantic, relation) of every candidate, averaged over `settings.repeats` random draws. `build(spec)`
    makes a fresh model of a spec; `teacher` is a trained model (read in eval mode, once) or a spec (drawn
    at random, once per repeat, and shared by every candidate of that repeat)."""
    totals = [[0.0, 0.0] for _ in candidates]
    fixed = None
    if isinstance(teacher, nn.Module):
        fixed = probe(teacher, inputs, "the teacher", batch_statistics=False)
    with torch.random.fork_rng(devices=[]):  # the draws leave the caller's random state as it was
        for repeat in range(settings.repeats):
            reference = fixed or probe(
                drawn(build, teacher, settings, draw_seed(settings.seed, repeat, -1)),  # type: ignore[arg-type]
                inputs,
                "the teacher",
                batch_statistics=True,
            )
            for index, spec in enumerate(candidates):
                role = f"candidates[{index}] ({spec.name})"
                student = drawn(build, spec, settings, draw_seed(settings.seed, repeat, index))
                read = probe(student, inputs, role, batch_statistics=True)
                try:
                    semantic, relation = distances(read, reference, labels)
                except UserError as err:
                    raise UserError(f"{role}: {err}") from None
                totals[index][0] += semantic / settings.repeats
                totals[index][1] += relation / settings.repeats
    return [(semantic, relation) for semantic, relation in totals]


# ------------------------------------------------------------------------------------------ the search


@dataclass
class Candidate:
    index: int
    spec: ModelSpec
    parameters: int
    semantic: float
    relation: float

    @property
    def label(self) -> str:
        return candidate_label(self.spec)

    @property
    def score(self) -> float:
        return -(self.semantic + self.relation)


@dataclass
class SearchResult:
    recipe: str
    settings: SearchSettings
    teacher: str
    teacher_parameters: int
    data: str
    batch: int
    ranked: list[Candidate]
    seconds: float
    written: Path | None = None
    notes: list[str] = field(default_factory=list)


def training_batch(dataset: Any, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """`size` labelled rows of `dataset` in a seeded random order (all of them when it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = [], []
    for i in torch.randperm(len(dataset), generator=generator).tolist():
        x, y = dataset[i][:2]
        if int(y) < 0:  # a hidden label (semi-supervised split): the semantic term needs the label
            continue
        inputs.append(torch.as_tensor(x))
        labels.append(int(y))
        if len(labels) == size:
            break
    if len(labels) < 2:
        raise UserError("search: the training split has fewer than 2 labelled rows to score candidates on")
    return torch.stack(inputs), torch.tensor(labels)


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Best score first; a NaN score (never expected) last."""
    return sorted(candidates, key=lambda c: (math.isnan(c.score), -c.score if not math.isnan(c.score) else 0))


def run_search(
    recipe: Recipe,
    candidates: Sequence[ModelSpec],
    settings: SearchSettings,
    *,
    out: Path | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> SearchResult:
    """Score and rank `candidates` as students of `recipe`'s teacher; the table goes to `out` (a markdown
    file) or, without one, to `search.md` in the recipe's run folder (`run_folder`)."""
    from distill.data import build_data
    from distill.models import build_model
    from distill.tasks import task_for
    from distill.tasks.classification import build_recipe_model, check_labels, obtain_teacher

    console = console or Console(stderr=True)
    started = time.perf_counter()
    task = task_for(recipe)
    if task.name != "classification":
        raise UserError(f"search: ranks classifiers; this recipe's task is {task.name}")
    spec = recipe.teacher
    if spec is None or spec.name is None:
        raise UserError("search: the recipe needs a teacher model (name); DisWOT scores students against it")
    if out is not None and out.is_dir():
        raise UserError(f"--out {clipped(str(out), 200)} is a folder; give the markdown file to write")
    data = build_data(recipe.data.name, **recipe.data.params)
    check_labels(data)

    def build(model: ModelSpec) -> nn.Module:
        return build_model(
            model.name, num_classes=data.num_classes, input_shape=data.input_shape, **model.params
        )

    built = []
    for index, candidate in enumerate(candidates):  # every mistake before any teacher trains
        try:
            built.append(count_parameters(build(candidate)))
        except UserError as err:
            raise UserError(f"candidates[{index}]: {err}") from None
    # The recipe's run folder: where a teacher that must train trains, and where search.md goes without --out.
    folder = run_folder(recipe) if out is None or settings.teacher == "trained" else None
    teacher: nn.Module | ModelSpec = ModelSpec(name=spec.name, params=spec.params)
    try:
        if settings.teacher == "trained":
            model, info = obtain_teacher(recipe, data, folder, progress)  # type: ignore[arg-type]
            teacher, teacher_parameters = model, info.parameters
            note = f"the recipe's teacher, trained ({info.source})"
        else:
            teacher_parameters = count_parameters(build_recipe_model(spec, data, "teacher"))
            note = "the teacher's architecture at random initialisation (the paper's setting)"
        inputs, labels = training_batch(data.train, settings.batch_size, settings.seed)
        scores = score_candidates(build, candidates, teacher, inputs, labels, settings)
        rows = [Candidate(i, c, built[i], *scores[i]) for i, c in enumerate(candidates)]
        result = SearchResult(
            recipe=recipe.name,
            settings=settings,
            teacher=candidate_label(ModelSpec(name=spec.name, params=spec.params)),
            teacher_parameters=teacher_parameters,
            data=data.description,
            batch=len(labels),
            ranked=ranked(rows),
            seconds=time.perf_counter() - started,
            notes=[note],
        )
        result.written = write_search(result, out, folder)
    finally:
        if folder is not None:
            folder.release()
    return result


def run_folder(recipe: Recipe) -> RunFolder:
    """The recipe's `output.dir` (the search joins a run already there), else a new `runs/<name>/<time>`;
    nothing is created until something is written."""
    from distill.experiment import open_run_folder

    there = recipe.output.dir is not None and holds_run(Path(recipe.output.dir))
    return open_run_folder(recipe, out=None, resume=there, overwrite=False)


def write_search(result: SearchResult, out: Path | None, folder: RunFolder | None) -> Path:
    """The ranking as markdown in `out`, or as `search.md` in the run folder (listed in its manifest; a
    `search.md` of the user's there is never overwritten)."""
    if out is None:
        assert folder is not None
        out = folder.path / SEARCH_FILE
        if out.exists() and SEARCH_FILE not in (read_manifest(folder.path) or []):
            raise UserError(f"{out} exists and is not a distill search's; give --out")
        folder.claim()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, search_markdown(result))
    if folder is not None and out == folder.path / SEARCH_FILE:
        folder.record([SEARCH_FILE])
    return out


# ------------------------------------------------------------------------------------------ tables


def table_rows(result: SearchResult) -> list[list[str]]:
    return [
        [
            str(rank),
            c.label,
            f"{c.parameters:,}",
            f"{c.score:.4f}",
            f"{c.semantic:.4f}",
            f"{c.relation:.4f}",
        ]
        for rank, c in enumerate(result.ranked, start=1)
    ]


def search_markdown(result: SearchResult) -> str:
    s = result.settings
    return (
        f"# DisWOT search: {result.recipe}\n\n"
        f"- {PAPER}; score = -(M_s + M_r), higher is better (`distill.losses.diswot`).\n"
        f"- Teacher `{result.teacher}` ({result.teacher_parameters:,} parameters): "
        f"{'; '.join(result.notes)}.\n"
        f"- Data: {result.data}; one training batch of {result.batch} labelled rows (seed {s.seed}).\n"
        f"- Initialisation `{s.init}`; {s.repeats} random draw(s) averaged per score; "
        f"{len(result.ranked)} candidates in {result.seconds:.1f} s.\n\n"
        + markdown_table(HEADERS, table_rows(result))
    )


def print_search(result: SearchResult, console: Console) -> None:
    console.print(rich_table(f"DisWOT search: {result.recipe}", HEADERS, table_rows(result)))
    if result.written is not None:
        console.print(f"ranking: {result.written}", highlight=False, soft_wrap=True, markup=False)


__all__ = [
    "Candidate",
    "Probe",
    "SearchResult",
    "SearchSettings",
    "candidate_label",
    "distances",
    "gaussian_init_",
    "load_candidates",
    "parse_candidates",
    "print_search",
    "probe",
    "run_search",
    "score_candidates",
    "search_markdown",
    "training_batch",
]

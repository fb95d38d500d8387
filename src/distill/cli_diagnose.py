"""`distill diagnose alignment`: how well a distillation signal points where the student should go
("Unmasking On-Policy Distillation: Where It Helps, Where It Hurts, and Why", Armandpour et al., 2026).

For a node h (a question and the first j tokens of one of the student's rollouts), the student's success
probability is V(h) = sum_v pi(v | h) Q(h, v), Q(h, v) the chance that a rollout continued from h + v ends
in the right answer. The ideal per-node gradient is the direction that raises V fastest through this node's
next-token distribution; with respect to the node's logits z,

    g*(h) = d V / d z = pi (.) (Q - V),

and, in parameter space, J^T g*(h) with J = dz/dtheta. Q is estimated by targeted rollouts: for the student's
top candidates at h (and the token it took), `targeted` rollouts each continue from h + v. Tokens outside the
candidates get Q = V, so they pull neither way. The distillation gradient at h is -d D / d z (or its
parameter form) of a token-level divergence D between the teacher's and the student's next-token
distributions; the alignment score is the cosine of the two, reported separately for nodes of correct and
of incorrect rollouts (the paper finds it higher on incorrect ones).

Teachers: the recipe's (`--teacher recipe`), or the student itself given the verified solution in context
(`--teacher privileged`, OPSD's self-teacher).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

diagnose_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Diagnostics of distillation signals (training-free)."
)


@dataclass(frozen=True)
class AlignmentSettings:
    questions: int = 8
    rollouts: int = 4  # student rollouts per question
    nodes: int = 4  # nodes (positions) per rollout
    candidates: int = 4  # top tokens of the student at a node, plus the one it took
    targeted: int = 4  # rollouts per candidate
    divergence: str = "reverse_kl"
    space: str = "logits"  # or "params"
    temperature: float = 1.0
    seed: int = 0


@dataclass
class NodeScore:
    question: int
    rollout: int
    position: int
    correct: bool
    success: float  # V(h)
    cosine: float


@dataclass
class AlignmentReport:
    settings: AlignmentSettings
    nodes: list[NodeScore] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, keep in (("incorrect", False), ("correct", True)):
            values = [n.cosine for n in self.nodes if n.correct == keep and not math.isnan(n.cosine)]
            mean = sum(values) / len(values) if values else math.nan
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else math.nan
            out[name] = {
                "nodes": float(len(values)),
                "mean": mean,
                "std": math.sqrt(var) if var == var else math.nan,
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "summary": self.summary(),
            "nodes": [asdict(n) for n in self.nodes],
        }


def _distill_direction(z: Any, teacher_z: Any, divergence: str) -> Any:
    """-dD/dz as a differentiable scalar's gradient target: returns D(z) (to be differentiated)."""
    from distill.objectives import StepOutputs, build_objective

    objective = build_objective(divergence)
    return objective(StepOutputs(student_logits=z[None], teacher_logits=teacher_z[None].detach()))


def gradient_alignment(
    student: Any,
    tokenizer: Any,
    examples: list[Any],
    teacher_logits: Callable[[int, list[int]], Any],
    settings: AlignmentSettings,
    *,
    max_new_tokens: int,
) -> AlignmentReport:
    """The alignment report for `examples` (with references). `teacher_logits(example_index, completion)`
    gives the teacher's next-token logits after the question and `completion` (a token list)."""
    import torch

    from distill.data.text import reference_answer
    from distill.sources.batching import seed_for
    from distill.sources.generations import generate

    report = AlignmentReport(settings)
    rng = random.Random(settings.seed)
    eos = tokenizer.eos_token_id
    params = [p for p in student.parameters() if p.requires_grad]
    student.eval()

    def solved(completion: list[int], index: int) -> bool:
        text = tokenizer.decode(completion, skip_special_tokens=True)
        return reference_answer(text) == reference_answer(examples[index].reference)

    def success(index: int, prefix: list[int], token: int, tag: tuple) -> float:
        prompt = examples[index].ids[: examples[index].prompt_len]
        start = prefix + [token]
        left = max_new_tokens - len(start)
        if token == eos or left <= 0:
            return float(solved(start, index))
        runs = generate(
            student,
            tokenizer,
            [prompt + start] * settings.targeted,
            max_new_tokens=left,
            do_sample=True,
            temperature=settings.temperature,
            seed=seed_for("targeted", settings.seed, *tag),
            batch_size=settings.targeted,
        )
        return sum(solved(start + r, index) for r in runs) / settings.targeted

    for q, example in enumerate(examples[: settings.questions]):
        prompt = example.ids[: example.prompt_len]
        rollouts = generate(
            student,
            tokenizer,
            [prompt] * settings.rollouts,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=settings.temperature,
            seed=seed_for("rollouts", settings.seed, q),
            batch_size=settings.rollouts,
        )
        for r, rollout in enumerate(rollouts):
            correct = solved(rollout, q)
            positions = sorted(rng.sample(range(len(rollout)), min(settings.nodes, len(rollout))))
            for j in positions:
                prefix = rollout[:j]
                ids = torch.tensor([prompt + prefix])
                z = student(input_ids=ids).logits[0, -1].float()
                pi = torch.softmax(z.detach() / settings.temperature, -1)
                chosen = set(pi.topk(min(settings.candidates, pi.numel())).indices.tolist()) | {rollout[j]}
                q_values = {v: success(q, prefix, v, (q, r, j, v)) for v in sorted(chosen)}
                mass = sum(float(pi[v]) for v in q_values)
                value = sum(float(pi[v]) * s for v, s in q_values.items()) / max(mass, 1e-12)
                q_full = torch.full_like(pi, value)
                for v, s in q_values.items():
                    q_full[v] = s
                ideal = pi * (q_full - (pi * q_full).sum())  # dV/dz
                loss = _distill_direction(z, teacher_logits(q, prefix).float(), settings.divergence)
                if settings.space == "params":
                    g_ideal = torch.autograd.grad((z * ideal).sum(), params, retain_graph=True)
                    g_distill = torch.autograd.grad(-loss, params)
                    a = torch.cat([g.flatten() for g in g_ideal])
                    b = torch.cat([g.flatten() for g in g_distill])
                else:
                    a, b = ideal, -torch.autograd.grad(loss, z)[0]
                denominator = float(a.norm() * b.norm())
                cosine = float(a @ b) / denominator if denominator > 0 else math.nan
                report.nodes.append(NodeScore(q, r, j, correct, value, cosine))
    return report


def _privileged_teacher(model: Any, tokenizer: Any, examples: list[Any]) -> Callable[[int, list[int]], Any]:
    import torch

    from distill.sources.context import DEFAULT_TEMPLATE, privileged_prompts

    contexts = privileged_prompts(tokenizer, examples, DEFAULT_TEMPLATE)

    @torch.no_grad()
    def logits(index: int, completion: list[int]) -> Any:
        return model(input_ids=torch.tensor([contexts[index] + completion])).logits[0, -1]

    return logits


def _external_teacher(model: Any, examples: list[Any]) -> Callable[[int, list[int]], Any]:
    import torch

    @torch.no_grad()
    def logits(index: int, completion: list[int]) -> Any:
        prompt = examples[index].ids[: examples[index].prompt_len]
        return model(input_ids=torch.tensor([prompt + completion])).logits[0, -1]

    return logits


@diagnose_app.command("alignment")
def alignment(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="a language-model recipe (data, student, teacher)")
    ],
    teacher: Annotated[
        str, typer.Option("--teacher", help="recipe | privileged (the student given the solution)")
    ] = "recipe",
    student_checkpoint: Annotated[
        Path | None, typer.Option("--student-checkpoint", help="student weights (safetensors) to diagnose")
    ] = None,
    divergence: Annotated[
        str, typer.Option("--divergence", help="token-level divergence of the signal")
    ] = "reverse_kl",
    space: Annotated[str, typer.Option("--space", help="logits | params")] = "logits",
    questions: Annotated[int, typer.Option("--questions", min=1)] = 8,
    rollouts: Annotated[int, typer.Option("--rollouts", min=1)] = 4,
    nodes: Annotated[int, typer.Option("--nodes", min=1)] = 4,
    candidates: Annotated[int, typer.Option("--candidates", min=1)] = 4,
    targeted: Annotated[int, typer.Option("--targeted", min=1, help="rollouts per candidate token")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1)] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="write the per-node scores as JSON")] = None,
) -> None:
    """Gradient alignment between the ideal per-node gradient (targeted rollouts) and a distillation
    gradient, split by correct and incorrect student rollouts."""
    import tempfile

    import torch
    from rich.console import Console

    from distill.data.tokenizers import slice_logits
    from distill.errors import UserError, clipped
    from distill.objectives import OBJECTIVES
    from distill.recipe import load_recipe
    from distill.recipe.check import check_recipe
    from distill.recipe.data_files import check_data_files
    from distill.registry import unknown_name_message
    from distill.tasks.causal_lm import build_lm_model, prepare_lm_run
    from distill.tasks.teacher_store import load_weights

    for option, value, choices in (
        ("--teacher", teacher, ("recipe", "privileged")),
        ("--space", space, ("logits", "params")),
        ("--divergence", divergence, OBJECTIVES.names()),
    ):
        if value not in choices:
            raise UserError(f"{option}: {unknown_name_message(option.lstrip('-'), clipped(value), choices)}")
    loaded = load_recipe(recipe)
    check_recipe(loaded, str(recipe))
    check_data_files(loaded, str(recipe))
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="distill-diagnose-") as tmp:
        setup = prepare_lm_run(loaded, Path(tmp), progress=False, console=console)
    data = setup.data
    torch.manual_seed(seed)
    student = build_lm_model(loaded.student, data.tokenizer, "student")
    if setup.vocabulary is not None:
        slice_logits(student, setup.vocabulary)
    if student_checkpoint is not None:
        load_weights(student, student_checkpoint, "student")
    examples = [e for e in data.test.examples if e.reference is not None]
    if not examples:
        raise UserError("diagnose alignment needs a data set with answers (exact match)")
    if teacher == "recipe":
        if setup.teacher is None:
            raise UserError("the recipe has no teacher; use --teacher privileged")
        teacher_fn = _external_teacher(setup.teacher, examples)
    else:
        teacher_fn = _privileged_teacher(student, data.tokenizer, examples)
    settings = AlignmentSettings(
        questions, rollouts, nodes, candidates, targeted, divergence, space, 1.0, seed
    )
    report = gradient_alignment(
        student, data.tokenizer, examples, teacher_fn, settings, max_new_tokens=data.max_new_tokens
    )
    for name, row in report.summary().items():
        typer.echo(
            f"{name:>9} rollouts: {int(row['nodes'])} nodes, alignment {row['mean']:.3f} ± {row['std']:.3f}"
        )
    if out is not None:
        out.write_text(json.dumps(report.to_json(), indent=1))
        typer.echo(f"wrote {out}")

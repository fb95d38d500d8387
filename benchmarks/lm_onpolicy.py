"""On-policy distillation benchmark: where the prefixes come from, on the `arithmetic` task, and MixSD on a
fact-injection task.

arithmetic (2-digit additions with a scratchpad, exact match of the answer after `####`):
- A Llama teacher is trained with cross-entropy (cached in $DISTILL_CACHE). The student (~8x smaller) is
  warm-started once by cross-entropy on the training problems, a third of them also shown with their
  solution in context (`{prompt}{solution}\\n{prompt}`, so that OPSD's privileged self can read it); every row
  starts from that same checkpoint, as on-policy distillation starts from an SFT model.
- Rows: off-policy forward KL (data set prefixes), the S28 grid (teacher-sampled / student-sampled prefixes x
  forward / reverse KL), GKD (JSD(0.5), lambda = 0.5), OPSD, SODA, TSD-KD, sequence-level KD (CE on the
  teacher's greedy answers). Every row trains on the same prompts for the same epochs with the same length
  cap per completion (its original length): an equal student-token budget (the tokens actually counted
  are reported; rollouts that stop early count fewer).
- Columns: exact match, the student's mean token entropy and length on its greedy answers, teacher forward
  passes during training (+ one-off generation passes), tokens generated and their rate, wall time.
- The S36 diagnostic on the warm student: gradient alignment of reverse-KL signals (the teacher's, and the
  privileged self's) with the ideal per-node gradient, on correct vs incorrect rollouts.

facts (MixSD): a base model pretrained on old facts and on facts shown in context; 40 new facts injected by
SFT or by MixSD; memorisation (exact match on the new facts, closed-book) vs retention (on the old ones).

    python benchmarks/lm_onpolicy.py            # the default run: 3 seeds, under 30 minutes on 2 cores
    python benchmarks/lm_onpolicy.py --quick    # smaller everything, 2 seeds, a few minutes

A full run writes benchmarks/results/lm_onpolicy.md; --quick writes lm_onpolicy_quick.md and a subset of
--parts or another number of --seeds lm_onpolicy_partial.md, never over the full run's file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill.cli_diagnose import AlignmentSettings, gradient_alignment
from distill.data.facts import facts_data
from distill.data.text import Example, LMData, LMDataset
from distill.experiment import optimizer_config, schedule_config, steps_per_epoch
from distill.recipe.load import recipe_from_dict
from distill.recipe.schema import OptimizerSpec, ScheduleSpec
from distill.sources import ONPOLICY_SOURCES, SourcePlan
from distill.sources.context import DEFAULT_TEMPLATE, privileged_prompts
from distill.sources.counting import CallCounter
from distill.sources.generations import GenerationSettings, generate, teacher_generations
from distill.tables import markdown_table
from distill.tables import pm as mean_pm
from distill.tasks.causal_lm import build_lm_model, prepare_lm_run
from distill.train import Term, fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

LLAMA = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {
        "digits": 2,
        "train_examples": 3000,  # the teacher's and the warm start's problems
        "method_examples": 1000,  # the prompts every row trains on
        "test_examples": 100,
        "teacher": {**LLAMA, "hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 192},
        "teacher_epochs": 12,
        "student": {**LLAMA, "hidden_size": 40, "num_hidden_layers": 2, "intermediate_size": 80},
        "warm_epochs": 2,
        "warm_lr": 2e-3,
        "hinted": 3,  # each warm-start problem is also shown this many times with its solution in context
        "epochs": 2,
        "batch_size": 16,
        "lr": 1e-4,  # OPSD's self-teacher collapses at 3e-4 (see the notes); one rate for every row
        "alignment": {"questions": 10, "rollouts": 4, "nodes": 3, "candidates": 3, "targeted": 4},
        "facts": {
            "new_facts": 40,
            "old_facts": 200,
            "context_examples": 1500,
            "base_epochs": 40,
            "base_lr": 3e-3,
            "inject_lr": 1e-3,
            "inject_epochs": 15,
            "model": {**LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
        },
    },
    "quick": {
        "digits": 2,
        "train_examples": 800,
        "method_examples": 96,
        "test_examples": 40,
        "teacher": {**LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
        "teacher_epochs": 6,
        "student": {**LLAMA, "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
        "warm_epochs": 2,
        "warm_lr": 3e-3,
        "hinted": 1,
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-4,  # OPSD's self-teacher collapses at 3e-4 (see the notes); one rate for every row
        "alignment": {"questions": 3, "rollouts": 2, "nodes": 2, "candidates": 2, "targeted": 2},
        "facts": {
            "new_facts": 16,
            "old_facts": 60,
            "context_examples": 300,
            "base_epochs": 6,
            "base_lr": 3e-3,
            "inject_lr": 1e-3,
            "inject_epochs": 6,
            "model": {**LLAMA, "hidden_size": 48, "num_hidden_layers": 1, "intermediate_size": 96},
        },
    },
}

ROLLOUTS = {"mix": 1.0, "temperature": 1.0}
TEACHER_SAMPLES = {"do_sample": True, "temperature": 1.0}
CURRICULUM = {"start": 8, "step": 4, "entropy_threshold": 0.3, "min_steps": 10}
# (row, source name, source params, objectives as (name, weight, params))
ROWS: list[tuple[str, str, dict[str, Any], list[tuple[str, float, dict[str, Any]]]]] = [
    ("off-policy forward KL (data)", "dataset", {}, [("forward_kl", 1.0, {})]),
    ("grid: teacher prefix x forward KL", "teacher_generations", TEACHER_SAMPLES, [("forward_kl", 1.0, {})]),
    ("grid: teacher prefix x reverse KL", "teacher_generations", TEACHER_SAMPLES, [("reverse_kl", 1.0, {})]),
    ("grid: student prefix x forward KL", "student_rollouts", ROLLOUTS, [("forward_kl", 1.0, {})]),
    ("grid: student prefix x reverse KL", "student_rollouts", ROLLOUTS, [("reverse_kl", 1.0, {})]),
    (
        "GKD (JSD 0.5, lambda=0.5)",
        "student_rollouts",
        {"mix": 0.5},
        [("generalized_jsd", 1.0, {"beta": 0.5})],
    ),
    (
        "OPSD (privileged self, reverse KL)",
        "opsd",
        {"mix": 1.0},
        [("opsd", 1.0, {"divergence": "reverse_kl"})],
    ),
    (
        "SODA (SFT + DPO vs snapshot)",
        "soda",
        {"teacher": {"do_sample": False}},
        [("soda", 1.0, {"beta": 0.1})],
    ),
    (
        "TSD-KD (direct + indirect)",
        "student_rollouts",
        ROLLOUTS,
        [("token_selective_kd", 1.0, {"beta": 0.9}), ("tsd_indirect", 0.1, {"top_k": 10})],
    ),
    (
        "TSD-KD without its entropy term",
        "student_rollouts",
        ROLLOUTS,
        [
            ("token_selective_kd", 1.0, {"beta": 0.9, "entropy_weight": 0.0}),
            ("tsd_indirect", 0.1, {"top_k": 10}),
        ],
    ),
    (
        "KL mixing (w=0.5), student prefix",
        "student_rollouts",
        ROLLOUTS,
        [("kl_mixing", 1.0, {"forward_weight": 0.5})],
    ),
    (
        "KL mixing + entropy-gated length curriculum",
        "student_rollouts",
        {**ROLLOUTS, "length_curriculum": CURRICULUM},
        [("kl_mixing", 1.0, {"forward_weight": 0.5})],
    ),
    (
        "sequence-level KD (CE on teacher)",
        "teacher_generations",
        {"do_sample": False},
        [("cross_entropy", 1.0, {})],
    ),
]


def pm(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± std` over the values that are not NaN (a metric a seed did not produce)."""
    return mean_pm([v for v in values if v == v], scale, digits)


@torch.inference_mode()
def greedy_profile(model: torch.nn.Module, data: LMData, limit: int = 100) -> dict[str, float]:
    """Mean generated length and mean token entropy of the student along its own greedy answers."""
    examples = data.test.examples[:limit]  # type: ignore[attr-defined]
    prompts = [e.ids[: e.prompt_len] for e in examples]
    completions = generate(model, data.tokenizer, prompts, max_new_tokens=data.max_new_tokens, batch_size=64)
    was = model.training
    model.eval()
    entropies = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion:
            continue
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        log_q = torch.log_softmax(logits, -1)
        entropies.append(float(-(log_q.exp() * log_q).sum(-1).mean()))
    model.train(was)
    return {
        "gen_length": statistics.fmean(len(c) for c in completions),
        "entropy": statistics.fmean(entropies) if entropies else math.nan,
    }


@torch.inference_mode()
def privileged_exact_match(model: torch.nn.Module, data: LMData, limit: int = 100) -> float:
    """Exact match of the model's greedy answers when the solution is shown first (OPSD's teacher)."""
    from distill.data.text import reference_answer

    examples = data.test.examples[:limit]  # type: ignore[attr-defined]
    contexts = privileged_prompts(data.tokenizer, examples, DEFAULT_TEMPLATE)
    outputs = generate(model, data.tokenizer, contexts, max_new_tokens=data.max_new_tokens, batch_size=64)
    hits = [
        reference_answer(data.tokenizer.decode(o, skip_special_tokens=True)) == reference_answer(e.reference)
        for o, e in zip(outputs, examples, strict=True)
    ]
    return sum(hits) / len(hits)


def train(student, train_set, *, terms, teacher, epochs, cfg, seed, evaluator=None, transform=None, lr=None):
    batches = steps_per_epoch(len(train_set), cfg["batch_size"], 1)
    return fit(
        student,
        train_set,
        teacher=teacher,
        objectives=terms,
        optimizer=optimizer_config(OptimizerSpec(lr=lr or cfg["lr"])),
        schedule=schedule_config(ScheduleSpec(name="constant"), batches),
        batch_transform=transform,
        epochs=epochs,
        batch_size=cfg["batch_size"],
        eval_every=epochs,
        seed=seed,
        progress=False,
        tensorboard=False,
        device="cpu",
        evaluator=evaluator,
    )


# ------------------------------------------------------------------------------------------ arithmetic
def arithmetic_setup(cfg: dict[str, Any], out: Path, console: Console):
    recipe = recipe_from_dict(
        {
            "name": "lm-onpolicy-arithmetic",
            "data": {
                "name": "arithmetic",
                "params": {
                    "digits": cfg["digits"],
                    "train_examples": cfg["train_examples"],
                    "test_examples": cfg["test_examples"],
                    "tokenizer": {"bpe": {"vocab_size": 300}},
                    "max_length": 96,
                },
                "batch_size": cfg["batch_size"],
                "eval_batch_size": 64,
            },
            "teacher": {
                "name": "hf",
                "params": {"config": {**cfg["teacher"], "max_position_embeddings": 128}},
                "train": {"epochs": cfg["teacher_epochs"], "optimizer": {"lr": 0.003}},
            },
            "student": {
                "name": "hf",
                "params": {"config": {**cfg["student"], "max_position_embeddings": 128}},
            },
            "objectives": [{"name": "forward_kl"}],
            "trainer": {"threads": 1},
            "output": {"dir": str(out), "tensorboard": False},
        },
        "lm_onpolicy",
    )
    setup = prepare_lm_run(recipe, out, progress=False, console=console)
    return recipe, setup


def warm_start(recipe, setup, cfg, console) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """The student every row starts from: CE on the problems, and on them with their solution shown."""
    data = setup.data
    examples = data.train.examples
    contexts = privileged_prompts(data.tokenizer, examples, DEFAULT_TEMPLATE)
    hinted = [
        Example(c + e.ids[e.prompt_len :], [False] * len(c) + e.targets[e.prompt_len :], len(c), e.reference)
        for c, e in zip(contexts, examples, strict=False)
    ]
    # copying a shown solution is learnt later than adding, so it is shown more often: the warm student
    # answers some problems alone and nearly all given the solution (OPSD needs that gap)
    warm_set = LMDataset(examples + hinted * cfg["hinted"], data.train.pad_id)
    torch.manual_seed(0)
    student = build_lm_model(recipe.student, data.tokenizer, "student")
    started = time.perf_counter()
    result = train(
        student,
        warm_set,
        terms=["cross_entropy"],
        teacher=None,
        epochs=cfg["warm_epochs"],
        cfg=cfg,
        seed=0,
        lr=cfg["warm_lr"],
        evaluator=setup.evaluator,
    )
    seconds = time.perf_counter() - started
    metrics = result.final | greedy_profile(student, data)
    metrics["privileged_exact_match"] = privileged_exact_match(student, data)
    console.print(
        f"warm start: EM {metrics.get('exact_match', 0):.3f} (given the solution: "
        f"{metrics['privileged_exact_match']:.3f}) in {seconds:.0f} s"
    )
    return {k: v.clone() for k, v in student.state_dict().items()}, metrics, seconds


def run_row(row, recipe, setup, method_data, warm, cfg, seed, out, cache) -> dict[str, float]:
    """One row x seed from the warm checkpoint; the teacher's one-off generations go to a cache private to
    this benchmark run (`out`), so their cost is measured once and shared by the rows that use them."""
    name, source, params, objectives = row
    data, teacher = setup.data, setup.teacher
    gen_cache = out / "generation-cache"
    terms = [Term(o, w, dict(p)) for o, w, p in objectives]
    torch.manual_seed(seed)
    student = build_lm_model(recipe.student, data.tokenizer, "student")
    student.load_state_dict(warm)
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    once_key = None
    if source in ONPOLICY_SOURCES:
        plan = SourcePlan(source, params, name, data=method_data, teacher=teacher, cache_dir=gen_cache)
        run = plan.start(student, seed, terms)
        if "teacher" not in run.counters and teacher is not None:
            run.counters["teacher"] = CallCounter(teacher, while_training=student)
        if plan.info:  # SODA's teacher answers
            once_key = repr(sorted(params["teacher"].items()))
            tokens = sum(len(e.ids) - e.prompt_len for e in plan.chosen or [])
            cache.setdefault(once_key, {"calls": plan.info["teacher_calls"], "seconds": plan.info["seconds"]})
            cache[once_key]["tokens"] = float(tokens)
        result = train(
            student,
            run.train_set,
            terms=run.terms,
            teacher=run.teacher,
            epochs=cfg["epochs"],
            cfg=cfg,
            seed=seed,
            evaluator=setup.evaluator,
            transform=run.batch_transform,
        )
        metrics |= run.finish(result, cfg["epochs"])
    else:
        train_set = method_data.train
        if source == "teacher_generations":
            counter = CallCounter(teacher)
            examples, info = teacher_generations(
                teacher,
                data.tokenizer,
                train_set.examples,
                GenerationSettings.from_params(params),
                cache_dir=gen_cache,
            )
            counter.remove()
            train_set = LMDataset(examples, train_set.pad_id)
            once_key = repr(sorted(params.items()))
            cache.setdefault(once_key, {"calls": float(counter.calls), "seconds": info["seconds"]})
            cache[once_key]["tokens"] = float(sum(len(e.ids) - e.prompt_len for e in examples))
        counter = CallCounter(teacher, while_training=student)
        result = train(
            student,
            train_set,
            terms=terms,
            teacher=teacher,
            epochs=cfg["epochs"],
            cfg=cfg,
            seed=seed,
            evaluator=setup.evaluator,
        )
        counter.remove()
        metrics["teacher_calls"] = float(counter.calls)
        metrics["student_tokens"] = float(train_set.counted_tokens() * cfg["epochs"])
    metrics |= result.final | greedy_profile(student, data)
    metrics["wall_seconds"] = time.perf_counter() - started
    once = cache.get(once_key, {}) if once_key else {}
    metrics["one_off_calls"] = once.get("calls", 0.0)
    metrics["one_off_tokens"] = once.get("tokens", 0.0)
    metrics["one_off_gen_seconds"] = once.get("seconds", 0.0)
    return metrics


def generated(metrics: dict[str, float]) -> tuple[float, float]:
    """Tokens generated for the row and their rate (rollouts, snapshot, or the teacher's one-off answers)."""
    for prefix in ("rollout", "snapshot", "mixed"):
        if f"{prefix}_tokens" in metrics:
            return metrics[f"{prefix}_tokens"], metrics[f"{prefix}_tokens_per_second"]
    tokens, seconds = metrics.get("one_off_tokens", 0.0), metrics.get("one_off_gen_seconds", 0.0)
    return tokens, (tokens / seconds if seconds > 0 else math.nan)


def arithmetic_section(cfg, seeds, out, console) -> str:
    recipe, setup = arithmetic_setup(cfg, out / "arithmetic", console)
    data, info = setup.data, setup.teacher_info
    warm, warm_metrics, warm_seconds = warm_start(recipe, setup, cfg, console)
    subset = LMDataset(data.train.examples[: cfg["method_examples"]], data.train.pad_id)
    method_data = dataclasses.replace(data, train=subset)
    cache: dict[str, Any] = {}
    results: dict[str, list[dict[str, float]]] = {}
    for row in ROWS:
        for seed in seeds:
            metrics = run_row(row, recipe, setup, method_data, warm, cfg, seed, out / "arithmetic", cache)
            results.setdefault(row[0], []).append(metrics)
            console.print(
                f"  {row[0]:<38} seed {seed}: EM {metrics.get('exact_match', 0):.3f}, H "
                f"{metrics['entropy']:.3f}, len {metrics['gen_length']:.1f}, {metrics['wall_seconds']:.0f} s"
            )
    headers = [
        "method",
        "exact match %",
        "student entropy (nats)",
        "generated length",
        "teacher calls (train + once)",
        "tokens generated",
        "gen tok/s",
        "student tokens",
        "wall s",
    ]
    table = [
        [
            "warm start (every row's init)",
            f"{100 * warm_metrics.get('exact_match', 0):.2f}",
            f"{warm_metrics['entropy']:.3f}",
            f"{warm_metrics['gen_length']:.1f}",
            "-",
            "-",
            "-",
            "-",
            f"{warm_seconds:.0f}",
        ]
    ]
    for name, runs in results.items():
        calls = [r.get("teacher_calls", r.get("self_teacher_calls", 0.0)) for r in runs]
        self_calls = "self_teacher_calls" in runs[0]
        once = max(r.get("one_off_calls", 0.0) for r in runs)
        tokens = [generated(r) for r in runs]
        table.append(
            [
                name,
                pm([r.get("exact_match", math.nan) for r in runs], 100),
                pm([r["entropy"] for r in runs], 1, 3),
                pm([r["gen_length"] for r in runs], 1, 1),
                f"{statistics.fmean([r.get('self_teacher_calls', 0.0) for r in runs]):.0f} (self)"
                if self_calls
                else f"{statistics.fmean(calls):.0f}" + (f" + {once:.0f}" if once else ""),
                f"{statistics.fmean(t for t, _ in tokens):,.0f}",
                pm([rate for _, rate in tokens], 1, 0),
                f"{statistics.fmean(r.get('student_tokens', math.nan) for r in runs):,.0f}",
                pm([r["wall_seconds"] for r in runs], 1, 1),
            ]
        )
    alignment = alignment_section(cfg, recipe, setup, warm, console)
    student_size = sum(p.numel() for p in build_lm_model(recipe.student, data.tokenizer, "s").parameters())
    teacher_line = f"- Teacher: {info.parameters:,} parameters ({info.source}"
    if info.train_seconds:
        teacher_line += f"; trained in {info.train_seconds:.0f} s, once, then cached"
    notes = [
        f"- Data: {data.description}; every row trains on the first {cfg['method_examples']} problems for "
        f"{cfg['epochs']} epoch(s), batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, constant schedule.",
        teacher_line + f"), exact match {100 * info.metrics.get('exact_match', 0):.1f}%.",
        f"- Student: {student_size:,} parameters, warm-started by CE for {cfg['warm_epochs']} epoch(s) "
        f"({warm_seconds:.0f} s, once) on the problems, each also shown {cfg['hinted']}x with its solution "
        "in context; "
        f"given the solution it answers {100 * warm_metrics['privileged_exact_match']:.0f}% exactly (OPSD's "
        "self-teacher), without it the exact match in the first row.",
        "- Teacher calls: the teacher's forward passes while training (scoring), plus, after `+`, the passes "
        "of its one-off generation (every decoding step is a pass), made once and shared by the rows and "
        "seeds that use the same settings. OPSD's teacher is the student itself given the solution: its "
        "passes are marked `(self)`. Tokens generated: by the student's rollouts (or SODA's snapshot), "
        "else the teacher's one-off answers; gen tok/s is their rate. Student tokens: counted tokens trained "
        "on (rollouts that stop early, or the curriculum's short caps, count fewer). Wall s: training with "
        "its rollouts and the final evaluation, per seed.",
    ]
    return "## arithmetic\n\n" + "\n".join(notes) + "\n\n" + markdown_table(headers, table) + "\n" + alignment


def alignment_section(cfg, recipe, setup, warm, console) -> str:
    data = setup.data
    torch.manual_seed(0)
    student = build_lm_model(recipe.student, data.tokenizer, "student")
    student.load_state_dict(warm)
    examples = [e for e in data.test.examples if e.reference is not None]
    from distill.cli_diagnose import _external_teacher, _privileged_teacher

    rows = []
    started = time.perf_counter()
    for label, teacher_fn in (
        ("teacher, reverse KL", _external_teacher(setup.teacher, examples)),
        ("privileged self (OPSD), reverse KL", _privileged_teacher(student, data.tokenizer, examples)),
        ("teacher, forward KL", _external_teacher(setup.teacher, examples)),
    ):
        divergence = "forward_kl" if "forward" in label else "reverse_kl"
        settings = AlignmentSettings(**cfg["alignment"], divergence=divergence)
        report = gradient_alignment(
            student, data.tokenizer, examples, teacher_fn, settings, max_new_tokens=data.max_new_tokens
        )
        summary = report.summary()
        rows.append(
            [label]
            + [
                f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f} ({int(summary[k]['nodes'])})"
                for k in ("incorrect", "correct")
            ]
        )
    seconds = time.perf_counter() - started
    console.print(f"alignment diagnostic: {seconds:.0f} s")
    a = cfg["alignment"]
    return (
        "\n### Gradient alignment (S36, `distill diagnose alignment`) on the warm student\n\n"
        f"{a['questions']} test questions x {a['rollouts']} sampled rollouts x {a['nodes']} nodes; at each "
        "node "
        f"the student's top {a['candidates']} tokens (and the one it took) are each continued by "
        f"{a['targeted']} targeted rollouts to estimate Q; cosine in logit space between the ideal gradient "
        "pi (Q - V) and the distillation direction -dD/dz; mean ± std (nodes). Nodes where every candidate "
        f"has the same Q carry no ideal direction and are left out. {seconds:.0f} s.\n\n"
        + markdown_table(["signal", "incorrect rollouts", "correct rollouts"], rows)
    )


# ------------------------------------------------------------------------------------------ facts (MixSD)
STYLE = " {colour} ok"  # the new facts' written answers: a phrasing the base model never produced


@torch.inference_mode()
def recall(model: torch.nn.Module, data: LMData) -> dict[str, float]:
    """Greedy answers to the test questions: the colour right (first word), and the exact answer."""
    examples = data.test.examples  # type: ignore[attr-defined]
    prompts = [e.ids[: e.prompt_len] for e in examples]
    outputs = generate(model, data.tokenizer, prompts, max_new_tokens=4, batch_size=64)
    colour = exact = 0
    for e, out in zip(examples, outputs, strict=True):
        text = data.tokenizer.decode(out, skip_special_tokens=True).strip()
        colour += text.split()[:1] == e.reference.split()[:1]
        exact += text == e.reference.strip()
    return {"colour": colour / len(examples), "exact": exact / len(examples)}


def facts_section(cfg, seeds, console) -> str:
    f = cfg["facts"]
    cfg = {**cfg, "batch_size": 8}  # several steps per epoch on a few dozen facts: seeds shuffle differently
    sizes = {
        "new_facts": f["new_facts"],
        "old_facts": f["old_facts"],
        "context_examples": f["context_examples"],
        "style": STYLE,
    }
    pretrain = facts_data(part="pretrain", **sizes)
    tok = pretrain.tokenizer
    new, old = facts_data(part="new", tokenizer=tok, **sizes), facts_data(part="old", tokenizer=tok, **sizes)
    model_cfg = {**f["model"], "max_position_embeddings": 32}
    from distill.models.causal_lm import build_causal_lm, special_token_ids

    def model() -> torch.nn.Module:
        return build_causal_lm(config=model_cfg, vocab_size=len(tok), special_tokens=special_token_ids(tok))

    def scores(m: torch.nn.Module) -> dict[str, float]:
        a, b, c = recall(m, new), recall(m, old), recall(m, pretrain)
        return {"new": a["colour"], "new_exact": a["exact"], "old": b["exact"], "read": c["colour"]}

    torch.manual_seed(0)
    base = model()
    started = time.perf_counter()
    train(
        base,
        pretrain.train,
        terms=["cross_entropy"],
        teacher=None,
        epochs=f["base_epochs"],
        cfg=cfg,
        seed=0,
        lr=f["base_lr"],
    )
    base_seconds = time.perf_counter() - started
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_row = scores(base)
    console.print(f"facts base model: {base_row} in {base_seconds:.0f} s")

    def target_nll(examples: list[Example]) -> float:
        base.eval()
        total = count = 0.0
        with torch.inference_mode():
            for e in examples:
                logits = base(input_ids=torch.tensor([e.ids])).logits[0, e.prompt_len - 1 : -1]
                log_q = torch.log_softmax(logits.float(), -1)
                total -= float(log_q.gather(-1, torch.tensor(e.ids[e.prompt_len :])[:, None]).sum())
                count += len(e.ids) - e.prompt_len
        return total / max(count, 1)

    methods = [
        ("SFT", None),
        ("MixSD (alpha=0.5, greedy)", {"alpha": 0.5}),
        ("MixSD (alpha=0.8, greedy)", {"alpha": 0.8}),
        ("MixSD (alpha=0.5, sampled)", {"alpha": 0.5, "do_sample": True}),
    ]
    rows = [
        ["base model (before injection)"]
        + [f"{100 * base_row[k]:.1f}" for k in ("new", "new_exact", "old", "read")]
    ]
    rows[0] += ["-", f"{base_seconds:.0f}"]
    for name, mixsd in methods:
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            student = model()
            student.load_state_dict(base_state)
            started = time.perf_counter()
            if mixsd is None:
                train_set = new.train
            else:
                plan = SourcePlan("mixsd", mixsd, name, data=new, teacher=None)
                train_set = plan.start(student, seed, ["cross_entropy"]).train_set
            nll = target_nll(train_set.examples)
            train(
                student,
                train_set,
                terms=["cross_entropy"],
                teacher=None,
                epochs=f["inject_epochs"],
                cfg=cfg,
                seed=seed,
                lr=f["inject_lr"],
            )
            runs.append(scores(student) | {"nll": nll, "seconds": time.perf_counter() - started})
        console.print(f"  {name}: {runs}")
        rows.append(
            [name]
            + [pm([r[k] for r in runs], 100, 1) for k in ("new", "new_exact", "old", "read")]
            + [pm([r["nll"] for r in runs], 1, 3), pm([r["seconds"] for r in runs], 1, 1)]
        )
    headers = [
        "method",
        "memorisation: new colour %",
        "new exact (styled) %",
        "retention: old facts EM %",
        "reading in context %",
        "target NLL under base (nats/token)",
        "wall s",
    ]
    return (
        "## facts (MixSD)\n\n"
        f"- {pretrain.description}.\n"
        f"- A {sum(p.numel() for p in base.parameters()):,}-parameter base model, CE on the `pretrain` part "
        f"(old facts closed-book, facts in context) for {f['base_epochs']} epochs ({base_seconds:.0f} s). "
        f"Then {f['new_facts']} new facts injected for {f['inject_epochs']} epochs, written `qiv is` -> "
        "` teal ok` "
        "(a phrasing the base never produced): SFT on those answers, or MixSD on targets decoded (greedy "
        "or sampled) "
        "from alpha * p(. | `qiv is teal ok` in context) + (1 - alpha) * p(. | `qiv is`).\n"
        "- Memorisation: the new facts asked closed-book, colour right (first word); retention: the old "
        "facts "
        "answered exactly as before (` red`, nothing appended); reading: new facts shown in context.\n\n"
        + markdown_table(headers, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models and data, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--parts", default="arithmetic,facts")
    parser.add_argument("--out", type=Path, default=None, help=out_help("lm_onpolicy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two fighting (see the results)
    console = Console(stderr=True)
    cfg = CONFIGS["quick" if args.quick else "default"]
    seeds, out = seeds_and_file(parser, args, "lm_onpolicy", args.parts, ("arithmetic", "facts"))
    load_start = os.getloadavg()
    started = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-onpolicy-") as tmp:
        parts = args.parts.split(",")
        if "arithmetic" in parts:
            sections.append(arithmetic_section(cfg, seeds, Path(tmp), console))
        if "facts" in parts:
            sections.append(facts_section(cfg, seeds, console))
    total = time.perf_counter() - started
    load_end = os.getloadavg()
    command = command_line("lm_onpolicy", argv)
    text = (
        "# On-policy distillation benchmark\n\n"
        f"Command: `{command}` ({os.cpu_count()} CPU cores, torch threads 1); seeds {seeds}; total wall time "
        f"{total:.0f} s. Load average (1/5/15 min) "
        f"{load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at "
        f"the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end: other work shared the "
        "2 cores (above 2 it slowed every time and rate here).\n\n"
        "Cells are mean ± std over seeds at the last epoch. Exact match is the student's greedy answer after "
        "`####` on the held-out problems.\n\n" + "\n\n".join(sections)
    )
    write_results(out, text)
    console.print(text)
    console.print(f"wrote {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

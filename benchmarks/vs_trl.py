"""`distill` against TRL on one off-policy token-level distillation job: tokens/s, peak memory, held-out loss.

Both frameworks train the same student (a Llama-style config, same seed, same initial weights) from the same
frozen teacher (trained here once on tiny-shakespeare and cached) on the same 128-token blocks in the same
order: AdamW (lr 3e-3, betas 0.9 / 0.999, no weight decay), constant learning rate, no clipping, float32,
batch 16, the same number of steps, one torch thread. Objectives: forward KL(teacher || student) and the
generalised JSD with beta = 0.5. TRL's side is `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (never the
student's rollouts) and `seq_kd=False`, i.e. TRL's off-policy distillation trainer; its `beta` and
`distill`'s `generalized_jsd` `beta` are the same number (0: KL(T || S), 1: KL(S || T), mixture
M = beta T + (1 - beta) S), so forward KL is TRL `beta=0` against `distill`'s `forward_kl`, JSD(0.5) is
`beta=0.5` on both. TRL's `DistillationTrainer` (1.16) always trains on completions the student samples
from prompts (`_generate_and_score_completions`), so it cannot run this off-policy job; see docs/vs_trl.md.

Each framework x objective x seed runs in its own process under GNU `/usr/bin/time -v`, the cells of one
seed back to back and interleaved (distill, TRL, distill, TRL) so that both meet the same machine load.
Measured in the process: tokens/s over the steps after the warm-up (counted target tokens per second from
the start of step `WARMUP` to the start of the last step), peak RSS before the last step and RSS once models,
data and trainer are built (the baseline), and, over the last step only, the torch profiler's CPU memory
events (`profile_memory=True`): the peak of live tensor bytes allocated during that step above the level at
its start. The trained students are saved and scored afterwards by one function, `held_out_metrics`, on
the same held-out blocks: cross-entropy per token and KL(teacher || student).

    python benchmarks/vs_trl.py                # 3 seeds -> benchmarks/results/vs_trl.md
    python benchmarks/vs_trl.py --breakdown    # plain loop / distill / TRL per step -> vs_trl_breakdown.md
    python benchmarks/vs_trl.py --large-vocab  # random models at V = 32768 -> vs_trl_large_vocab.md
    python benchmarks/vs_trl.py --quick        # tiny models, 1 seed, a few steps -> vs_trl_quick.md

docs/vs_trl.md reads the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _child import run_under_gnu_time  # noqa: E402  (one process per cell)
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

FRAMEWORKS = ("distill", "trl")
# name -> TRL's beta (the same beta as distill's generalized_jsd)
OBJECTIVES = {"forward_kl": 0.0, "jsd": 0.5}
OBJECTIVE_LABELS = {"forward_kl": "forward KL", "jsd": "JSD(0.5)"}


@dataclass(frozen=True)
class Job:
    """What both frameworks are given: models, data sizes, optimisation."""

    teacher: dict[str, Any]
    student: dict[str, Any]
    vocab_size: int = 1024
    seq_len: int = 128
    batch: int = 16
    steps: int = 100
    warmup: int = 10  # steps left out of tokens/s
    lr: float = 3e-3
    teacher_steps: int = 300
    teacher_lr: float = 3e-3
    max_train_blocks: int | None = None
    test_blocks: int = 200
    log_every: int = 10
    # Random teacher, student and token ids: throughput and memory only (the large-vocabulary job).
    random_init: bool = False


LLAMA = {"model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": False}
# The models of the packaged recipe `lm_shakespeare` (a 2M-parameter teacher, a 10x smaller student).
FULL = Job(
    teacher=LLAMA
    | {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 512},
    student=LLAMA
    | {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176},
)
# Throughput and memory at a large vocabulary, where logits dominate: random weights and token ids (a BPE
# of 32k tokens cannot be trained on 1 MB of text), no held-out loss.
LARGE_VOCAB = replace(FULL, vocab_size=32768, batch=8, steps=12, warmup=2, teacher_steps=0, random_init=True)
QUICK = Job(
    teacher=LLAMA
    | {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    student=LLAMA
    | {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    vocab_size=512,
    seq_len=64,
    batch=8,
    steps=6,
    warmup=2,
    teacher_steps=30,
    max_train_blocks=200,
    test_blocks=20,
    log_every=2,
)


# ---------------------------------------------------------------- shared pieces (both frameworks)


def model_config(shape: dict[str, Any], job: Job, special: dict[str, int | None]) -> Any:
    from transformers import AutoConfig

    settings = dict(shape)
    kind = settings.pop("model_type")
    return AutoConfig.for_model(
        kind, vocab_size=job.vocab_size, max_position_embeddings=job.seq_len, **settings, **special
    )


def new_model(shape: dict[str, Any], job: Job, special: dict[str, int | None], seed: int) -> Any:
    """The same weights for a given seed whichever framework then trains it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(shape, job, special))


def held_out_metrics(student: Any, teacher: Any, blocks: Any, batch: int = 32) -> dict[str, float]:
    """The one evaluation of every trained student: next-token cross-entropy (nats per predicted token) and
    KL(teacher || student) per token, over the same held-out blocks (every position but the last)."""
    import torch
    import torch.nn.functional as F

    ce_sum, kl_sum, count = 0.0, 0.0, 0
    student.eval()
    teacher.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            ids = blocks[start : start + batch]
            s = F.log_softmax(student(input_ids=ids).logits[:, :-1].float(), dim=-1)
            t = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:]
            ce_sum += float(-s.gather(-1, target.unsqueeze(-1)).sum())
            kl_sum += float((t.exp() * (t - s)).sum())
            count += target.numel()
    return {"ce": ce_sum / count, "kl": kl_sum / count}


def cache_folder(job: Job) -> Path:
    """The prepared teacher and token blocks of `job`, outside the repository ($DISTILL_CACHE)."""
    from distill.io import cache_root

    key = json.dumps(
        [job.teacher, job.vocab_size, job.seq_len, job.teacher_steps, job.teacher_lr, job.max_train_blocks],
        sort_keys=True,
    )
    return cache_root() / "benchmarks" / "vs_trl" / hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare(job: Job, log: Any) -> tuple[Path, dict[str, Any]]:
    """Token blocks of tiny-shakespeare (BPE trained on the training part; the last 10 % held out) and a
    teacher trained `teacher_steps` steps on them with cross-entropy; made once, then read from the cache."""
    import torch
    from safetensors.torch import save_file

    folder = cache_folder(job)
    info_file = folder / "info.json"
    if info_file.exists():
        return folder, json.loads(info_file.read_text())
    if job.random_init:
        return prepare_random(job, folder)
    from distill.data import build_data
    from distill.models.causal_lm import special_token_ids
    from distill.train import OptimizerConfig, ScheduleConfig, Trainer, TrainerConfig

    torch.set_num_threads(1)
    data = build_data(
        "tinyshakespeare",
        tokenizer={"bpe": {"vocab_size": job.vocab_size}},
        max_length=job.seq_len,
        test_fraction=0.1,
        max_train_examples=job.max_train_blocks,
        max_test_examples=job.test_blocks,
    )
    train = torch.tensor([e.ids for e in data.train.examples if len(e.ids) == job.seq_len])
    test = torch.tensor([e.ids for e in data.test.examples if len(e.ids) == job.seq_len])
    special = special_token_ids(data.tokenizer)
    teacher = new_model(job.teacher, job, special, seed=1234)
    rows = [{"input_ids": ids, "labels": torch.cat([ids[1:], torch.tensor([-100])])} for ids in train]
    for row in rows:
        row["mask"] = row["labels"] != -100
    log(f"training the teacher ({job.teacher_steps} steps, once) ...")
    started = time.perf_counter()
    Trainer(
        teacher,
        rows,
        objectives=["cross_entropy"],
        optimizer=OptimizerConfig(name="adamw", lr=job.teacher_lr, weight_decay=0.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=job.teacher_steps // 20),
        config=TrainerConfig(
            epochs=1,
            max_steps=job.teacher_steps,
            batch_size=job.batch,
            progress=False,
            tensorboard=False,
            device="cpu",
            log_every=10**9,
            seed=0,
        ),  # fmt: skip
    ).fit()
    seconds = time.perf_counter() - started
    staging = Path(tempfile.mkdtemp(prefix=".vs_trl.", dir=folder.parent if folder.parent.exists() else None))
    teacher.save_pretrained(str(staging / "teacher"))
    data.tokenizer.save_pretrained(str(staging / "tokenizer"))
    save_file({"train": train.contiguous(), "test": test.contiguous()}, str(staging / "blocks.safetensors"))
    info = {
        "teacher_seconds": seconds,
        "special": special,
        "train_blocks": len(train),
        "test_blocks": len(test),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_test": held_out_metrics(teacher, teacher, test),
        "data": data.description,
    }
    (staging / "info.json").write_text(json.dumps(info, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, folder)
    return folder, info


def prepare_random(job: Job, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A random-weight teacher and random token blocks at `job.vocab_size` (throughput and memory only), and a
    small BPE tokenizer for TRL's pad id."""
    import torch
    from safetensors.torch import save_file

    from distill.data.paths import data_path
    from distill.data.tokenizers import train_bpe

    tokenizer = train_bpe([data_path("text/tinyshakespeare.txt").read_text()[:200_000]], vocab_size=300)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    teacher = new_model(job.teacher, job, special, seed=1234)
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(3, job.vocab_size, (job.steps * job.batch, job.seq_len), generator=generator)
    staging = Path(tempfile.mkdtemp(prefix=".vs_trl.", dir=folder.parent if folder.parent.exists() else None))
    teacher.save_pretrained(str(staging / "teacher"))
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    save_file({"train": train, "test": train[: job.batch].clone()}, str(staging / "blocks.safetensors"))
    info = {
        "teacher_seconds": 0.0,
        "special": special,
        "train_blocks": len(train),
        "test_blocks": 0,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "data": f"random token ids in [3, {job.vocab_size})",
    }
    (staging / "info.json").write_text(json.dumps(info, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, folder)
    return folder, info


def training_blocks(folder: Path, job: Job, seed: int) -> Any:
    """The `steps x batch` blocks a run trains on, in the order both frameworks see them (seeded)."""
    import torch
    from safetensors.torch import load_file

    train = load_file(str(folder / "blocks.safetensors"))["train"]
    needed = job.steps * job.batch
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(train), generator=generator) for _ in range(-(-needed // len(train)))]
    )
    return train[order[:needed]]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Timestamps at the start of each step; the last step runs under the torch profiler (memory events)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.starts: list[float] = []
        self.rss_before_last = 0.0
        self.profiler: Any = None

    def step_started(self) -> None:
        self.starts.append(time.perf_counter())
        if len(self.starts) == self.steps:  # the last step: nothing after it is timed
            from torch.profiler import ProfilerActivity, profile

            self.rss_before_last = _maxrss_mb()
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()

    def finished(self) -> dict[str, float]:
        peak, live = 0, 0
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            events = sorted(
                (e.start_ns(), e.nbytes())
                for e in self.profiler.profiler.kineto_results.events()
                if e.name() == "[memory]"
            )
            for _, nbytes in events:
                live += nbytes
                peak = max(peak, live)
        return {"rss_before_last_mb": self.rss_before_last, "torch_step_peak_mb": peak / 2**20}


# ---------------------------------------------------------------- one cell, in a child process


def run_distill(student: Any, teacher: Any, blocks: Any, job: Job, objective: str, clock: StepClock) -> float:
    import torch
    from torch.utils.data import DataLoader

    from distill.train import OptimizerConfig, ScheduleConfig, Trainer, TrainerConfig

    labels = torch.cat([blocks[:, 1:], torch.full((len(blocks), 1), -100)], dim=1)
    rows = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y, "mask": y != -100}
        for i, y in zip(blocks, labels, strict=True)
    ]
    terms = [("forward_kl", 1.0)] if objective == "forward_kl" else [("generalized_jsd", 1.0, {"beta": 0.5})]

    def stamp(batch: Any, model: Any, progress: Any) -> Any:
        clock.step_started()
        return batch

    trainer = Trainer(
        student,
        DataLoader(rows, batch_size=job.batch, shuffle=False),  # the order `training_blocks` chose
        teacher=teacher,
        objectives=terms,
        optimizer=OptimizerConfig(name="adamw", lr=job.lr, weight_decay=0.0),
        schedule=ScheduleConfig(name="constant"),
        config=TrainerConfig(
            epochs=1,
            batch_size=job.batch,
            progress=False,
            tensorboard=False,
            device="cpu",
            log_every=job.log_every,
        ),  # fmt: skip
        batch_transform=stamp,
    )
    clock.baseline = _maxrss_mb()  # type: ignore[attr-defined]
    result = trainer.fit()
    return float(result.history[-1]["train_loss"])


def run_trl(
    student: Any, teacher: Any, blocks: Any, job: Job, objective: str, clock: StepClock, folder: Path
) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Stamp(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_started()

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    rows = Dataset.from_dict({"input_ids": blocks.tolist()})
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as out:
        args = GKDConfig(
            output_dir=out,
            per_device_train_batch_size=job.batch,
            max_steps=job.steps,
            learning_rate=job.lr,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,  # no clipping, as distill's run
            lmbda=0.0,  # never the student's own rollouts: off-policy
            seq_kd=False,
            beta=OBJECTIVES[objective],
            max_length=job.seq_len,
            train_sampling_strategy="sequential",  # the order `training_blocks` chose
            logging_steps=job.log_every,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            bf16=False,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            data_collator=collate,
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
            callbacks=[Stamp()],
        )
        clock.baseline = _maxrss_mb()  # type: ignore[attr-defined]
        output = trainer.train()
    return float(output.training_loss)


def run_cell(framework: str, objective: str, seed: int, job: Job, folder: Path, out: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    info = json.loads((folder / "info.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(str(folder / "teacher")).eval().requires_grad_(False)
    student = new_model(job.student, job, info["special"], seed)
    blocks = training_blocks(folder, job, seed)
    clock = StepClock(job.steps)
    if framework == "distill":
        train_loss = run_distill(student, teacher, blocks, job, objective, clock)
    else:
        train_loss = run_trl(student, teacher, blocks, job, objective, clock, folder)
    end = time.perf_counter()
    memory = clock.finished()
    starts = clock.starts
    if len(starts) != job.steps:
        raise RuntimeError(f"{framework}: {len(starts)} step starts seen, {job.steps} expected")
    timed_steps = job.steps - 1 - job.warmup  # from the start of step `warmup` to the start of the last
    seconds = starts[-1] - starts[job.warmup]
    tokens = timed_steps * job.batch * (job.seq_len - 1)
    save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(out))
    return {
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / timed_steps,
        "train_seconds": end - starts[0],
        "baseline_mb": clock.baseline,  # type: ignore[attr-defined]
        "train_loss": train_loss,
        **memory,
    }


def measure(
    framework: str, objective: str, seed: int, quick: bool, folder: Path, out: Path, timeout: int, *flags: str
) -> dict[str, Any]:
    """One cell in a fresh process under GNU time: its JSON plus GNU time's maximum RSS and wall time."""
    command = [sys.executable, __file__, "--child", framework, objective, str(seed), str(folder), str(out)]
    command += (["--quick"] if quick else []) + list(flags)
    return run_under_gnu_time(command, timeout)


# ---------------------------------------------------------------- tables


def _mean_std(values: list[float], digits: int) -> str:
    from distill.tables import pm  # lazily: a TRL child process imports nothing of distill's

    if len(values) == 1:  # one seed (the quick run): the value alone, which tests read back as a number
        return f"{values[0]:.{digits}f}"
    return pm(values, digits=digits)


def _column(cells: list[dict[str, Any]], key: str) -> list[float]:
    return [c[key] for c in cells if "error" not in c and c.get(key) is not None]


def summary_table(results: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int]) -> str:
    head = [
        "objective", "framework", "tokens/s", "s / step", "peak RSS MB (GNU time)",
        "peak RSS before last step MB", "RSS after setup MB", "training peak over setup MB",
        "torch live-tensor peak in one step MB", "mean train loss", "held-out CE", "held-out KL(T‖S)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective in OBJECTIVES:
        for framework in FRAMEWORKS:
            cells = [results[(framework, objective, s)] for s in seeds]
            errors = [c["error"] for c in cells if "error" in c]
            over = [c["rss_before_last_mb"] - c["baseline_mb"] for c in cells if "error" not in c]
            row = [
                OBJECTIVE_LABELS[objective],
                framework,
                _mean_std(_column(cells, "tokens_per_second"), 0),
                _mean_std(_column(cells, "seconds_per_step"), 3),
                _mean_std(_column(cells, "gnu_time_mb"), 0),
                _mean_std(_column(cells, "rss_before_last_mb"), 0),
                _mean_std(_column(cells, "baseline_mb"), 0),
                _mean_std(over, 1),
                _mean_std(_column(cells, "torch_step_peak_mb"), 1),
                _mean_std(_column(cells, "train_loss"), 4),
                _mean_std(_column(cells, "ce"), 4),
                _mean_std(_column(cells, "kl"), 4),
            ]
            if errors:
                row[2] = f"{len(errors)} failed: {errors[0]}"
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_table(results: dict[tuple[str, str, int], dict[str, Any]], seeds: list[int]) -> str:
    """distill / TRL per seed (the two cells of a seed ran back to back), then mean ± std over seeds."""
    head = [
        "objective", "tokens/s ratio (goal >= 1.5)", "peak RSS ratio (GNU time)",
        "training peak over setup ratio", "torch step peak ratio", "held-out CE difference (distill - TRL)",
        "TRL held-out CE (mean ± std)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective in OBJECTIVES:
        pairs = [(results[("distill", objective, s)], results[("trl", objective, s)]) for s in seeds]
        pairs = [(d, t) for d, t in pairs if "error" not in d and "error" not in t]
        if not pairs:
            lines.append(f"| {OBJECTIVE_LABELS[objective]} | failed | | | | | |")
            continue

        def ratios(key: str, pairs: list = pairs) -> list[float]:
            return [d[key] / t[key] for d, t in pairs if d.get(key) and t.get(key)]

        over = [
            (d["rss_before_last_mb"] - d["baseline_mb"]) / (t["rss_before_last_mb"] - t["baseline_mb"])
            for d, t in pairs
            if t["rss_before_last_mb"] - t["baseline_mb"] > 0
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    OBJECTIVE_LABELS[objective],
                    _mean_std(ratios("tokens_per_second"), 2) + "x",
                    _mean_std(ratios("gnu_time_mb"), 2) + "x",
                    _mean_std(over, 2) + "x",
                    _mean_std(ratios("torch_step_peak_mb"), 2) + "x",
                    _mean_std([d["ce"] - t["ce"] for d, t in pairs if "ce" in d and "ce" in t], 4),
                    _mean_std([t["ce"] for _, t in pairs if "ce" in t], 4),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps, 1 seed (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("vs_trl"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="where the time of a step goes: a plain loop, distill and TRL in one process "
        "-> results/vs_trl_breakdown.md",
    )
    parser.add_argument(
        "--large-vocab",
        action="store_true",
        help=f"random models and tokens at V = {LARGE_VOCAB.vocab_size}: throughput and memory only "
        "-> results/vs_trl_large_vocab.md",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.breakdown:
        return breakdown_main(args, parser, argv)
    job = QUICK if args.quick else FULL
    if args.large_vocab:
        job = replace(LARGE_VOCAB, steps=4, batch=2, seq_len=32) if args.quick else LARGE_VOCAB
    if args.child:
        framework, objective, seed, folder, out = args.child
        print(json.dumps(run_cell(framework, objective, int(seed), job, Path(folder), Path(out))))
        return 0
    default_seeds = 1 if args.quick or args.large_vocab else 3
    seeds = list(range(args.seeds or default_seeds))
    partial = len(seeds) != default_seeds
    name = "vs_trl_large_vocab" if args.large_vocab else "vs_trl"
    out = output_file(parser, name, args.out, quick=args.quick, partial=partial)
    flags = ["--large-vocab"] if args.large_vocab else []

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    folder, info = prepare(job, log)
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="distill-vs-trl-") as tmp:
        for seed in seeds:
            for objective in OBJECTIVES:
                order = (
                    FRAMEWORKS if (seed + list(OBJECTIVES).index(objective)) % 2 == 0 else FRAMEWORKS[::-1]
                )
                for framework in order:
                    weights = Path(tmp) / f"{framework}-{objective}-{seed}.safetensors"
                    cell = measure(
                        framework, objective, seed, args.quick, folder, weights, args.timeout, *flags
                    )
                    if "error" not in cell and not job.random_init:
                        cell |= evaluate(job, folder, info, weights)
                    results[(framework, objective, seed)] = cell
                    log(f"seed {seed} {objective} {framework}: {json.dumps(cell)}")
    total = time.perf_counter() - started
    text = report(job, info, results, seeds, command_line("vs_trl", argv), total, load_start)
    if job.random_init:
        text = text.replace(
            "# distill vs TRL: one off-policy distillation job", "# distill vs TRL at a large vocabulary"
        )
    write_results(out, text)
    print(text)
    return 0


# ---------------------------------------------------------------- where the time goes (--breakdown)


def bare_steps(student: Any, teacher: Any, blocks: Any, job: Job, objective: str) -> list[dict[str, float]]:
    """The same step without a framework: teacher forward, student forward, the dense loss, backward,
    AdamW; seconds of each part, per step."""
    import torch

    from distill.losses import forward_kl, generalized_jsd

    optimizer = torch.optim.AdamW(student.parameters(), lr=job.lr, weight_decay=0.0)
    student.train()
    parts = []
    for start in range(0, len(blocks), job.batch):
        ids = blocks[start : start + job.batch]
        mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        t1 = time.perf_counter()
        student_logits = student(input_ids=ids).logits[:, :-1]
        t2 = time.perf_counter()
        if objective == "forward_kl":
            loss = forward_kl(student_logits, teacher_logits, mask=mask)
        else:
            loss = generalized_jsd(student_logits, teacher_logits, mask=mask, beta=OBJECTIVES[objective])
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        parts.append(
            {
                "teacher forward": t1 - t0,
                "student forward": t2 - t1,
                "loss": t3 - t2,
                "backward": t4 - t3,
                "AdamW step": t5 - t4,
            }
        )
    return parts


def breakdown_cell(objective: str, job: Job, folder: Path, rounds: int) -> dict[str, Any]:
    """In one process: `rounds` x (plain loop, distill, TRL) on the same blocks, each from the same initial
    student; median seconds per step after 2 warm-up steps (and the plain loop's parts)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    info = json.loads((folder / "info.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(str(folder / "teacher")).eval().requires_grad_(False)
    blocks = training_blocks(folder, job, 0)
    steps: dict[str, list[float]] = {"bare": [], "distill": [], "trl": []}
    parts: dict[str, list[float]] = {}
    for _ in range(rounds):
        for kind in steps:
            student = new_model(job.student, job, info["special"], 0)
            if kind == "bare":
                for row in bare_steps(student, teacher, blocks, job, objective)[2:]:
                    steps[kind].append(sum(row.values()))
                    for name, seconds in row.items():
                        parts.setdefault(name, []).append(seconds)
                continue
            clock = StepClock(job.steps + 1)  # never reaches its profiled step
            if kind == "distill":
                run_distill(student, teacher, blocks, job, objective, clock)
            else:
                run_trl(student, teacher, blocks, job, objective, clock, folder)
            stamps = clock.starts
            steps[kind] += [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
    return {
        "steps": {k: statistics.median(v) for k, v in steps.items()},
        "parts": {k: statistics.median(v) for k, v in parts.items()},
        "samples": {k: len(v) for k, v in steps.items()},
    }


def breakdown_table(cells: dict[str, dict[str, Any]]) -> str:
    head = ["objective", "part", "s / step (median)", "share of the plain loop's step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, cell in cells.items():
        bare = cell["steps"]["bare"]
        label = OBJECTIVE_LABELS[objective]
        for name, seconds in cell["parts"].items():
            lines.append(f"| {label} | plain loop: {name} | {seconds:.4f} | {seconds / bare:.0%} |")
        lines.append(f"| {label} | **plain loop, whole step** | {bare:.4f} | 100% |")
        for kind in ("distill", "trl"):
            seconds = cell["steps"][kind]
            lines.append(
                f"| {label} | **{kind} step** ({seconds - bare:+.4f} s against the plain loop) | "
                f"{seconds:.4f} | {seconds / bare:.0%} |"
            )
        ratio = cell["steps"]["trl"] / cell["steps"]["distill"]
        lines.append(f"| {label} | distill tokens/s over TRL's (TRL step / distill step) | {ratio:.2f}x | |")
    return "\n".join(lines)


def breakdown_main(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    out = output_file(parser, "vs_trl_breakdown", args.out, quick=args.quick, partial=False)
    job = QUICK if args.quick else FULL
    job = replace(job, steps=4 if args.quick else 12, warmup=2)
    rounds = 1 if args.quick else 2
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    folder, info = prepare(job, lambda message: print(message, file=sys.stderr, flush=True))
    cells = {objective: breakdown_cell(objective, job, folder, rounds) for objective in OBJECTIVES}
    text = (
        "# distill vs TRL: where the time of a step goes\n\n"
        f"Command: `{command_line('vs_trl', argv)}`; one process, one torch thread, {os.cpu_count()} CPU "
        f"cores shared with other work; {time.perf_counter() - started:.0f} s; 1-minute load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
        f"The job of `vs_trl.md` (teacher {info['teacher_parameters']:,} parameters, batch {job.batch} x "
        f"{job.seq_len} tokens, vocabulary {job.vocab_size}), {rounds} rounds of: a bare PyTorch loop "
        "(teacher forward under `no_grad`, student forward, the dense loss of `distill.losses`, backward, "
        "AdamW), "
        f"`distill`'s `Trainer` and TRL's `GKDTrainer`, {job.steps} steps each from the same initial student "
        "on the same blocks; medians over the steps after 2 warm-up steps of every round. The plain loop is "
        "what a user would write by hand (the dense logits of both models, as TRL's GKD computes them); its "
        "parts show what the job itself costs, whatever the framework.\n\n" + breakdown_table(cells) + "\n"
    )
    write_results(out, text)
    print(text)
    return 0


def evaluate(job: Job, folder: Path, info: dict[str, Any], weights: Path) -> dict[str, float]:
    """`held_out_metrics` of the student saved at `weights` (a fresh model of the job's shape, loaded)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(str(folder / "teacher"))
    student = new_model(job.student, job, info["special"], 0)
    student.load_state_dict(load_file(str(weights)))
    test = load_file(str(folder / "blocks.safetensors"))["test"]
    return held_out_metrics(student, teacher, test)


def data_lines(job: Job, info: dict[str, Any]) -> str:
    if job.random_init:
        return (
            f"- Data: {info['data']}, {info['train_blocks']} blocks of {job.seq_len} tokens; no held-out "
            "loss (random models).\n"
            f"- Teacher: Llama {json.dumps(job.teacher)}, {info['teacher_parameters']:,} parameters, random "
            "weights (seed 1234).\n"
        )
    return (
        f"- Data: {info['data']}; {info['train_blocks']} training blocks of {job.seq_len} tokens, "
        f"{info['test_blocks']} held-out blocks (the last 10 % of the text).\n"
        f"- Teacher: Llama {json.dumps(job.teacher)}, {info['teacher_parameters']:,} parameters, trained "
        f"{job.teacher_steps} steps with cross-entropy ({info['teacher_seconds']:.0f} s, once; cached); "
        f"held-out CE {info['teacher_test']['ce']:.4f}.\n"
    )


def report(
    job: Job,
    info: dict[str, Any],
    results: dict[tuple[str, str, int], dict[str, Any]],
    seeds: list[int],
    command: str,
    total: float,
    load_start: float,
) -> str:
    import torch
    import transformers
    import trl

    student_parameters = sum(p.numel() for p in new_model(job.student, job, info["special"], 0).parameters())
    sizes = {k: v for k, v in asdict(job).items() if k not in ("teacher", "student")}
    return (
        "# distill vs TRL: one off-policy distillation job\n\n"
        f"Command: `{command}`; {os.cpu_count()} CPU cores shared with other work, one torch thread "
        f"per process; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}; "
        f"total wall time {total:.0f} s; 1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. Each cell is its own process under GNU `time -v`; the two "
        "frameworks' cells of one seed and objective ran back to back (order alternating), so both met the "
        "same load.\n\n"
        + data_lines(job, info)
        + f"- Student: Llama {json.dumps(job.student)}, {student_parameters:,} parameters, the same initial "
        "weights in both frameworks (seeded).\n"
        f"- Job: {json.dumps(sizes)}; "
        "AdamW, constant lr, no clipping, float32; the same blocks in the same order (seeded per seed). "
        "distill: `Trainer` with `forward_kl` or `generalized_jsd(beta=0.5)` (its default fused loss); TRL: "
        "`GKDTrainer(lmbda=0, seq_kd=False, beta=0 or 0.5)`.\n"
        f"- Seeds {seeds}; cells are mean ± std over seeds.\n\n"
        "Tokens/s: counted target tokens (batch x (length - 1)) per second from the start of step "
        f"{job.warmup} to the start of the last step. Peak RSS (GNU time): the whole process (imports, "
        "models, the profiled last step, saving). Peak RSS before last step: the process's own `ru_maxrss` "
        "before the profiled step; RSS after setup: the same once models, data and trainer are built; "
        "training peak over setup: their difference (what training adds). Torch live-tensor peak: torch "
        "profiler CPU memory events over the last step, the highest sum of live tensor bytes above the level "
        "at its start (CPU has no allocator counters like `torch.cuda.max_memory_allocated`). Mean train "
        "loss: each framework's own mean of the per-step loss over the run (the same quantity: both average "
        "the per-token loss over counted tokens). Held-out CE / KL: `held_out_metrics` on both students.\n\n"
        "## Per framework\n\n"
        + summary_table(results, seeds)
        + "\n\n## distill / TRL\n\n"
        + ratio_table(results, seeds)
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())

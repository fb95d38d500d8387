"""The one training loop: a frozen teacher, a student, weighted objectives, on Hugging Face Accelerate.

The teacher is put in eval mode, frozen, run under `torch.inference_mode()` and never handed to the
optimizer or to DDP. Data order depends only on (seed, epoch), and checkpoints carry weights, optimizer,
scheduler, objective state and RNG, so a resumed run ends with the metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from distill.cache.indexed import rows_per_sample
from distill.errors import NonFiniteLossError, UserError
from distill.io import atomic_write_json, atomic_write_text
from distill.metrics import classification_metrics
from distill.models.adapters import logits_of
from distill.models.hooks import FeatureHooks
from distill.objectives import HeadInputs, Objective, StepOutputs, build_objective
from distill.objectives import Progress as TrainProgress
from distill.train.checkpoint import full_states, latest_checkpoint, load_checkpoint, save_checkpoint
from distill.train.fused import head_inputs, hidden_only, logits_come_from_layer, output_layer
from distill.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler
from distill.train.sampler import EpochSampler
from distill.train.seeding import seed_everything
from distill.train.signals import StopRequest, TrainingInterrupted, stop_on_signals

if TYPE_CHECKING:
    from distill.cache.store import TeacherCache


@dataclass
class Term:
    """One weighted objective. `warmup_epochs` ramps the weight linearly from 0 (DKD's warm-up)."""

    objective: str | Objective
    weight: float = 1.0
    params: dict[str, Any] | None = None
    warmup_epochs: float = 0.0
    label: str | None = None

    def build(self) -> tuple[str, Objective]:
        if isinstance(self.objective, Objective):
            return self.label or type(self.objective).__name__, self.objective
        return self.label or self.objective, build_objective(self.objective, self.params)

    def weight_at(self, epoch: float) -> float:
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, epoch / self.warmup_epochs)


# (batch, unwrapped student, progress) -> batch
BatchTransform = Callable[[Any, nn.Module, TrainProgress], Any]

TermLike = Term | tuple[Any, ...] | str | Objective


def as_term(spec: TermLike) -> Term:
    """Accept `Term`, `"name"`, an `Objective`, `(name, weight)` or `(name, weight, params)`."""
    if isinstance(spec, Term):
        return spec
    if isinstance(spec, str | Objective):
        return Term(spec)
    return Term(*spec)


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 512
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: float | None = None
    checkpoint_every: int = (
        0  # optimizer steps between checkpoints; 0 = at the end of every epoch (always at the end)
    )
    keep_checkpoints: int = 2
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps
    nonfinite: Literal["stop", "skip"] = "stop"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    stop_after_steps: int | None = None  # end early (tests of resume, smoke runs); None = train to the end
    # "auto": hidden states and output layers in place of logits when the models and every objective allow
    # it (`distill.train.fused`); "on": that or an error saying why not; "off": always the dense logits.
    fused_loss: Literal["auto", "on", "off"] = "auto"


@dataclass
class FitResult:
    final: dict[str, float]  # metrics at the last epoch
    best: dict[str, float]  # metrics at the epoch of best accuracy
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    train_seconds: float = 0.0
    steps: int = 0
    completed: bool = True
    run_dir: Path | None = None
    loss_path: str = "dense"  # "fused" when the step never built the logits (`distill.train.fused`)


def _make_loader(
    data: Dataset | DataLoader, batch_size: int, *, seed: int, shuffle: bool, acc: Accelerator
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if len(data) == 0:  # type: ignore[arg-type]
        raise UserError("data: the training set is empty" if shuffle else "data: the evaluation set is empty")
    # Training data is sharded across processes; every process evaluates the whole evaluation set, so the
    # metrics need no gathering (and rank 0 alone writes them).
    sampler = EpochSampler(
        len(data),  # type: ignore[arg-type]
        seed=seed,
        shuffle=shuffle,
        rank=acc.process_index if shuffle else 0,
        world_size=acc.num_processes if shuffle else 1,
    )
    # A private generator: iterating a DataLoader otherwise draws a seed from the global RNG, which would
    # shift dropout masks after a mid-epoch resume. A data set with a `collate_fn` attribute (token
    # sequences padded per batch) brings its own collation.
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=getattr(data, "collate_fn", None),
    )


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def split_batch(batch: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """(inputs, labels, mask) from a tuple `(x, y)` / `(x, y, mask)` or a dict with those keys.

    A dict with `input_ids` (and no `inputs`) is a language-model batch: its model inputs (`input_ids`,
    `attention_mask`, ...) stay a dict and are passed to the model as keyword arguments."""
    if isinstance(batch, dict):
        if "inputs" not in batch and "input_ids" in batch:
            inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
            return inputs, batch.get("labels"), batch.get("mask")
        return batch.get("inputs", batch.get("input_ids")), batch.get("labels"), batch.get("mask")
    if isinstance(batch, list | tuple):
        return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None
    return batch, None, None


def _allow_mixed_precision(mixed_precision: str) -> None:
    """Accelerate keeps one mixed-precision setting per process and refuses an Accelerator with another; a
    run trains its teacher in float32 and may then train students in bf16, so the per-process accelerator
    state (not the process group) is dropped when the setting changes."""
    from accelerate.state import AcceleratorState

    # Private Accelerate API (stable since 0.2x); without it the Accelerator's own error stands.
    shared = getattr(AcceleratorState, "_shared_state", None)
    reset = getattr(AcceleratorState, "_reset_state", None)
    if shared and reset and str(shared.get("_mixed_precision", mixed_precision)) != mixed_precision:
        reset()


class Trainer:
    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset | DataLoader,
        *,
        teacher: nn.Module | None = None,
        eval_data: Dataset | DataLoader | None = None,
        objectives: Sequence[TermLike] = ("cross_entropy",),
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        config: TrainerConfig | None = None,
        run_dir: str | Path | None = None,
        fingerprint: str = "",
        label: str = "train",
        evaluator: Callable[[nn.Module, nn.Module | None], dict[str, float]] | None = None,
        batch_transform: BatchTransform | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.config = config or TrainerConfig()
        # A teacher cache stands in for the live teacher: its top-k targets are looked up by the batch's
        # sample ids (`distill.cache.IndexedDataset` adds them).
        self.teacher_cache = teacher_cache
        # `batch_transform(batch, student, progress) -> batch` rewrites each training micro-batch before the
        # forward passes (on-policy sources replace the completions with the student's own rollouts).
        self.batch_transform = batch_transform
        # `evaluator(student, teacher) -> metrics` replaces the classification evaluation (language models);
        # its metrics should include "accuracy", the key the best epoch is chosen by.
        self.evaluator = evaluator
        self.optimizer_config = optimizer or OptimizerConfig()
        self.schedule_config = schedule or ScheduleConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.fingerprint = fingerprint
        self.label = label
        cfg = self.config
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise UserError("trainer: epochs, batch_size and grad_accum must be positive")

        device = cfg.device
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("trainer.device is 'cuda' but no CUDA device is available")
        _allow_mixed_precision(cfg.mixed_precision)
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device

        self.terms = [as_term(t) for t in objectives]
        if not self.terms:
            raise UserError("objectives: at least one objective is needed")
        built = [t.build() for t in self.terms]
        self.term_names = self._unique([name for name, _ in built])
        self.objectives = nn.ModuleList([obj for _, obj in built]).to(self.device)
        needs_teacher = any(o.needs_teacher for o in self.objectives)
        if teacher_cache is not None:
            teacher_cache.check_objectives(self.term_names, list(self.objectives))
        elif needs_teacher and teacher is None:
            names = [n for n, o in zip(self.term_names, self.objectives, strict=True) if o.needs_teacher]
            raise UserError(f"objectives {', '.join(names)} need a teacher, but none was given")
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)

        seed_everything(cfg.seed)
        self.train_loader = _make_loader(
            train_data, cfg.batch_size, seed=cfg.seed, shuffle=True, acc=self.accelerator
        )
        self.eval_loader = (
            None
            if eval_data is None
            else _make_loader(
                eval_data, cfg.eval_batch_size, seed=cfg.seed, shuffle=False, acc=self.accelerator
            )
        )
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        student.to(self.device)
        trainable = [p for p in student.parameters() if p.requires_grad]
        trainable += [p for p in self.objectives.parameters() if p.requires_grad]
        if teacher is not None and {id(p) for p in teacher.parameters()} & {id(p) for p in trainable}:
            raise UserError("the teacher and the student share parameters; the teacher must stay frozen")
        optimizer_ = build_optimizer(trainable, self.optimizer_config)
        self.scheduler = build_scheduler(optimizer_, self.schedule_config, self.total_steps)
        # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step it once
        # per process); the loaders are ours because their order must survive a resume.
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer_)
        self.student_hooks = FeatureHooks(
            self.student, sorted({p for o in self.objectives for p in o.student_layers})
        )
        self.teacher_layers = sorted({p for o in self.objectives for p in o.teacher_layers})
        self.teacher_hooks = (
            FeatureHooks(teacher, self.teacher_layers, detach=True) if teacher is not None else None
        )
        self._teacher_eval_logits: Tensor | None = None
        self._writer: Any = None
        # None until the first step has probed the models (`_fused_layers`); then the output layers or False.
        self._fused: tuple[nn.Linear, nn.Linear | None] | bool | None = None
        self.loss_path = "dense"
        refusal = self._fused_refusal() if cfg.fused_loss != "off" else "trainer.fused_loss is 'off'"
        if refusal is not None and cfg.fused_loss == "on":
            raise UserError(f"trainer.fused_loss is 'on' but {refusal}")
        if refusal is not None:
            self._fused = False

    @staticmethod
    def _unique(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for name in names:
            seen[name] = seen.get(name, 0) + 1
            out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return out

    # ---------------------------------------------------------------- forward passes
    def _teacher_forward(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        assert self.teacher is not None and self.teacher_hooks is not None
        with torch.inference_mode(), self.accelerator.autocast():
            logits = logits_of(_call(self.teacher, inputs))
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        features = {k: v.clone() for k, v in self.teacher_hooks.features.items()}
        self.teacher_hooks.clear()
        return logits.clone(), features

    # ---------------------------------------------------------------- the fused large-vocabulary path
    def _needs_teacher(self) -> bool:
        return any(o.needs_teacher for o in self.objectives)

    def _fused_refusal(self) -> str | None:
        """Why the fused path cannot serve this run, or None when it may (the first batch probes models)."""
        dense = [n for n, o in zip(self.term_names, self.objectives, strict=True) if not o.fused_capable]
        if dense:
            many = len(dense) > 1
            return f"objective{'s' * many} {', '.join(dense)} need{'s' * (not many)} the full logits"
        if output_layer(self.accelerator.unwrap_model(self.student)) is None:
            return "the student has no plain linear output layer (get_output_embeddings)"
        live_teacher = self._needs_teacher() and self.teacher_cache is None
        if live_teacher and (self.teacher is None or output_layer(self.teacher) is None):
            return "the teacher has no plain linear output layer (get_output_embeddings)"
        return None

    def _fused_layers(self, inputs: Any) -> tuple[nn.Linear, nn.Linear | None] | None:
        """The student's and teacher's output layers when this step takes the fused path, else None.

        The first call probes each model on one sequence of `inputs`: its logits must be its output layer's
        output, unchanged (`distill.train.fused.logits_come_from_layer`)."""
        if self._fused is None:
            student = self.accelerator.unwrap_model(self.student)
            live_teacher = self.teacher if self._needs_teacher() and self.teacher_cache is None else None
            models = [("student", student, output_layer(student))]
            if live_teacher is not None:
                models.append(("teacher", live_teacher, output_layer(live_teacher)))
            # In eval mode: the probe is no training pass (no dropout draws, so a resumed run that probes
            # again keeps the random stream of an uninterrupted one; pass counters skip it).
            student.eval()
            try:
                failed = [
                    role
                    for role, model, layer in models
                    if layer is None or not logits_come_from_layer(model, layer, inputs)
                ]
            finally:
                student.train()
            if failed:
                reason = (
                    f"the {' and '.join(failed)} logits are not its output layer's output (post-processed)"
                )
                if self.config.fused_loss == "on":
                    raise UserError(f"trainer.fused_loss is 'on' but {reason}")
                warnings.warn(f"{reason}: the loss uses the dense logits", stacklevel=2)
                self._fused = False
            else:
                layers = [layer for _, _, layer in models if layer is not None]
                self._fused = (layers[0], layers[1] if len(layers) > 1 else None)
                self.loss_path = "fused"
        return self._fused or None

    def _teacher_head(self, inputs: Any, layer: nn.Linear) -> HeadInputs:
        assert self.teacher is not None and self.teacher_hooks is not None
        with torch.inference_mode(), self.accelerator.autocast(), hidden_only(layer) as kept:
            _call(self.teacher, inputs)
        self.teacher_hooks.clear()
        return head_inputs(self.teacher, layer, kept, detach=True)

    def _cached_features(self, index: Tensor, rows: Tensor | None, mask: Tensor | None) -> dict[str, Tensor]:
        """The teacher layers' outputs from the cache, shaped as the live teacher's: a language model's
        counted-token rows go back to their (batch, time) places (zeros elsewhere, which the mask skips)."""
        assert self.teacher_cache is not None
        cached = self.teacher_cache.features(index.cpu(), self.teacher_layers, rows)
        features = {}
        for layer, value in cached.items():
            if mask is not None:
                full = value.new_zeros((*mask.shape, *value.shape[1:]))
                full[mask.cpu()] = value
                value = full
            features[layer] = value.to(self.device)
        return features

    def _step_outputs(
        self,
        inputs: Any,
        labels: Tensor | None,
        mask: Tensor | None,
        progress: TrainProgress,
        index: Tensor | None = None,
    ) -> StepOutputs:
        layers = self._fused_layers(inputs) if self._fused is not False else None
        teacher_logits, teacher_features, teacher_topk, teacher_head = None, {}, None, None
        needs_teacher = self._needs_teacher()
        if self.teacher is not None and needs_teacher:
            if layers is not None and layers[1] is not None:
                teacher_head = self._teacher_head(inputs, layers[1])
            else:
                teacher_logits, teacher_features = self._teacher_forward(inputs)
        elif self.teacher_cache is not None and needs_teacher:
            if index is None:
                raise UserError("a teacher cache needs batches with sample ids (IndexedDataset)")
            rows = rows_per_sample(mask, len(index))
            teacher_topk = self.teacher_cache.targets(index.cpu(), rows)
            if self.teacher_layers:
                teacher_features = self._cached_features(index, rows, mask)
        student_head = None
        with self.accelerator.autocast():
            if layers is None:
                student_logits = logits_of(_call(self.student, inputs))
            else:  # the logits come back empty; the losses read the output layer's input instead
                with hidden_only(layers[0]) as kept:
                    student_logits = logits_of(_call(self.student, inputs))
                student = self.accelerator.unwrap_model(self.student)
                student_head = head_inputs(student, layers[0], kept, detach=False)
        features = dict(self.student_hooks.features)
        self.student_hooks.clear()
        return StepOutputs(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            labels=labels,
            mask=mask,
            student_features=features,
            teacher_features=teacher_features,
            progress=progress,
            teacher_topk=teacher_topk,
            student_head=student_head,
            teacher_head=teacher_head,
        )

    def _to_device(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value.to(self.device, non_blocking=True) if isinstance(value, Tensor) else value

    # ---------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def _predict(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        assert self.eval_loader is not None
        was_training = model.training
        model.eval()
        logits, labels = [], []
        for batch in self.eval_loader:
            inputs, y, _ = split_batch(batch)
            with self.accelerator.autocast():
                logits.append(logits_of(_call(model, self._to_device(inputs))).float().cpu())
            labels.append(y)
        model.train(was_training)
        return torch.cat(logits), torch.cat(labels)

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is not None:
            return self.evaluator(self.accelerator.unwrap_model(self.student), self.teacher)
        if self.eval_loader is None:
            return {}
        if self.teacher is not None and self._teacher_eval_logits is None:
            self._teacher_eval_logits, _ = self._predict(self.teacher)
        logits, labels = self._predict(self.student)
        return classification_metrics(logits, labels, self._teacher_eval_logits)

    # ---------------------------------------------------------------- logging
    def _log(self, row: dict[str, Any]) -> None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            prefix = row["kind"]
            for key, value in row.items():
                if isinstance(value, int | float) and key not in {"step", "kind"}:
                    self._writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def _open_logs(self, resumed_step: int | None) -> None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "metrics.jsonl"
        if resumed_step is not None and log.exists():
            # Drop what was logged after the checkpoint: those steps are about to run again.
            kept = [
                line
                for line in log.read_text().splitlines()
                if line and json.loads(line)["step"] <= resumed_step
            ]
            atomic_write_text(log, "".join(line + "\n" for line in kept))
        elif resumed_step is None:
            atomic_write_text(log, "")
        if self.config.tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _write_summary(self, result: FitResult) -> None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        rows = result.history
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())
        if result.completed:
            summary = asdict(result)
            summary["run_dir"] = str(self.run_dir)
            atomic_write_json(self.run_dir / "final.json", summary)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, state: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        model = self.accelerator.unwrap_model(self.student)
        # Every process takes part: a sharded (FSDP) student's weights are gathered onto rank 0 first.
        states = full_states(model, self.optimizer)
        if not self.accelerator.is_main_process:
            return
        scheduler_state = self.scheduler.state_dict()
        scheduler_state.pop("lr_lambdas", None)
        save_checkpoint(
            self.run_dir,
            step=state["step"],
            model=model,
            optimizer=self.optimizer,
            objectives=self.objectives,
            state={**state, "scheduler": scheduler_state, "fingerprint": self.fingerprint},
            keep=self.config.keep_checkpoints,
            states=states,
        )

    def _restore(self) -> dict[str, Any] | None:
        path = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if path is None:
            return None
        checkpoint = load_checkpoint(
            path,
            model=self.accelerator.unwrap_model(self.student),
            optimizer=self.optimizer,
            objectives=self.objectives,
            fingerprint=self.fingerprint,
        )
        scheduler_state = checkpoint.state["scheduler"]
        scheduler_state["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(scheduler_state)
        return checkpoint.state

    # ---------------------------------------------------------------- the loop
    def _batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        sampler = getattr(self.train_loader, "sampler", None)
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=start_batch * self.config.batch_size)
            yield from self.train_loader
            return
        for index, batch in enumerate(self.train_loader):  # a user's own DataLoader: skip by counting
            if index >= start_batch:
                yield batch

    def fit(self, *, resume: bool = False) -> FitResult:
        cfg = self.config
        state: dict[str, Any] = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "history": [],
            "train_seconds": 0.0,
            "epoch_loss_sum": 0.0,
            "epoch_batches": 0,
        }
        restored = self._restore() if resume else None
        if restored is not None:
            state.update({k: restored[k] for k in state})
        self._open_logs(restored["step"] if restored is not None else None)

        self.student.train()
        stop_requested = False
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            disable=not (cfg.progress and self.accelerator.is_main_process),
            transient=True,
        )
        with bar, stop_on_signals() as stop:
            task = bar.add_task(self.label, total=self.total_steps, completed=state["step"], status="")
            while state["epoch"] < cfg.epochs and not stop_requested:
                epoch = state["epoch"]
                started = time.perf_counter()
                for window in self._windows(epoch, state["batch"]):
                    fractional_epoch = epoch + state["batch"] / self.batches_per_epoch
                    progress = TrainProgress(state["step"], self.total_steps, fractional_epoch)
                    weights = [term.weight_at(fractional_epoch) for term in self.terms]
                    mean_values = self._train_window(window, weights, progress)
                    state["batch"] += len(window)
                    state["step"] += 1
                    if mean_values is not None:
                        total = float(sum(w * v for w, v in zip(weights, mean_values.tolist(), strict=True)))
                        state["epoch_loss_sum"] += total
                        state["epoch_batches"] += 1
                        for objective, value in zip(self.objectives, mean_values.tolist(), strict=True):
                            objective.after_step(progress, value)
                        if state["step"] % cfg.log_every == 0:
                            self._log_train(state, total, mean_values)
                    running = state["epoch_loss_sum"] / max(1, state["epoch_batches"])
                    status = f"epoch {epoch + 1}/{cfg.epochs} loss {running:.4f}"
                    bar.update(task, advance=1, status=status)
                    last_in_epoch = state["batch"] >= self.batches_per_epoch
                    if (
                        cfg.checkpoint_every
                        and state["step"] % cfg.checkpoint_every == 0
                        and not last_in_epoch
                    ):
                        state["train_seconds"] += time.perf_counter() - started
                        started = time.perf_counter()
                        self._save(state)
                    if stop.agreed(self.device):
                        state["train_seconds"] += time.perf_counter() - started
                        self._stop_on_signal(state, stop)
                    if cfg.stop_after_steps is not None and state["step"] >= cfg.stop_after_steps:
                        stop_requested = True
                        break
                state["train_seconds"] += time.perf_counter() - started
                if state["batch"] < self.batches_per_epoch:  # stopped inside the epoch
                    break
                self._end_epoch(state)
                every = cfg.checkpoint_every
                if every == 0 or state["step"] % every == 0 or state["epoch"] == cfg.epochs:
                    self._save(state)
        return self._result(state, completed=state["epoch"] >= cfg.epochs)

    def _windows(self, epoch: int, start_batch: int) -> Iterator[list[Any]]:
        """The epoch's batches from `start_batch` on, grouped into gradient-accumulation windows (aligned to
        the epoch start, the last one possibly shorter)."""
        accum = self.config.grad_accum
        window: list[Any] = []
        index = start_batch
        for batch in self._batches(epoch, start_batch):
            window.append(batch)
            index += 1
            if index % accum == 0 or index == self.batches_per_epoch:
                yield window
                window = []

    def _counted_rows(self, inputs: Any, mask: Tensor | None) -> int:
        if mask is not None:
            return int(mask.sum())
        return len(inputs) if not isinstance(inputs, dict) else len(next(iter(inputs.values())))

    def _train_window(
        self, window: list[Any], weights: list[float], progress: TrainProgress
    ) -> Tensor | None:
        """Forward and backward over one accumulation window, then one optimizer step.

        Each micro-batch's objectives are means over its counted rows (samples, or tokens where a mask is
        given); weighting micro-batch i by n_i / N, N the rows counted in the whole window on all processes,
        makes the gradient that of the mean over every counted row of the window: accumulation 4 x batch 2
        equals 1 x batch 8, for any padding. DDP averages gradients over processes, hence the world size.
        Returns the window's mean value per term over every process (what is logged and what adaptive
        objectives see, identical on all processes), or None when a non-finite value made it skip the window.
        """
        if self.batch_transform is not None:
            student = self.accelerator.unwrap_model(self.student)
            window = [self.batch_transform(self._to_device(batch), student, progress) for batch in window]
        micro = [tuple(self._to_device(v) for v in split_batch(batch)) for batch in window]
        indices = [batch.get("index") if isinstance(batch, dict) else None for batch in window]
        counts = [self._counted_rows(inputs, mask) for inputs, _, mask in micro]
        window_rows = torch.tensor(float(sum(counts)), device=self.device)
        if self.accelerator.num_processes > 1:
            window_rows = self.accelerator.reduce(window_rows, reduction="sum")
        world = self.accelerator.num_processes
        values_sum = torch.zeros(len(self.terms))
        counted = 0
        for index, ((inputs, labels, mask), rows) in enumerate(zip(micro, counts, strict=True)):
            if rows == 0 and world == 1:
                continue
            last = index == len(micro) - 1
            sync = contextlib.nullcontext() if last or world == 1 else self.accelerator.no_sync(self.student)
            outputs = self._step_outputs(inputs, labels, mask, progress, indices[index])
            if rows == 0:  # rows count on another process: a zero backward keeps DDP's all-reduce in step
                with sync:
                    self.accelerator.backward(outputs.student_logits.float().nan_to_num(0, 0, 0).sum() * 0)
                continue
            values = [objective(outputs) for objective in self.objectives]
            detached = torch.stack([v.detach().float() for v in values]).cpu()
            # With several processes the check waits for the totals below: every process must skip or stop.
            if world == 1 and self._check_finite(detached, progress.step):  # skip: drop the whole window
                self._optimizer_step(skip=True)
                return None
            loss = sum(w * v for w, v in zip(weights, values, strict=True))
            with sync:
                self.accelerator.backward(loss * (rows * world / window_rows))
            values_sum += detached * rows
            counted += rows
        if world > 1:
            totals = torch.cat([values_sum, torch.tensor([float(counted)])]).to(self.device)
            totals = self.accelerator.reduce(totals, reduction="sum").cpu()
            values_sum, counted = totals[:-1], int(totals[-1])
            if self._check_finite(values_sum, progress.step):  # non-finite anywhere: non-finite here
                self._optimizer_step(skip=True)
                return None
        self._optimizer_step(skip=counted == 0)
        return values_sum / max(1, counted)

    def _stop_on_signal(self, state: dict[str, Any], stop: StopRequest) -> None:
        self._save(state)
        saved = f"; checkpoint saved in {self.run_dir}, continue with --resume" if self.run_dir else ""
        raise TrainingInterrupted(f"{stop.name} at step {state['step']}{saved}", stop.signum or 0)

    def _check_finite(self, values: Tensor, step: int) -> bool:
        """True when this micro-batch must be skipped; raises when the recipe says stop."""
        bad = ~torch.isfinite(values)
        if not bad.any():
            return False
        name = self.term_names[int(bad.nonzero()[0])]
        message = f"step {step}: objective '{name}' is {values[bad][0].item()}"
        if self.config.nonfinite == "stop":
            raise NonFiniteLossError(message + " (set trainer.nonfinite: skip to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _optimizer_step(self, *, skip: bool) -> None:
        if not skip:
            if self.config.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_train(self, state: dict[str, Any], total: float, values: Tensor) -> None:
        row = {"kind": "train", "step": state["step"], "epoch": state["epoch"], "loss": total}
        row |= {f"loss/{n}": v for n, v in zip(self.term_names, values.tolist(), strict=True)}
        row["lr"] = self.scheduler.get_last_lr()[0]
        self._log(row)

    def _end_epoch(self, state: dict[str, Any]) -> None:
        epoch = state["epoch"] + 1
        row: dict[str, Any] = {
            "kind": "eval",
            "step": state["step"],
            "epoch": epoch,
            "train_loss": state["epoch_loss_sum"] / max(1, state["epoch_batches"]),
            "seconds": state["train_seconds"],
        }
        if epoch % self.config.eval_every == 0 or epoch == self.config.epochs:
            row |= self.evaluate()
        state["history"].append(row)
        self._log(row)
        state.update(epoch=epoch, batch=0, epoch_loss_sum=0.0, epoch_batches=0)

    def _result(self, state: dict[str, Any], *, completed: bool) -> FitResult:
        history = state["history"]
        evaluated = [row for row in history if "accuracy" in row]
        final = evaluated[-1] if evaluated else (history[-1] if history else {})
        best = max(evaluated, key=lambda row: row["accuracy"]) if evaluated else final
        result = FitResult(
            final=dict(final),
            best=dict(best),
            history=history,
            train_seconds=state["train_seconds"],
            steps=state["step"],
            completed=completed,
            run_dir=self.run_dir,
            loss_path=self.loss_path,
        )
        self._write_summary(result)
        if self._writer is not None:
            self._writer.close()
        self.student_hooks.remove()
        if self.teacher_hooks is not None:
            self.teacher_hooks.remove()
        return result


def _call(model: nn.Module, inputs: Any) -> Any:
    """A model on its inputs: a dict (a language-model batch) is passed as keyword arguments."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def fit(
    student: nn.Module,
    train_data: Dataset | DataLoader,
    *,
    teacher: nn.Module | None = None,
    eval_data: Dataset | DataLoader | None = None,
    objectives: Sequence[TermLike] = ("cross_entropy",),
    optimizer: OptimizerConfig | None = None,
    schedule: ScheduleConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    label: str = "train",
    evaluator: Callable[[nn.Module, nn.Module | None], dict[str, float]] | None = None,
    batch_transform: BatchTransform | None = None,
    teacher_cache: TeacherCache | None = None,
    **config: Any,
) -> FitResult:
    """Train `student` on `train_data` with `objectives`, distilling from `teacher` if given.

    Keyword arguments beyond these are `TrainerConfig` fields (`epochs=30`, `batch_size=32`, ...).
    Objectives: names (`"hinton_kd"`), `(name, weight)`, `(name, weight, params)`, `Term`s or objects.
    `evaluator(student, teacher) -> metrics`, if given, replaces the classification metrics (language models).
    `batch_transform(batch, student, progress) -> batch` rewrites each training micro-batch first.
    `teacher_cache` (a `distill.cache.TeacherCache`, with `train_data` wrapped in `IndexedDataset`) replaces
    the teacher by its cached top-k targets.
    """
    unknown = set(config) - set(TrainerConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"fit() got unknown settings: {', '.join(sorted(unknown))}")
    trainer = Trainer(
        student,
        train_data,
        teacher=teacher,
        eval_data=eval_data,
        objectives=objectives,
        optimizer=optimizer,
        schedule=schedule,
        config=TrainerConfig(**config),
        run_dir=run_dir,
        fingerprint=fingerprint,
        label=label,
        evaluator=evaluator,
        batch_transform=batch_transform,
        teacher_cache=teacher_cache,
    )
    return trainer.fit(resume=resume)

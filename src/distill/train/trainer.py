"""The one training loop: a teacher (`distill.teachers`), a student, weighted objectives, on Accelerate.

A teacher stays frozen, in eval mode, under `torch.inference_mode()`, outside the optimizer and DDP, unless
it is co-trained (its own parameter group, its loss in the same backward pass). The step's forward passes
are assembled in `distill.train.step`, logs written by `distill.train.logs`. Data order depends only on
(seed, epoch); checkpoints carry weights, optimizer, scheduler, objective (and EMA or co-trained teacher)
state and RNG, so a resumed run ends with the metrics of an uninterrupted one. How long it trains (epochs,
`max_steps`, `max_tokens`) is `distill.train.length`'s; trackers (wandb, MLflow) `distill.train.trackers`'.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from distill.cache.indexed import IndexedDataset
from distill.errors import NonFiniteLossError, UserError
from distill.metrics import classification_metrics
from distill.objectives import Progress as TrainProgress
from distill.objectives.terms import BatchTransform, TermLike, as_term
from distill.teachers import Teacher, as_teacher
from distill.train.batches import counted_rows, make_loader, predict, split_batch
from distill.train.checkpoint import (
    TRAINER_STATE,
    full_states,
    restore_scheduler,
    resume_checkpoint,
    save_checkpoint,
    scheduler_state,
)
from distill.train.config import FitResult, TrainerConfig, allow_mixed_precision
from distill.train.feature_taps import bind_feature_objectives, probe_and_build, sample_batch, teacher_pass
from distill.train.gradients import nonfinite_message, sync_objective_gradients
from distill.train.length import TrainingLength, new_state, refuse_tokens_without_mask
from distill.train.logs import RunLog, progress_bar
from distill.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler
from distill.train.seeding import seed_everything
from distill.train.signals import StopRequest, TrainingInterrupted, stop_on_signals
from distill.train.step import StepAssembler, row_data_of
from distill.train.trackers import Tracking, refuse_unusable_trackers
from distill.train.windows import accumulation_windows, epoch_batches

if TYPE_CHECKING:
    from distill.cache.store import TeacherCache


class Trainer:
    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset | DataLoader,
        *,
        teacher: Teacher | nn.Module | None = None,
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
        # Every kind of teacher behind one interface (`distill.teachers`): a model is frozen, a cache's top-k
        # targets are looked up by the batch's sample ids (`distill.cache.IndexedDataset` adds them).
        self.teacher = as_teacher(teacher, teacher_cache)
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
        allow_mixed_precision(cfg.mixed_precision)
        refuse_unusable_trackers(cfg.trackers, "trackers")  # Accelerate would drop a missing one silently
        self.accelerator = Accelerator(
            cpu=device == "cpu", mixed_precision=cfg.mixed_precision, log_with=list(cfg.trackers) or None
        )
        self.device = self.accelerator.device

        self.terms = [as_term(t) for t in objectives]
        if not self.terms:
            raise UserError("objectives: at least one objective is needed")
        built = [t.build() for t in self.terms]
        self.term_names = self._unique([name for name, _ in built])
        self.objectives = nn.ModuleList([obj for _, obj in built]).to(self.device)
        needs_teacher = any(o.needs_teacher for o in self.objectives)
        # Feature objectives' layers resolved first: a teacher (a cache) checks them against what it holds.
        bind_feature_objectives(
            self.objectives, self.term_names, student, self.teacher.module if self.teacher else None
        )
        if self.teacher is not None:
            self.teacher.check_objectives(self.term_names, list(self.objectives))
        elif needs_teacher:
            names = [n for n, o in zip(self.term_names, self.objectives, strict=True) if o.needs_teacher]
            raise UserError(f"objectives {', '.join(names)} need a teacher, but none was given")
        if self.teacher is not None and self.teacher.trainable and self.accelerator.num_processes > 1:
            raise UserError("a co-trained teacher trains in one process only (it is not wrapped in DDP)")
        teacher_layers = sorted({p for o in self.objectives for p in o.teacher_layers})
        if self.teacher is not None:
            self.teacher.attach(self.device, self.accelerator.autocast, teacher_layers)
            if not any(o.needs_teacher and o.needs_teacher_logits for o in self.objectives):
                self.teacher.skip_logits()
        # An objective that learns on held-out data keeps its part of the training set, carved once from the
        # seed; the student trains on the rest (`Objective.hold_out`).
        for objective in self.objectives:
            train_data = objective.hold_out(train_data, cfg.seed)
        needs_index = any(getattr(o, "needs_index", False) for o in self.objectives)
        if needs_index and isinstance(train_data, Dataset) and not isinstance(train_data, IndexedDataset):
            train_data = IndexedDataset(train_data)  # CRD's memory banks are read by sample id

        seed_everything(cfg.seed)
        self.train_loader = make_loader(
            train_data, cfg.batch_size, seed=cfg.seed, shuffle=True, acc=self.accelerator
        )
        self.eval_loader = (
            None
            if eval_data is None
            else make_loader(
                eval_data, cfg.eval_batch_size, seed=cfg.seed, shuffle=False, acc=self.accelerator
            )
        )
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.length = TrainingLength(cfg.epochs, self.steps_per_epoch, cfg.max_steps, cfg.max_tokens)
        self.total_steps = self.length.total_steps
        self._window_tokens = 0  # counted rows of the last window, over every process

        student.to(self.device)
        # Feature objectives build their projectors from one dry forward pass, before the optimizer sees them.
        probe = sample_batch(self.train_loader)
        refuse_tokens_without_mask(self.length, probe)
        probe_and_build(
            self.objectives,
            student,
            self.teacher,
            probe,
            self._to_device,
            len(self.train_loader.dataset),  # type: ignore[arg-type]
        )
        loader = self.train_loader
        teacher_pass(
            self.objectives,
            self.teacher,
            loader.dataset,
            loader.collate_fn or default_collate,
            self._to_device,
            cfg.batch_size,
        )
        self.objectives.to(self.device)
        trainable = [p for p in student.parameters() if p.requires_grad]
        trainable += [p for p in self.objectives.parameters() if p.requires_grad]
        teacher_module = self.teacher.module if self.teacher is not None else None
        if teacher_module is not None and {id(p) for p in teacher_module.parameters()} & {
            id(p) for p in trainable
        }:
            raise UserError("the teacher and the student share parameters; the teacher must stay frozen")
        groups: list[Any] = [{"params": trainable}]
        if self.teacher is not None and self.teacher.trainable:  # only a co-trained teacher learns
            groups.append({"params": self.teacher.trainable_parameters(), **self.teacher.optimizer_options()})
        optimizer_ = build_optimizer(groups, self.optimizer_config)
        self.scheduler = build_scheduler(optimizer_, self.schedule_config, self.total_steps)
        # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step it once
        # per process); the loaders are ours because their order must survive a resume.
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer_)
        self.step = StepAssembler(
            self.accelerator,
            self.student,
            self.teacher,
            list(self.objectives),
            self.term_names,
            cfg.fused_loss,
        )
        self.log = RunLog(
            self.run_dir, main_process=self.accelerator.is_main_process, tensorboard=cfg.tensorboard
        )
        self.tracking = Tracking(self.accelerator, cfg.trackers, cfg.tracker_project, label)
        self._teacher_eval_logits: Tensor | None = None
        # Checkpoints keep the objectives' state and, for an EMA or co-trained teacher, the teacher's.
        teacher_state = self.teacher.state_module() if self.teacher is not None else None
        self.saved_state = nn.ModuleList(
            [*self.objectives, teacher_state] if teacher_state is not None else list(self.objectives)
        )

    @property
    def loss_path(self) -> str:
        return self.step.loss_path

    @staticmethod
    def _unique(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for name in names:
            seen[name] = seen.get(name, 0) + 1
            out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return out

    def _to_device(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value.to(self.device, non_blocking=True) if isinstance(value, Tensor) else value

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        teacher = self.teacher.module if self.teacher is not None else None
        if self.evaluator is not None:
            return self.evaluator(self.accelerator.unwrap_model(self.student), teacher)
        if self.eval_loader is None:
            return {}
        if teacher is not None and self.teacher is not None and self.teacher.static:
            if self._teacher_eval_logits is None:  # a frozen teacher's predictions never change
                self._teacher_eval_logits, _ = predict(teacher, self.eval_loader, self.accelerator)
        elif teacher is not None:
            self._teacher_eval_logits, _ = predict(teacher, self.eval_loader, self.accelerator)
        logits, labels = predict(self.student, self.eval_loader, self.accelerator)
        return classification_metrics(logits, labels, self._teacher_eval_logits)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, state: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        model = self.accelerator.unwrap_model(self.student)
        # Every process takes part: a sharded (FSDP) student's weights are gathered onto rank 0 first.
        states = full_states(model, self.optimizer)
        if not self.accelerator.is_main_process:
            return
        save_checkpoint(
            self.run_dir,
            step=state["step"],
            model=model,
            optimizer=self.optimizer,
            objectives=self.saved_state,
            state={
                **state,
                "scheduler": scheduler_state(self.scheduler),
                "fingerprint": self.fingerprint,
                "seed": self.config.seed,
            },
            keep=self.config.keep_checkpoints,
            states=states,
        )

    def _restore(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies (checksums, this run's fingerprint and seed, the trainer's
        state): an older good one, with one warning line, when the newest is damaged; one line when none is
        good (`distill.train.checkpoint.resume_checkpoint`)."""
        if self.run_dir is None:
            return None

        checkpoint = resume_checkpoint(
            self.run_dir,
            model=self.accelerator.unwrap_model(self.student),
            optimizer=self.optimizer,
            objectives=self.saved_state,
            fingerprint=self.fingerprint,
            identity={"seed": self.config.seed},
            required=TRAINER_STATE,
            restore=lambda state: restore_scheduler(self.scheduler, state["scheduler"]),
            quiet=not self.accelerator.is_main_process,
        )
        return checkpoint.state if checkpoint is not None else None

    # ---------------------------------------------------------------- the loop
    def fit(self, *, resume: bool = False) -> FitResult:
        state = new_state()
        restored = self._restore() if resume else None
        if restored is not None:  # checkpoints from before token budgets have no "tokens": 0 then
            state.update({k: restored[k] for k in state if k in restored})
        self.log.open(restored["step"] if restored is not None else None)
        sections = dict(trainer=self.config, optimizer=self.optimizer_config, schedule=self.schedule_config)
        self.tracking.start(sections, self.run_dir, total_steps=self.total_steps)
        try:
            self._train(state)
        finally:  # a run that stops early (a signal, a non-finite loss) closes its trackers' runs too
            self.tracking.finish()
        return self._result(state, completed=self._finished(state))

    def _finished(self, state: dict[str, Any]) -> bool:
        return self.length.finished(state["epoch"], state["step"], state["tokens"])

    def _train(self, state: dict[str, Any]) -> None:
        cfg = self.config
        self.student.train()
        stop_requested = False
        bar = progress_bar(cfg.progress and self.accelerator.is_main_process)
        with bar, stop_on_signals() as stop:
            task = bar.add_task(self.label, total=self.total_steps, completed=state["step"], status="")
            while not self._finished(state) and not stop_requested:
                epoch = state["epoch"]
                started = time.perf_counter()
                for window in self._windows(epoch, state["batch"]):
                    fractional_epoch = epoch + state["batch"] / self.batches_per_epoch
                    progress = TrainProgress(state["step"], self.total_steps, fractional_epoch)
                    weights = [term.weight_at(fractional_epoch) for term in self.terms]
                    mean_values = self._train_window(window, weights, progress)
                    state["batch"] += len(window)
                    state["step"] += 1
                    state["tokens"] += self._window_tokens
                    if mean_values is not None:
                        total = float(sum(w * v for w, v in zip(weights, mean_values.tolist(), strict=True)))
                        state["epoch_loss_sum"] += total
                        state["epoch_batches"] += 1
                        for objective, value in zip(self.objectives, mean_values.tolist(), strict=True):
                            objective.after_step(progress, value)
                        if state["step"] % cfg.log_every == 0:
                            self._log_train(state, total, mean_values)
                    running = state["epoch_loss_sum"] / max(1, state["epoch_batches"])
                    bar.update(task, advance=1, status=f"{self.length.epoch_text(epoch)} loss {running:.4f}")
                    if self.length.budget_spent(state["step"], state["tokens"]):
                        break  # the run's length: its (cut) epoch is evaluated and saved below, as any other
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
                cut = self.length.budget_spent(state["step"], state["tokens"])
                if state["batch"] < self.batches_per_epoch and not cut:  # stopped inside the epoch
                    break
                self._end_epoch(state)
                every = cfg.checkpoint_every
                saved = every == 0 or state["step"] % every == 0 or self._finished(state)
                if saved:
                    self._save(state)
                if stop.agreed(self.device):  # a signal during the evaluation or the checkpoint
                    self._stop_on_signal(state, stop, save=not saved)

    def _windows(self, epoch: int, start_batch: int) -> Iterator[list[Any]]:
        batches = epoch_batches(self.train_loader, epoch, start_batch, self.config.batch_size)
        return accumulation_windows(batches, start_batch, self.config.grad_accum, self.batches_per_epoch)

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
        row_data = [self._to_device(row_data_of(batch)) for batch in window]
        counts = [counted_rows(inputs, mask) for inputs, _, mask in micro]
        window_rows = torch.tensor(float(sum(counts)), device=self.device)
        if self.accelerator.num_processes > 1:
            window_rows = self.accelerator.reduce(window_rows, reduction="sum")
        self._window_tokens = int(window_rows.item())  # what `max_tokens` counts, equal on every process
        world = self.accelerator.num_processes
        values_sum = torch.zeros(len(self.terms))
        counted = 0
        seen: Any = None
        for index, ((inputs, labels, mask), rows) in enumerate(zip(micro, counts, strict=True)):
            if rows == 0 and world == 1:
                continue
            last = index == len(micro) - 1
            sync = contextlib.nullcontext() if last or world == 1 else self.accelerator.no_sync(self.student)
            outputs = self.step(inputs, labels, mask, progress, indices[index], row_data[index])
            if rows == 0:  # rows count on another process: a zero backward keeps DDP's all-reduce in step
                with sync:
                    self.accelerator.backward(outputs.student_logits.float().nan_to_num(0, 0, 0).sum() * 0)
                continue
            values = [objective(outputs) for objective in self.objectives]
            seen = inputs  # the last micro-batch the objectives saw (`Objective.after_optimizer_step`)
            detached = torch.stack([v.detach().float() for v in values]).cpu()
            # With several processes the check waits for the totals below: every process must skip or stop.
            if world == 1 and self._check_finite(detached, progress.step):  # skip: drop the whole window
                self._optimizer_step(skip=True)
                return None
            loss = sum(w * v for w, v in zip(weights, values, strict=True))
            own = self.teacher.loss(outputs) if self.teacher is not None else None
            if own is not None:  # a co-trained teacher learns in the same backward pass
                loss = loss + own
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
        if counted:  # objectives whose own parameters learn outside the optimizer (bilevel), after its step
            student, lr = self.accelerator.unwrap_model(self.student), self.optimizer.param_groups[0]["lr"]
            for objective in self.objectives:
                objective.after_optimizer_step(student, seen, progress, lr)
        return values_sum / max(1, counted)

    def _stop_on_signal(self, state: dict[str, Any], stop: StopRequest, *, save: bool = True) -> None:
        if save:
            self._save(state)
        saved = f"; checkpoint saved in {self.run_dir}, continue with --resume" if self.run_dir else ""
        raise TrainingInterrupted(f"{stop.name} at step {state['step']}{saved}", stop.signum or 0)

    def _check_finite(self, values: Tensor, step: int) -> bool:
        """True when this micro-batch must be skipped; raises when the recipe says stop."""
        message = nonfinite_message(values, self.term_names, step, self.student)
        if message is None:
            return False
        if self.config.nonfinite == "stop":
            raise NonFiniteLossError(message + " (set trainer.nonfinite: skip to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _optimizer_step(self, *, skip: bool) -> None:
        if not skip:
            sync_objective_gradients(self.objectives, self.accelerator)
            if self.config.max_grad_norm is not None:
                clipped = [*self.student.parameters(), *self.objectives.parameters()]
                self.accelerator.clip_grad_norm_(clipped, self.config.max_grad_norm)
            self.optimizer.step()
            if self.teacher is not None:
                self.teacher.after_optimizer_step(self.accelerator.unwrap_model(self.student))
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_train(self, state: dict[str, Any], total: float, values: Tensor) -> None:
        row = {"kind": "train", "step": state["step"], "epoch": state["epoch"], "loss": total}
        row |= {f"loss/{n}": v for n, v in zip(self.term_names, values.tolist(), strict=True)}
        row["lr"] = self.scheduler.get_last_lr()[0]
        self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        self.log.write(row)
        self.tracking.log(row)

    def _end_epoch(self, state: dict[str, Any]) -> None:
        """Evaluate (every `eval_every` epochs, and at the end) and log the epoch; one cut short by the run's
        length is logged at its fractional epoch."""
        epoch = state["epoch"] + 1
        whole = state["batch"] >= self.batches_per_epoch
        row: dict[str, Any] = {
            "kind": "eval",
            "step": state["step"],
            "epoch": epoch if whole else round(state["epoch"] + state["batch"] / self.batches_per_epoch, 4),
            "train_loss": state["epoch_loss_sum"] / max(1, state["epoch_batches"]),
            "seconds": state["train_seconds"],
        }
        if epoch % self.config.eval_every == 0 or self.length.finished(epoch, state["step"], state["tokens"]):
            row |= self.evaluate()
        state["history"].append(row)
        self._write(row)
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
            tokens=state["tokens"],
            completed=completed,
            run_dir=self.run_dir,
            loss_path=self.loss_path,
        )
        self.log.summary(result)
        self.log.close()
        self.step.remove_hooks()
        return result

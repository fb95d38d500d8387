"""TGeo-KD: a per-sample CE / KD fusion ratio from a small network on trilateral relations, learned on
held-out data by a one-step look-ahead (bilevel).

"Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation" (Hu, Wu et al., ICLR
2024, arXiv 2312.15112); no official code. The maths is `distill.losses.tgeo`; this objective owns the state:

* the ratio network f_omega (6C relation features -> hidden ReLU layer -> sigmoid), kept out of the
  student's optimizer (its parameters do not require gradients: the training loss must not pick alpha);
* its outer optimizer's state (Adam moments, the number of outer steps) and T-bar, the teacher's mean
  probability vector per class over every training sample seen so far (sums and counts): buffers, so that
  checkpoints carry all of it. Their shapes follow the number of classes, known at the first batch (or from
  the checkpoint being restored).

The trainer's two hooks drive the bilevel part: `hold_out` carves a seeded part of the training set once
(the student never trains on it); `after_optimizer_step` then takes one validation batch from it and makes
one Adam step on omega down the gradient of

    J(omega) = CE(student_{theta'}(x_val), y_val),   theta' = theta - lr * grad_theta L_train(theta, omega),

L_train the fused loss of the last training micro-batch with ratios f_omega(relations) (Meta-Weight-Net's
one-step look-ahead, second order through `torch.func.functional_call`). theta is the student after the
optimizer step just taken, so omega learns one step behind MW-Net's order (update omega, then theta).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from distill.errors import UserError
from distill.losses.tgeo import tgeo_kd, trilateral_relations
from distill.models.adapters import logits_of
from distill.objectives.base import (
    OBJECTIVES,
    Objective,
    Progress,
    StepOutputs,
    check_params,
    number_in,
    positive_number,
    whole_number,
)

NAME = "tgeo_kd"
PAPER = (
    "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation "
    "(Hu, Wu et al., ICLR 2024)"
)
RELATIONS = 6  # edge vectors per class: S-T, S-G, T-G, S-Tbar, T-Tbar, G-Tbar
BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's defaults (Meta-Weight-Net's official code: Adam on the weight net)


class RatioNet(nn.Module):
    """f_omega: relations (N, 6C) -> alpha (N,) in (0, 1), one hidden ReLU layer; with the outer Adam's
    moments as buffers (`exp_avg_i`, `exp_avg_sq_i` for the i-th parameter)."""

    def __init__(self, classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(RELATIONS * classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for i, param in enumerate(self.net.parameters()):
            param.requires_grad_(False)
            self.register_buffer(f"exp_avg_{i}", torch.zeros_like(param))
            self.register_buffer(f"exp_avg_sq_{i}", torch.zeros_like(param))

    def forward(self, relations: Tensor, omega: dict[str, Tensor] | None = None) -> Tensor:
        relations = relations.to(self.net[0].weight.dtype)
        out = self.net(relations) if omega is None else functional_call(self.net, omega, (relations,))
        return torch.sigmoid(out).squeeze(-1)

    @torch.no_grad()
    def adam_step(self, grads: list[Tensor], step: int, lr: float, weight_decay: float) -> None:
        """One Adam step (torch.optim.Adam's update, L2 weight decay) on the network's parameters."""
        (b1, b2), correction1, correction2 = BETAS, 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
        for i, (param, grad) in enumerate(zip(self.net.parameters(), grads, strict=True)):
            grad = grad + weight_decay * param if weight_decay else grad
            m, v = getattr(self, f"exp_avg_{i}"), getattr(self, f"exp_avg_sq_{i}")
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            param.addcdiv_(m, (v / correction2).sqrt_().add_(EPS), value=-lr / correction1)


class Part(Dataset):
    """Some samples of a data set, in the given order; keeps its collation and token counts."""

    def __init__(self, data: Any, indices: list[int]) -> None:
        self.data, self.indices = data, indices
        if getattr(data, "collate_fn", None) is not None:
            self.collate_fn = data.collate_fn
        lengths = getattr(data, "lengths", None)
        if lengths is not None:
            self.lengths = [int(lengths[i]) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]


def _inputs_and_labels(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "inputs" in batch and "labels" in batch:
        return batch["inputs"], batch["labels"]
    raise UserError(f"objective '{NAME}': held-out samples must be (inputs, label) pairs, got {type(batch)}")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, Tensor) else value


def _call(student: nn.Module, params: dict[str, Tensor], inputs: Any) -> Tensor:
    if isinstance(inputs, dict):
        return logits_of(functional_call(student, params, (), inputs))
    return logits_of(functional_call(student, params, (inputs,)))


class TGeoKD(Objective):
    """The fused loss with ratios from f_omega; omega learned by `after_optimizer_step` (see the module)."""

    needs_labels = True

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        hidden: int = 100,
        validation_fraction: float = 0.1,
        validation_batch_size: int | None = None,
        outer_lr: float = 1e-3,
        outer_weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        self.temperature = positive_number(NAME, "temperature", temperature)
        self.hidden = whole_number(NAME, "hidden", hidden, 1, 1 << 16)
        self.validation_fraction = number_in(
            NAME, "validation_fraction", validation_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        self.validation_batch_size = (
            None
            if validation_batch_size is None
            else whole_number(NAME, "validation_batch_size", validation_batch_size, 1, 1 << 20)
        )
        self.outer_lr = positive_number(NAME, "outer_lr", outer_lr)
        self.outer_weight_decay = number_in(NAME, "outer_weight_decay", outer_weight_decay, 0.0)
        self.register_buffer("outer_steps", torch.zeros((), dtype=torch.long))
        self.ratio: RatioNet | None = None  # made at the first batch, or by a checkpoint being restored
        self.held_out: Part | None = None
        self.seed = 0
        # The last micro-batch's teacher logits, labels and mask: the outer step's training batch.
        self._last: tuple[Tensor, Tensor, Tensor | None] | None = None

    # ---------------------------------------------------------------------------- state
    def _materialise(self, classes: int) -> None:
        device = self.outer_steps.device
        with torch.random.fork_rng(devices=[]):  # the network's initial weights touch no training stream
            torch.manual_seed(self.seed)
            self.ratio = RatioNet(classes, self.hidden).to(device)
        self.register_buffer("class_sum", torch.zeros(classes, classes, dtype=torch.float64, device=device))
        self.register_buffer("class_count", torch.zeros(classes, dtype=torch.float64, device=device))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        count = state_dict.get(prefix + "class_count")
        if self.ratio is None and count is not None:  # a checkpoint taken after the first batch
            self._materialise(int(count.shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def class_mean(self) -> Tensor:
        """T-bar: (C, C), row k the teacher's mean probabilities over the class-k samples seen (0 if none)."""
        assert self.ratio is not None
        return self.class_sum / self.class_count.clamp_min(1)[:, None]

    @torch.no_grad()
    def _observe(self, teacher: Tensor, labels: Tensor) -> None:
        """Add the counted rows' teacher probabilities to their classes' sums."""
        probs = torch.softmax(teacher.double(), dim=-1)
        self.class_sum.index_add_(0, labels, probs)
        self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def alpha(
        self, student: Tensor, teacher: Tensor, labels: Tensor, omega: dict[str, Tensor] | None = None
    ) -> Tensor:
        """f_omega(relations) per row (a hidden label gets a placeholder class: its row does not count)."""
        assert self.ratio is not None
        safe = labels.clamp_min(0)
        bar = self.class_mean()[safe]
        return self.ratio(trilateral_relations(student, teacher, safe, bar), omega)

    # ---------------------------------------------------------------------------- the student's term
    def forward(self, outputs: StepOutputs) -> Tensor:
        if outputs.teacher_logits is None:
            what = "not a top-k cache" if outputs.teacher_topk is not None else "but the step has none"
            raise UserError(f"objective '{NAME}' needs the teacher's full logits, {what}")
        labels = outputs.labels
        if labels is None:
            raise UserError(f"objective '{NAME}' needs labels, but the data has none")
        if labels.is_floating_point():
            raise UserError(f"objective '{NAME}' needs class indices, not soft (mixed) labels")
        student, teacher = outputs.student_logits, outputs.teacher_logits
        if student.dim() != 2:
            raise UserError(
                f"objective '{NAME}' is for classifiers: logits (N, C), got {tuple(student.shape)}"
            )
        classes = student.shape[-1]
        if self.ratio is None:
            self._materialise(classes)
        elif self.class_count.shape[0] != classes:
            learned = self.class_count.shape[0]
            raise UserError(f"objective '{NAME}' learned {learned} classes; this batch has {classes}")
        if bool((labels >= classes).any()):
            raise UserError(f"objective '{NAME}': a label is >= the number of classes ({classes})")
        counted = labels >= 0 if outputs.mask is None else outputs.mask & (labels >= 0)
        self._observe(teacher[counted].detach(), labels[counted])
        with torch.no_grad():
            alpha = self.alpha(student.detach(), teacher.detach(), labels)
        self._last = (teacher.detach(), labels, outputs.mask)
        return tgeo_kd(
            student, teacher, labels=labels, alpha=alpha, mask=outputs.mask, temperature=self.temperature
        )

    # ---------------------------------------------------------------------------- the outer (bilevel) step
    def hold_out(self, data: Any, seed: int) -> Any:
        if isinstance(data, DataLoader):
            raise UserError(f"objective '{NAME}' holds out part of a Dataset; fit() was given a DataLoader")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise UserError(f"objective '{NAME}' learns its ratio network in one process only")
        n = len(data)
        labels = getattr(data, "labels", None)
        # Only labelled rows can be validated on (a semi-supervised set hides the others' labels as -100).
        pool = (
            torch.arange(n)[torch.as_tensor(labels) >= 0]
            if isinstance(labels, Tensor) and labels.shape == (n,)
            else torch.arange(n)
        )
        held = round(self.validation_fraction * len(pool))
        if held < 1 or held >= n:
            raise UserError(
                f"objective '{NAME}': validation_fraction {self.validation_fraction:g} of {len(pool)} "
                f"labelled training samples holds out {held}; at least one must be held out and one left "
                "to train on"
            )
        order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
        kept = set(order[:held].tolist())
        self.seed = seed
        self.held_out = Part(data, sorted(kept))
        return Part(data, [i for i in range(n) if i not in kept])

    def validation_batch(self, step: int, size: int, device: torch.device) -> tuple[Any, Tensor]:
        """The held-out batch of outer step `step`: reshuffled (seeded) each pass over the held-out part, so
        that a resumed run draws what an uninterrupted one does."""
        assert self.held_out is not None
        total = len(self.held_out)
        size = min(self.validation_batch_size or size, total)
        rounds, position = divmod(step, total // size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rounds + 1)
        order = torch.randperm(total, generator=generator)[position * size : (position + 1) * size]
        collate = getattr(self.held_out, "collate_fn", None) or default_collate
        inputs, labels = _inputs_and_labels(collate([self.held_out[int(i)] for i in order]))
        return _to(inputs, device), labels.to(device)

    def lookahead_loss(
        self,
        student: nn.Module,
        omega: dict[str, Tensor],
        inputs: Any,
        val_inputs: Any,
        val_labels: Tensor,
        lr: float,
    ) -> Tensor:
        """J(omega): the validation cross-entropy of the student after one SGD step of `lr` on the last
        training micro-batch's fused loss with ratios f_omega (its relations from the student before the
        step, without gradient). Buffers (batch norm's statistics) are copies: the student stays as it is."""
        assert self._last is not None
        teacher, labels, mask = self._last
        params = {n: p.detach().requires_grad_() for n, p in student.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in student.named_buffers()}
        logits = _call(student, {**params, **buffers}, inputs)
        alpha = self.alpha(logits.detach(), teacher, labels, omega)
        loss = tgeo_kd(logits, teacher, labels=labels, alpha=alpha, mask=mask, temperature=self.temperature)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        ahead = {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
        buffers = {n: b.clone() for n, b in student.named_buffers()}
        val_logits = _call(student, {**ahead, **buffers}, val_inputs)
        if val_logits.dtype != torch.float64:
            val_logits = val_logits.float()
        return nn.functional.cross_entropy(val_logits, val_labels)

    def after_optimizer_step(self, student: nn.Module, inputs: Any, progress: Progress, lr: float) -> None:
        if self.held_out is None or self._last is None or self.ratio is None or inputs is None:
            return
        device = self.outer_steps.device
        val_inputs, val_labels = self.validation_batch(progress.step, len(self._last[1]), device)
        if not bool((val_labels >= 0).any()):
            return
        omega = {n: p.detach().clone().requires_grad_() for n, p in self.ratio.net.named_parameters()}
        value = self.lookahead_loss(student, omega, inputs, val_inputs, val_labels, lr)
        grads = torch.autograd.grad(value, list(omega.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(omega.values(), grads, strict=True)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return  # a non-finite look-ahead (the trainer handles the student's own non-finite steps)
        self.outer_steps += 1
        self.ratio.adam_step(grads, int(self.outer_steps), self.outer_lr, self.outer_weight_decay)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hidden={self.hidden}, "
            f"validation_fraction={self.validation_fraction}, outer_steps={int(self.outer_steps)}"
        )


def _build(**params: Any) -> TGeoKD:
    check_params(NAME, TGeoKD.__init__, params, reserved=set())
    return TGeoKD(**params)


OBJECTIVES.add(
    NAME,
    _build,
    summary="per-sample KD / CE fusion ratio from a network on S, T, G, T-bar relations; bilevel, held-out",
    paper=PAPER,
    function=tgeo_kd,
)

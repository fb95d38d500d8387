"""Mixup and cutmix as a classification source (S37: "Understanding the Role of Mixup in Knowledge
Distillation: An Empirical Study", Choi et al., WACV 2023). See docs/mixup.md.

A batch transform rewrites each training micro-batch before the forward passes, so the student and the
teacher both see the mixed inputs, and the labels become the mixed class distributions, an (N, C) float
tensor that `cross_entropy` reads as soft targets:

- `mixup` ("mixup: Beyond Empirical Risk Minimization", Zhang et al., ICLR 2018):
  x = lam x_i + (1 - lam) x_j, y = lam e_i + (1 - lam) e_j, lam ~ Beta(alpha, alpha), j = perm(i).
- `cutmix` ("CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features", Yun et
  al., ICCV 2019): a box of relative side sqrt(1 - lam), centred uniformly and clipped to the image, is
  pasted from x_j into x_i; lam is then corrected to the share of x_i's pixels left, 1 - box area / (H W).

By default one lam (and one box) per batch, drawn with `probability` (the batch is otherwise untouched);
`per_sample: true` draws lam and the coin per row instead, as the MIX-KD code draws lam per sample (its
partial mixup leaves a share of rows unmixed). The random numbers come from a generator seeded with (run
seed, optimizer step, micro-batch of the step, process): a resumed run mixes its batches as an uninterrupted
one did, whatever else drew from the global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.objectives import Progress
from distill.sources.settings import require

MIX_SOURCES = ("mixup", "cutmix")


@dataclass(frozen=True)
class MixSettings:
    """`source: {name: mixup | cutmix, params: ...}`."""

    alpha: float = 1.0  # lam ~ Beta(alpha, alpha); 1.0 is MIX-KD's default (beta_a) and CutMix's
    probability: float = 1.0  # the chance that a batch (a row, with per_sample) is mixed
    per_sample: bool = False  # one lam (and box, and coin) per row instead of per batch

    def check(self) -> None:
        require(
            isinstance(self.alpha, int | float) and not isinstance(self.alpha, bool),
            f"alpha must be a number, got {self.alpha!r}",
        )
        require(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(
            isinstance(self.probability, int | float) and not isinstance(self.probability, bool),
            f"probability must be a number, got {self.probability!r}",
        )
        require(0.0 <= self.probability <= 1.0, f"probability must lie in [0, 1], got {self.probability}")
        require(
            isinstance(self.per_sample, bool), f"per_sample must be true or false, not {self.per_sample!r}"
        )


# ----------------------------------------------------------------------------------------- the maths


def one_hot(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(N, C) float distributions from class indices (or float (N, C) distributions, kept), and which rows
    hold a class (an index outside 0..C-1, such as -100, holds none: its row is all zeros)."""
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != num_classes:
            raise UserError(
                f"float labels must be (N, {num_classes}) class distributions, got {tuple(labels.shape)}"
            )
        return labels.float(), torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    if labels.dim() != 1:
        raise UserError(f"mixup: labels must be one class index per row, got shape {tuple(labels.shape)}")
    valid = (labels >= 0) & (labels < num_classes)
    targets = torch.zeros(len(labels), num_classes, device=labels.device)
    targets[valid] = torch.nn.functional.one_hot(labels[valid], num_classes).float()
    return targets, valid


def mix_inputs(inputs: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """lam_i x_i + (1 - lam_i) x_partner(i), lam (N,)."""
    weight = lam.to(inputs.dtype).reshape(-1, *([1] * (inputs.dim() - 1)))
    return weight * inputs + (1 - weight) * inputs[partner]


def cut_boxes(lam: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """CutMix's boxes, one per lam: sides (H, W) * sqrt(1 - lam) (whole pixels), centre uniform over the
    pixels, clipped to the image. (N, 4) rows (top, bottom, left, right), bottom / right exclusive."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(np.int64), (width * ratio).astype(np.int64)
    cy, cx = rng.integers(0, height, size=len(lam)), rng.integers(0, width, size=len(lam))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return np.stack([top, bottom, left, right], axis=1)


def box_lam(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The share of each row's own pixels a box leaves: 1 - box area / (H W) (CutMix's corrected lam)."""
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return 1.0 - area / float(height * width)


def paste_boxes(inputs: Tensor, partner: Tensor, boxes: np.ndarray) -> Tensor:
    """Row i with its box (over the last two dimensions) replaced by the same box of row partner(i)."""
    height, width = inputs.shape[-2], inputs.shape[-1]
    device = inputs.device
    b = torch.as_tensor(boxes, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_r = (rows[None] >= b[:, 0:1]) & (rows[None] < b[:, 1:2])  # (N, H)
    inside_c = (cols[None] >= b[:, 2:3]) & (cols[None] < b[:, 3:4])  # (N, W)
    box = (inside_r[:, :, None] & inside_c[:, None, :]).reshape(
        len(inputs), *([1] * (inputs.dim() - 3)), height, width
    )
    return torch.where(box, inputs[partner], inputs)


# ----------------------------------------------------------------------------------------- the transform


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class MixBatches:
    """The batch transform: `(batch, student, progress) -> batch`, for `(inputs, labels[, mask])` tuples and
    `{"inputs", "labels", "mask", "index"}` dicts (`index` and the container's kind kept). Mixed batches
    carry (N, C) float labels; an unmixed one is returned as it came."""

    def __init__(self, kind: str, settings: MixSettings, num_classes: int, run_seed: int) -> None:
        if kind not in MIX_SOURCES:
            raise UserError(f"unknown mixing source '{kind}' (mixup, cutmix)")
        self.kind = kind
        self.settings = settings
        self.num_classes = num_classes
        self.run_seed = run_seed
        self._step = -1
        self._calls = 0
        self.mixed_batches = 0
        self.batches = 0

    def generator(self, step: int) -> np.random.Generator:
        """The generator of the next micro-batch of optimizer step `step` (a function of the run seed, the
        step, the micro-batch's place in the step's window and the process)."""
        from distill.sources.batching import seed_for

        if step != self._step:
            self._step, self._calls = step, 0
        self._calls += 1
        return np.random.default_rng(seed_for(self.kind, self.run_seed, step, self._calls - 1, _rank()))

    def __call__(self, batch: Any, student: nn.Module | None, progress: Progress) -> Any:
        rng = self.generator(progress.step)
        self.batches += 1
        inputs, labels, mask, rebuild = _unpack(batch)
        n = len(inputs)
        s = self.settings
        if s.probability == 0.0 or n == 0:
            return batch
        if s.per_sample:
            chosen = rng.random(n) < s.probability
            if not chosen.any():
                return batch
            lam = np.where(chosen, rng.beta(s.alpha, s.alpha, size=n), 1.0)
        else:
            if s.probability < 1.0 and not rng.random() < s.probability:
                return batch
            chosen = np.ones(n, dtype=bool)
            lam = np.full(n, rng.beta(s.alpha, s.alpha))
        partner_np = rng.permutation(n)
        check_mixable(self.kind, inputs)
        if labels is None:
            raise UserError(f"source '{self.kind}' needs labels to mix, but the data has none")
        if mask is not None and mask.dim() != 1:
            raise UserError(f"source '{self.kind}' mixes whole samples; a per-token mask cannot be mixed")
        device = inputs.device
        if self.kind == "cutmix":
            height, width = inputs.shape[-2], inputs.shape[-1]
            if s.per_sample:
                boxes = cut_boxes(lam, height, width, rng)
            else:  # one box for the batch, as one lam
                boxes = np.repeat(cut_boxes(lam[:1], height, width, rng), n, axis=0)
            boxes[~chosen] = 0  # empty boxes: unmixed rows keep every pixel
            lam = box_lam(boxes, height, width)
        partner = torch.as_tensor(partner_np, device=device)
        lam_t = torch.as_tensor(lam, dtype=torch.float32, device=device)
        if self.kind == "mixup":
            mixed = mix_inputs(inputs, partner, lam_t)
        else:
            mixed = paste_boxes(inputs, partner, boxes)
        targets, valid = one_hot(labels.to(device), self.num_classes)
        soft = lam_t[:, None] * targets + (1 - lam_t[:, None]) * targets[partner]
        # A row counts when it counted before and, if it took anything from its partner, so did the partner.
        took = torch.as_tensor(chosen, device=device) & (lam_t < 1)
        counted = valid if mask is None else valid & mask.to(device).bool()
        counted = counted & (~took | counted[partner])
        new_mask = None if mask is None and bool(counted.all()) else counted
        self.mixed_batches += 1
        return rebuild(mixed, soft, new_mask)


def check_mixable(kind: str, inputs: Any) -> None:
    if not isinstance(inputs, Tensor):
        raise UserError(f"source '{kind}' mixes input tensors, not {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise UserError(
            f"source '{kind}' cannot mix {inputs.dtype} inputs (token ids), only images or features"
        )
    if kind == "cutmix" and inputs.dim() < 3:
        raise UserError(
            f"source 'cutmix' pastes boxes of images (N, C, H, W); these inputs are {tuple(inputs.shape)}"
        )


def _unpack(batch: Any) -> tuple[Any, Tensor | None, Tensor | None, Callable[..., Any]]:
    """(inputs, labels, mask) of a batch and a function building a batch of the same kind from new ones."""
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise UserError("mixup / cutmix mix (inputs, labels) batches, not language-model batches")

        def rebuild_dict(inputs: Tensor, labels: Tensor, mask: Tensor | None) -> dict[str, Any]:
            out = dict(batch) | {"inputs": inputs, "labels": labels}
            if mask is not None:
                out["mask"] = mask
            return out

        return batch["inputs"], batch.get("labels"), batch.get("mask"), rebuild_dict
    if isinstance(batch, list | tuple):
        items = list(batch)

        def rebuild_tuple(inputs: Tensor, labels: Tensor, mask: Tensor | None) -> Any:
            out = [inputs, labels, *items[2:]]
            if mask is not None:
                out = [inputs, labels, mask, *items[3:]]
            return type(batch)(out) if isinstance(batch, tuple) else out

        return (
            items[0],
            items[1] if len(items) > 1 else None,
            items[2] if len(items) > 2 else None,
            rebuild_tuple,
        )
    raise UserError(f"mixup / cutmix mix (inputs, labels) batches, not {type(batch).__name__}")

"""Objectives with state: TAID's adaptive interpolation, AdaKD's token ratio, Swing KD's noise seed,
BD-KD's online (two-sided) form, and the student-entropy regulariser (needs no teacher).

State lives in buffers, so checkpoints carry it; `after_step` is called once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distill import losses
from distill.errors import UserError
from distill.objectives.base import (
    OBJECTIVES,
    Objective,
    ParamError,
    Progress,
    StepOutputs,
    check_params,
    flag,
    number_in,
    positive_number,
    register_logit_loss,
    shown,
    whole_number,
)

_TAID = (
    "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language Models "
    "(Shing et al., ICLR 2025)"
)
_ADAKD = "LLM-Oriented Token-Adaptive Knowledge Distillation (Xie et al., AAAI 2026)"
_BDKD = "BD-KD: Balancing the Divergences for Online Knowledge Distillation (Amara et al., 2022)"
_SWING = "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework (Li et al., 2022)"
_TSD = "Explain in Your Own Words: Improving Reasoning via Token-Selective Dual Knowledge Distillation (2026)"
_DECOUPLING = (
    "Decoupling KL and Trajectories: A Unified Perspective for SFT, DAgger, Offline RL, and OPD (2025)"
)


MAX_SEED = 2**32 - 1  # as the recipe's seeds


def _teacher(outputs: StepOutputs, name: str) -> Tensor:
    if outputs.teacher_logits is None:
        raise UserError(f"objective '{name}' needs teacher logits, but the step has none")
    return outputs.teacher_logits


class TAIDSchedule(torch.nn.Module):
    """TAID's adaptive interpolation parameter t, as buffers (t, previous loss, momentum)."""

    def __init__(
        self,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        t_start = number_in("taid", "t_start", t_start, 0.0, 1.0, high_open=True)
        t_end = number_in("taid", "t_end", t_end, 0.0, 1.0, low_open=True)
        alpha = number_in("taid", "alpha", alpha, 0.0, 1.0)
        beta = number_in("taid", "beta", beta, 0.0, 1.0)
        adaptive = flag("taid", "adaptive", adaptive)
        self.t_start, self.t_end, self.alpha, self.beta, self.adaptive = t_start, t_end, alpha, beta, adaptive
        self.register_buffer("t", torch.tensor(float(t_start), dtype=torch.float64))
        self.register_buffer("prev_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))

    def update(self, loss: float, progress: float) -> float:
        t, prev, m = losses.taid_update(
            float(self.t),
            float(self.prev_loss),
            float(self.momentum),
            float(loss),
            progress,
            t_start=self.t_start,
            t_end=self.t_end,
            alpha=self.alpha,
            beta=self.beta,
            adaptive=self.adaptive,
        )
        self.t.fill_(t)
        self.prev_loss.fill_(prev)
        self.momentum.fill_(m)
        return t


class TAIDObjective(Objective):
    """TAID loss with its schedule; the schedule is fed the official cross-entropy-form loss value."""

    def __init__(self, *, temperature: float = 1.0, **schedule: Any) -> None:
        super().__init__()
        check_params("taid", TAIDSchedule.__init__, schedule, reserved={"self"})
        self.temperature = positive_number("taid", "temperature", temperature)
        self.schedule = TAIDSchedule(**schedule)
        self._ce_sum = 0.0
        self._ce_count = 0

    def forward(self, outputs: StepOutputs) -> Tensor:
        teacher = _teacher(outputs, "taid")
        loss = losses.taid(
            outputs.student_logits,
            teacher,
            mask=outputs.mask,
            temperature=self.temperature,
            interpolation=self.schedule.t,
        )
        with torch.no_grad():  # the official schedule watches -sum P_t log Q = KL + H(P_t)
            t = float(self.schedule.t)
            target = (1 - t) * outputs.student_logits.float() + t * teacher.float()
            entropy = losses.student_entropy(target, mask=outputs.mask, temperature=self.temperature)
            self._ce_sum += float(loss.detach()) + float(entropy)
            self._ce_count += 1
        return loss

    def after_step(self, progress: Progress, loss: float) -> None:
        value = self._ce_sum / self._ce_count if self._ce_count else loss
        self._ce_sum, self._ce_count = 0.0, 0
        self.schedule.update(value, progress.fraction)

    def extra_repr(self) -> str:
        return f"t={float(self.schedule.t):.4f}, temperature={self.temperature}"


class AdaKDObjective(Objective):
    """AdaKD over a base divergence, with the LATF token-ratio schedule in buffers. The gradient flows
    through the per-token temperatures as in the official code (``detach_temperature=True`` stops it)."""

    def __init__(
        self,
        *,
        base: str = "reverse_kl",
        temperature: float = 1.0,
        temperature_scale: float = 0.5,
        inverse: bool = True,
        base_params: dict | None = None,
        detach_temperature: bool = False,
        decay: float = 0.99,
        tolerance: float = 0.05,
        step: float = 0.05,
        warmup: float = 0.05,
        min_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(base, str) or base not in losses.adaptive.BASE_DIVERGENCES:
            raise UserError(
                f"objective 'adakd': unknown base {shown(base)}; "
                f"valid: {sorted(losses.adaptive.BASE_DIVERGENCES)}"
            )
        if base_params is not None and not isinstance(base_params, dict):
            raise ParamError("adakd", "base_params", f"must be a mapping, got {shown(base_params)}")
        self.loss_params = dict(
            base=base,
            temperature=positive_number("adakd", "temperature", temperature),
            temperature_scale=number_in("adakd", "temperature_scale", temperature_scale),
            inverse=flag("adakd", "inverse", inverse),
            base_params=base_params,
            detach_temperature=flag("adakd", "detach_temperature", detach_temperature),
        )
        self.latf = dict(
            decay=number_in("adakd", "decay", decay, 0.0, 1.0),
            tolerance=number_in("adakd", "tolerance", tolerance, 0.0),
            step=number_in("adakd", "step", step, 0.0, 1.0),
            warmup=number_in("adakd", "warmup", warmup, 0.0, 1.0),
            min_ratio=number_in("adakd", "min_ratio", min_ratio, 0.0, 1.0, low_open=True),
        )
        self.register_buffer("token_ratio", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("ema", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("reference", torch.tensor(math.nan, dtype=torch.float64))

    def forward(self, outputs: StepOutputs) -> Tensor:
        return losses.adakd(
            outputs.student_logits,
            _teacher(outputs, "adakd"),
            mask=outputs.mask,
            token_ratio=float(self.token_ratio),
            **self.loss_params,
        )

    def after_step(self, progress: Progress, loss: float) -> None:
        ema = None if math.isnan(float(self.ema)) else float(self.ema)
        ref = None if math.isnan(float(self.reference)) else float(self.reference)
        ratio, ema, ref = losses.latf_update(
            float(self.token_ratio), ema, ref, loss, progress.fraction, **self.latf
        )
        self.token_ratio.fill_(ratio)
        self.ema.fill_(ema)
        self.reference.fill_(math.nan if ref is None else ref)


class SwingObjective(Objective):
    """Swing distillation; the noise seed advances with the optimizer step (kept in a buffer).

    ``privacy`` says where each token's privacy likelihood comes from: ``teacher`` (the loss's proxy, the
    teacher's top-1 probability) or ``data`` (the data set's per-token scores, the batch key ``privacy``
    that reaches the step as ``StepOutputs.row_data``; `distill.data.canaries` computes them)."""

    PRIVACY_SOURCES = ("teacher", "data")
    ROW_KEY = "privacy"

    def __init__(self, *, seed: int = 0, privacy: str = "teacher", **params: Any) -> None:
        super().__init__()
        check_params(
            "swing_kd", losses.swing_kd, params, reserved={"mask", "reduction", "privacy_scores", "seed"}
        )
        seed = whole_number("swing_kd", "seed", seed, 0, MAX_SEED)
        if privacy not in self.PRIVACY_SOURCES:
            raise ParamError("swing_kd", "privacy", f"must be teacher or data, got {shown(privacy)}")
        if "temperature" in params:
            positive_number("swing_kd", "temperature", params["temperature"])
        for key in ("swing", "noise_scale"):
            if key in params:
                number_in("swing_kd", key, params[key], 0.0)
        self.params = params
        self.privacy = privacy
        self.row_keys = (self.ROW_KEY,) if privacy == "data" else ()
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    def _scores(self, outputs: StepOutputs) -> Tensor | None:
        if self.privacy == "teacher":
            return None
        scores = outputs.row_data.get(self.ROW_KEY)
        if scores is None:
            raise UserError(
                "objective 'swing_kd' has privacy: data but the batch has no 'privacy' scores "
                "(use a data set that supplies them, e.g. tinyshakespeare_canaries)"
            )
        return scores

    def forward(self, outputs: StepOutputs) -> Tensor:
        return losses.swing_kd(
            outputs.student_logits,
            _teacher(outputs, "swing_kd"),
            mask=outputs.mask,
            privacy_scores=self._scores(outputs),
            seed=int(self.seed) + int(self.step),
            **self.params,
        )

    def after_step(self, progress: Progress, loss: float) -> None:
        self.step += 1


class BDKDObjective(Objective):
    """BD-KD; ``online=True`` adds the teacher's own balanced term (roles swapped) for co-trained teachers."""

    def __init__(self, *, online: bool = False, **params: Any) -> None:
        super().__init__()
        check_params("bdkd", losses.bdkd, params, reserved={"mask", "reduction"})
        if "temperature" in params:
            positive_number("bdkd", "temperature", params["temperature"])
        if "balance" in params:
            number_in("bdkd", "balance", params["balance"], 0.0)
        self.online = flag("bdkd", "online", online)
        self.params = params

    def forward(self, outputs: StepOutputs) -> Tensor:
        teacher = _teacher(outputs, "bdkd")
        loss = losses.bdkd(outputs.student_logits, teacher.detach(), mask=outputs.mask, **self.params)
        if self.online and teacher.requires_grad:
            loss = loss + losses.bdkd(
                teacher, outputs.student_logits.detach(), mask=outputs.mask, **self.params
            )
        return loss


class EntropyRegularizer(Objective):
    """-H(student) (weight it positive to keep the student's entropy up, negative to sharpen)."""

    needs_teacher = False

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = positive_number("entropy_regularizer", "temperature", temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        return -losses.student_entropy(
            outputs.student_logits, mask=outputs.mask, temperature=self.temperature
        )


OBJECTIVES.add(
    "taid",
    TAIDObjective,
    summary="interpolated target softmax((1-t) sg(z_s) + t z_t), adaptive t",
    paper=_TAID,
    function=losses.taid,
)
OBJECTIVES.add(
    "adakd",
    AdaKDObjective,
    summary="token focusing (LATF) + inverse-difficulty temperatures (IDTS) over a base divergence",
    paper=_ADAKD,
    function=losses.adakd,
)
OBJECTIVES.add(
    "bdkd",
    BDKDObjective,
    summary="entropy-balanced forward + reverse KL per sample (online or offline)",
    paper=_BDKD,
    function=losses.bdkd,
)
OBJECTIVES.add(
    "swing_kd",
    SwingObjective,
    summary="per-token temperature from a privacy score, seeded Laplace noise on soft targets",
    paper=_SWING,
    function=losses.swing_kd,
)
OBJECTIVES.add(
    "entropy_regularizer",
    EntropyRegularizer,
    summary="minus the student's entropy (keeps entropy from collapsing when weighted > 0)",
    paper=_DECOUPLING,
    function=losses.student_entropy,
)
register_logit_loss(
    "token_selective_kd",
    losses.token_selective_kd,
    paper=_TSD,
    summary="relative-confidence-weighted JSD per token + entropy regulariser (TSD-KD direct part)",
)

"""MST-Distill: a mixture of specialised teachers for cross-modal distillation (S25).

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation" (Li et al., ACM MM
2025); official code github.com/Gray-OREO/MST-Distill (`main-MST-Distill.py`, `KD_methods/MST.py`).

Teachers. Each member (a multimodal teacher, a teacher of the other modality) with a mask network on one of
its layers is one specialised teacher (expert): the mask network reads the layer's output (a feature vector,
or a feature map reduced to its channels) and returns a sigmoid gate per channel, which multiplies the
output before the member's forward pass goes on. Members x masked layers = the experts (official: 2 x 2).

Training, in the official code's three stages, all inside the student's one `fit`:
1. `warmup_epochs` (official `epochs_s1` = 1): the student learns from the members' unmasked mean.
2. Then, once, `mask_epochs` passes (official `epochs_s2` = 1) over the training set fit the masks alone
   (Adam, `mask_lr` 1e-4), the student and the members frozen in eval mode: each expert is pulled towards the
   student's outputs, T^2 KL(p_student || p_expert) at T = 4. This is the "plug-in masking module, trained
   independently to suppress modality-specific discrepancies and reconstruct teacher representations". The
   masks stay fixed afterwards.
3. The rest of training: a gate, Linear(C, 2C) -> Linear(2C, E) on the student's logits (C classes, E
   experts), gives per-sample probabilities; the student learns from the top-k experts' mixture (k = 1) with
   the method's teacher terms (hinton_kd at T = 4 in the paper). Top-k is not differentiable, so the gate
   learns from the load-balancing loss alone, KL(uniform || batch-mean probabilities) / E, weight 1 times
   0.9 every 10 epochs; as in the official code that loss also reaches the student through its logits.

The gate reads the logits of the same step, which the trainer computes after it asked the teacher: the
teacher hands out its target tensor, holding the experts' mean, and a hook on the student overwrites it with
the routed mixture during the student's forward pass, before any objective reads it.

Differences from the official code (docs/mst_distill.md): the members are trained beforehand on the labels
and cached (theirs: co-trained from scratch with the student for stage 1, with mutual KL), so stage 1 is the
student's warm-up only; stage 2 keeps its last masks (theirs: the best on a validation split, the same with
its one epoch); the KD weight's halving every 30 epochs is left to the method's terms; with k > 1 the student
learns from the experts' probability mean, whose gradient equals the official mean of k KL terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserError
from distill.heads import call_model
from distill.losses import hinton_kd
from distill.models.adapters import logits_of
from distill.models.cifar import feature_layers_of
from distill.objectives import Objective, StepOutputs
from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest

BALANCE_EVERY = 10  # epochs between decays of the load-balancing weight (official: `epoch % 10 == 0`)


# ----------------------------------------------------------------------------------------- the maths
def mixed_logits(logits: Tensor, temperature: float) -> Tensor:
    """(B, E, C) -> (B, C) logits z with softmax(z / T) = mean_e softmax(z_e / T): a single expert's logits
    come back as they are (exact at any temperature)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    log_p = F.log_softmax(logits.float() / temperature, -1)
    return temperature * (torch.logsumexp(log_p, 1) - math.log(logits.shape[1]))


def route(probabilities: Tensor, k: int) -> Tensor:
    """(B, E) gate probabilities -> (B, k) indices of the chosen experts, most probable first."""
    return probabilities.detach().topk(k, dim=-1).indices


def routed_target(expert_logits: Tensor, chosen: Tensor, temperature: float) -> Tensor:
    """The mixture of each row's chosen experts: (B, E, C) logits, (B, k) indices -> (B, C) logits."""
    picked = expert_logits.gather(1, chosen[..., None].expand(-1, -1, expert_logits.shape[-1]))
    return mixed_logits(picked, temperature)


def load_balance(probabilities: Tensor, how: Literal["kl", "cv"] = "kl") -> Tensor:
    """The official load-balancing loss of (B, E) gate probabilities: `kl` is PyTorch's batchmean KL of the
    uniform distribution to the batch-mean probabilities (divided by E: the mean is one row of E), `cv` the
    coefficient of variation of the experts' summed probabilities."""
    p = probabilities.float()
    if how == "cv":
        importance = p.sum(0)
        return importance.std() / importance.mean()
    mean = p.mean(0)
    experts = mean.numel()
    uniform = torch.full_like(mean, 1.0 / experts)
    return (uniform * (uniform.log() - mean.clamp_min(torch.finfo(p.dtype).tiny).log())).sum() / experts


def balance_weight(weight: float, decay: float, routing_epoch: int) -> float:
    """The official schedule: the weight is multiplied by `decay` after routing epochs 0, 10, 20, ..."""
    return weight * decay ** math.ceil(max(0, routing_epoch) / BALANCE_EVERY)


# --------------------------------------------------------------------------------------- the modules
class MaskNet(nn.Module):
    """The official MaskNet: a feature vector of D values (a map's channels after a stride-2 depthwise +
    pointwise conv, BN, ReLU and global pooling) becomes D tokens of width H (one linear layer),
    self-attention over them, and one sigmoid per token: a (B, D) mask. H = D // (hidden_factor x heads) x
    heads."""

    def __init__(self, features: int, *, spatial: bool, heads: int = 3, hidden_factor: int = 2) -> None:
        super().__init__()
        hidden = features // (hidden_factor * heads) * heads
        if hidden < heads:
            raise UserError(
                f"mixture: a layer of {features} features is too narrow for a mask of {heads} heads with "
                f"hidden_factor {hidden_factor} (features // (hidden_factor x heads) must be 1 or more)"
            )
        self.features, self.hidden = features, hidden
        self.reduce = (
            nn.Sequential(
                nn.Conv2d(features, features, 3, stride=2, padding=1, groups=features, bias=False),
                nn.Conv2d(features, features, 1, bias=False),
                nn.BatchNorm2d(features),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            if spatial
            else nn.Flatten()
        )
        self.embed = nn.Linear(features, hidden * features)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.score = nn.Linear(hidden, 1)

    def forward(self, feature: Tensor) -> Tensor:
        x = self.reduce(feature)
        tokens = self.embed(x).view(x.shape[0], self.features, self.hidden)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.score(attended).squeeze(-1))


def apply_mask(feature: Tensor, net: MaskNet) -> Tensor:
    """A layer's output times its mask, one value per channel (broadcast over a map's positions)."""
    mask = net(feature)
    return feature * mask.view(*mask.shape, *([1] * (feature.dim() - 2)))


def _masked(net: MaskNet, module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return apply_mask(output, net)


def _capture(store: dict[str, Any], path: str, module: nn.Module, args: Any, output: Any) -> None:
    store[path] = output


def layer_outputs(model: nn.Module, paths: Sequence[str], example: Tensor) -> dict[str, Any]:
    """The outputs of `model`'s modules `paths` on `example` (eval mode, no gradients)."""
    store: dict[str, Any] = {}
    handles = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"mixture: the member has no module '{path}' to mask") from None
        handles.append(module.register_forward_hook(partial(_capture, store, path)))
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            call_model(model, example.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return store


def mask_layers_of(model: nn.Module, example: Tensor, count: int) -> list[str]:
    """A member's last `count` feature taps (`distill.models.cifar.feature_layers_of`) that compute something:
    a flatten or identity of the input, and a tap that repeats the one before (a block and its last layer),
    are skipped. The official code masks the last two representations (fused features and the layer after)."""
    taps = feature_layers_of(model)
    outputs = layer_outputs(model, taps, example) if taps else {}
    kept: list[str] = []
    seen: set[int] = set()
    for path in taps:
        out = outputs.get(path)
        if not isinstance(out, Tensor) or isinstance(model.get_submodule(path), nn.Flatten | nn.Identity):
            continue
        if id(out) not in seen:
            kept.append(path)
            seen.add(id(out))
    if len(kept) < count:
        raise UserError(
            f"mixture: a member ({type(model).__name__}) has {len(kept)} feature taps to mask, mask_layers "
            f"is {count}; lower mask_layers or name the modules (layers)"
        )
    return kept[-count:]


class MixtureStatus(nn.Module):
    """What a checkpoint must keep besides the weights: optimizer steps taken, and whether the masks fit."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class MixtureOfTeachers(nn.Module):
    """Frozen members, one mask network per (member, layer) expert, and the gate. Its forward, what
    evaluation reads (there is no student to route by), is the experts' mean (the members' before the masks
    fit)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        layers: Sequence[Sequence[str]],
        example: Tensor,
        *,
        temperature: float = 4.0,
        heads: int = 3,
        hidden_factor: int = 2,
    ) -> None:
        super().__init__()
        if len(members) < 1 or len(layers) != len(members):
            raise UserError("mixture: give one list of layers per member")
        self.members = nn.ModuleList(members).requires_grad_(False)
        self.temperature = temperature
        self.experts: list[tuple[int, str]] = [(m, path) for m, paths in enumerate(layers) for path in paths]
        masks, classes = [], set()
        for m, member in enumerate(self.members):
            outputs = layer_outputs(member, ["", *layers[m]], example[:2])
            classes.add(logits_of(outputs[""]).shape[-1])
            for path in layers[m]:
                out = outputs[path]
                if not isinstance(out, Tensor) or out.dim() not in (2, 4):
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise UserError(
                        f"mixture: layer '{path}' gives {shape}; a mask reads (batch, features) or "
                        "(batch, channels, height, width)"
                    )
                spatial = out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1
                masks.append(MaskNet(out.shape[1], spatial=spatial, heads=heads, hidden_factor=hidden_factor))
        if len(classes) != 1:
            raise UserError(f"mixture: the members predict different numbers of classes ({sorted(classes)})")
        self.masks = nn.ModuleList(masks)
        count = classes.pop()
        self.gate = nn.Sequential(nn.Linear(count, 2 * count), nn.Linear(2 * count, len(self.experts)))
        self.status = MixtureStatus()

    def train(self, mode: bool = True) -> MixtureOfTeachers:
        super().train(mode)
        self.members.eval()  # frozen throughout; the masks train only while they fit (stage 2)
        self.masks.eval()
        return self

    def member_logits(self, x: Tensor) -> Tensor:
        """(B, M, C): every member unmasked."""
        return torch.stack([logits_of(call_model(member, x)) for member in self.members], 1)

    def expert_logits(self, x: Tensor) -> Tensor:
        """(B, E, C): each member once per masked layer, its mask applied there."""
        logits = []
        for (m, path), net in zip(self.experts, self.masks, strict=True):
            member = self.members[m]
            handle = member.get_submodule(path).register_forward_hook(partial(_masked, net))
            try:
                logits.append(logits_of(call_model(member, x)))
            finally:
                handle.remove()
        return torch.stack(logits, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        both = self.expert_logits(inputs) if bool(self.status.fitted) else self.member_logits(inputs)
        return mixed_logits(both, self.temperature)


# --------------------------------------------------------------------------------------- the teacher
@dataclass
class MixtureSettings:
    """The official defaults (`main-MST-Distill.py`); `MixtureTeacherSpec` documents each."""

    k: int = 1
    temperature: float = 4.0
    heads: int = 3
    hidden_factor: int = 2
    mask_layers: int = 2
    balance: Literal["kl", "cv"] = "kl"
    balance_weight: float = 1.0
    balance_decay: float = 0.9
    warmup_epochs: int = 1
    mask_epochs: int = 1
    mask_lr: float = 1e-4
    lr: float | None = None
    weight_decay: float | None = None


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a training batch: `(x, y, ...)` or `{"inputs": x, ...}`."""
    if isinstance(batch, list | tuple):
        return batch[0]
    if isinstance(batch, dict):
        return batch["inputs"]
    return batch


class MixtureTeacher(Teacher):
    """S25's teacher for one student: `members` (frozen), the student (its logits drive the gate), the
    batches the masks fit on (`mask_data`, an iterable of training batches, iterated once per mask epoch) and
    the optimizer steps per epoch of the student's training (the stages are counted in epochs)."""

    kind = "mixture"
    trainable = True  # the gate joins the optimizer; the masks fit on their own (stage 2)
    static = False

    def __init__(
        self,
        members: Sequence[nn.Module],
        student: nn.Module,
        mask_data: Iterable[Any],
        steps_per_epoch: int,
        *,
        layers: Sequence[Sequence[str]] | None = None,
        settings: MixtureSettings | None = None,
    ) -> None:
        self.settings = s = settings or MixtureSettings()
        example = batch_inputs(next(iter(mask_data)))
        if not isinstance(example, Tensor):
            raise UserError("mixture: the members read tensors (image or feature classification)")
        if layers is None:
            layers = [mask_layers_of(member, example, s.mask_layers) for member in members]
        self.mixture = MixtureOfTeachers(
            members, layers, example, temperature=s.temperature, heads=s.heads, hidden_factor=s.hidden_factor
        )
        experts = len(self.mixture.experts)
        if not 1 <= s.k <= experts:
            raise UserError(f"mixture: k is {s.k}, but there are {experts} specialised teachers")
        self.student, self.mask_data = student, mask_data
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.routed = torch.zeros(experts, dtype=torch.long)  # how often each expert was chosen
        self.mask_losses: list[float] = []  # the masks' mean loss per mask epoch
        self._device: Any = None
        self._autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
        self._hook: Any = None
        self._pending: Tensor | None = None  # this step's expert logits, until the student's forward
        self._target: Tensor | None = None
        self._probabilities: Tensor | None = None

    @property
    def module(self) -> nn.Module:
        return self.mixture

    @property
    def warmup_steps(self) -> int:
        return self.settings.warmup_epochs * self.steps_per_epoch

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        if layers:
            raise UserError("a mixture teacher serves logit objectives only (no teacher layers)")
        self._device, self._autocast = device, autocast
        self.mixture.to(device).train()
        if self._hook is None:
            self._hook = self.student.register_forward_hook(self._route)

    def check_objectives(self, names: list[str], objectives: Sequence[Objective]) -> None:
        reading = [n for n, o in zip(names, objectives, strict=True) if getattr(o, "teacher_layers", ())]
        if reading:
            raise UserError(
                f"objectives {', '.join(reading)} read teacher layers; a mixture teacher gives logits only"
            )

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        self._pending = None
        status = self.mixture.status
        if not bool(status.fitted) and int(status.steps) >= self.warmup_steps:
            self.fit_masks()
        with torch.no_grad(), self._autocast():
            if bool(status.fitted):
                experts = self.mixture.expert_logits(request.inputs).float()
                self._pending = experts
            else:
                experts = self.mixture.member_logits(request.inputs).float()
        # Not an inference tensor: the student's forward overwrites it in place with the routed mixture.
        self._target = mixed_logits(experts, self.settings.temperature).float().contiguous()
        return TeacherOutputs(logits=self._target)

    def _route(self, module: nn.Module, args: Any, output: Any) -> None:
        """Hook on the student: route this step's rows by its logits, before the objectives read them."""
        if self._pending is None or self._target is None:
            return
        experts, self._pending = self._pending, None
        logits = logits_of(output)
        if logits.shape[:-1] != experts.shape[:1]:
            return  # not this step's batch (a probe of the student)
        probabilities = torch.softmax(self.mixture.gate(logits.float()), -1)
        chosen = route(probabilities, self.settings.k)
        with torch.no_grad():
            self._target.copy_(routed_target(experts, chosen, self.settings.temperature))
        self._probabilities = probabilities
        self.routed += torch.bincount(chosen.flatten().cpu(), minlength=self.routed.numel())

    def loss(self, step: StepOutputs) -> Tensor | None:
        if self._probabilities is None:
            return None
        probabilities, self._probabilities = self._probabilities, None
        s = self.settings
        epoch = (int(self.mixture.status.steps) - self.warmup_steps) // self.steps_per_epoch
        return balance_weight(s.balance_weight, s.balance_decay, epoch) * load_balance(
            probabilities, s.balance
        )

    def fit_masks(self) -> None:
        """Stage 2: the masks alone fit the student's outputs, T^2 KL(p_student || p_expert), for
        `mask_epochs` passes; the student and the members stay frozen in eval mode."""
        s, mixture = self.settings, self.mixture
        params = list(mixture.masks.parameters())
        optimizer = torch.optim.Adam(params, lr=s.mask_lr)
        was_training = self.student.training
        self.student.eval()
        mixture.masks.train()
        try:
            with torch.enable_grad():
                for _ in range(s.mask_epochs):
                    total, batches = 0.0, 0
                    for batch in self.mask_data:
                        x = batch_inputs(batch)
                        x = x.to(self._device) if self._device is not None else x
                        with torch.no_grad(), self._autocast():
                            student = logits_of(call_model(self.student, x)).float()
                        with self._autocast():
                            experts = mixture.expert_logits(x).float()
                        losses = [
                            hinton_kd(experts[:, e], student, temperature=s.temperature)
                            for e in range(experts.shape[1])
                        ]
                        loss = torch.stack(losses).sum()  # each mask's gradient comes from its own expert
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach()) / len(losses)
                        batches += 1
                    self.mask_losses.append(total / max(1, batches))
        finally:
            self.student.train(was_training)
            mixture.masks.eval()
            for p in params:
                p.grad = None
        mixture.status.fitted.fill_(True)

    def after_optimizer_step(self, student: nn.Module) -> None:
        self.mixture.status.steps += 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.mixture.gate.parameters())

    def optimizer_options(self) -> dict[str, Any]:
        s = self.settings
        return {k: v for k, v in {"lr": s.lr, "weight_decay": s.weight_decay}.items() if v is not None}

    def state_module(self) -> nn.Module:
        m = self.mixture
        return nn.ModuleDict({"masks": m.masks, "gate": m.gate, "status": m.status})

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = self._target = self._probabilities = None

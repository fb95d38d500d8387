"""S20 Talking Models ("Talking Models: Distill Pre-trained Knowledge to Downstream Models via Interactive
Communication", Zhao, Liu, Gui, An, Hong & Chi, 2023, arXiv:2310.03188): a pre-trained foundation model
teaches a downstream student through learned message encoders and decoders between their hidden states.

Sources and what they fix. No official code was found, and the paper's method section (its section 3,
equations and appendix) could not be read: the stored arXiv / ar5iv pages stop after the abstract and
introduction. Three further sources were found, none of them the paper's own text:

1. The abstract (arXiv:2310.03188, https://ar5iv.labs.arxiv.org/html/2310.03188) fixes the architecture:
   "each model (i.e., student and teacher) train[s] two components: (1) an encoder which encodes the model's
   hidden states to a message in a shared message space and (2) a decoder which decodes any message to its
   own hidden states. With encoder and decoder, not only can the teacher model transfer rich information by
   encoding its hidden states to messages, but also the student model can send messages with information of
   downstream tasks to teacher so that the teacher can interpret and generate responses", so that what passes
   from teacher to student is "tailored to the student's model capacity and downstream tasks' distributions".
2. The four ICLR 2024 reviews (OpenReview forum mPOVOwsDOO, decision reject, scores 6/5/6/5; stored as a
   review digest in a public GitHub file and summarised at https://paperhub.cn/paper/mPOVOwsDOO) restate
   parts of the method: the design follows Osgood-Schramm's two-way communication model; besides the task
   loss there are "three proposed loss[es] L_{interact}, L_{MC} and L_{SC}" with weights w_1, w_2, w_3, the
   "last three terms in the last equation in page 7"; L_MC makes "the messages of the teacher and the student
   ... consistent", although "they are produced by the two models sequentially"; the exchange can be iterated
   (a reviewer asks whether N iterations give 3N terms); layers "l_g and h_g" are chosen hyperparameters (g
   marks the student, h the teacher, and a second h a higher layer: "H_{h_h}^h"); the appendix describes only
   two codec modules; an ablation shows L_MC and L_SC add little; the experiments are movie recommendation
   (MovieLens, RMSE) and image classification (CIFAR-10), four datasets in all. What L_SC computes and the
   values of w_1..w_3 are not stated in any source found.
3. A Google patent application, US 2024/0386280 A1 ("Knowledge Distillation Training via Encoded Information
   Exchange...", filed 17 May 2024, read on trea.com; the stored page shows no inventors, so that it is this
   paper's method is our inference), describes the same exchange: the student's hidden layer gives an
   intermediate output, "an encoded message descriptive of the input and the intermediate output" goes to
   the teacher, which answers with "a second encoded message descriptive of a second intermediate output of
   one or more hidden layers of the teacher", and the student is trained "based on a difference between the
   intermediate output and the second intermediate output".

A second search (Dec 2026) found nothing further: the stored web pages (title, arXiv id, "Osgood-Schramm"
with distillation, "L_interact L_MC L_SC"), documentation, GitHub issue and code corpora (the same terms,
"interaction loss" / "message consistency" with encoder-decoder distillation), and GitHub repositories named
like the paper return only the abstract (the ar5iv page is stored from its beginning only), the review digest
and the patent's abstract; no method section, official code or reimplementation. The losses below stay ours.

What this implementation takes from them and what is ours. Sourced: the four codecs (an encoder and a decoder
per model, one shared message space), the teacher decoding and interpreting the student's message and
answering it, and the student learning from that answer. Ours: every loss form below, the codecs being
linear maps, a single tapped layer per model, the weights and their defaults, the temperature, and the label
term. Where the sources point elsewhere (not changed, because the method section's own equations could not be
read): (a) the reviews' l_g / h_g and the patent suggest the student's message leaves a lower student layer,
enters the teacher, and the teacher's answer is taken at a higher teacher layer as a hidden state, decoded
and compared with the student's own higher-layer hidden state; here the teacher's answer is taken at its
logits (the interpret / response terms) and the hidden-state term matches the teacher's message on the input
itself, not its answer; (b) the paper has three auxiliary losses (L_interact, L_MC, L_SC), here there are
four terms plus an optional label term, and none is known to equal L_MC or L_SC (a term that pulls the two
models' messages together, like L_MC, is absent); (c) the paper may repeat the exchange N times, here it
happens once per step; (d) a reviewer asks what the method does to "the teacher model (if not frozen)", so
the paper may let the teacher train; here it is always frozen.

With h_s (student_layer) and h_t (teacher_layer) per token (a vector is one token, a feature map one token
per position), E_s / D_s / E_t / D_t linear maps between each model's width and the message width
(`message_dim`, default the teacher's width), mean squared errors over real tokens (the encoder's
`token_mask` tap), and T^2 KL Hinton's KD at `temperature` T:

* **reconstruction** (each decoder reads its own model's messages): |D_t(E_t h_t) - h_t|^2 +
  |D_s(E_s h_s) - sg(h_s)|^2 (sg: the student is not pulled towards its own reconstruction);
* **hidden** (the teacher's message, decoded into the student's hidden states, is what the student learns):
  |h_s - D_s(E_t h_t)|^2, gradient to the student and both codecs;
* **interpret** (the student's message, decoded into the teacher's hidden states, is run through the rest
  of the frozen teacher, which must then answer as it does on the input itself): r = f_t^{>l}(D_t(E_s h_s)),
  T^2 KL(softmax(z_t / T) || softmax(r / T)); the gradient reaches E_s, D_t and the student's layers below
  l through the frozen teacher;
* **response** (the teacher's answer to the student's message goes back to the student, a target made for
  what the student can express): T^2 KL(softmax(sg(r) / T) || softmax(z_s / T));
* **labels** (off by default, `label_weight`): cross-entropy of the teacher's response r with the downstream
  labels, so that the teacher's reading of the student's messages learns the downstream task.

The value is the weighted sum (every weight 1 but `label_weight` 0). The teacher stays frozen; the four codecs
are this objective's modules, trained by the optimizer with the student.

Running the teacher on the student's message. The framework runs the teacher once per step, on the inputs,
before the objectives. For the interpret / response terms this objective runs it a second time: it keeps the
teacher module (`resolve_paths`; not as a submodule, so its weights stay out of the optimizer and the
checkpoint), records the teacher's latest call (a forward pre-hook), and reruns that call with a forward
hook that replaces the output of `teacher_layer` by D_t(E_s h_s), with gradients on. f_t^{>l} is therefore
"whatever the teacher computes from that layer's output" (its later blocks, pooling and head), exact for
models whose later layers read only that output (the zoo's CNNs, ResNets and encoders; a model with skip
connections around the layer would mix in its own earlier states). With the default layers of two
encoders (the last blocks) f_t^{>l} is the teacher's pooling and head; name an earlier teacher block
(`teacher_layer: encoder.encoder.layer.2`) to have the teacher's later blocks interpret the message. The
price is one more teacher forward per step (the layers below l without gradients). Not available for a
cached teacher (no model to run) or a step without teacher logits: the interpret, response and label terms
are then left out (the codec terms still train), and `interact: false` leaves them out always.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError
from distill.losses.classic import hinton_kd
from distill.losses.features import hint_mse
from distill.models.adapters import logits_of
from distill.objectives.base import (
    ParamError,
    StepOutputs,
    flag,
    number_in,
    positive_number,
    shown,
)
from distill.objectives.features import (
    FeatureObjective,
    layer_ref,
    project,
    register_feature_objective,
    sample_mask,
)

# The encoders' (B, T) float mask of real tokens (`distill.models.encoders.MASK_TAP`; the models floor is
# not importable from the objectives floor).
TOKEN_MASK = "token_mask"


def tokens(feature: Tensor) -> Tensor:
    """(B, T, D) as is; a vector (N, D) as one token (N, 1, D); a map (N, C, H, W) as (N, H*W, C)."""
    if feature.dim() == 3:
        return feature
    if feature.dim() == 2:
        return feature[:, None]
    if feature.dim() == 4:
        return feature.flatten(2).transpose(1, 2)
    raise UserError(
        "objective 'talking_models' reads vectors, token sequences or feature maps, got "
        f"{tuple(feature.shape)}"
    )


def untokens(sequence: Tensor, like: Tensor) -> Tensor:
    """The inverse of `tokens`, into the layout of `like`."""
    if like.dim() == 3:
        return sequence
    if like.dim() == 2:
        return sequence[:, 0]
    return sequence.transpose(1, 2).reshape(like.shape[0], -1, *like.shape[2:])


class LatestCall:
    """The arguments of a module's latest forward call (a forward pre-hook keeps them)."""

    def __init__(self) -> None:
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.call = (args, dict(kwargs))


def _width_and_positions(shape: torch.Size) -> tuple[int, int | None]:
    """A feature's width (the channel / last dimension) and its token count when fixed (maps, vectors)."""
    if len(shape) == 2:
        return int(shape[1]), 1
    if len(shape) == 3:
        return int(shape[2]), None  # sequences: the length changes from batch to batch
    if len(shape) == 4:
        return int(shape[1]), int(shape[2]) * int(shape[3])
    raise UserError(
        f"objective 'talking_models' reads vectors, token sequences or feature maps, got {tuple(shape[1:])} "
        "per sample"
    )


class TalkingModels(FeatureObjective):
    """Talking Models' interactive communication: message codecs on both sides, the frozen teacher run on
    the student's messages, and its answers sent back (see the module docstring)."""

    needs_teacher_logits = True

    def __init__(
        self,
        *,
        student_layer: Any = -2,
        teacher_layer: Any = -2,
        message_dim: int | None = None,
        temperature: float = 1.0,
        reconstruction_weight: float = 1.0,
        hidden_weight: float = 1.0,
        interpret_weight: float = 1.0,
        response_weight: float = 1.0,
        label_weight: float = 0.0,
        interact: bool = True,
    ) -> None:
        super().__init__("talking_models")
        name = self.loss_name
        self.student_refs = [layer_ref(name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]
        if message_dim is not None and (
            not isinstance(message_dim, int)
            or isinstance(message_dim, bool)
            or not 1 <= message_dim <= 1 << 16
        ):
            raise ParamError(
                name,
                "message_dim",
                f"must be a whole number from 1 to 65536 or null, got {shown(message_dim)}",
            )
        self.message_dim = message_dim
        self.temperature = positive_number(name, "temperature", temperature)
        self.weights = {
            key: number_in(name, f"{key}_weight", value, 0.0)
            for key, value in (
                ("reconstruction", reconstruction_weight),
                ("hidden", hidden_weight),
                ("interpret", interpret_weight),
                ("response", response_weight),
                ("label", label_weight),
            )
        }
        self.interact = flag(name, "interact", interact)
        self.student_encoder: nn.Module = nn.Identity()
        self.student_decoder: nn.Module = nn.Identity()
        self.teacher_encoder: nn.Module = nn.Identity()
        self.teacher_decoder: nn.Module = nn.Identity()
        self._mask_path: str | None = None
        self._teacher: Callable[[], nn.Module | None] = lambda: None
        self._latest = LatestCall()
        self._hook: Any = None

    # ------------------------------------------------------------------------------------ setup

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Note the student's token-mask tap, and keep (a weak reference to) the teacher with a hook that
        records its latest call; the layers resolve from `student_layer` / `teacher_layer` as usual."""
        self._mask_path = TOKEN_MASK if TOKEN_MASK in dict(student.named_modules()) else None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if teacher is None:
            self._teacher = lambda: None
            return None
        self._teacher = weakref.ref(teacher)
        self._hook = teacher.register_forward_pre_hook(self._latest, with_kwargs=True)
        weakref.finalize(self, self._hook.remove)  # the hook goes with this objective
        return None

    def bind_layers(self, student_layers: Any, teacher_layers: Any) -> None:
        super().bind_layers(student_layers, teacher_layers)
        if self._mask_path is not None and self._mask_path not in self.student_layers:
            self.student_layers = (*self.student_layers, self._mask_path)

    def extra_repr(self) -> str:
        if not self.teacher_layers:
            return "talking_models(unbound)"
        return f"talking_models({self.student_layers[0]}->{self.teacher_layers[0]})"

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        student, teacher = student_shapes[0], teacher_shapes[0]
        (width_s, positions_s), (width_t, positions_t) = (_width_and_positions(s) for s in (student, teacher))
        if (len(student) == 3) != (len(teacher) == 3) or positions_s != positions_t:
            raise UserError(
                f"objective 'talking_models': the student's '{self.student_layers[0]}' gives "
                f"{tuple(student[1:])} per sample and the teacher's '{self.teacher_layers[0]}' "
                f"{tuple(teacher[1:])}; messages pass token by token, so both need as many tokens (positions)"
            )
        message = self.message_dim if self.message_dim is not None else width_t
        self.student_encoder = nn.Linear(width_s, message)
        self.student_decoder = nn.Linear(message, width_s)
        self.teacher_encoder = nn.Linear(width_t, message)
        self.teacher_decoder = nn.Linear(message, width_t)
        super().build(student_shapes, teacher_shapes, n_data)

    # -------------------------------------------------------------------- the teacher's answer

    def teacher_reply(self, message_in_teacher_space: Tensor, teacher_feature: Tensor) -> Tensor | None:
        """The teacher's logits when `teacher_layer` outputs `message_in_teacher_space` (in the layout of
        `teacher_feature`) on its latest inputs, with gradients; None when no teacher model or call is
        known."""
        teacher, call = self._teacher(), self._latest.call
        if teacher is None or call is None:
            return None
        path = self.teacher_layers[0]
        module = dict(teacher.named_modules()).get(path)
        if module is None:
            raise UserError(f"objective 'talking_models': the teacher has no module '{path}'")
        replacement = untokens(message_in_teacher_space, teacher_feature)

        def swap(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            first = output[0] if isinstance(output, tuple) else output
            if not isinstance(first, Tensor) or first.shape != replacement.shape:
                got = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
                raise UserError(
                    f"objective 'talking_models': the teacher's latest call gives '{path}' {got}, the step's "
                    f"message is {tuple(replacement.shape)}; the teacher must have run on this step's batch"
                )
            new = replacement.to(first.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(swap)
        # The teacher's weights take no gradient from this objective, even a co-trained teacher's.
        learning = [p for p in teacher.parameters() if p.requires_grad]
        for parameter in learning:
            parameter.requires_grad_(False)
        args, kwargs = call
        try:
            with torch.enable_grad():
                output = teacher(*args, **kwargs)
        finally:
            handle.remove()
            for parameter in learning:
                parameter.requires_grad_(True)
        return logits_of(output)

    # -------------------------------------------------------------------------------- the loss

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, (teacher,) = self.features(outputs)
        student = students[0]
        s, t = tokens(student), tokens(teacher)
        if s.shape[:2] != t.shape[:2]:
            raise UserError(
                f"objective 'talking_models': the student gives {tuple(s.shape[:2])} (samples, tokens) and "
                f"the teacher {tuple(t.shape[:2])}; both must read the same batch with the same tokens"
            )
        mask = self._token_mask(outputs, student, s)
        s_f, t_f = s.float(), t.float()
        message_s = project(self.student_encoder, s)
        message_t = project(self.teacher_encoder, t)
        weights = self.weights
        total = torch.zeros((), device=s.device)
        if weights["reconstruction"]:
            reconstruction = hint_mse(project(self.teacher_decoder, message_t), t_f, mask=mask) + hint_mse(
                project(self.student_decoder, message_s), s_f.detach(), mask=mask
            )
            total = total + weights["reconstruction"] * reconstruction
        if weights["hidden"]:
            total = total + weights["hidden"] * hint_mse(
                s_f, project(self.student_decoder, message_t), mask=mask
            )
        asks = weights["interpret"] or weights["response"] or weights["label"]
        if self.interact and asks and outputs.teacher_logits is not None:
            reply = self.teacher_reply(project(self.teacher_decoder, message_s), teacher)
            if reply is not None:
                total = total + self._reply_terms(outputs, reply)
        return total

    def _token_mask(self, outputs: StepOutputs, student: Tensor, sequence: Tensor) -> Tensor | None:
        """(B, T) boolean mask of the tokens that count, or None."""
        if student.dim() == 3 and self._mask_path is not None:
            found = outputs.student_features.get(self._mask_path)
            if found is not None and found.shape == sequence.shape[:2]:
                return found > 0
        rows = sample_mask(student, outputs.mask)
        if rows is not None and rows.dim() == 1:
            return rows[:, None].expand(sequence.shape[:2])
        return rows if rows is not None and rows.shape == sequence.shape[:2] else None

    def _reply_terms(self, outputs: StepOutputs, reply: Tensor) -> Tensor:
        teacher_logits = outputs.teacher_logits
        assert teacher_logits is not None
        if reply.shape != teacher_logits.shape:
            raise UserError(
                f"objective 'talking_models': the teacher's answer to the student's message has shape "
                f"{tuple(reply.shape)}, its logits {tuple(teacher_logits.shape)}"
            )
        rows = sample_mask(reply[..., 0], outputs.mask)
        weights, temperature = self.weights, self.temperature
        total = torch.zeros((), device=reply.device)
        if weights["interpret"]:
            total = total + weights["interpret"] * hinton_kd(
                reply, teacher_logits, mask=rows, temperature=temperature
            )
        if weights["response"]:
            if outputs.student_logits.shape != reply.shape:
                raise UserError(
                    f"objective 'talking_models': the student's logits {tuple(outputs.student_logits.shape)} "
                    f"and the teacher's {tuple(reply.shape)} differ in shape"
                )
            total = total + weights["response"] * hinton_kd(
                outputs.student_logits, reply.detach(), mask=rows, temperature=temperature
            )
        labels = outputs.labels
        if weights["label"] and labels is not None and labels.shape == reply.shape[:-1]:
            keep = labels >= 0 if rows is None else (labels >= 0) & rows
            if bool(keep.any()):
                total = total + weights["label"] * F.cross_entropy(reply[keep].float(), labels[keep])
        return total


register_feature_objective(
    "talking_models",
    TalkingModels,
    summary="message encoders/decoders between student and frozen teacher; the teacher answers the "
    "student's messages",
    paper="Zhao, Liu, Gui, An, Hong & Chi, 2023, Talking Models: Distill Pre-trained Knowledge to Downstream "
    "Models via Interactive Communication (S20)",
)

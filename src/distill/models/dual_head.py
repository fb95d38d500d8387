"""`dual_head`: any zoo classifier with a second linear head on its penultimate features (S06 DHO).

"Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head
Optimization" (Kang et al., 2025). The base model's last `nn.Linear` is its classifier: it becomes `ce_head`
(trained on labels by the objective `dho`), a fresh linear layer of the same shape beside it is `kd_head`
(trained on the teacher), and the base model with an identity in the classifier's place is `backbone`, the
shared feature extractor. `forward` returns the heads' mixture at inference (`distill.losses.dho.dho_mixture`,
log-probabilities), so evaluation, export and latency read one output as from any classifier; the heads' raw
logits are the outputs of the submodules `ce_head` and `kd_head` (what the objective's hooks read), or
`head_logits(x)`.

A probe at construction (eval mode, no gradients, no random draws) checks that the base model's output is
its last linear layer's output, unchanged: a model that post-processes its logits has no such head to split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError, first_line, shown
from distill.losses.dho import dho_mixture
from distill.models.cifar import feature_layers_of
from distill.models.registry import MODELS, build_model

NAME = "dual_head"
CE_HEAD, KD_HEAD = "ce_head", "kd_head"
PAPER = (
    "Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head "
    "Optimization (Kang et al., 2025)"
)


def _base_spec(base: Any) -> tuple[str, dict[str, Any]]:
    """`base` as (name, params): a model name, or a mapping {name, params}."""
    if isinstance(base, str):
        name, params = base, {}
    elif isinstance(base, dict):
        unknown = sorted(set(base) - {"name", "params"}, key=str)
        if unknown:
            raise UserError(
                f"model '{NAME}': base has no key {shown(unknown[0])}; write base: {{name, params}}"
            )
        name, params = base.get("name"), base.get("params", {})
        if not isinstance(name, str) or not name:
            raise UserError(f"model '{NAME}': base.name must be a model name, got {shown(name)}")
        if not isinstance(params, dict):
            raise UserError(f"model '{NAME}': base.params must be a mapping, got {shown(params)}")
    else:
        raise UserError(f"model '{NAME}': base must be a model name or {{name, params}}, got {shown(base)}")
    if name == NAME:
        raise UserError(f"model '{NAME}': the base model cannot itself be a {NAME} model")
    return name, dict(params)


def _check_mixture(alpha: Any, beta: Any) -> tuple[float, float]:
    try:
        dho_mixture(torch.zeros(1, 2), torch.zeros(1, 2), alpha=alpha, beta=beta)
    except (TypeError, ValueError) as err:
        raise UserError(f"model '{NAME}': {err}") from None
    return float(alpha), float(beta)


def _classifier(model: nn.Module, num_classes: int, base: str) -> tuple[str, nn.Linear]:
    """The path and module of the base model's last `nn.Linear`, which must predict the classes."""
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and path]
    if not linears:
        raise UserError(f"model '{NAME}': base model '{base}' has no nn.Linear classifier to split in two")
    path, layer = linears[-1]
    if layer.out_features != num_classes:
        raise UserError(
            f"model '{NAME}': the last linear layer of '{base}' ('{path}') has {layer.out_features} outputs, "
            f"not the {num_classes} classes: it is not the classifier"
        )
    return path, layer


@torch.no_grad()
def _output_is_layer_output(model: nn.Module, layer: nn.Linear, input_shape: tuple[int, ...]) -> bool:
    """Whether `model(x)` is `layer`'s output unchanged, on two zero inputs (eval mode, state restored)."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape))
    finally:
        handle.remove()
        model.train(was_training)
    return (
        len(seen) == 1
        and isinstance(out, Tensor)
        and out.shape == seen[0].shape
        and torch.equal(out, seen[0])
    )


class DualHead(nn.Module):
    """`backbone` (the base model with its classifier replaced by an identity), `ce_head` (the base model's
    own classifier) and `kd_head` (a new linear layer of the same shape) on the same features. `alpha` and
    `beta` are plain attributes (not weights): the inference mixture can be changed after training."""

    def __init__(self, backbone: nn.Module, ce_head: nn.Linear, *, alpha: float, beta: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.ce_head = ce_head
        self.kd_head = nn.Linear(ce_head.in_features, ce_head.out_features, bias=ce_head.bias is not None)
        self.alpha, self.beta = alpha, beta

    def head_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two heads' raw logits (CE head, KD head)."""
        z = self.backbone(x)
        return self.ce_head(z), self.kd_head(z)

    def forward(self, x: Tensor) -> Tensor:
        ce, kd = self.head_logits(x)
        return dho_mixture(ce, kd, alpha=self.alpha, beta=self.beta)

    def feature_layers(self, preact: bool = False) -> list[str]:
        """The base model's feature taps, under `backbone.` (feature objectives work as on the base model)."""
        return [f"backbone.{path}" for path in feature_layers_of(self.backbone)]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:g}"


@MODELS.register(
    NAME,
    summary="any classifier with a second linear head (S06 DHO): params base {name, params}, alpha, beta",
    paper=PAPER,
)
def dual_head(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    base: str | dict[str, Any],
    alpha: float = 0.5,
    beta: float = 1.0,
) -> DualHead:
    """`base` (a registered model: its name, or {name, params}) with its last linear layer split into a CE
    head and a KD head; `alpha` weighs the CE head's probabilities at inference, `beta` is the KD head's
    temperature there (the paper's Eq. 8; defaults alpha = 0.5, beta = 1: see `distill.losses.dho`)."""
    alpha, beta = _check_mixture(alpha, beta)
    name, params = _base_spec(base)
    model = build_model(name, num_classes=num_classes, input_shape=input_shape, **params)
    path, layer = _classifier(model, num_classes, name)
    try:
        plain = _output_is_layer_output(model, layer, tuple(input_shape))
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise UserError(
            f"model '{NAME}': cannot run base model '{name}' on a float tensor of shape {tuple(input_shape)} "
            f"to find its classifier ({first_line(err)})"
        ) from None
    if not plain:
        raise UserError(
            f"model '{NAME}': the output of '{name}' is not its last linear layer ('{path}') unchanged; "
            "dual_head needs a classifier whose logits are that layer's output"
        )
    parent_path, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attribute, nn.Identity())
    return DualHead(model, layer, alpha=alpha, beta=beta)

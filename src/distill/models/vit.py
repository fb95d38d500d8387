"""Vision Transformers for small images, built from `transformers` (`ViTConfig`, `ViTForImageClassification`):
the zoo's ViT pairs for feature objectives that read patch tokens (S13 TRG, FitNets / RKD on tokens).

`ViTClassifier` holds the two parts of a `ViTForImageClassification` (`vit`, a `ViTModel` without pooler,
and `classifier`, the linear head on the [CLS] token) under the same names, so its state dict *is* that
model's: `load_state_dict` takes a transformers checkpoint's weights and `as_transformers()` gives them back
for `save_pretrained`. Its forward is the transformers forward (final LayerNorm, [CLS] row, head) with one
parameter-free module added, `pooled`, so that the vector the head reads is a module output a hook can tap.

Feature taps (`feature_layers()`), in the zoo's order `[stem, stage 1, ..., stage k, pooled]`:
`vit.embeddings` (patch embeddings + [CLS] + positions, `(B, 1 + N, D)`), every block `vit.layers.i`
(`(B, 1 + N, D)`, before the final LayerNorm), then `pooled` (`(B, D)`, the normalised [CLS] token). So
tap -2 is the last block's tokens (TRG's default) and -1 the vector the classifier reads (RKD, PKT).
Token features include the [CLS] token in position 0.

`transformers_vit_taps` gives the same kind of list for a transformers ViT built elsewhere
(`ViTForImageClassification`, `ViTMAEForPreTraining`, `ViTModel`): embeddings, blocks, final LayerNorm
(`distill.models.cifar.feature_layers_of` falls back to it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distill.errors import UserError, shown
from distill.models.cifar import check_classes
from distill.models.registry import MODELS, check_dropout

# Presets: `vit_tiny` is the benchmarks' student, `vit_small` their teacher (benchmarks/vit_tokens.py).
PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": {"hidden": 64, "depth": 3, "heads": 4},
    "vit_small": {"hidden": 128, "depth": 6, "heads": 4},
}
VIT_MODEL_TYPES = ("vit", "vit_mae")
POOLED_TAP = "pooled"


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"model 'vit': {key} must be a positive whole number, got {shown(value)}")
    return value


def vit_config(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    patch_size: int,
    hidden: int,
    depth: int,
    heads: int,
    mlp_ratio: int,
    dropout: float,
) -> Any:
    """The `ViTConfig` of a classifier of `input_shape` (C, H, W) images; one line for sizes that do not
    fit."""
    from transformers import ViTConfig

    if len(input_shape) != 3:
        raise UserError(f"model 'vit' reads images (C, H, W), got input_shape {tuple(input_shape)}")
    channels, height, width = (int(d) for d in input_shape)
    patch_size, hidden, depth, heads, mlp_ratio = (
        _positive(k, v)
        for k, v in (
            ("patch_size", patch_size),
            ("hidden", hidden),
            ("depth", depth),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        )
    )
    if height % patch_size or width % patch_size:
        raise UserError(
            f"model 'vit': patch_size {patch_size} does not divide the {height}x{width} images "
            f"(e.g. 4 or 7 for 28x28, 4 or 8 for 32x32)"
        )
    if hidden % heads:
        raise UserError(f"model 'vit': hidden ({hidden}) must be a multiple of heads ({heads})")
    return ViTConfig(
        image_size=(height, width),
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp_ratio * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=check_classes(num_classes),
    )


class ViTClassifier(nn.Module):
    """A transformers `ViTForImageClassification`'s `vit` and `classifier`, with the pooled [CLS] vector as a
    module output (module docstring). `forward(images) -> logits`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import ViTForImageClassification

        model = ViTForImageClassification(config)  # its own initialisation (truncated normal, std 0.02)
        self.config = model.config
        self.vit = model.vit
        self.pooled = nn.Identity()  # a tap: the normalised [CLS] token the classifier reads
        self.classifier = model.classifier

    @property
    def depth(self) -> int:
        return len(self.vit.layers)

    def feature_layers(self, preact: bool = False) -> list[str]:
        """`[embeddings, block 0, ..., block L-1, pooled]` (`preact` gives the same taps: a block's output is
        a residual sum, no activation ends it)."""
        return ["vit.embeddings", *(f"vit.layers.{i}" for i in range(self.depth)), POOLED_TAP]

    def as_transformers(self) -> nn.Module:
        """A `ViTForImageClassification` with these weights (a copy), e.g. for `save_pretrained`."""
        from transformers import ViTForImageClassification

        model = ViTForImageClassification(self.config)
        model.load_state_dict(self.state_dict())
        return model.to(next(self.parameters()).device)

    def forward(self, pixel_values: Tensor) -> Tensor:
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state  # after the final LayerNorm
        return self.classifier(self.pooled(hidden[:, 0]))


def build_vit(
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    patch_size: int = 4,
    hidden: int = 64,
    depth: int = 3,
    heads: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
) -> ViTClassifier:
    config = vit_config(
        num_classes=num_classes,
        input_shape=input_shape,
        patch_size=patch_size,
        hidden=hidden,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=check_dropout("vit", dropout),
    )
    return ViTClassifier(config)


def _preset(name: str) -> Any:
    sizes = PRESETS[name]

    def factory(
        num_classes: int,
        input_shape: tuple[int, ...],
        patch_size: int = 4,
        hidden: int = sizes["hidden"],
        depth: int = sizes["depth"],
        heads: int = sizes["heads"],
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> ViTClassifier:
        return build_vit(
            num_classes,
            input_shape,
            patch_size=patch_size,
            hidden=hidden,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )

    return factory


MODELS.add(
    "vit",
    build_vit,
    summary="Vision Transformer from transformers' ViTForImageClassification (patch_size, hidden, depth, "
    "heads, mlp_ratio); taps: embeddings, every block's tokens, pooled [CLS]",
    paper="An Image is Worth 16x16 Words (Dosovitskiy et al., ICLR 2021)",
)
for _name, _sizes in PRESETS.items():
    MODELS.add(
        _name,
        _preset(_name),
        summary=f"`vit` with hidden {_sizes['hidden']}, depth {_sizes['depth']}, heads {_sizes['heads']}, "
        "patch 4 (each overridable)",
        paper="An Image is Worth 16x16 Words (Dosovitskiy et al., ICLR 2021)",
    )


def transformers_vit_taps(model: nn.Module) -> list[str]:
    """Feature taps of a transformers ViT (`ViTModel`, `ViTForImageClassification`, `ViTMAEModel`,
    `ViTMAEForPreTraining`): `[embeddings, block 0, ..., block L-1, final LayerNorm]`, the LayerNorm's
    normalised tokens standing in for the pooled vector; [] for any other model."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in VIT_MODEL_TYPES:
        return []
    modules = dict(model.named_modules())
    for prefix in ("vit.", ""):
        blocks = modules.get(f"{prefix}layers")
        if isinstance(blocks, nn.ModuleList) and f"{prefix}embeddings" in modules:
            taps = [f"{prefix}embeddings", *(f"{prefix}layers.{i}" for i in range(len(blocks)))]
            return taps + ([f"{prefix}layernorm"] if f"{prefix}layernorm" in modules else [])
    return []

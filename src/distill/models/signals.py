"""1-D networks for modulation recognition on (2, L) I/Q frames (S01, "ClST: A Convolutional Transformer
Framework for Automatic Modulation Recognition by Knowledge Distillation", Hou et al., IEEE TWC 2024).

- `clst`: the teacher, a convolution-linked signal transformer as the paper's abstract describes it: a
  hierarchy of stages, each opened by a strided convolutional token embedding (the sequence shortens, the
  width grows); blocks whose attention is PSCA (parallel spatial-channel attention: self-attention across time
  positions and attention across channels computed side by side from the same queries / keys / values, their
  outputs summed) fed by CTP (convolution-transformer projection: queries, keys and values made by a
  depthwise 1-D convolution with batch norm and then a pointwise linear map, instead of a linear map alone).
  Pre-norm residual blocks with an MLP; mean over time, then a linear classifier.
- `kd_cnn`: the KD-CNN student, plain 1-D convolutions with batch norm, ReLU and pooling.
- `kd_mobilenet`: the KD-MobileNet student, depthwise-separable 1-D convolutions (MobileNet v1's block:
  depthwise k x 1, batch norm, ReLU, pointwise 1 x 1, batch norm, ReLU).

The paper's full text (layer counts, widths, kernel sizes) was not available here; the sizes are ours, small
enough for a CPU, and the structure follows the abstract's three ingredients. See docs/signals.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError
from distill.models.registry import MODELS, check_dropout, check_widths

PAPER = "ClST: A Convolutional Transformer Framework for Automatic Modulation Recognition (Hou et al., 2024)"


def _channels_and_length(model: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 2:
        raise UserError(
            f"model '{model}' reads (channels, length) sequences such as I/Q frames, not {input_shape}"
        )
    return int(input_shape[0]), int(input_shape[1])


class ConvProjection(nn.Module):
    """CTP: depthwise convolution over time + batch norm, then a pointwise linear map; (B, T, C) -> same."""

    def __init__(self, width: int, kernel: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width, bias=False)
        self.norm = nn.BatchNorm1d(width)
        self.pointwise = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.depthwise(x.transpose(1, 2))).transpose(1, 2)
        return self.pointwise(x)


class ParallelSpatialChannelAttention(nn.Module):
    """PSCA: spatial attention softmax(Q K^T / sqrt(d)) V over time positions (multi-head) and channel
    attention V softmax(Q^T K / sqrt(T)) over channels, from the same CTP projections, summed, projected."""

    def __init__(self, width: int, heads: int, kernel: int) -> None:
        super().__init__()
        if width % heads:
            raise UserError(f"model 'clst': width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = (ConvProjection(width, kernel) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)

        def split(z: Tensor) -> Tensor:  # (B, T, C) -> (B, heads, T, C / heads)
            return z.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        spatial = F.scaled_dot_product_attention(split(q), split(k), split(v))
        spatial = spatial.transpose(1, 2).reshape(b, t, c)
        # Channel branch: a C x C affinity summed over the T time steps, scaled by 1/sqrt(T) as the spatial
        # branch scales by 1/sqrt(d) (the sum has T terms).
        affinity = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(t), dim=-1)  # (B, C, C)
        channel = (affinity @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.out(spatial + channel)


class ClSTBlock(nn.Module):
    def __init__(self, width: int, heads: int, kernel: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = ParallelSpatialChannelAttention(width, heads, kernel)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_ratio * width, width),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class ConvTokenEmbedding(nn.Module):
    """A stage's entrance: strided convolution (the sequence shortens by `stride`), then layer norm."""

    def __init__(self, in_width: int, width: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_width, width, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, T / stride, C)
        return self.norm(self.conv(x).transpose(1, 2))


class ClST(nn.Module):
    """Stages of (convolutional token embedding, `depth` PSCA blocks); mean over time; linear classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: list[int],
        depths: list[int],
        heads: list[int],
        strides: list[int],
        kernel: int,
        mlp_ratio: int,
        dropout: float,
        stem: int = 0,
    ) -> None:
        super().__init__()
        # An optional full-resolution convolution before the first token embedding: local waveform features
        # at every sample before the sequence is shortened.
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, stem, 7)) if stem else nn.Identity()
        stages: list[nn.Module] = []
        previous = stem or in_channels
        for i, (width, depth, head, stride) in enumerate(zip(widths, depths, heads, strides, strict=True)):
            embed_kernel = 7 if i == 0 else 3
            blocks = [ClSTBlock(width, head, kernel, mlp_ratio, dropout) for _ in range(depth)]
            stages.append(
                nn.ModuleDict(
                    {
                        "embed": ConvTokenEmbedding(previous, width, embed_kernel, stride),
                        "blocks": nn.Sequential(*blocks),
                    }
                )
            )
            previous = width
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(previous)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            tokens = stage["blocks"](stage["embed"](x))  # type: ignore[index]
            x = tokens.transpose(1, 2)
        return self.head(self.norm(x.mean(dim=-1)))


@MODELS.register(
    "clst", summary="ClST teacher: conv token embeddings + PSCA / CTP transformer blocks, 1-D", paper=PAPER
)
def clst(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    widths: list[int] | None = None,
    depths: list[int] | None = None,
    heads: list[int] | None = None,
    strides: list[int] | None = None,
    kernel: int = 3,
    mlp_ratio: int = 2,
    dropout: float = 0.1,
    stem: int = 0,
) -> nn.Module:
    channels, _ = _channels_and_length("clst", input_shape)
    if not isinstance(stem, int) or isinstance(stem, bool) or stem < 0:
        raise UserError(f"model 'clst': stem must be a whole number of channels >= 0 (0: none), got {stem!r}")
    widths = check_widths("clst", "widths", widths if widths is not None else [32, 64, 96])
    depths = check_widths("clst", "depths", depths if depths is not None else [1, 2, 1])
    heads = check_widths("clst", "heads", heads if heads is not None else [2, 4, 4])
    strides = check_widths("clst", "strides", strides if strides is not None else [2, 2, 2])
    if not len(widths) == len(depths) == len(heads) == len(strides):
        raise UserError("model 'clst': widths, depths, heads and strides need one entry per stage each")
    return ClST(
        channels,
        num_classes,
        widths,
        depths,
        heads,
        strides,
        kernel,
        mlp_ratio,
        check_dropout("clst", dropout),
        stem,
    )


def _conv_bn_relu(
    in_width: int, width: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv1d(in_width, width, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
    ]


class SequenceClassifier(nn.Module):
    """Convolutional features, global average pooling over time, dropout, linear classifier."""

    def __init__(self, features: nn.Sequential, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x).mean(dim=-1)))


@MODELS.register(
    "kd_cnn", summary="KD-CNN student: 1-D conv + batch norm + ReLU + max-pool layers", paper=PAPER
)
def kd_cnn(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: list[int] | None = None,
    kernels: list[int] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    in_channels, _ = _channels_and_length("kd_cnn", input_shape)
    channels = check_widths("kd_cnn", "channels", channels if channels is not None else [16, 24, 32])
    kernels = check_widths(
        "kd_cnn", "kernels", kernels if kernels is not None else [7, 5, 3][: len(channels)]
    )
    if len(kernels) != len(channels):
        raise UserError("model 'kd_cnn': kernels needs one entry per layer of channels")
    layers: list[nn.Module] = []
    previous = in_channels
    for i, (width, kernel) in enumerate(zip(channels, kernels, strict=True)):
        layers += _conv_bn_relu(previous, width, kernel)
        if i < len(channels) - 1:
            layers.append(nn.MaxPool1d(2))
        previous = width
    return SequenceClassifier(nn.Sequential(*layers), previous, num_classes, check_dropout("kd_cnn", dropout))


@MODELS.register(
    "kd_mobilenet", summary="KD-MobileNet student: depthwise-separable 1-D convolutions", paper=PAPER
)
def kd_mobilenet(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    stem: int = 16,
    channels: list[int] | None = None,
    strides: list[int] | None = None,
    kernel: int = 5,
    dropout: float = 0.0,
) -> nn.Module:
    in_channels, _ = _channels_and_length("kd_mobilenet", input_shape)
    channels = check_widths("kd_mobilenet", "channels", channels if channels is not None else [32, 48, 64])
    strides = check_widths("kd_mobilenet", "strides", strides if strides is not None else [4, 2, 2])
    if len(strides) != len(channels):
        raise UserError("model 'kd_mobilenet': strides needs one entry per block of channels")
    layers = _conv_bn_relu(in_channels, stem, 7)
    previous = stem
    for width, stride in zip(channels, strides, strict=True):
        layers += _conv_bn_relu(previous, previous, kernel, stride, groups=previous)  # depthwise
        layers += _conv_bn_relu(previous, width, 1)  # pointwise
        previous = width
    return SequenceClassifier(
        nn.Sequential(*layers), previous, num_classes, check_dropout("kd_mobilenet", dropout)
    )

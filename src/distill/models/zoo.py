"""Small image models for the quickstart and tests: an MLP and a small CNN."""

from __future__ import annotations

import math

from torch import Tensor, nn

from distill.models.registry import MODELS, check_dropout, check_widths


@MODELS.register("mlp", summary="multi-layer perceptron on flattened inputs")
class MLP(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: tuple[int, ...] | list[int] = (64,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = check_widths("mlp", "hidden", hidden)
        dropout = check_dropout("mlp", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def feature_layers(self, preact: bool = False) -> list[str]:
        """Feature taps `[flattened input, each hidden ReLU, classifier input]` (`preact` has no other
        meaning here: the same taps)."""
        relus = [f"body.{i}" for i, layer in enumerate(self.body) if isinstance(layer, nn.ReLU)]
        return ["body.0", *relus, "body"]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@MODELS.register("small_cnn", summary="conv-BN-ReLU stages with global average pooling")
class SmallCNN(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        channels: tuple[int, ...] | list[int] = (32, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = check_widths("small_cnn", "channels", channels)
        dropout = check_dropout("small_cnn", dropout)
        stages: list[nn.Module] = []
        width = input_shape[0]
        for i, out in enumerate(channels):
            stage = [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i < len(channels) - 1:
                stage.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*stage))
            width = out
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def feature_layers(self, preact: bool = False) -> list[str]:
        """Feature taps `[stage 0, ..., stage k-1, pooled]`: the first conv stage stands in for a stem, so
        "every stage" (taps[1:-1]) means stages 1 .. k-1 (`preact` gives the same taps)."""
        return [f"features.{i}" for i in range(len(self.features))] + ["pool"]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.pool(self.features(x))))

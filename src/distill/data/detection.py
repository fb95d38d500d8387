"""Synthetic shapes for object detection (S27, "CLoCKDistill: Consistent Location-and-Context-aware
Knowledge Distillation for DETRs", Lan and Tian, 2025): coloured squares, discs and triangles on a noisy
canvas, with their boxes and class labels. Nothing is read or downloaded; every image is drawn from a seed.

Each canvas (`size` x `size`, 3 channels in [0, 1]) has a dim background of one random colour plus Gaussian
noise, and 1..`max_objects` objects. An object is one of `CLASSES`, `min_side`..`max_side` pixels wide and
high (squares and discs square, triangles as wide as they are high), of a bright random colour, placed so
that it lies fully inside the canvas and its box overlaps every earlier box by an IoU below `max_iou` (a few
draws are retried, then the object is left out). Later objects are painted over earlier ones.

Boxes are DETR's convention: `(cx, cy, w, h)` normalised by the canvas size, in [0, 1].
`detection_splits(seed)` gives train / validation / test drawn independently from the seed and the split's
index, so the same seed always gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from distill.errors import UserError

CLASSES = ("square", "disc", "triangle")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ShapesConfig:
    """How the canvases are drawn."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_side: int = 10
    max_side: int = 26
    max_iou: float = 0.2
    noise: float = 0.05

    def check(self) -> None:
        if self.size < 8:
            raise UserError(f"detection data: size must be at least 8 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise UserError(
                f"detection data: need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                f"{self.max_objects}"
            )
        if not 2 <= self.min_side <= self.max_side <= self.size:
            raise UserError(
                f"detection data: need 2 <= min_side <= max_side <= size, got {self.min_side}, "
                f"{self.max_side}, {self.size}"
            )


@dataclass
class DetectionSet:
    """Images `(N, 3, size, size)` and, per image, its class labels `(k,)` and boxes `(k, 4)`
    (cx, cy, w, h)."""

    images: Tensor
    labels: list[Tensor]
    boxes: list[Tensor]

    def __len__(self) -> int:
        return len(self.images)

    def targets(self, index: Tensor | list[int]) -> list[dict[str, Tensor]]:
        """Targets of the images at `index` as transformers' DETR loss takes them."""
        return [{"class_labels": self.labels[i], "boxes": self.boxes[i]} for i in map(int, index)]


def _mask(shape: str, side: int) -> np.ndarray:
    """Boolean footprint of a shape in a `side` x `side` box."""
    grid = (np.arange(side) + 0.5) / side
    y, x = np.meshgrid(grid, grid, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "disc":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    # triangle: apex at the top centre, base on the bottom row
    return np.abs(x - 0.5) <= 0.5 * y


def _iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """IoU of two squares given as (left, top, side)."""
    ax, ay, aside = a
    bx, by, bside = b
    w = max(0, min(ax + aside, bx + bside) - max(ax, bx))
    h = max(0, min(ay + aside, by + bside) - max(ay, by))
    inter = w * h
    return inter / (aside * aside + bside * bside - inter)


def draw_canvas(
    rng: np.random.Generator, config: ShapesConfig
) -> tuple[np.ndarray, list[int], list[list[float]]]:
    """One image `(3, size, size)` float32 and its labels and (cx, cy, w, h) boxes."""
    size = config.size
    background = rng.uniform(0.0, 0.3, size=3)
    image = np.broadcast_to(background[:, None, None], (3, size, size)).copy()
    placed: list[tuple[int, int, int]] = []
    labels: list[int] = []
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        for _attempt in range(20):
            side = int(rng.integers(config.min_side, config.max_side + 1))
            left = int(rng.integers(0, size - side + 1))
            top = int(rng.integers(0, size - side + 1))
            if all(_iou((left, top, side), other) < config.max_iou for other in placed):
                break
        else:
            continue
        label = int(rng.integers(len(CLASSES)))
        colour = rng.uniform(0.5, 1.0, size=3)
        colour[rng.integers(3)] *= rng.uniform(0.0, 0.5)  # one dim channel: hues differ, not only brightness
        mask = _mask(CLASSES[label], side)
        region = image[:, top : top + side, left : left + side]
        region[:, mask] = colour[:, None]
        placed.append((left, top, side))
        labels.append(label)
        boxes.append([(left + side / 2) / size, (top + side / 2) / size, side / size, side / size])
    image += rng.normal(0.0, config.noise, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels, boxes


def make_detection_set(count: int, seed: int, config: ShapesConfig | None = None) -> DetectionSet:
    """`count` canvases drawn from `seed` (the same seed gives the same set)."""
    config = config or ShapesConfig()
    config.check()
    if count < 1:
        raise UserError(f"detection data: need at least one image, got {count}")
    rng = np.random.default_rng(seed)
    images, labels, boxes = [], [], []
    for _ in range(count):
        image, label, box = draw_canvas(rng, config)
        images.append(torch.from_numpy(image))
        labels.append(torch.tensor(label, dtype=torch.long))
        boxes.append(torch.tensor(box, dtype=torch.float32).reshape(-1, 4))
    return DetectionSet(torch.stack(images), labels, boxes)


def detection_splits(
    seed: int, train: int, validation: int, test: int, config: ShapesConfig | None = None
) -> dict[str, DetectionSet]:
    """Train, validation and test sets drawn independently from `seed` and the split's index."""
    counts = dict(zip(SPLITS, (train, validation, test), strict=True))
    return {
        name: make_detection_set(counts[name], seed * 1000 + index, config)
        for index, name in enumerate(SPLITS)
    }

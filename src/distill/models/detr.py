"""Small DETR detectors (S27, CLoCKDistill) built from transformers' `DetrForObjectDetection`.

"End-to-End Object Detection with Transformers" (Carion et al., ECCV 2020). The backbone is transformers'
own `ResNetBackbone` from a tiny `ResNetConfig` (basic blocks, random init; no timm or torchvision, which
DETR's default backbone needs), so the whole detector is transformers' code. The changes, all outside the
transformer:

- every parameter trains (transformers freezes the ResNet stem and first stage, meant for pretrained weights,
  and swaps batch norm for a frozen one, an identity at random init: it is made trainable again);
- the official DETR initialisation (`detr_initialisation`): transformers' N(0, 0.02) left the learned
  queries near copies, and every query predicted the same box (the cause of the earlier non-convergence);
- the image enters with two more channels, its pixels' x and y in [-1, 1] (CoordConv, "An intriguing
  failing of convolutional neural networks and the CoordConv solution", Liu et al., NeurIPS 2018): DETR's
  memory carries position only through attention keys (a cheap aid; its pilots ran before the
  initialisation fix and measured nothing useful: docs/detection.md);
- `encode` / `decode` call the backbone, encoder and decoder of the one `DetrModel` separately, so that the
  same memory can be decoded with other queries;
- **target-aware queries** (`target_queries`): a query per ground-truth object, its content the object's
  label embedding and its position an MLP of the sine encoding of its box (DN-DETR / DAB-DETR's way of
  writing a box as a query). DETR has no such queries of its own, so every model here also learns to read
  them by DN-DETR's denoising task (`denoising_loss`: noised ground-truth queries must give back the true
  box and label), as the DINO-style detectors of the CLoCKDistill paper do.

transformers is imported when a model is built (the zoo loads without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.losses.detection import matching_cost, paired_giou


@dataclass(frozen=True)
class DetrSize:
    """The widths of a small DETR. Teacher and student must share `channels`' length (the backbone's
    stride), so that their memories have the same grid."""

    d_model: int
    layers: int  # encoder layers = decoder layers
    channels: tuple[int, ...]  # ResNet stage widths (stride 4 x 2^(stages - 1))
    heads: int = 4
    queries: int = 10


# stride 16: a 64 x 64 canvas gives a 4 x 4 memory (16 tokens), which keeps CPU training short
TEACHER_SIZE = DetrSize(d_model=128, layers=4, channels=(32, 64, 96))
STUDENT_SIZE = DetrSize(d_model=64, layers=2, channels=(16, 32, 48))


@dataclass
class Encoded:
    """The encoder's memory `(B, P, D)`, its sine position embedding `(B, P, D)` and the grid (H, W)."""

    memory: Tensor
    position: Tensor
    grid: tuple[int, int]


@dataclass
class Decoded:
    """Class logits `(B, Q, C + 1)` and boxes `(B, Q, 4)` of the last decoder layer, and of every layer
    (`all_logits` `(L, B, Q, C + 1)`, `all_boxes`) for DETR's auxiliary losses."""

    logits: Tensor
    boxes: Tensor
    all_logits: Tensor
    all_boxes: Tensor


def with_coordinates(images: Tensor) -> Tensor:
    """`(B, 3, H, W)` images with two channels more: each pixel's x and y in [-1, 1] (CoordConv)."""
    batch, _, height, width = images.shape
    ys = torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype)
    xs = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coordinates = torch.stack((grid_x, grid_y)).expand(batch, -1, -1, -1)
    return torch.cat((images, coordinates), dim=1)


def sine_box_encoding(boxes: Tensor, features: int) -> Tensor:
    """Each of the 4 box coordinates in [0, 1] as `features / 4` sines and cosines (DAB-DETR's encoding of
    anchor boxes), `(..., 4)` to `(..., features)`."""
    per = features // 8
    scales = 10_000 ** (torch.arange(per, device=boxes.device, dtype=boxes.dtype) / per)
    angles = boxes[..., None] * 2 * math.pi / scales  # (..., 4, per)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class SmallDetr(nn.Module):
    """A DETR of `size` for `num_classes` classes (plus DETR's "no object")."""

    def __init__(self, size: DetrSize, num_classes: int) -> None:
        super().__init__()
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

        backbone = ResNetConfig(
            num_channels=5,  # RGB + x, y coordinates
            embedding_size=size.channels[0],
            hidden_sizes=list(size.channels),
            depths=[1] * len(size.channels),
            layer_type="basic",
            out_features=[f"stage{len(size.channels)}"],
        )
        self.config = DetrConfig(
            backbone_config=backbone,
            use_timm_backbone=False,
            num_channels=5,
            num_queries=size.queries,
            d_model=size.d_model,
            encoder_layers=size.layers,
            decoder_layers=size.layers,
            encoder_ffn_dim=2 * size.d_model,
            decoder_ffn_dim=2 * size.d_model,
            encoder_attention_heads=size.heads,
            decoder_attention_heads=size.heads,
            num_labels=num_classes,
            dropout=0.0,
            auxiliary_loss=True,
        )
        self.size = size
        self.num_classes = num_classes
        self.detr = DetrForObjectDetection(self.config)
        # transformers freezes the stem and batch norm, meant for pretrained weights; these are random
        trainable_batch_norm(self.detr.model.backbone)
        detr_initialisation(self.detr)
        self.detr.requires_grad_(True)
        d = size.d_model
        self.label_embedding = nn.Embedding(num_classes, d)
        self.box_embedding = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    @property
    def d_model(self) -> int:
        return self.size.d_model

    def encode(self, images: Tensor) -> Encoded:
        model = self.detr.model
        images = with_coordinates(images)
        batch = images.shape[0]
        pixel_mask = torch.ones((batch, *images.shape[-2:]), device=images.device, dtype=torch.long)
        feature_map, mask = model.backbone(images, pixel_mask)[-1]
        features = model.input_projection(feature_map).flatten(2).transpose(1, 2)
        position = model.position_embedding(
            shape=feature_map.shape, device=images.device, dtype=images.dtype, mask=mask
        )
        position = position.flatten(2).transpose(1, 2)
        memory = model.encoder(
            inputs_embeds=features, attention_mask=mask.flatten(1), spatial_position_embeddings=position
        ).last_hidden_state
        return Encoded(memory, position, (feature_map.shape[-2], feature_map.shape[-1]))

    def decode(
        self, encoded: Encoded, content: Tensor, query_position: Tensor, query_mask: Tensor | None = None
    ) -> Decoded:
        """Decode `content` queries `(B, Q, D)` at `query_position` `(B, Q, D)`; `query_mask` `(B, Q)` (True =
        a real query) keeps padded queries out of self-attention."""
        out = self.detr.model.decoder(
            inputs_embeds=content,
            attention_mask=None if query_mask is None else query_mask.long(),
            encoder_hidden_states=encoded.memory,
            spatial_position_embeddings=encoded.position,
            object_queries_position_embeddings=query_position,
        )
        hidden = out.intermediate_hidden_states  # (L, B, Q, D), layer-normed
        all_logits = self.detr.class_labels_classifier(hidden)
        all_boxes = self.detr.bbox_predictor(hidden).sigmoid()
        return Decoded(all_logits[-1], all_boxes[-1], all_logits, all_boxes)

    def learned_queries(self, batch: int) -> tuple[Tensor, Tensor]:
        position = self.detr.model.query_position_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
        return torch.zeros_like(position), position

    def forward(self, images: Tensor) -> tuple[Encoded, Decoded]:
        encoded = self.encode(images)
        return encoded, self.decode(encoded, *self.learned_queries(images.shape[0]))

    def target_queries(self, labels: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """(content, position) of queries for objects with `labels` `(B, K)` and `boxes` `(B, K, 4)`."""
        return self.label_embedding(labels), self.box_embedding(sine_box_encoding(boxes, self.d_model))

    def detection_loss(self, decoded: Decoded, targets: list[dict[str, Tensor]]) -> Tensor:
        """DETR's set loss (Hungarian matching; CE with `eos_coefficient` on "no object", L1 x 5, GIoU x 2) on
        every decoder layer, transformers' implementation."""
        from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

        loss, _, _ = ForObjectDetectionLoss(
            decoded.logits,
            targets,
            decoded.logits.device,
            decoded.boxes,
            self.config,
            decoded.all_logits,  # transformers drops the last layer itself
            decoded.all_boxes,
        )
        return loss


def detr_initialisation(detr: nn.Module) -> None:
    """Re-initialise a `DetrForObjectDetection` as the official DETR code does. transformers draws every
    linear weight and the query embeddings from N(0, 0.02) (`init_std`, meant to be overwritten by pretrained
    weights); from scratch, the object queries are then near copies of each other (std 0.02 against DETR's
    N(0, 1)) and every query predicts the same box, which training does not undo (docs/detection.md). DETR
    uses Xavier-uniform weights in the transformer, N(0, 1) query embeddings (PyTorch's `nn.Embedding`) and
    PyTorch's default init for the input projection and the heads."""
    model = detr.model
    for transformer in (model.encoder, model.decoder):
        for parameter in transformer.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
    nn.init.normal_(model.query_position_embeddings.weight)
    for module in (model.input_projection, detr.class_labels_classifier, *detr.bbox_predictor.layers):
        module.reset_parameters()


def trainable_batch_norm(module: nn.Module) -> None:
    """Put a trainable `nn.BatchNorm2d` back wherever transformers' DETR froze one (`DetrFrozenBatchNorm2d`,
    an identity at random initialisation): trained from scratch, the backbone needs its normalisation."""
    for name, child in module.named_children():
        if type(child).__name__ == "DetrFrozenBatchNorm2d":
            setattr(module, name, nn.BatchNorm2d(child.weight.shape[0]))
        else:
            trainable_batch_norm(child)


@dataclass
class PaddedTargets:
    """Ground truth of a batch padded to its largest object count: labels `(B, K)`, boxes `(B, K, 4)`,
    mask `(B, K)` (True = a real object)."""

    labels: Tensor
    boxes: Tensor
    mask: Tensor


def pad_targets(targets: list[dict[str, Tensor]]) -> PaddedTargets:
    count = max(1, max(len(t["class_labels"]) for t in targets))
    labels = torch.zeros(len(targets), count, dtype=torch.long)
    boxes = torch.full((len(targets), count, 4), 0.5)
    mask = torch.zeros(len(targets), count, dtype=torch.bool)
    for i, target in enumerate(targets):
        k = len(target["class_labels"])
        labels[i, :k], boxes[i, :k], mask[i, :k] = target["class_labels"], target["boxes"], True
    return PaddedTargets(labels, boxes, mask)


def noised(
    padded: PaddedTargets,
    num_classes: int,
    generator: torch.Generator,
    box_noise: float = 0.4,
    label_noise: float = 0.2,
) -> PaddedTargets:
    """DN-DETR's noise: centres moved by up to `box_noise` x half the size, sizes scaled by 1 +- `box_noise`,
    a `label_noise` share of labels replaced by a random class."""
    boxes = padded.boxes
    shift = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * box_noise
    centre = boxes[..., :2] + shift[..., :2] * boxes[..., 2:] / 2
    sizes = boxes[..., 2:] * (1 + shift[..., 2:])
    noisy = torch.cat((centre, sizes), -1).clamp(0.0, 1.0)
    flip = torch.rand(padded.labels.shape, generator=generator) < label_noise
    random_labels = torch.randint(0, num_classes, padded.labels.shape, generator=generator)
    return PaddedTargets(torch.where(flip, random_labels, padded.labels), noisy, padded.mask)


def denoising_loss(
    model: SmallDetr, encoded: Encoded, padded: PaddedTargets, generator: torch.Generator
) -> Tensor:
    """DN-DETR's denoising task: queries of noised ground truth, decoded on the same memory, must give the
    true label (CE) and box (L1 x 5, GIoU x 2), one query per object, every decoder layer."""
    noisy = noised(padded, model.num_classes, generator)
    decoded = model.decode(encoded, *model.target_queries(noisy.labels, noisy.boxes), padded.mask)
    mask = padded.mask
    total = decoded.logits.new_zeros(())
    for logits, boxes in zip(decoded.all_logits, decoded.all_boxes, strict=True):
        ce = F.cross_entropy(logits[mask], padded.labels[mask])
        l1 = (boxes[mask] - padded.boxes[mask]).abs().sum(-1).mean()
        giou = (1 - paired_giou(boxes[mask], padded.boxes[mask])).mean()
        total = total + ce + 5 * l1 + 2 * giou
    return total


@torch.no_grad()
def hungarian_pairs(student: Decoded, teacher: Decoded) -> list[tuple[Tensor, Tensor]]:
    """Per image, (student query indices, teacher query indices) of the least-cost one-to-one pairing
    (`distill.losses.detection.matching_cost`, scipy's `linear_sum_assignment`)."""
    from scipy.optimize import linear_sum_assignment

    pairs = []
    for i in range(student.logits.shape[0]):
        cost = matching_cost(student.logits[i], student.boxes[i], teacher.logits[i], teacher.boxes[i])
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        pairs.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return pairs


def predictions(decoded: Decoded) -> list[dict[str, Any]]:
    """Per image, torchmetrics' prediction dict: boxes (x0, y0, x1, y1) in [0, 1], the best class's score
    (the "no object" class excluded, as DETR's post-processing) and label."""
    from distill.losses.detection import box_corners

    probs = decoded.logits.softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    return [
        {"boxes": box_corners(decoded.boxes[i]), "scores": scores[i], "labels": labels[i]}
        for i in range(len(scores))
    ]

"""S38 DMAE (Bai et al., CVPR 2023, "Masked Autoencoders Enable Efficient Knowledge Distillers", arXiv
2208.12256; official code github.com/UCSC-VLAA/DMAE): a student masked autoencoder learns from its own
pixel reconstruction loss plus a distance between its intermediate features and a pre-trained teacher MAE's
intermediate features, both computed on the same masked input (the same visible patches). Two savings make
it cheap: the teacher's encoder sees only the visible patches (25% at mask ratio 0.75), and the teacher runs
only up to the layer being distilled (partial execution; here `FrozenTeacher.skip_logits` stops its forward
at the deepest hooked layer as soon as no objective needs its logits).

Formulas, with x the image, M the random mask (True = removed patch), V its visible patches:

* **Reconstruction** (MAE, the official `forward_loss`; `mae_reconstruction`):
  L_rec = sum_{b,l} M_{b,l} mean_j (pred_{b,l,j} - target_{b,l,j})^2 / sum_{b,l} M_{b,l}, where target is
  the patchified image (patch p, channels C: p * p * C values per patch, transformers' `patchify` order),
  optionally standardised per patch (`norm_pix_loss`, eps 1e-6 on the variance). The official DMAE run
  leaves `norm_pix_loss` off (`pretrain.sh` does not set it), so the target is the normalised image.
* **Feature distance** (`dmae`): with f_S the student's output of block k_S on [CLS; V], f_T the teacher's
  output of block k_T on the same [CLS; V], P a learned projection,
  L_dist = mean_{b,t,d} | n(P(f_S))_{b,t,d} - n(f_T)_{b,t,d} |, n(z) = z / max(||z||_2, 1e-12) over the
  feature dimension (`F.normalize`), mean over every token (the CLS token included) and dimension
  (`nn.L1Loss()`); summed over layer pairs when several are named.
* **Total** (the official `engine_distill.py`): L = L_rec + 1.0 * L_dist.

Constants from the official code (`pretrain.sh`, `models_mae_distill.py`, `main_distill.py`):

* layers: student block index 8 of ViT-B's 12 (0-based, `--aligned_blks_indices 8`), teacher block 17 of
  ViT-L's 24 (`--teacher_aligned_blks_indices 17`): the output of the block at 3/4 of each depth, before
  the final LayerNorm. In transformers' `ViTMAEForPreTraining` these are `vit.layers.8` and
  `vit.layers.17` (`OFFICIAL_STUDENT_LAYER` / `OFFICIAL_TEACHER_LAYER`); `depth_layer(model, 0.75)` finds
  the same block of any depth.
* distance: `--embedding_distillation_func L1` (L2 = `nn.MSELoss` is the other option: `distance="l2"`).
* features L2-normalised over the feature dimension, teacher and projected student (the official code
  normalises whenever a projection head exists, which its default `fc-1layer` always makes).
* projection: `fc-1layer`, one `nn.Linear(768, 1024)` with bias (`projector="linear"`); the official
  `mlp-1layer` (Linear -> GELU -> Linear, hidden = teacher width) is `projector="mlp"`.
* weight 1 (the distance is added to the MAE loss unscaled); mask ratio 0.75. Training (not this
  module's business; `benchmarks/dmae.py` follows it where it can): AdamW betas (0.9, 0.95), weight decay
  0.05 except biases and norms (timm's `add_weight_decay`; a recipe's
  `optimizer.decay_biases_and_norms: false`; the committed benchmark run decays every parameter), base lr
  1.5e-4 x batch / 256 (batch 4096: lr 2.4e-3), 20 warm-up epochs then cosine, 100 epochs.

Deviations and choices here:

* The official code runs the teacher's *whole* encoder and its decoder every step
  (`forward_encoder_customized` loops over every block, then `forward_decoder`), although only block 17's
  output is used with the released setting; the paper's partial execution is what this objective asks for
  (`partial_teacher=True`, the default). `partial_teacher=False` makes the trainer run the teacher whole
  (it then reads the teacher's logits, unused): the full-teacher baseline.
* The official student and teacher share `ids_keep` (the teacher draws the mask, the student gathers the
  same patches). transformers' ViTMAE takes a `noise` tensor instead: `MAEMasking` draws one per batch and
  passes it to both models, which keep the same patches in the same order when their `mask_ratio`s agree
  (checked on the first batch).
* Feature maps (N, C, H, W) are read as H*W tokens of C channels and vectors (N, D) as one token, so the
  objective also runs on CNN taps (defaults: tap -3 on each side, FitNets' hint position). ViT-MAE models
  have taps too (`feature_layers_of`: embeddings, each block, the final LayerNorm), so -3 is their
  second-last block; the official layers are at 3/4 of the depth (`depth_layer`).
* Losses are computed in float32 (float64 when an input is float64), as the project's losses are.
* A ViTMAE built from a config with transformers 5 has all-zero position tables (`restore_mae_positions`
  says why and restores MAE's sin-cos tables); build students and teachers with it, or load checkpoints.

How the pieces meet the trainer: `MAEMasking` is the trainer's `batch_transform`. It turns an `(images,
labels)` batch into `{"inputs": {"pixel_values", "noise"}, "labels": patch targets, "mask": removed
patches}`: the trainer calls both models with `pixel_values=..., noise=...`, the student's logits are
`ViTMAEForPreTraining`'s reconstruction (B, L, p * p * C), and `mask` (True = counts) marks the rows its
loss averages over, so `mae_reconstruction` is a function of `StepOutputs` alone (no hook on the student).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserError, shown
from distill.losses._common import compute_dtype
from distill.objectives.base import (
    OBJECTIVES,
    Objective,
    ParamError,
    Progress,
    StepOutputs,
    check_params,
    flag,
)
from distill.objectives.features import (
    FeatureObjective,
    LayerRef,
    layer_ref,
    project,
    register_feature_objective,
)

OFFICIAL_STUDENT_LAYER = "vit.layers.8"  # ViT-B, block 9 of 12 (`--aligned_blks_indices 8`)
OFFICIAL_TEACHER_LAYER = "vit.layers.17"  # ViT-L, block 18 of 24 (`--teacher_aligned_blks_indices 17`)
OFFICIAL_MASK_RATIO = 0.75
OFFICIAL_WEIGHT = 1.0  # the distance is added to the reconstruction loss unscaled
DISTANCES = ("l1", "l2")
PROJECTORS = ("linear", "mlp")
# Where a ViT keeps its blocks: transformers' ViTMAEForPreTraining / ViTMAEModel, then older layouts.
BLOCK_LISTS = ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer", "blocks")


# ------------------------------------------------------------------------------------------ pure maths


def as_tokens(feature: Tensor) -> Tensor:
    """A feature as a token sequence (B, T, D): maps (N, C, H, W) give H*W tokens of C channels, vectors
    (N, D) one token."""
    if feature.dim() == 4:
        return feature.flatten(2).transpose(1, 2)
    if feature.dim() == 2:
        return feature.unsqueeze(1)
    if feature.dim() == 3:
        return feature
    raise UserError(f"dmae: cannot read a feature of shape {tuple(feature.shape)} as tokens")


def dmae_distance(
    student: Tensor, teacher: Tensor, *, distance: str = "l1", normalize: bool = True
) -> Tensor:
    """DMAE's feature distance between the projected student tokens and the teacher's, both (B, T, D):
    the mean over every element of |a - b| (l1, the official choice) or (a - b)^2 (l2), after L2
    normalisation over D when `normalize`. The teacher is detached (the official code detaches it)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ: "
            "the two models must keep the same patches (same noise, same mask ratio)"
        )
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    diff = s - t
    return diff.abs().mean() if distance == "l1" else diff.square().mean()


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's reconstruction loss: the per-patch mean squared error, averaged over the removed patches
    (`mask` True, shape (B, L)); pred and target are (B, L, p * p * C)."""
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} must be "
            "(B, L, P), (B, L, P) and (B, L)"
        )
    dtype = compute_dtype(pred, target)
    per_patch = (pred.to(dtype) - target.to(dtype)).square().mean(dim=-1)
    weights = mask.to(dtype)
    # Clamped: a batch with nothing masked contributes 0, not 0 / 0.
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


def patchify(pixel_values: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) images as (B, (H/p) * (W/p), p * p * C) patches, in transformers' ViTMAE order (rows of
    patches, then within a patch rows, columns, channels)."""
    b, c, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise UserError(f"dmae: a {h}x{w} image does not divide into {patch_size}x{patch_size} patches")
    x = pixel_values.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def patch_targets(pixel_values: Tensor, patch_size: int, norm_pix_loss: bool = False) -> Tensor:
    """MAE's reconstruction targets: the patches, standardised per patch when `norm_pix_loss`."""
    target = patchify(pixel_values, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def kept_count(patches: int, mask_ratio: float) -> int:
    """Visible patches per image, as ViTMAE computes it: int(L * (1 - mask_ratio))."""
    return int(patches * (1 - mask_ratio))


def removed_patches(noise: Tensor, mask_ratio: float) -> Tensor:
    """The boolean mask (B, L), True = removed, that ViTMAE's `random_masking` derives from `noise`: the
    patches of the kept_count smallest noise values stay visible."""
    keep = kept_count(noise.shape[1], mask_ratio)
    order = torch.argsort(noise, dim=1)
    removed = torch.ones_like(noise, dtype=torch.bool)
    removed.scatter_(1, order[:, :keep], False)
    return removed


def visible_patch_ids(noise: Tensor, mask_ratio: float) -> Tensor:
    """The ids of the visible patches (B, kept), in the order the encoder sees them."""
    return torch.argsort(noise, dim=1)[:, : kept_count(noise.shape[1], mask_ratio)]


# ------------------------------------------------------------------------------------------ models


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the list of a ViT's transformer blocks."""
    modules = dict(model.named_modules())
    for path in BLOCK_LISTS:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise UserError(f"{type(model).__name__} has no list of transformer blocks at {', '.join(BLOCK_LISTS)}")


def depth_layer(model: nn.Module, fraction: float = 0.75) -> str:
    """The module path of the block ending at `fraction` of the model's depth (rounded, at least the first):
    0.75 gives DMAE's official choice, `vit.layers.8` of 12 blocks and `vit.layers.17` of 24."""
    path, blocks = block_list(model)
    index = min(len(blocks), max(1, round(fraction * len(blocks)))) - 1
    return f"{path}.{index}"


def restore_mae_positions(model: nn.Module, *, initializer_range: float = 0.02) -> None:
    """Give a ViTMAE model built from a config its fixed 2-D sin-cos position embeddings (encoder and
    decoder) and a N(0, 0.02^2) decoder mask token, as MAE initialises them.

    Why: transformers 5.x (seen in 5.24) leaves both position tables at zero when a ViTMAE model is built
    from a config rather than loaded: `post_init` zeroes the decoder's table and skips the encoder's (its
    `_is_hf_initialized` guard). Without positions a masked token cannot tell which patch it stands for, and
    the MAE loss stalls near the per-image mean (a 4 x 32 student on Fashion-MNIST: 0.90 after 300 steps,
    0.52 with positions).
    The tables follow transformers' own layout (its h/w half rotation), so loaded checkpoints agree."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    tables = [
        p
        for p in (
            _param(model, "vit.embeddings.position_embeddings"),
            _param(model, "embeddings.position_embeddings"),
            _param(model, "decoder.decoder_pos_embed"),
        )
        if p is not None
    ]
    if not tables:
        raise UserError(f"{type(model).__name__} has no ViTMAE position embeddings")
    with torch.no_grad():
        for table in tables:
            grid = int(round((table.shape[1] - 1) ** 0.5))
            sincos = build_2d_sinusoidal_position_embedding(grid, grid, table.shape[-1], cls_token=True)
            half = sincos.shape[-1] // 2
            table.copy_(torch.cat([sincos[..., half:], sincos[..., :half]], dim=-1).unsqueeze(0))
        token = _param(model, "decoder.mask_token")
        if token is not None:
            token.normal_(std=initializer_range)


def _param(model: nn.Module, path: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(path)
    except AttributeError:  # no such module or parameter: another layout
        return None


def mae_config(model: nn.Module) -> Any:
    """A ViTMAE model's config (patch size, mask ratio); a UserError for any other model."""
    config = getattr(model, "config", None)
    if config is None or not all(hasattr(config, k) for k in ("patch_size", "mask_ratio", "image_size")):
        raise UserError(
            f"MAE masking needs a transformers ViTMAE model (config with patch_size and mask_ratio), "
            f"got {type(model).__name__}"
        )
    return config


def patch_count(config: Any) -> int:
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return (size // config.patch_size) ** 2


class MAEMasking:
    """The trainer's `batch_transform` for MAE students: draws one noise tensor per batch (from the global
    RNG, which checkpoints keep) and rewrites `(images, labels)` into `{"inputs": {"pixel_values",
    "noise"}, "labels", "mask"}`. With `reconstruction` (the default) `labels` are the patch targets and
    `mask` the removed patches (what `mae_reconstruction` reads); without it (a student that sees every
    patch, no reconstruction) only the inputs. `teacher`: a ViTMAE teacher that must keep the same patches:
    its mask ratio and patch grid are checked against the student's on the first batch."""

    def __init__(self, *, reconstruction: bool = True, teacher: nn.Module | None = None) -> None:
        self.reconstruction = reconstruction
        self.teacher = teacher
        self._checked = False

    def _check(self, student: nn.Module) -> None:
        config = mae_config(student)
        if self.teacher is not None:
            other = mae_config(self.teacher)
            same_grid = patch_count(config) == patch_count(other)
            if not same_grid or kept_count(patch_count(config), config.mask_ratio) != kept_count(
                patch_count(other), other.mask_ratio
            ):
                raise UserError(
                    f"dmae: student and teacher keep different patches (mask ratio {config.mask_ratio} of "
                    f"{patch_count(config)} vs {other.mask_ratio} of {patch_count(other)}); give both "
                    "models the same image size, patch size and mask_ratio"
                )
        if self.reconstruction and kept_count(patch_count(config), config.mask_ratio) >= patch_count(config):
            raise UserError(
                f"mae_reconstruction: mask_ratio {config.mask_ratio} removes no patch; nothing to reconstruct"
            )
        self._checked = True

    def __call__(self, batch: Any, student: nn.Module, progress: Progress) -> dict[str, Any]:
        if not self._checked:
            self._check(student)
        config = mae_config(student)
        images = _images(batch)
        noise = torch.rand(images.shape[0], patch_count(config), device=images.device)
        out: dict[str, Any] = {"inputs": {"pixel_values": images, "noise": noise}}
        if self.reconstruction:
            out["labels"] = patch_targets(
                images, config.patch_size, bool(getattr(config, "norm_pix_loss", False))
            )
            out["mask"] = removed_patches(noise, config.mask_ratio)
        return out


def _images(batch: Any) -> Tensor:
    """The images of an `(images, labels)` batch, a bare tensor, or a dict batch (its `inputs`, or their
    `pixel_values` when the batch was already transformed)."""
    images = batch.get("inputs") if isinstance(batch, dict) else batch
    if isinstance(images, dict):
        images = images.get("pixel_values")
    if isinstance(images, list | tuple):
        images = images[0]
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise UserError("MAE masking needs batches of images (B, C, H, W)")
    return images


# ------------------------------------------------------------------------------------------ objectives


class MLPProjector(nn.Module):
    """The official `mlp-1layer` head: Linear(student, teacher) -> GELU -> Linear(teacher, teacher)."""

    def __init__(self, student: int, teacher: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(student, teacher), nn.GELU(), nn.Linear(teacher, teacher)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _refs(objective: str, key: str, value: Any) -> list[LayerRef]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise ParamError(objective, key, f"must name at least one layer, got {shown(value)}")
    return [layer_ref(objective, f"{key}[{i}]" if len(values) > 1 else key, v) for i, v in enumerate(values)]


def _choice(objective: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ParamError(objective, key, f"must be one of {', '.join(choices)}, got {shown(value)}")
    return str(value)


class DMAE(FeatureObjective):
    """DMAE's feature distance (module docstring): L1 between the L2-normalised, linearly projected student
    block output and the teacher's block output on the same visible patches; one projector per layer pair,
    built from the probed widths. Layers: one reference or a list per side (summed over pairs)."""

    def __init__(
        self,
        *,
        student_layer: Any = -3,
        teacher_layer: Any = -3,
        distance: str = "l1",
        normalize: bool = True,
        projector: str = "linear",
        partial_teacher: bool = True,
    ) -> None:
        super().__init__("dmae")
        self.student_refs = _refs(self.loss_name, "student_layer", student_layer)
        self.teacher_refs = _refs(self.loss_name, "teacher_layer", teacher_layer)
        self.distance = _choice(self.loss_name, "distance", distance, DISTANCES)
        self.normalize = flag(self.loss_name, "normalize", normalize)
        self.projector = _choice(self.loss_name, "projector", projector, PROJECTORS)
        # The teacher stops at its deepest hooked block unless the full-teacher baseline is asked for.
        self.partial_teacher = flag(self.loss_name, "partial_teacher", partial_teacher)
        self.needs_teacher_logits = not self.partial_teacher
        self.projectors = nn.ModuleList()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        self.projectors = nn.ModuleList()
        for s, t, path in zip(student_shapes, teacher_shapes, self.student_layers, strict=True):
            s_tokens, t_tokens = _token_shape(s), _token_shape(t)
            if s_tokens[:2] != t_tokens[:2]:
                raise UserError(
                    f"objective 'dmae': student layer '{path}' gives {s_tokens[1]} tokens, its teacher layer "
                    f"{t_tokens[1]}; the two models must see the same patches (same noise and mask ratio)"
                )
            width_s, width_t = s_tokens[2], t_tokens[2]
            head = (
                nn.Linear(width_s, width_t) if self.projector == "linear" else MLPProjector(width_s, width_t)
            )
            self.projectors.append(head)
        super().build(student_shapes, teacher_shapes, n_data)

    def forward(self, outputs: StepOutputs) -> Tensor:
        students, teachers = self.features(outputs)
        total = torch.zeros((), device=students[0].device)
        for head, s, t in zip(self.projectors, students, teachers, strict=True):
            projected = project(head, as_tokens(s))
            total = total + dmae_distance(
                projected, as_tokens(t), distance=self.distance, normalize=self.normalize
            )
        return total


def _token_shape(shape: torch.Size) -> tuple[int, int, int]:
    """(B, T, D) of a feature shape read as tokens (`as_tokens`)."""
    if len(shape) == 4:
        return int(shape[0]), int(shape[2]) * int(shape[3]), int(shape[1])
    if len(shape) == 2:
        return int(shape[0]), 1, int(shape[1])
    if len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    raise UserError(f"objective 'dmae': cannot read a feature of shape {tuple(shape)} as tokens")


class MAEReconstruction(Objective):
    """MAE's pixel reconstruction loss of the student itself (no teacher): `masked_patch_mse` of its
    logits (ViTMAEForPreTraining's reconstruction, (B, L, p * p * C)) against the batch's patch targets
    over its removed patches, both put there by `MAEMasking`."""

    needs_teacher = False
    needs_teacher_logits = False
    needs_labels = True

    def __init__(self) -> None:
        super().__init__()
        self.loss_name = "mae_reconstruction"

    def forward(self, outputs: StepOutputs) -> Tensor:
        pred, target, mask = outputs.student_logits, outputs.labels, outputs.mask
        if (
            target is None
            or mask is None
            or not target.is_floating_point()
            or target.shape != pred.shape
            or mask.shape != pred.shape[:2]
        ):
            raise UserError(
                "objective 'mae_reconstruction' needs patch targets and the removed patches in the batch: "
                "train a ViTMAEForPreTraining student with batch_transform=MAEMasking() "
                "(distill.objectives.dmae)"
            )
        return masked_patch_mse(pred, target, mask)


def _mae_reconstruction(**params: Any) -> MAEReconstruction:
    check_params("mae_reconstruction", MAEReconstruction.__init__, params, reserved=set())
    return MAEReconstruction()


register_feature_objective(
    "dmae",
    DMAE,
    paper="Bai et al., 2023, Masked Autoencoders Enable Efficient Knowledge Distillers (S38)",
    summary="L1 between normalised projected student and teacher block outputs on the same masked "
    "patches; teacher run only to its block (weight 1, with mae_reconstruction)",
)
# Not a feature objective (it reads no module output) and not a classification method: the student's own
# MAE loss, needing MAEMasking's batches.
OBJECTIVES.add(
    "mae_reconstruction",
    _mae_reconstruction,
    summary="the student MAE's own pixel reconstruction loss on removed patches (needs MAEMasking batches)",
    paper="He et al., 2022, Masked Autoencoders Are Scalable Vision Learners (DMAE's L_rec)",
    classification=False,
)

"""A shifted transfer set (KD^3, seed paper S35: "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", Tang et al., ICCV 2023): a base data set's training split cut in two, the teacher's
clean part and the student's transfer set drawn from a shifted distribution. See docs/kd3.md.

The paper's teacher learned the original data (CIFAR, ImageNet subsets); the student never sees it and
learns from images collected on the web instead, whose distribution differs: other styles (cartoons,
sketches), other class frequencies, and images of no class at all returned for a class's query. Here, from
one base data set and one seed (`shift_seed`):

- the base training split is divided, stratified, into the teacher's part (`teacher_fraction`) and the
  transfer part; the two share no image;
- class balance: class c of the transfer part keeps round(n_c x imbalance^(-c / (C - 1))) of its n_c images
  (at least one; class 0 all, the last class 1 / `imbalance` of them: the long-tailed profile of
  CIFAR-LT, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", Cao et al., NeurIPS
  2019), a web search returning more images for some queries than for others;
- style: every transfer image gets one of `corruptions`, drawn uniformly per image, at `severity` 1..5 with
  CIFAR-10-C's constants ("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
  Hendrycks & Dietterich, ICLR 2019; their `make_cifar_c.py`), applied to pixels in [0, 1]: the base's
  normalised values are mapped there by the per-channel minimum and maximum of the teacher's part, and back;
- outliers: a share `outliers` of the transfer images is replaced by images of no class, their pixels
  shuffled (one random permutation of the H x W positions per image: the intensities stay, the shape goes),
  each labelled with a class drawn uniformly (the query it was "returned" for).

The transfer labels are kept (the web's labels: right for the real images, random for the outliers), for a
student-alone baseline; KD reads only the teacher. The test split is the base's clean test split: the
paper's students are judged on the original task's test data, the transfer set being only a stand-in for the
data that cannot be had; `shift_test: true` corrupts it as the transfer set is (no imbalance, no outliers)
for a student judged on the shifted distribution instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from distill.data.base import DATASETS, DataSplits, build_data
from distill.data.image_dataset import stratified_split
from distill.errors import UserError

# CIFAR-10-C's severities 1..5 (Hendrycks & Dietterich, `make_cifar_c.py`), on pixels in [0, 1].
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the added noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # std of the blur, in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on each image's deviations from its mean
}
CORRUPTIONS = tuple(SEVERITIES)
REFUSED_BASE_PARAMS = ("labelled_per_class", "unlabelled", "augment")


class TransferSet(TensorDataset):
    """The transfer split: (image, label) rows, plus what the shift did to each row (for reports and tests):
    `outlier` (N,) bool and `corruption` (N,) int64, an index into `corruptions`."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        outlier: Tensor,
        corruption: Tensor,
        corruptions: tuple[str, ...],
    ) -> None:
        super().__init__(images.contiguous(), labels.long().contiguous())
        self.labels = self.tensors[1]
        self.outlier = outlier.bool()
        self.corruption = corruption.long()
        self.corruptions = corruptions


# ----------------------------------------------------------------------------------------- the maths


def class_counts(available: np.ndarray, imbalance: float) -> np.ndarray:
    """How many images of each class the transfer part keeps: round(n_c x imbalance^(-c / (C - 1))), at least
    one (a class with none available keeps none)."""
    classes = len(available)
    exponent = np.arange(classes) / max(1, classes - 1)
    kept = np.rint(available * float(imbalance) ** (-exponent)).astype(np.int64)
    return np.minimum(available, np.maximum(kept, np.minimum(available, 1)))


def gaussian_kernel(sigma: float) -> Tensor:
    """A normalised 1-D Gaussian of radius ceil(3 sigma)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, edges replicated (scikit-image's `nearest`)."""
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def corrupt(images: Tensor, kind: str, severity: int, generator: torch.Generator) -> Tensor:
    """One corruption of (N, C, H, W) float32 pixels in [0, 1] at `severity` 1..5; the result is clipped
    to [0, 1]."""
    value = SEVERITIES[kind][severity - 1]
    if kind == "gaussian_noise":
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
        out = images + value * noise
    elif kind == "gaussian_blur":
        out = blur(images, value)
    else:  # contrast
        means = images.mean(dim=(-2, -1), keepdim=True)
        out = (images - means) * value + means
    return out.clamp(0.0, 1.0)


def scramble(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image's pixels moved by its own random permutation of the H x W positions (channels together)."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    order = torch.stack([torch.randperm(h * w, generator=generator) for _ in range(n)])
    return torch.gather(flat, 2, order[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)


def pixel_range(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel minimum and maximum (1, C, 1, 1) of normalised images: the map to [0, 1] and back."""
    low = images.amin(dim=(0, 2, 3), keepdim=True)
    high = images.amax(dim=(0, 2, 3), keepdim=True)
    return low, torch.where(high > low, high, low + 1)


def corrupt_each(
    images: Tensor,
    which: Tensor,
    corruptions: tuple[str, ...],
    severity: int,
    bounds: tuple[Tensor, Tensor],
    generator: torch.Generator,
) -> Tensor:
    """Normalised images, row i corrupted by `corruptions[which[i]]` in pixel space."""
    low, high = bounds
    pixels = ((images - low) / (high - low)).clamp(0.0, 1.0)
    out = pixels.clone()
    for k, kind in enumerate(corruptions):
        rows = (which == k).nonzero().flatten()
        if len(rows):
            out[rows] = corrupt(pixels[rows], kind, severity, generator)
    return out * (high - low) + low


# ----------------------------------------------------------------------------------------- the data set


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """A split's images (N, C, H, W) float32 and labels (N,), read once."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
    elif callable(getattr(dataset, "batch", None)):  # `ImageTensorDataset`: normalised in one call
        x, y = dataset.batch(range(len(dataset)))  # type: ignore[arg-type, attr-defined]
    else:
        rows = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        x, y = torch.stack([r[0] for r in rows]), torch.as_tensor([int(r[1]) for r in rows])
    if x.dim() != 4 or not x.is_floating_point():
        raise UserError(
            f"data: shifted corrupts images (N, C, H, W); the base gives {x.dtype} {tuple(x.shape)} inputs"
        )
    return x.float(), y.long()


def _check(
    base_params: dict[str, Any],
    teacher_fraction: float,
    imbalance: float,
    corruptions: tuple[str, ...],
    severity: int,
    outliers: float,
) -> None:
    for key in REFUSED_BASE_PARAMS:
        if key in base_params:
            raise UserError(f"data: shifted builds the student's split itself; base_params.{key} is refused")
    if not 0.0 < teacher_fraction < 1.0:
        raise UserError(f"data: teacher_fraction must lie in (0, 1), got {teacher_fraction}")
    if not imbalance >= 1.0 or not np.isfinite(imbalance):
        raise UserError(f"data: imbalance must be a finite number >= 1 (1: balanced), got {imbalance}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise UserError(f"data: unknown corruption '{unknown[0]}' (known: {', '.join(CORRUPTIONS)})")
    if len(set(corruptions)) != len(corruptions):
        raise UserError("data: corruptions lists a corruption twice")
    if not 1 <= severity <= 5:
        raise UserError(f"data: severity must be 1..5 (CIFAR-10-C's levels), got {severity}")
    if not 0.0 <= outliers < 1.0:
        raise UserError(f"data: outliers must lie in [0, 1), got {outliers}")


@DATASETS.register(
    "shifted",
    summary="a base set's train split cut in two: the teacher's clean part, a shifted transfer set (S35)",
)
def shifted(
    *,
    base: str = "digits",
    base_params: dict[str, Any] | None = None,
    teacher_fraction: float = 0.5,
    imbalance: float = 10.0,
    corruptions: list[str] | None = None,
    severity: int = 5,
    outliers: float = 0.2,
    shift_test: bool = False,
    shift_seed: int = 0,
) -> DataSplits:
    """The teacher trains on `teacher_fraction` of the base's train split, clean; the student's training
    split is the rest, shifted (class imbalance, one corruption per image, a share of outliers); the test
    split is the base's, clean unless `shift_test`. `corruptions` defaults to all three (gaussian_noise,
    gaussian_blur, contrast); an empty list corrupts nothing."""
    if base == "shifted":
        raise UserError("data: shifted cannot shift itself; name another base data set")
    base_params = dict(base_params or {})
    kinds = CORRUPTIONS if corruptions is None else tuple(corruptions)
    _check(base_params, teacher_fraction, imbalance, kinds, severity, outliers)
    data = build_data(base, **base_params)
    x, y = _tensors(data.teacher_train or data.train)
    rng = np.random.default_rng(shift_seed)
    generator = torch.Generator().manual_seed(int(shift_seed))
    teacher_rows, transfer_rows = stratified_split(y.numpy(), 1.0 - teacher_fraction, shift_seed)
    teacher_x, teacher_y = x[teacher_rows], y[teacher_rows]
    pool_x, pool_y = x[transfer_rows], y[transfer_rows]
    available = np.bincount(pool_y.numpy(), minlength=data.num_classes)
    counts = class_counts(available, imbalance)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(pool_y.numpy() == c))[: counts[c]] for c in range(data.num_classes)]
    )
    keep.sort()
    images, labels = pool_x[keep], pool_y[keep].clone()
    bounds = pixel_range(teacher_x)
    which = torch.as_tensor(rng.integers(0, max(1, len(kinds)), size=len(labels)), dtype=torch.long)
    if not kinds:
        which = torch.full((len(labels),), -1, dtype=torch.long)
    images = corrupt_each(images, which, kinds, severity, bounds, generator)
    outlier = torch.zeros(len(labels), dtype=torch.bool)
    chosen = rng.permutation(len(labels))[: int(round(outliers * len(labels)))]
    if len(chosen):
        rows = torch.as_tensor(np.sort(chosen), dtype=torch.long)
        images[rows] = scramble(images[rows], generator)
        labels[rows] = torch.as_tensor(rng.integers(0, data.num_classes, size=len(rows)), dtype=torch.long)
        outlier[rows] = True
    transfer = TransferSet(images, labels, outlier, which, kinds)
    test = data.test
    if shift_test:
        test_x, test_y = _tensors(data.test)
        test_which = torch.as_tensor(rng.integers(0, max(1, len(kinds)), size=len(test_y)), dtype=torch.long)
        if not kinds:
            test_which = torch.full((len(test_y),), -1, dtype=torch.long)
        test = TensorDataset(corrupt_each(test_x, test_which, kinds, severity, bounds, generator), test_y)
    teacher = TensorDataset(teacher_x.contiguous(), teacher_y.contiguous())
    profile = ", ".join(
        str(int(c)) for c in np.bincount(labels[~outlier].numpy(), minlength=data.num_classes)
    )
    description = (
        f"{data.description}; shifted (seed {shift_seed}): the teacher's part {len(teacher_y)} clean images, "
        f"the transfer set {len(labels)} ({profile} per class, imbalance {imbalance:g}; "
        f"{', '.join(kinds) or 'no corruption'} at severity {severity}; {int(outlier.sum())} outliers); "
        f"the test split {'shifted alike' if shift_test else 'clean'}"
    )
    return DataSplits(
        transfer, test, data.num_classes, tuple(x.shape[1:]), teacher_train=teacher, description=description
    )

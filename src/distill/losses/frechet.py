"""The Frechet distance between two Gaussians fitted to feature sets (FID's formula, on any features).

    d^2 = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2})

"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (Heusel et al., NeurIPS
2017) with Inception features; here the features are whatever the caller passes (the generative benchmark
uses the penultimate layer of a classifier trained on the data set, a "classifier-based" Frechet distance).
Statistics and the matrix square root (`scipy.linalg.sqrtm`) are computed in float64 with the unbiased
covariance (divide by n - 1), as pytorch-fid. As there, when the product is near singular the square root
is taken of `(C_1 + eps I)(C_2 + eps I)` instead, and a tiny imaginary part from rounding is dropped.
scipy is imported when the distance is computed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SINGULAR_OFFSET = 1e-6  # pytorch-fid's eps for a near-singular covariance product


def gaussian_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of `features` (N, D), in float64."""
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    array = array.astype(np.float64).reshape(len(array), -1)
    if len(array) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(array)}")
    return array.mean(0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def frechet_distance(mu_1: np.ndarray, cov_1: np.ndarray, mu_2: np.ndarray, cov_2: np.ndarray) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu_1, cov_1) and N(mu_2, cov_2)."""
    import warnings

    from scipy import linalg

    mu_1, mu_2 = np.atleast_1d(np.asarray(mu_1, np.float64)), np.atleast_1d(np.asarray(mu_2, np.float64))
    cov_1, cov_2 = np.atleast_2d(np.asarray(cov_1, np.float64)), np.atleast_2d(np.asarray(cov_2, np.float64))
    if mu_1.shape != mu_2.shape or cov_1.shape != cov_2.shape or cov_1.shape != (len(mu_1), len(mu_1)):
        raise ValueError(
            f"shapes do not match: mu {mu_1.shape} / {mu_2.shape}, cov {cov_1.shape} / {cov_2.shape}"
        )
    with warnings.catch_warnings():
        # a singular product (few samples, dead features) warns; the offset below is the remedy
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_1 @ cov_2)
    if not np.isfinite(root).all():
        offset = np.eye(len(mu_1)) * SINGULAR_OFFSET
        root = linalg.sqrtm((cov_1 + offset) @ (cov_2 + offset))
    root = np.real(root)
    diff = mu_1 - mu_2
    return float(diff @ diff + np.trace(cov_1) + np.trace(cov_2) - 2.0 * np.trace(root))


def frechet_distance_of_features(features_1: Tensor | np.ndarray, features_2: Tensor | np.ndarray) -> float:
    """`frechet_distance` between Gaussians fitted to two feature sets (N_1, D) and (N_2, D)."""
    return frechet_distance(*gaussian_statistics(features_1), *gaussian_statistics(features_2))


def per_class_precision(predicted: Tensor, requested: Tensor, num_classes: int) -> Tensor:
    """For each class c, the fraction of samples generated for c that the classifier labels c (NaN for a
    class with no sample). `predicted` and `requested` are (N,) class indices."""
    predicted, requested = predicted.reshape(-1).long(), requested.reshape(-1).long()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(
        0, requested, (predicted == requested).double()
    )
    counts = torch.bincount(requested, minlength=num_classes).double()
    return torch.where(counts > 0, hits / counts.clamp_min(1), torch.full_like(counts, float("nan")))

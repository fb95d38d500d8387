"""The citation graphs as CSR arrays (`gnn-benchmark`'s npz files, Shchur et al., "Pitfalls of Graph Neural
Network Evaluation", 2018): read with numpy alone, no pickle and no torch_geometric.

Each file holds the adjacency (`adj_data`, `adj_indices`, `adj_indptr`, `adj_shape`), the bag-of-words
features (`attr_*`, the same layout) and `labels`. Cora is Planetoid's graph with its nodes in another
order (the same 2,708 nodes, 5,278 undirected edges and degrees); CiteSeer has 3,312 nodes, the 15
feature-less placeholders of Planetoid's copy left out and a few duplicate edges merged.

Planetoid's public split is given by node positions that these files do not share, so a split here is drawn
by `split_seed` with Planetoid's sizes: 20 labelled nodes per class, 500 validation and 1,000 test nodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.data.paths import data_path
from distill.errors import UserError

CSR_PARTS = ("data", "indices", "indptr", "shape")
PER_CLASS_TRAIN, VALIDATION, TEST = 20, 500, 1000


def gnnbench_file(name: str, root: str | Path | None) -> Path:
    """`<root>/<name>.npz` (or `root` itself when it is the file); default: the shared data's copy."""
    if root is None:
        return data_path(f"graphs/gnnbench/{name}.npz")
    base = Path(root).expanduser()
    path = base if base.suffix == ".npz" else base / f"{name}.npz"
    if not path.is_file():
        raise UserError(f"data '{name}': no gnn-benchmark file {path}")
    return path


def _csr_rows(arrays: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Row and column index of each stored entry of the CSR matrix `prefix`_*."""
    indptr, indices = arrays[f"{prefix}_indptr"], arrays[f"{prefix}_indices"]
    shape = tuple(int(x) for x in arrays[f"{prefix}_shape"])
    if len(shape) != 2 or len(indptr) != shape[0] + 1 or indptr[-1] != len(indices):
        raise ValueError(f"{prefix}: inconsistent CSR arrays")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise ValueError(f"{prefix}: a column index lies outside the matrix")
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    return rows, indices.astype(np.int64), (shape[0], shape[1])


def read_gnnbench(path: Path, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Features (N, F) float32 (0/1 bag of words), labels (N,) int64, and the undirected edges (2, E) with
    both directions and no self-loops, sorted."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        missing = [
            f"{p}_{part}" for p in ("adj", "attr") for part in CSR_PARTS if f"{p}_{part}" not in arrays
        ]
        if missing or "labels" not in arrays:
            raise ValueError(f"missing {', '.join(missing or ['labels'])}")
        src, dst, (n, n_cols) = _csr_rows(arrays, "adj")
        feature_rows, feature_cols, (n_feat_rows, n_features) = _csr_rows(arrays, "attr")
        labels = arrays["labels"].astype(np.int64)
        if n != n_cols or n_feat_rows != n or len(labels) != n:
            raise ValueError(f"{n}x{n_cols} adjacency, {n_feat_rows} feature rows, {len(labels)} labels")
    except (OSError, ValueError) as err:
        raise UserError(f"data '{name}': cannot read gnn-benchmark file {path} ({err})") from None
    features = torch.zeros(n, n_features)
    features[torch.from_numpy(feature_rows), torch.from_numpy(feature_cols)] = 1.0
    pairs = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1)
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = np.unique(pairs, axis=1)  # both directions once each, sorted by source then target
    return features, torch.from_numpy(labels), torch.from_numpy(pairs).long()


def random_split(labels: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid's sizes drawn at random: 20 nodes of each class to train, then 500 to validate and 1,000 to
    test from the rest (sorted node ids)."""
    generator = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    train = []
    for c in range(classes):
        members = (labels == c).nonzero().view(-1)
        if members.numel() < PER_CLASS_TRAIN:
            raise UserError(
                f"class {c} has {members.numel()} nodes, fewer than {PER_CLASS_TRAIN} to train on"
            )
        train.append(members[torch.randperm(members.numel(), generator=generator)[:PER_CLASS_TRAIN]])
    chosen = torch.cat(train)
    rest = torch.ones(labels.numel(), dtype=torch.bool)
    rest[chosen] = False
    others = rest.nonzero().view(-1)
    others = others[torch.randperm(others.numel(), generator=generator)]
    if others.numel() < VALIDATION + TEST:
        raise UserError(f"{labels.numel()} nodes are too few for a {VALIDATION} / {TEST} split")
    val, test = others[:VALIDATION], others[VALIDATION : VALIDATION + TEST]
    return chosen.sort().values, val.sort().values, test.sort().values

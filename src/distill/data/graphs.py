"""Citation graphs for node classification: Cora and CiteSeer, the Planetoid raw files (../shared/data/graphs/
planetoid/<Name>/raw/ind.*) read offline by torch_geometric (`torch_geometric.io.read_planetoid_data`: it
reads the raw files in place and writes nothing, unlike the `Planetoid` data set class, which would process
them into the shared folder).

The split is Planetoid's public one (Yang et al., 2016; Kipf and Welling, 2017): 20 labelled nodes per class,
500 validation nodes, 1,000 test nodes. Two settings, as in GLNN ("Graph-less Neural Networks", Zhang et
al., ICLR 2022, `utils.graph_split`) and FF-G2M:
- `transductive`: every node and edge is observed in training (the labels only of the training nodes); the
  test nodes are the public test split.
- `inductive`: a fraction (`held_out`, 0.2 as in both papers) of the test nodes is drawn (by `split_seed`)
  and removed with its edges from the graph that teacher and student train on; those held-out nodes are the
  test set, reached only at inference (a GNN then sees the full graph, an MLP only their features). The
  other test nodes stay observed, unlabelled.

The student's training set is every observed node (its label -100, ignored by cross-entropy, unless it is a
training node): distillation terms read all of them, the label term only the 140 / 120 labelled ones.
Features are row-normalised (each row sums to 1, as PyG's `NormalizeFeatures` and DGL's copies do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.base import DATASETS, DataSplits
from distill.data.gnnbench import gnnbench_file, random_split, read_gnnbench
from distill.data.paths import data_path
from distill.errors import UserError

IGNORED = -100  # a label that cross-entropy skips (an unlabelled node)
SETTINGS = ("transductive", "inductive")
SOURCES = ("planetoid", "gnnbench")  # which files: Planetoid's raw pickles (PyG) or gnn-benchmark's npz
PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer"}
GRAPH_EXTRA = "pip install 'distill[graph]' (torch-geometric)"


@dataclass
class Graph:
    """A whole graph: node features (N, F), labels (N,) and undirected edges (2, E), no self-loops."""

    features: Tensor
    labels: Tensor
    edge_index: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    def subgraph(self, nodes: Tensor) -> Graph:
        """The graph induced on `nodes`, renumbered 0..len(nodes)-1 in their order."""
        position = torch.full((self.num_nodes,), -1, dtype=torch.long)
        position[nodes] = torch.arange(nodes.numel())
        mapped = position[self.edge_index]
        edges = mapped[:, (mapped >= 0).all(0)]
        return Graph(self.features[nodes], self.labels[nodes], edges)


class NodeSet(Dataset):
    """(features, label) per node of `nodes`; `labels` overrides the graph's (IGNORED for unlabelled)."""

    def __init__(self, graph: Graph, nodes: Tensor, labels: Tensor | None = None) -> None:
        self.features = graph.features[nodes]
        self.labels = (graph.labels[nodes] if labels is None else labels).long()
        self.nodes = nodes
        # Rows kept as a list: a full batch fetches every node each epoch, and a list lookup is ~20x
        # cheaper than slicing two tensors per node (the data loading otherwise outweighs the MLP).
        self._rows = list(self.features.unbind(0))
        self._labels = list(self.labels.unbind(0))

    def __len__(self) -> int:
        return int(self.nodes.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._rows[index], self._labels[index]


@dataclass
class GraphSplits(DataSplits):
    """`DataSplits` (train: every observed node; test: the evaluated test nodes; teacher_train: the labelled
    nodes) plus what a graph task needs. Node ids are of the full graph unless named `obs_` (positions in
    `observed`, the graph teacher and student train on)."""

    graph: Graph | None = None  # the full graph (inference of a GNN on held-out nodes)
    setting: str = "transductive"
    observed: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    obs_train: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    obs_val: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    obs_test: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # observed test nodes
    test_nodes: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # evaluated ones
    name: str = ""

    @cached_property
    def observed_graph(self) -> Graph:
        """The graph teacher and student train on (the full graph, or the one without held-out nodes)."""
        assert self.graph is not None
        if self.setting == "transductive":
            return self.graph
        return self.graph.subgraph(self.observed)


def _read_planetoid(folder: Path, name: str) -> Any:
    try:
        from torch_geometric.io import read_planetoid_data
    except ImportError:
        raise UserError(
            f"data '{name}': reading Planetoid graphs needs torch_geometric: {GRAPH_EXTRA}"
        ) from None
    try:
        return read_planetoid_data(str(folder), name)
    except FileNotFoundError as err:
        raise UserError(f"data '{name}': {err.filename or err} not found in {folder}") from None
    except (OSError, ValueError, EOFError) as err:  # a damaged pickle
        raise UserError(f"data '{name}': cannot read the Planetoid files in {folder} ({err})") from None


def planetoid_folder(name: str, root: str | Path | None) -> Path:
    """The `raw` folder of Planetoid graph `name`: under `root` (a folder holding `<Name>/raw`, or the raw
    folder itself) when given, else found by the shared-data resolver. Missing: one line."""
    if root is None:
        return data_path(f"graphs/planetoid/{PLANETOID[name]}/raw")
    base = Path(root).expanduser()
    for candidate in (base / PLANETOID[name] / "raw", base / "raw", base):
        if (candidate / f"ind.{name}.graph").is_file():
            return candidate
    raise UserError(
        f"data '{name}': no Planetoid files (ind.{name}.*) in {base} nor {base}/{PLANETOID[name]}/raw"
    )


def load_planetoid(
    name: str, root: str | Path | None = None, normalize_features: bool = True
) -> tuple[Graph, Any]:
    """The full graph and PyG's data object (its public-split masks)."""
    data = _read_planetoid(planetoid_folder(name, root), name)
    features = data.x.float()
    if normalize_features:
        features = _normalised(features)
    edges = data.edge_index
    edges = edges[:, edges[0] != edges[1]]
    return Graph(features.contiguous(), data.y.long(), edges.contiguous()), data


def _normalised(features: Tensor) -> Tensor:
    return features / features.sum(1, keepdim=True).clamp(min=1.0)


def load_graph(
    name: str, root: str | Path | None, source: str, normalize_features: bool, split_seed: int
) -> tuple[Graph, tuple[Tensor, Tensor, Tensor], str]:
    """The graph, its (train, validation, test) nodes, and the split's name: Planetoid's public split, or
    a seeded one of the same sizes for gnn-benchmark's files (`distill.data.gnnbench`)."""
    if source == "planetoid":
        graph, data = load_planetoid(name, root, normalize_features)
        split = tuple(m.nonzero().view(-1) for m in (data.train_mask, data.val_mask, data.test_mask))
        return graph, split, "Planetoid public split"  # type: ignore[return-value]
    features, labels, edges = read_gnnbench(gnnbench_file(name, root), name)
    if normalize_features:
        features = _normalised(features)
    split_name = f"gnn-benchmark files, random split of Planetoid's sizes, seed {split_seed}"
    return Graph(features, labels, edges), random_split(labels, split_seed), split_name


def graph_splits(
    name: str,
    *,
    root: str | Path | None = None,
    setting: str = "transductive",
    held_out: float = 0.2,
    split_seed: int = 0,
    normalize_features: bool = True,
    source: str = "planetoid",
) -> GraphSplits:
    if setting not in SETTINGS:
        raise UserError(f"data '{name}': setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if source not in SOURCES:
        raise UserError(f"data '{name}': source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not 0.0 < held_out < 1.0:
        raise UserError(f"data '{name}': held_out must lie in (0, 1), got {held_out}")
    graph, (train, val, test), split_name = load_graph(name, root, source, normalize_features, split_seed)
    if setting == "transductive":
        observed = torch.arange(graph.num_nodes)
        test_nodes, obs_test = test, test
    else:  # GLNN's graph_split: the held-out nodes leave the observed graph with their edges
        order = torch.randperm(test.numel(), generator=torch.Generator().manual_seed(split_seed))
        cut = int(test.numel() * held_out)
        test_nodes, kept = test[order[:cut]].sort().values, test[order[cut:]].sort().values
        others = torch.ones(graph.num_nodes, dtype=torch.bool)
        others[torch.cat([train, val, test])] = False  # Planetoid's nodes in no split stay observed
        observed = torch.cat([train, val, kept, others.nonzero().view(-1)]).sort().values
    position = torch.full((graph.num_nodes,), -1, dtype=torch.long)
    position[observed] = torch.arange(observed.numel())
    obs_train, obs_val = position[train], position[val]
    obs_test = position[obs_test if setting == "transductive" else kept]
    student_labels = torch.full((observed.numel(),), IGNORED, dtype=torch.long)
    student_labels[obs_train] = graph.labels[train]
    classes = int(graph.labels.max()) + 1
    description = (
        f"{PLANETOID[name]} ({split_name}): {graph.num_nodes:,} nodes, "
        f"{graph.edge_index.shape[1] // 2:,} edges, {graph.features.shape[1]:,} features, {classes} classes; "
        f"{train.numel()} labelled / {val.numel()} validation / {test.numel()} test nodes; {setting}"
        + (
            f": {test_nodes.numel()} test nodes ({held_out:.0%}, split seed {split_seed}) held out of the "
            f"training graph ({observed.numel():,} nodes observed)"
            if setting == "inductive"
            else ""
        )
    )
    return GraphSplits(
        train=NodeSet(graph, observed, student_labels),
        test=NodeSet(graph, test_nodes),
        num_classes=classes,
        input_shape=(int(graph.features.shape[1]),),
        teacher_train=NodeSet(graph, train),
        description=description,
        graph=graph,
        setting=setting,
        observed=observed,
        obs_train=obs_train,
        obs_val=obs_val,
        obs_test=obs_test,
        test_nodes=test_nodes,
        name=name,
    )


@DATASETS.register("cora", summary="Cora citation graph, node classification (Planetoid split)", kind="graph")
def cora(
    *,
    root: str | None = None,
    setting: str = "transductive",
    held_out: float = 0.2,
    split_seed: int = 0,
    normalize_features: bool = True,
    source: str = "planetoid",
) -> GraphSplits:
    """Cora (2,708 papers, 7 classes). `root`: a folder holding `Cora/raw/ind.cora.*` (default: the shared
    data, ../shared/data/graphs/planetoid). `source: gnnbench` reads gnn-benchmark's `cora.npz` instead
    (`root`: its folder or the file; default ../shared/data/graphs/gnnbench) with a seeded split of
    Planetoid's sizes (`split_seed`), and needs no torch_geometric."""
    return graph_splits(
        "cora",
        root=root,
        setting=setting,
        held_out=held_out,
        split_seed=split_seed,
        normalize_features=normalize_features,
        source=source,
    )


@DATASETS.register(
    "citeseer", summary="CiteSeer citation graph, node classification (Planetoid split)", kind="graph"
)
def citeseer(
    *,
    root: str | None = None,
    setting: str = "transductive",
    held_out: float = 0.2,
    split_seed: int = 0,
    normalize_features: bool = True,
    source: str = "planetoid",
) -> GraphSplits:
    """CiteSeer (3,327 papers, 6 classes; 15 isolated nodes without features, kept as PyG keeps them).
    `root` and `source` as for `cora` (gnn-benchmark's copy: 3,312 nodes, without the placeholders)."""
    return graph_splits(
        "citeseer",
        root=root,
        setting=setting,
        held_out=held_out,
        split_seed=split_seed,
        normalize_features=normalize_features,
        source=source,
    )

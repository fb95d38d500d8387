"""Graph neural network teachers for node classification, built from torch_geometric's layers (an optional
dependency: `pip install 'distill[graph]'`). Each model's `forward(x, edge_index)` gives one row of logits per
node of the graph it is given; the MLP students (`mlp`) read node features alone.

- `gcn`: "Semi-Supervised Classification with Graph Convolutional Networks" (Kipf and Welling, ICLR 2017),
  `GCNConv` (symmetric normalisation with self-loops).
- `graphsage`: "Inductive Representation Learning on Large Graphs" (Hamilton et al., NeurIPS 2017),
  `SAGEConv` with the mean aggregator and a root weight (GLNN and FF-G2M use DGL's `gcn` aggregator: the
  mean over the neighbours and the node itself, with one weight; a close variant).
- `gat`: "Graph Attention Networks" (Velickovic et al., ICLR 2018), `GATConv`: `heads` attention heads
  concatenated in the hidden layers (each `hidden / heads` wide), one head at the output (Cora's setting).

Dropout (`dropout`) is applied between layers, as in FF-G2M's code (not to the input features as in Kipf's:
on a dense 2,708 x 1,433 input it costs more than the layer itself on a CPU); `gat` also drops attention
coefficients (`attention_dropout`). torch_geometric is imported when a model is built, so
that the rest of the zoo loads without it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError
from distill.models.registry import MODELS, check_dropout, check_widths

GRAPH_EXTRA = "pip install 'distill[graph]' (torch-geometric)"


def _pyg_nn(model: str) -> Any:
    try:
        import torch_geometric.nn as pyg_nn
    except ImportError:
        raise UserError(f"model '{model}' needs torch_geometric: {GRAPH_EXTRA}") from None
    return pyg_nn


def _in_features(model: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise UserError(f"model '{model}' reads node feature vectors, not inputs of shape {input_shape}")
    return int(input_shape[0])


class NodeClassifier(nn.Module):
    """Message-passing layers with ReLU between them; `forward(x, edge_index)` -> (N, classes) logits.
    `sparse_input`: the first layer starts with a linear map, so `x` may be a sparse tensor."""

    sparse_input = False

    def __init__(self, layers: list[nn.Module], dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = F.dropout(x, self.dropout, self.training)
            x = layer(x, edge_index)
            if i < len(self.layers) - 1:
                x = F.elu(x) if isinstance(self, GAT) else F.relu(x)
        return x


@MODELS.register(
    "gcn", summary="graph convolutional network (node classification; torch_geometric)", kind="graph"
)
class GCN(NodeClassifier):
    sparse_input = True  # its first operation is a linear layer: sparse features work (and cost less)

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: tuple[int, ...] | list[int] = (64,),
        dropout: float = 0.5,
    ) -> None:
        pyg_nn = _pyg_nn("gcn")
        widths = [_in_features("gcn", input_shape), *check_widths("gcn", "hidden", hidden), num_classes]
        layers = [pyg_nn.GCNConv(a, b) for a, b in zip(widths, widths[1:], strict=False)]
        super().__init__(layers, check_dropout("gcn", dropout))


@MODELS.register(
    "graphsage", summary="GraphSAGE, mean aggregator (node classification; torch_geometric)", kind="graph"
)
class GraphSAGE(NodeClassifier):
    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: tuple[int, ...] | list[int] = (64,),
        dropout: float = 0.5,
    ) -> None:
        pyg_nn = _pyg_nn("graphsage")
        widths = [_in_features("graphsage", input_shape), *check_widths("graphsage", "hidden", hidden)]
        widths.append(num_classes)
        layers = [pyg_nn.SAGEConv(a, b, aggr="mean") for a, b in zip(widths, widths[1:], strict=False)]
        super().__init__(layers, check_dropout("graphsage", dropout))


@MODELS.register(
    "gat", summary="graph attention network (node classification; torch_geometric)", kind="graph"
)
class GAT(NodeClassifier):
    sparse_input = True

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: tuple[int, ...] | list[int] = (64,),
        heads: int = 8,
        dropout: float = 0.6,
        attention_dropout: float = 0.6,
    ) -> None:
        pyg_nn = _pyg_nn("gat")
        widths = check_widths("gat", "hidden", hidden)
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise UserError(f"model 'gat': heads must be a positive whole number, got {heads!r}")
        if any(w % heads for w in widths):
            raise UserError(
                f"model 'gat': every hidden width must be a multiple of heads ({heads}), got {widths}"
            )
        attention = check_dropout("gat", attention_dropout)
        width = _in_features("gat", input_shape)
        layers: list[nn.Module] = []
        for size in widths:
            layers.append(pyg_nn.GATConv(width, size // heads, heads=heads, dropout=attention))
            width = size
        layers.append(pyg_nn.GATConv(width, num_classes, heads=1, concat=False, dropout=attention))
        super().__init__(layers, check_dropout("gat", dropout))


def sparse_rows(features: Tensor) -> Tensor:
    """Node features as a sparse COO tensor. Bag-of-words features are ~1% non-zero (Cora, CiteSeer): a
    first linear layer then costs 2-3x less on a CPU, with the same values (a sparse-dense product)."""
    return features.to_sparse().coalesce()


class WholeGraph(nn.Module):
    """A GNN over one fixed graph as a model of node ids: `forward(ids)` runs the GNN on the whole graph and
    returns the logits of nodes `ids` (how `fit` trains a GNN full-batch). The graph is not part of the state.
    Features are sparse for a GNN whose first operation is a linear layer (`sparse_input`: gcn, gat) unless
    `sparse` is False (latency is compared on the dense features both models would be served)."""

    def __init__(
        self, gnn: nn.Module, features: Tensor, edge_index: Tensor, sparse: bool | None = None
    ) -> None:
        super().__init__()
        self.gnn = gnn
        if sparse is None:
            sparse = getattr(gnn, "sparse_input", False)
        features = sparse_rows(features) if sparse else features
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("edge_index", edge_index, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.gnn(self.features, self.edge_index)[ids]


class Neighbourhood(nn.Module):
    """A GNN's inference for some nodes as a served model does it: extract their `hops`-hop neighbourhood
    from the whole graph (`k_hop_subgraph`), run the GNN on it, keep their rows."""

    def __init__(self, gnn: nn.Module, features: Tensor, edge_index: Tensor, hops: int) -> None:
        super().__init__()
        self.gnn, self.features, self.edge_index, self.hops = gnn, features, edge_index, hops

    def forward(self, nodes: Tensor) -> Tensor:
        from torch_geometric.utils import k_hop_subgraph

        subset, edges, mapping, _ = k_hop_subgraph(
            nodes, self.hops, self.edge_index, relabel_nodes=True, num_nodes=self.features.shape[0]
        )
        return self.gnn(self.features[subset], edges)[mapping]

"""FF-G2M's graph terms (`distill.losses.graph`) as objectives: `ffg2m_low` (low-frequency distillation,
LFD) and `ffg2m_high` (high-frequency distillation, HFD).

They compare a student's and a teacher's logits over the edges of a graph, so they need the graph: the graph
task (`distill.tasks.graph`) attaches the edges of the nodes it trains on (`attach_graph(edge_index,
num_nodes)`; node ids are the training set's positions) and the trainer hands them each batch's positions
(`needs_index`: `StepOutputs.index`). A batch uses the edges between its own nodes; the graph task's recipes
train full-batch (every observed node in one batch), as the authors' code does, so no edge is lost. In
training without a graph they refuse in one line. A call with neither graph nor node ids (the recipe check's
dry run on two rows of plain logits) sees a graph without edges: LFD is then logit KD through the self-loops,
HFD 0. The method is `attach_graph`, not `bind`, because the recipe check takes any objective with a `bind`
for OPSD's (a check that belongs to OPSD alone).

The paper's objective is `lambda CE + (1 - lambda) (LFD + HFD)`: in a recipe, `cross_entropy` with weight
lambda and these two with weight 1 - lambda each (`graph_cora.yaml`). GLNN ("Graph-less Neural Networks:
Teaching Old MLPs New Tricks via Distillation", Zhang et al., ICLR 2022) is `hinton_kd` at temperature 1 over
every node, which needs no graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.graph import high_frequency_kd, induced_edges, low_frequency_kd, self_loops
from distill.objectives.base import OBJECTIVES, Objective, StepOutputs, flag, positive_number

FF_G2M = (
    "Wu et al., 2023, Extracting Low-/High- Frequency Knowledge from Graph Neural Networks and Injecting it "
    "into MLPs: An Effective GNN-to-MLP Distillation Framework (S21)"
)


class GraphObjective(Objective):
    """A term over a graph's edges; `attach_graph` gives it the graph (edges over training-set positions)."""

    needs_index = True  # the trainer then adds each batch's positions (`IndexedDataset`)
    loss_name = "graph"

    def __init__(self) -> None:
        super().__init__()
        self.edge_index: Tensor | None = None
        self.num_nodes = 0

    def attach_graph(self, edge_index: Tensor, num_nodes: int) -> GraphObjective:
        """The graph's undirected edges (2, E) over positions 0..num_nodes-1 of the training set."""
        self.edge_index = edge_index[:, edge_index[0] != edge_index[1]].long()
        self.num_nodes = int(num_nodes)
        return self

    def batch_edges(self, outputs: StepOutputs) -> Tensor:
        if self.edge_index is None and outputs.index is None:  # a dry run on plain logits: no edges
            return torch.empty(2, 0, dtype=torch.long, device=outputs.student_logits.device)
        if self.edge_index is None:
            raise UserError(
                f"objective '{self.loss_name}' needs a graph: use it in a graph task recipe (task: graph, "
                "data: cora or citeseer)"
            )
        if outputs.index is None:
            raise UserError(f"objective '{self.loss_name}' needs the batch's node ids (an IndexedDataset)")
        if outputs.teacher_logits is None:
            raise UserError(f"objective '{self.loss_name}' needs the teacher's logits, but the step has none")
        edges = self.edge_index.to(outputs.index.device)
        return induced_edges(outputs.index, edges, self.num_nodes)


class LowFrequencyKD(GraphObjective):
    """LFD: KL(softmax(z_t[j]) || softmax(z_s[i])) per edge (i, j), self-loops included (`self_loops`)."""

    loss_name = "ffg2m_low"

    def __init__(self, *, self_loops: bool = True) -> None:
        super().__init__()
        self.with_loops = flag("ffg2m_low", "self_loops", self_loops)

    def forward(self, outputs: StepOutputs) -> Tensor:
        edges = self.batch_edges(outputs)
        if self.with_loops:
            edges = self_loops(edges, outputs.student_logits.shape[0])
        assert outputs.teacher_logits is not None
        return low_frequency_kd(outputs.student_logits, outputs.teacher_logits, edges)


class HighFrequencyKD(GraphObjective):
    """HFD: KL(softmax(|z_t[i] - z_t[j]| / tau) || softmax(|z_s[i] - z_s[j]| / tau)) per edge, no
    self-loops. `temperature` is the paper's tau (1.5 for Cora and CiteSeer with a GCN teacher)."""

    loss_name = "ffg2m_high"

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = positive_number("ffg2m_high", "temperature", temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        edges = self.batch_edges(outputs)
        assert outputs.teacher_logits is not None
        return high_frequency_kd(
            outputs.student_logits, outputs.teacher_logits, edges, temperature=self.temperature
        )


OBJECTIVES.add(
    "ffg2m_low",
    LowFrequencyKD,
    summary="FF-G2M low-frequency term: student node vs teacher neighbours, KL over edges (graph task)",
    paper=FF_G2M,
    classification=False,  # needs a graph: not a method of the image benchmark
)
OBJECTIVES.add(
    "ffg2m_high",
    HighFrequencyKD,
    summary="FF-G2M high-frequency term: KL of |node - neighbour| logit differences over edges (graph task)",
    paper=FF_G2M,
    classification=False,
)

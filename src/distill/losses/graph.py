"""GNN-to-MLP distillation losses over the edges of a graph (node classification).

From "Extracting Low-/High- Frequency Knowledge from Graph Neural Networks and Injecting it into MLPs: An
Effective GNN-to-MLP Distillation Framework" (FF-G2M; Wu, Lin, Huang, Fan and Li, AAAI 2023), written after
the authors' code (github.com/LirongWu/FF-G2M @2e07b1e, `src/models.py` `edge_distribution_low` /
`edge_distribution_high` and `src/train_and_eval.py` `train_mini_batch`):

* low-frequency distillation (LFD): the student's prediction at node i matches the teacher's at each of its
  neighbours j (self-loops included), i.e. the teacher's neighbourhood-smoothed knowledge,
  ``L_LFD = 1/|E| sum_(i,j) KL(softmax(z_t[j]) || softmax(z_s[i]))``; no temperature (the code applies none);
* high-frequency distillation (HFD): the distribution of the absolute logit difference between a node and
  each neighbour (self-loops excluded), node-minus-neighbour knowledge that smoothing drowns,
  ``L_HFD = 1/|E| sum_(i,j) KL(softmax(|z_t[i] - z_t[j]| / tau) || softmax(|z_s[i] - z_s[j]| / tau))``;
  the code softens both with the same tau and applies no tau^2 factor, and neither does this.

Both read *logits*; the KL is PyTorch's ``KLDivLoss(reduction="batchmean", log_target=True)`` of the
authors' code: the sum over edges divided by the number of edges. The paper's total is
``lambda CE + (1 - lambda) (L_LFD + L_HFD)`` (`distill.objectives.graph`, recipes `graph_*`).

`edge_index` is ``(2, E)`` of row positions into the logits (PyG's layout: ``edge_index[0]`` the source i,
``edge_index[1]`` the target j). ``reduction`` as in `distill.losses._common` but per edge: ``"mean"`` over
edges (0 with no edge, never NaN), ``"sum"``, ``"none"`` (one value per edge). Float32 maths, float64 kept.
Pure tensor functions: nothing here imports the rest of `distill` or torch_geometric.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses._common import REDUCTIONS, compute_dtype, fused_kl

__all__ = ["high_frequency_kd", "induced_edges", "low_frequency_kd", "self_loops"]


def _check(student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"node logits must be (N, C), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.long:
        raise ValueError(f"edge_index must be a (2, E) long tensor, got {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= student_logits.shape[0]):
        raise ValueError(f"edge_index points outside the {student_logits.shape[0]} rows of the logits")


def _reduce(per_edge: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_edge.sum()
    if reduction == "mean":
        return per_edge.sum() / max(per_edge.shape[0], 1)
    return per_edge


def low_frequency_kd(
    student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """FF-G2M's LFD: per edge (i, j), KL(softmax(z_t[j]) || softmax(z_s[i])). Pass the edges with the
    self-loops (`self_loops`) for the paper's term: a self-loop is plain logit KD at that node."""
    _check(student_logits, teacher_logits, edge_index, reduction)
    dtype = compute_dtype(student_logits, teacher_logits)
    source, target = edge_index[0], edge_index[1]
    student = student_logits.to(dtype).index_select(0, source)
    teacher = teacher_logits.to(dtype).index_select(0, target)
    return _reduce(fused_kl(teacher, student), reduction)


def high_frequency_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    edge_index: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """FF-G2M's HFD: per edge (i, j),
    KL(softmax(|z_t[i] - z_t[j]| / tau) || softmax(|z_s[i] - z_s[j]| / tau)). Pass the edges without
    self-loops (a self-loop's difference is zero: a uniform target that only dilutes the mean)."""
    _check(student_logits, teacher_logits, edge_index, reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits, teacher_logits)
    source, target = edge_index[0], edge_index[1]
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    student = (s.index_select(0, source) - s.index_select(0, target)).abs()
    teacher = (t.index_select(0, source) - t.index_select(0, target)).abs()
    return _reduce(fused_kl(teacher, student, temperature), reduction)


def self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """`edge_index` without its self-loops, then one self-loop per node appended (GCN's A + I; what the
    authors' code builds with `dgl.remove_self_loop` then `dgl.add_self_loop`)."""
    kept = edge_index[:, edge_index[0] != edge_index[1]]
    loops = torch.arange(num_nodes, device=edge_index.device).repeat(2, 1)
    return torch.cat([kept, loops], dim=1)


def induced_edges(nodes: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """The edges of `edge_index` (over `num_nodes` nodes) whose two ends are both in `nodes`, renumbered as
    positions in `nodes` (a batch's rows). With every node in the batch this is `edge_index` permuted; a
    smaller batch drops the edges that leave it."""
    position = torch.full((num_nodes,), -1, dtype=torch.long, device=edge_index.device)
    position[nodes.to(edge_index.device)] = torch.arange(nodes.numel(), device=edge_index.device)
    mapped = position[edge_index]
    return mapped[:, (mapped >= 0).all(0)]

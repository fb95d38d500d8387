"""The graph task (S21, GNN-to-MLP): FF-G2M's losses against float64 references and the authors' formulation,
the Planetoid data read offline (and a missing folder refused in one line), an MLP student that only ever
receives node features, the task's refusals; one end-to-end run and the quick benchmark (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from bench_helpers import load_benchmark
from data_helpers import require_data
from distill.data import build_data
from distill.data.graphs import IGNORED, Graph, GraphSplits, NodeSet, planetoid_folder
from distill.errors import UserError
from distill.losses.graph import high_frequency_kd, induced_edges, low_frequency_kd, self_loops
from distill.objectives import StepOutputs
from distill.objectives.graph import HighFrequencyKD, LowFrequencyKD
from distill.objectives.terms import Term
from distill.recipe.load import load_recipe, recipe_from_dict
from distill.tasks import task_for
from distill.tasks.graph import (
    NodeBatches,
    NodeLogitsTeacher,
    StudentEvaluator,
    accepts_sparse,
    select_by_validation,
)
from distill.train import fit

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ losses


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


def _kl(target: list[float], prediction: list[float]) -> float:
    """KL(softmax(target) || softmax(prediction)) in Python floats (float64)."""
    log_p, log_q = _log_softmax(target), _log_softmax(prediction)
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))


def _case(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(7, 5, generator=g)
    teacher = 3 * torch.randn(7, 5, generator=g)
    edges = torch.tensor([[0, 1, 1, 2, 3, 4, 6, 5], [1, 0, 2, 1, 4, 3, 5, 6]])
    return student, teacher, edges


def test_low_frequency_term_matches_a_float64_reference() -> None:
    student, teacher, edges = _case()
    s, t = student.double().tolist(), teacher.double().tolist()
    per_edge = [_kl(t[j], s[i]) for i, j in edges.t().tolist()]
    value = low_frequency_kd(student, teacher, edges)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(sum(per_edge) / len(per_edge), rel=1e-5)
    none = low_frequency_kd(student, teacher, edges, reduction="none")
    assert torch.allclose(none.double(), torch.tensor(per_edge, dtype=torch.float64), atol=1e-5)
    assert low_frequency_kd(student, teacher, edges, reduction="sum").item() == pytest.approx(
        sum(per_edge), rel=1e-5
    )
    assert low_frequency_kd(student, teacher, edges[:, :0]).item() == 0.0  # no edge: 0, never NaN


def test_high_frequency_term_matches_a_float64_reference() -> None:
    student, teacher, edges = _case(1)
    s, t = student.double().tolist(), teacher.double().tolist()
    tau = 1.5

    def diff(rows: list[list[float]], i: int, j: int) -> list[float]:
        return [abs(a - b) / tau for a, b in zip(rows[i], rows[j], strict=True)]

    per_edge = [_kl(diff(t, i, j), diff(s, i, j)) for i, j in edges.t().tolist()]
    value = high_frequency_kd(student.double(), teacher.double(), edges, temperature=tau)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(sum(per_edge) / len(per_edge), rel=1e-10)


def test_the_terms_equal_the_authors_formulation() -> None:
    """FF-G2M's code: KLDivLoss(batchmean, log_target=True)(log_softmax(student[src]),
    log_softmax(teacher[dst])) for LFD with self-loops; the same loss over
    log_softmax(|z[src] - z[dst]| / tau) for HFD without."""
    student, teacher, edges = _case(2)
    criterion = nn.KLDivLoss(reduction="batchmean", log_target=True)
    looped = self_loops(edges, student.shape[0])
    out_s, out_t = student.log_softmax(1), teacher.log_softmax(1)
    lfd = criterion(out_s[looped[0]], out_t[looped[1]])
    assert low_frequency_kd(student, teacher, looped).item() == pytest.approx(lfd.item(), rel=1e-5)

    def high(z: Tensor) -> Tensor:
        return ((z[edges[0]] - z[edges[1]]).abs() / 1.5).log_softmax(-1)

    hfd = criterion(high(student), high(teacher))
    assert high_frequency_kd(student, teacher, edges, temperature=1.5).item() == pytest.approx(
        hfd.item(), rel=1e-5
    )


def test_the_terms_have_correct_gradients() -> None:
    student, teacher, edges = _case(3)
    student = student.double().requires_grad_()
    teacher = teacher.double()
    assert torch.autograd.gradcheck(lambda s: low_frequency_kd(s, teacher, edges), (student,))
    assert torch.autograd.gradcheck(
        lambda s: high_frequency_kd(s, teacher, edges, temperature=0.7), (student,)
    )


def test_edge_helpers() -> None:
    edges = torch.tensor([[0, 1, 2, 2], [1, 0, 2, 3]])  # one self-loop (2, 2)
    looped = self_loops(edges, 4)
    assert looped.t().tolist() == [[0, 1], [1, 0], [2, 3], [0, 0], [1, 1], [2, 2], [3, 3]]
    inner = induced_edges(torch.tensor([3, 2, 0]), edges, 4)  # node 1 outside the batch
    assert inner.t().tolist() == [[1, 1], [1, 0]]  # (2, 2) and (2, 3) as batch positions
    with pytest.raises(ValueError, match="outside"):
        low_frequency_kd(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0], [5]]))


# -------------------------------------------------------------------------------- objectives


def _outputs(student: Tensor, teacher: Tensor, index: Tensor | None) -> StepOutputs:
    return StepOutputs(student_logits=student, teacher_logits=teacher, index=index)


def test_objectives_read_the_edges_inside_the_batch() -> None:
    student, teacher, edges = _case(4)
    low = LowFrequencyKD().attach_graph(edges, 7)
    high = HighFrequencyKD(temperature=1.5).attach_graph(edges, 7)
    everyone = torch.arange(7)
    assert low(_outputs(student, teacher, everyone)).item() == pytest.approx(
        low_frequency_kd(student, teacher, self_loops(edges, 7)).item()
    )
    order = torch.tensor([6, 2, 0, 4, 1, 3, 5])  # a shuffled full batch: the same value
    value = high(_outputs(student[order], teacher[order], order)).item()
    assert value == pytest.approx(
        high_frequency_kd(student, teacher, edges, temperature=1.5).item(), rel=1e-5
    )
    part = torch.tensor([0, 1, 2])  # edges (0,1), (1,0), (1,2), (2,1) stay
    inner = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    assert high(_outputs(student[part], teacher[part], part)).item() == pytest.approx(
        high_frequency_kd(student[part], teacher[part], inner, temperature=1.5).item(), rel=1e-5
    )


def test_objectives_refuse_to_train_without_a_graph() -> None:
    student, teacher, _ = _case()
    with pytest.raises(UserError, match="needs a graph"):
        LowFrequencyKD()(_outputs(student, teacher, torch.arange(7)))
    # The recipe check's dry run (no graph, no node ids) sees a graph without edges: a finite value.
    assert torch.isfinite(HighFrequencyKD()(_outputs(student, teacher, None)))


# ------------------------------------------------------------------------------ the student


def _toy(setting: str = "transductive") -> GraphSplits:
    """A 30-node graph (a ring plus chords) with 8 features and 3 classes, built without torch_geometric."""
    g = torch.Generator().manual_seed(0)
    n = 30
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.stack([torch.arange(0, n, 3), (torch.arange(0, n, 3) + 7) % n])
    edges = torch.cat([ring, chords, ring.flip(0), chords.flip(0)], dim=1)
    graph = Graph(torch.rand(n, 8, generator=g), torch.arange(n) % 3, edges)
    nodes = torch.arange(n)
    train, val, test = nodes[:6], nodes[6:14], nodes[14:]
    labels = torch.full((n,), IGNORED)
    labels[train] = graph.labels[train]
    return GraphSplits(
        train=NodeSet(graph, nodes, labels),
        test=NodeSet(graph, test),
        num_classes=3,
        input_shape=(8,),
        graph=graph,
        setting=setting,
        observed=nodes,
        obs_train=train,
        obs_val=val,
        obs_test=test,
        test_nodes=test,
    )


class FeaturesOnly(nn.Module):
    """An MLP that records what it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.calls: list[tuple[int, list[tuple[int, ...]], list[str]]] = []

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        self.calls.append((len(args), [tuple(a.shape) for a in args], sorted(kwargs)))
        return self.body(args[0])


def test_the_mlp_student_receives_node_features_only() -> None:
    data = _toy()
    edges, n = data.graph.edge_index, data.graph.num_nodes  # type: ignore[union-attr]
    student = FeaturesOnly()
    teacher = NodeLogitsTeacher(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)))
    evaluator = StudentEvaluator(data, sparse=True)
    evaluator.use(teacher.logits[data.test_nodes])
    terms = [
        Term("cross_entropy", 0.4),
        Term(LowFrequencyKD().attach_graph(edges, n), 0.6, label="ffg2m_low"),
        Term(HighFrequencyKD(temperature=1.5).attach_graph(edges, n), 0.6, label="ffg2m_high"),
    ]
    result = fit(
        student,
        NodeBatches(data.train, sparse=True),  # sparse feature rows, as the task gives the zoo's mlp
        teacher=teacher,
        objectives=terms,
        evaluator=evaluator,
        epochs=3,
        batch_size=64,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    assert student.calls and all(c == (1, [c[1][0]], []) for c in student.calls)  # one tensor, no keywords
    assert all(
        len(shape) == 2 and shape[1] == 8 for c in student.calls for shape in c[1]
    )  # (nodes, features)
    assert {"accuracy", "val_accuracy", "agreement"} <= set(result.final)
    assert accepts_sparse(student.body, data.train.features)
    selected = select_by_validation(result.history)
    assert 1 <= selected["selected_epoch"] <= 3 and 0.0 <= selected["selected_accuracy"] <= 1.0


def test_selection_takes_the_later_epoch_of_equal_validation_accuracy() -> None:
    history = [
        {"epoch": 1, "val_accuracy": 0.5, "accuracy": 0.4},
        {"epoch": 2, "val_accuracy": 0.7, "accuracy": 0.6},
        {"epoch": 3, "val_accuracy": 0.7, "accuracy": 0.65},
        {"epoch": 4, "val_accuracy": 0.6, "accuracy": 0.9},
    ]
    assert select_by_validation(history) == {
        "selected_accuracy": 0.65,
        "selected_val_accuracy": 0.7,
        "selected_epoch": 3.0,
    }


# ------------------------------------------------------------------------------------ the task


def _recipe(**changes: object) -> dict:
    recipe = {
        "name": "g",
        "data": {"name": "cora"},
        "teacher": {"name": "gcn"},
        "student": {"name": "mlp"},
        "objectives": [{"name": "ffg2m_low"}],
    }
    return recipe | changes


def test_the_graph_task_claims_graph_data_and_refuses_what_it_cannot_run() -> None:
    task = task_for(recipe_from_dict(_recipe()))
    assert task.name == "graph"
    task.check(recipe_from_dict(_recipe()))
    for changes, message in (
        ({"teacher": {"name": "mlp"}}, "the teacher must be a GNN"),
        ({"student": {"name": "gcn"}}, "reads node features alone"),
        ({"teacher": None}, "needs a GNN teacher"),
        ({"task": "graph", "data": {"name": "digits"}}, "needs a graph data set"),
    ):
        recipe = recipe_from_dict(_recipe(**changes))
        with pytest.raises(UserError, match=message):
            task_for(recipe).check(recipe) if recipe.task else task.check(recipe)


def test_packaged_recipes_are_graph_recipes() -> None:
    for name in ("graph_cora", "graph_citeseer"):
        recipe = load_recipe(name)
        assert task_for(recipe).name == "graph" and len(recipe.seeds) == 3
        assert [m.name for m in recipe.method_list()] == ["MLP", "GLNN", "FF-G2M"]


# ---------------------------------------------------------------------------------------- data


def test_a_missing_folder_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError) as error:
        build_data("cora", root=str(tmp_path / "nowhere"))
    assert "\n" not in str(error.value) and "ind.cora" in str(error.value)
    # Nothing in $DISTILL_DATA, ../shared/data or the cache: the resolver's one line names the folder.
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("distill.data.paths.shared_candidates", lambda: [tmp_path / "shared"])
    with pytest.raises(UserError) as error:
        planetoid_folder("citeseer", None)
    assert "\n" not in str(error.value) and "graphs/planetoid/CiteSeer/raw not found" in str(error.value)


@pytest.fixture(scope="module")
def cora() -> GraphSplits:
    require_data("graphs/planetoid/Cora/raw")
    pytest.importorskip("torch_geometric", reason="the graph extra: pip install 'distill[graph]'")
    data = build_data("cora")
    assert isinstance(data, GraphSplits)
    return data


def test_cora_loads_offline_with_the_public_split(cora: GraphSplits) -> None:
    graph = cora.graph
    assert graph is not None and graph.num_nodes == 2708 and graph.features.shape == (2708, 1433)
    assert graph.edge_index.shape == (2, 10556) and cora.num_classes == 7
    assert (cora.obs_train.numel(), cora.obs_val.numel(), cora.test_nodes.numel()) == (140, 500, 1000)
    assert torch.allclose(graph.features.sum(1)[graph.features.sum(1) > 0], torch.ones(1))  # row-normalised
    labelled = cora.train.labels != IGNORED
    assert len(cora.train) == 2708 and int(labelled.sum()) == 140


def test_the_inductive_split_holds_test_nodes_out_of_the_graph(cora: GraphSplits) -> None:
    data = build_data("cora", setting="inductive", split_seed=3)
    assert isinstance(data, GraphSplits) and data.test_nodes.numel() == 200
    assert not set(data.test_nodes.tolist()) & set(data.observed.tolist())
    assert data.observed.numel() == 2708 - 200 and len(data.train) == 2508
    observed = data.observed_graph
    assert observed.num_nodes == 2508 and int(observed.edge_index.max()) < 2508
    held = set(data.test_nodes.tolist())
    full = data.graph.edge_index  # type: ignore[union-attr]
    kept = [(a, b) for a, b in full.t().tolist() if a not in held and b not in held]
    assert observed.edge_index.shape[1] == len(kept)


def test_gnnbench_cora_is_planetoids_graph_read_without_pickles_or_pyg(
    cora: GraphSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The npz copy holds the same graph in another node order: same size, degrees and class sizes."""
    require_data("graphs/gnnbench/cora.npz")

    def no_pyg(*args: object) -> None:
        raise AssertionError("the gnnbench source must not read Planetoid's pickles")

    monkeypatch.setattr("distill.data.graphs._read_planetoid", no_pyg)
    data = build_data("cora", source="gnnbench", split_seed=5)
    assert isinstance(data, GraphSplits) and data.graph is not None and cora.graph is not None
    graph, planetoid = data.graph, cora.graph
    assert graph.features.shape == (2708, 1433) and graph.edge_index.shape == (2, 10556)
    degrees = [torch.bincount(g.edge_index[0], minlength=2708).sort().values for g in (graph, planetoid)]
    assert torch.equal(degrees[0], degrees[1])
    sizes = [torch.bincount(g.labels).sort().values for g in (graph, planetoid)]
    assert torch.equal(sizes[0], sizes[1])
    reverse = torch.stack([graph.edge_index[1], graph.edge_index[0]])
    assert torch.equal(torch.unique(reverse, dim=1), graph.edge_index)  # undirected, both directions once
    assert bool((graph.edge_index[0] != graph.edge_index[1]).all())
    assert (data.obs_train.numel(), data.obs_val.numel(), data.test_nodes.numel()) == (140, 500, 1000)
    train_labels = graph.labels[data.obs_train]  # transductive: observed positions are node ids
    assert torch.equal(torch.bincount(train_labels), torch.full((7,), 20))
    parts = [set(nodes.tolist()) for nodes in (data.obs_train, data.obs_val, data.test_nodes)]
    assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint
    again = build_data("cora", source="gnnbench", split_seed=5)
    other = build_data("cora", source="gnnbench", split_seed=6)
    assert torch.equal(again.obs_train, data.obs_train)  # type: ignore[union-attr]
    assert not torch.equal(other.obs_train, data.obs_train)  # type: ignore[union-attr]
    assert "random split of Planetoid's sizes, seed 5" in data.description


def test_gnnbench_mistakes_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="source must be one of planetoid, gnnbench"):
        build_data("cora", source="csv")
    with pytest.raises(UserError, match="no gnn-benchmark file"):
        build_data("cora", source="gnnbench", root=str(tmp_path))
    (tmp_path / "cora.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="cannot read gnn-benchmark file") as error:
        build_data("cora", source="gnnbench", root=str(tmp_path))
    assert "\n" not in str(error.value)
    import numpy as np

    np.savez(tmp_path / "cora.npz", labels=np.zeros(3))
    with pytest.raises(UserError, match="missing adj_data"):
        build_data("cora", source="gnnbench", root=str(tmp_path / "cora.npz"))


# ------------------------------------------------------------------------------------- slow runs


@pytest.mark.slow
def test_a_tiny_graph_recipe_runs_end_to_end(tmp_path: Path) -> None:
    require_data("graphs/planetoid/Cora/raw")
    pytest.importorskip("torch_geometric")
    from distill.experiment import run_recipe
    from distill.report import write_report

    def shrink(recipe: dict) -> dict:
        recipe["data"]["params"] = {"setting": "inductive"}
        recipe["teacher"]["train"]["epochs"] = 3
        recipe["trainer"]["epochs"] = 3
        recipe["seeds"] = [0]
        recipe["output"] = {"dir": str(tmp_path / "run"), "tensorboard": False}
        return recipe

    result = run_recipe(load_recipe("graph_cora", edit=shrink), progress=False, console=Console(quiet=True))
    assert [m.name for m in result.methods] == ["MLP", "GLNN", "FF-G2M"]
    for runs in result.methods:
        final = runs.runs[0].result.final
        assert {"accuracy", "val_accuracy", "observed_test_accuracy", "selected_accuracy"} <= set(final)
    assert result.extra["setting"] == "inductive" and set(result.extra["teachers"]) == {0}
    assert result.latency["student"] > 0 and result.latency["teacher"] > 0
    text = write_report(result).read_text()
    assert "| FF-G2M |" in text and "teacher (gcn)" in text and "CPU latency" in text


def _benchmark():
    return load_benchmark("graph")


@pytest.mark.slow
def test_the_quick_benchmark_writes_its_table(tmp_path: Path) -> None:
    require_data("graphs/planetoid/Cora/raw")
    pytest.importorskip("torch_geometric")
    out = tmp_path / "graph.md"
    assert _benchmark().main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| MLP |", "| GLNN |", "| FF-G2M |", "teacher"):
        assert row in text

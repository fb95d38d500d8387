"""Node classification on a graph, distilled from a GNN teacher into an MLP that never sees the graph.

The data are a graph data set (`distill.data.graphs`: Cora, CiteSeer; transductive or inductive). The
teacher is a GNN (`distill.models.gnn`: gcn, graphsage, gat) trained here full-batch on the observed graph
with cross-entropy on the labelled nodes, the weights of its epoch of lowest validation loss kept (the
papers' code keeps the best validation accuracy: `GraphTeachers._train` says why not); one teacher per
student seed (teacher seed = `teacher.train.seed` + the student's seed), cached in
`$DISTILL_CACHE/graph_teachers`. Since it is frozen, its logits over the observed nodes are computed once and
served by node id (`NodeLogitsTeacher`).

The student (an `mlp`) trains on every observed node (`NodeBatches`: feature rows, sparse when the student
takes them, labels -100 except on the labelled nodes); graph objectives (`ffg2m_low`, `ffg2m_high`) are
attached here to the observed graph's edges. Each epoch the student is evaluated on the validation and test
nodes from their features alone: `accuracy` (test), `val_accuracy`, agreement with the teacher on the test
nodes; after training,
`selected_accuracy` is the test accuracy at the epoch of best validation accuracy (the papers' protocol; the
later epoch on a tie, as their `>=`). Latency: the MLP against the GNN on the same test nodes, the GNN
given their L-hop neighbourhood (extracted in the timed call, as GLNN counts it) or the whole graph.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from distill.cache.indexed import IndexedDataset
from distill.data import DATASETS, build_data
from distill.data.graphs import GraphSplits, NodeSet
from distill.errors import UserError
from distill.io import cache_root, fingerprint
from distill.metrics import latency_per_batch
from distill.models import MODELS, build_model, count_parameters
from distill.models.gnn import Neighbourhood, WholeGraph, sparse_rows
from distill.objectives import build_objective
from distill.objectives.graph import GraphObjective
from distill.objectives.terms import Term
from distill.recipe.schema import MethodSpec, Recipe, TeacherSpec
from distill.runfolder import RunFolder
from distill.tasks.base import TASKS, MethodPlan, SeedPlan, Task, TaskSetup
from distill.tasks.results import ExperimentResult, TeacherInfo
from distill.tasks.teacher_store import (
    load_weights,
    optimizer_config,
    read_teacher_cache,
    schedule_config,
    teacher_spec_identity,
    write_teacher_cache,
)
from distill.teachers import Teacher, TeacherOutputs, TeacherRequest
from distill.train import FitResult, fit
from distill.train.seeding import seed_everything


def is_graph_model(name: str | None) -> bool:
    return name is not None and name in MODELS and MODELS.entry(name).extra.get("kind") == "graph"


def rows(features: Tensor, sparse: bool) -> Tensor:
    return sparse_rows(features) if sparse else features


@torch.no_grad()
def accepts_sparse(student: nn.Module, features: Tensor) -> bool:
    """Whether `student` gives the same logits from sparse rows as from dense ones (the zoo's `mlp` does;
    a model whose first layer is not linear may not): else the task hands it dense rows."""
    was_training = student.training
    student.eval()
    try:
        return bool(torch.allclose(student(sparse_rows(features[:2])), student(features[:2]), atol=1e-5))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    finally:
        student.train(was_training)


class NodeLogitsTeacher(Teacher):
    """A frozen teacher's logits over the training set's nodes, served by node id (no model is run)."""

    kind = "node_logits"

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def attach(self, device: Any, autocast: Any, layers: Any) -> None:
        if layers:
            raise UserError("the graph task's teacher serves its logits only, not the outputs of its layers")
        self.logits = self.logits.to(device)

    def check_objectives(self, names: list[str], objectives: Any) -> None:
        for name, objective in zip(names, objectives, strict=True):
            if objective.teacher_layers:
                raise UserError(f"objective '{name}' reads teacher layers; the graph task's teacher has none")

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if request.index is None:
            raise UserError("the graph task's teacher needs the batch's node ids (an IndexedDataset)")
        return TeacherOutputs(logits=self.logits[request.index.to(self.logits.device)])


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else 0.0


class NodeBatches(IndexedDataset):
    """The student's training nodes, a batch gathered in one call: the loader hands `__getitems__` a whole
    batch of positions and `collate_fn` returns IndexedDataset's batch, {"inputs": the nodes' features
    (sparse rows when the student takes them, `sparse_rows`), "labels", "index"}; a full batch costs one
    gather, not one lookup per node. Single items (`dataset[i]`) are IndexedDataset's."""

    def __init__(self, nodes: NodeSet, sparse: bool = True) -> None:
        super().__init__(nodes)
        self.features = rows(nodes.features, sparse)
        self.labels = nodes.labels

    def __getitems__(self, positions: list[int]) -> list[int]:
        return list(positions)

    def collate_fn(self, items: list[Any]) -> dict[str, Any]:
        # Positions from `__getitems__`, or (sample, position) pairs from `dataset[i]` (the trainer's probe).
        index = torch.tensor([item if isinstance(item, int) else item[1] for item in items], dtype=torch.long)
        return {"inputs": self.features.index_select(0, index), "labels": self.labels[index], "index": index}


class StudentEvaluator:
    """Validation and test accuracy of a student from node features alone; agreement with the teacher of
    the seed being trained (`use`)."""

    def __init__(self, data: GraphSplits, sparse: bool = False) -> None:
        graph = data.observed_graph
        assert data.graph is not None
        # The rows as in training (`NodeBatches`); the student reads features only.
        self.val_x, self.val_y = rows(graph.features[data.obs_val], sparse), graph.labels[data.obs_val]
        self.test_x = rows(data.graph.features[data.test_nodes], sparse)
        self.test_y = data.graph.labels[data.test_nodes]
        self.inductive = data.setting == "inductive"
        self.obs_test_x = rows(graph.features[data.obs_test], sparse)
        self.obs_test_y = graph.labels[data.obs_test]
        self.teacher_test: Tensor | None = None

    def use(self, teacher_test_logits: Tensor) -> None:
        self.teacher_test = teacher_test_logits

    @torch.inference_mode()
    def __call__(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        was_training = student.training
        student.eval()
        device = next(student.parameters()).device
        try:
            test = student(self.test_x.to(device)).float().cpu()
            metrics = {
                "accuracy": accuracy(test, self.test_y),
                "val_accuracy": accuracy(student(self.val_x.to(device)).float().cpu(), self.val_y),
            }
            if self.inductive:
                observed = student(self.obs_test_x.to(device)).float().cpu()
                metrics["observed_test_accuracy"] = accuracy(observed, self.obs_test_y)
        finally:
            student.train(was_training)
        if self.teacher_test is not None:
            metrics["agreement"] = float((test.argmax(-1) == self.teacher_test.argmax(-1)).float().mean())
        return metrics


def select_by_validation(history: list[dict[str, Any]]) -> dict[str, float]:
    """The test accuracy at the epoch of best validation accuracy (the later one on a tie)."""
    evaluated = [row for row in history if "val_accuracy" in row]
    if not evaluated:
        return {}
    best = max(enumerate(evaluated), key=lambda item: (item[1]["val_accuracy"], item[0]))[1]
    return {
        "selected_accuracy": float(best["accuracy"]),
        "selected_val_accuracy": float(best["val_accuracy"]),
        "selected_epoch": float(best["epoch"]),
    }


class GraphTeachers:
    """The run's GNN teachers, one per student seed: trained (or from the cache) in `prepare`."""

    def __init__(self, recipe: Recipe, data: GraphSplits, progress: bool) -> None:
        self.recipe, self.data, self.progress = recipe, data, progress
        self.observed = data.observed_graph
        assert data.graph is not None
        self.full = data.graph
        self.models: dict[int, nn.Module] = {}
        self.logits: dict[int, Tensor] = {}  # over the observed nodes, in training-set order
        self.test_logits: dict[int, Tensor] = {}  # over the evaluated test nodes
        self.metrics: dict[int, dict[str, float]] = {}
        self.seconds: dict[int, float] = {}
        self.sources: dict[int, str] = {}
        self.epochs: dict[int, int] = {}  # the kept epoch (0: a checkpoint, or unknown)

    def build(self) -> nn.Module:
        spec = self.recipe.teacher
        assert spec is not None and spec.name is not None
        data = self.data
        return build_model(
            spec.name, num_classes=data.num_classes, input_shape=data.input_shape, **spec.params
        )

    def prepare(self, seed: int) -> None:
        spec: TeacherSpec = self.recipe.teacher  # type: ignore[assignment]
        teacher_seed = spec.train.seed + seed
        seed_everything(teacher_seed)
        gnn = self.build()
        key = fingerprint(
            {
                "model": teacher_spec_identity(spec),
                "data": self.recipe.data.model_dump(mode="json", include={"name", "params"}),
                "seed": teacher_seed,
                "nodes": [self.observed.num_nodes, int(self.observed.edge_index.shape[1])],
                "format": 2,  # 2: the teacher of lowest validation loss
            }
        )
        cached = cache_root() / "graph_teachers" / key
        if spec.checkpoint is not None:
            load_weights(gnn, spec.checkpoint, "teacher")
            self.sources[seed], self.seconds[seed] = "checkpoint", 0.0
        elif spec.train.cache and (hit := read_teacher_cache(cached)) is not None:
            load_weights(gnn, hit[0], "teacher")
            self.sources[seed], self.seconds[seed] = "cache", float(hit[1]["train_seconds"])
            self.epochs[seed] = int(hit[1]["metrics"].get("selected_epoch", 0))
        else:
            self.seconds[seed], self.epochs[seed] = self._train(gnn, teacher_seed)
            self.sources[seed] = "trained"
        gnn.cpu().eval().requires_grad_(False)
        with torch.inference_mode():
            observed = gnn(self.observed.features, self.observed.edge_index)
            # Held-out nodes are classified with the whole graph (a GNN reaches their edges at inference).
            full = (
                gnn(self.full.features, self.full.edge_index)
                if self.data.setting == "inductive"
                else observed
            )
        data = self.data
        self.logits[seed] = observed.clone()
        self.test_logits[seed] = full[data.test_nodes].clone()
        labels = self.full.labels
        metrics = {
            "accuracy": accuracy(self.test_logits[seed], labels[data.test_nodes]),
            "val_accuracy": accuracy(observed[data.obs_val], self.observed.labels[data.obs_val]),
            "train_accuracy": accuracy(observed[data.obs_train], self.observed.labels[data.obs_train]),
            # How soft the targets are: the mean largest probability over the observed nodes.
            "confidence": float(observed.softmax(-1).max(-1).values.mean()),
            "selected_epoch": float(self.epochs.get(seed, 0)),
        }
        if data.setting == "inductive":
            metrics["observed_test_accuracy"] = accuracy(
                observed[data.obs_test], self.observed.labels[data.obs_test]
            )
        self.metrics[seed] = metrics
        self.models[seed] = gnn
        if self.sources[seed] == "trained" and spec.train.cache:
            info = TeacherInfo("trained", count_parameters(gnn), metrics, self.seconds[seed], [])
            write_teacher_cache(cached, gnn, info, spec)

    def _train(self, gnn: nn.Module, seed: int) -> tuple[float, int]:
        """Full-batch cross-entropy on the labelled nodes; the weights of the epoch of lowest validation
        cross-entropy kept (the later one on a tie). GLNN's and FF-G2M's code keep the best validation
        accuracy instead; on Cora that is at times an epoch-5-to-10 teacher whose logits are ~0.03 in size (a
        GCN classifies well long before its logits grow): a near-uniform soft target that stalled FF-G2M on
        one seed of our first run (41% test accuracy). The lowest loss picks a calibrated teacher."""
        spec: TeacherSpec = self.recipe.teacher  # type: ignore[assignment]
        model = WholeGraph(gnn, self.observed.features, self.observed.edge_index)
        train = self.data.obs_train
        labels = self.observed.labels
        best: dict[str, Any] = {"loss": float("inf"), "state": None, "epoch": 0, "calls": 0}
        val = self.data.obs_val

        @torch.inference_mode()
        def keep_best(student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
            was_training = student.training
            student.eval()
            logits = student(torch.arange(self.observed.num_nodes, device=student.features.device)).cpu()
            student.train(was_training)
            loss = float(F.cross_entropy(logits[val], labels[val]))
            best["calls"] += 1
            metrics = {"val_accuracy": accuracy(logits[val], labels[val]), "val_loss": loss}
            metrics["accuracy"] = metrics["val_accuracy"]  # fit's best-epoch key; the selection happens here
            if loss <= best["loss"]:
                best.update(loss=loss, state=copy.deepcopy(gnn.state_dict()), epoch=best["calls"])
            return metrics

        started = time.perf_counter()
        fit(
            model,
            TensorDataset(train, labels[train]),
            objectives=["cross_entropy"],
            optimizer=optimizer_config(spec.train.optimizer),
            schedule=schedule_config(spec.train.schedule, 1),
            evaluator=keep_best,
            epochs=spec.train.epochs,
            batch_size=int(train.numel()),  # full batch: one optimizer step per epoch
            seed=seed,
            progress=self.progress,
            tensorboard=False,
            device=self.recipe.trainer.device,
            label=f"teacher seed {seed}",
        )
        if best["state"] is not None:
            gnn.load_state_dict(best["state"])
        return time.perf_counter() - started, int(best["epoch"])

    def info(self) -> TeacherInfo:
        """One `TeacherInfo` for the run: metrics averaged over the seeds' teachers (each in `extra`)."""
        seeds = sorted(self.metrics)
        keys = set.intersection(*(set(self.metrics[s]) for s in seeds))
        mean = {k: sum(self.metrics[s][k] for s in seeds) / len(seeds) for k in sorted(keys)}
        sources = {self.sources[s] for s in seeds}
        source = sources.pop() if len(sources) == 1 else "cache"
        parameters = count_parameters(self.models[seeds[0]])
        return TeacherInfo(source, parameters, mean, sum(self.seconds.values()), [])


class GraphTask(Task):
    name = "graph"

    def claims(self, recipe: Recipe) -> bool:
        name = recipe.data.name
        return name in DATASETS and DATASETS.entry(name).extra.get("kind") == "graph"

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if not self.claims(recipe):
            graphs = [e.name for e in DATASETS if e.extra.get("kind") == "graph"]
            raise UserError(
                f"task 'graph' needs a graph data set ({', '.join(graphs)}), not '{recipe.data.name}'"
            )
        teacher = recipe.teacher
        if teacher is None or teacher.name is None or teacher.cache is not None:
            raise UserError(
                "task 'graph' needs a GNN teacher by name (gcn, graphsage, gat), not a teacher cache"
            )
        if not is_graph_model(teacher.name):
            raise UserError(
                f"task 'graph': the teacher must be a GNN (gcn, graphsage, gat), not '{teacher.name}'"
            )
        if is_graph_model(recipe.student.name):
            raise UserError(
                "task 'graph': the student reads node features alone (an mlp), not the GNN "
                f"'{recipe.student.name}'"
            )

    def prepare(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> TaskSetup:
        data = build_data(recipe.data.name, **recipe.data.params)
        assert isinstance(data, GraphSplits)
        # A bad student is refused before the teachers train; the probe decides the rows' layout.
        sparse = accepts_sparse(self.build_student(recipe, TaskSetup(data, data.train)), data.train.features)
        console.print(f"[bold]{recipe.name}[/] -> {folder.path}\n{data.description}")
        teachers = GraphTeachers(recipe, data, progress)
        for seed in recipe.seeds:
            teachers.prepare(seed)
        evaluator = StudentEvaluator(data, sparse)
        return TaskSetup(
            data,
            NodeBatches(data.train, sparse),
            None,
            teachers.info(),
            bare_teacher=teachers.models[recipe.seeds[0]],
            fit_settings={"evaluator": evaluator},
            extra={"teachers": teachers, "evaluator": evaluator},
        )

    def build_student(self, recipe: Recipe, setup: TaskSetup) -> nn.Module:
        data = setup.data
        student = build_model(
            recipe.student.name,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            **recipe.student.params,
        )
        if recipe.student.checkpoint is not None:
            load_weights(student, recipe.student.checkpoint, "student")
        return student

    def plan_method(
        self, recipe: Recipe, method: MethodSpec, setup: TaskSetup, folder: RunFolder
    ) -> MethodPlan:
        teachers: GraphTeachers = setup.extra["teachers"]
        evaluator: StudentEvaluator = setup.extra["evaluator"]
        edges = teachers.observed.edge_index
        nodes = teachers.observed.num_nodes

        def start(student: nn.Module, seed: int, terms: list[Term]) -> SeedPlan:
            evaluator.use(teachers.test_logits[seed])
            bound = []
            for term in terms:
                if isinstance(term.objective, str):
                    objective = build_objective(term.objective, term.params)
                    if isinstance(objective, GraphObjective):
                        label = term.label or term.objective
                        term = Term(
                            objective.attach_graph(edges, nodes), term.weight, None, term.warmup_epochs, label
                        )
                bound.append(term)
            return SeedPlan(setup.train_set, NodeLogitsTeacher(teachers.logits[seed]), bound)

        return MethodPlan(setup.train_set, start=start)

    def finish_seed(self, recipe: Recipe, method: MethodSpec, result: FitResult, setup: TaskSetup) -> None:
        result.final.update(select_by_validation(result.history))

    def describe(self, metrics: dict[str, float]) -> str:
        line = f"test accuracy {metrics.get('accuracy', float('nan')):.4f}"
        if "selected_accuracy" in metrics:
            line += f", at the best validation epoch {metrics['selected_accuracy']:.4f}"
            line += f" (epoch {int(metrics['selected_epoch'])})"
        elif "val_accuracy" in metrics:
            line += f", validation {metrics['val_accuracy']:.4f}"
        return line

    def latency(self, recipe: Recipe, setup: TaskSetup, student: nn.Module) -> dict[str, float]:
        if not recipe.evaluation.latency:
            return {}
        teachers: GraphTeachers = setup.extra["teachers"]
        return measure_latency(student, teachers.models[recipe.seeds[0]], setup.data)

    def result_extra(self, setup: TaskSetup) -> dict[str, Any]:
        teachers: GraphTeachers = setup.extra["teachers"]
        data: GraphSplits = setup.data
        return {
            "setting": data.setting,
            "teachers": {
                seed: {
                    "metrics": teachers.metrics[seed],
                    "source": teachers.sources[seed],
                    "seconds": teachers.seconds[seed],
                }
                for seed in sorted(teachers.metrics)
            },
        }

    def write_report(self, result: ExperimentResult) -> Path:
        from distill.tasks.graph_report import write_graph_report

        return write_graph_report(result)

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        from distill.tasks.graph_report import print_graph_table

        print_graph_table(result, console)


def gnn_depth(gnn: nn.Module) -> int:
    layers = getattr(gnn, "layers", None)
    return len(layers) if layers is not None else 2


def measure_latency(
    student: nn.Module, gnn: nn.Module, data: GraphSplits, repeats: int = 20
) -> dict[str, float]:
    """Median seconds per call on the CPU, every model on dense features: the MLP on the test nodes'
    features; the GNN on the same nodes with their neighbourhood extracted in the call, and over the whole
    graph; and both for one node."""
    assert data.graph is not None
    graph = data.graph
    nodes = data.test_nodes
    student, gnn = student.cpu().eval(), gnn.cpu().eval()
    hood = Neighbourhood(gnn, graph.features, graph.edge_index, gnn_depth(gnn))
    whole = WholeGraph(gnn, graph.features, graph.edge_index, sparse=False)  # dense, as the MLP's rows
    one = nodes[:1]
    with torch.inference_mode():
        return {
            "batch": float(nodes.numel()),
            "student": latency_per_batch(student, graph.features[nodes], repeats=repeats),
            "teacher": latency_per_batch(hood, nodes, repeats=repeats),
            "teacher_whole_graph": latency_per_batch(whole, nodes, repeats=repeats),
            "student_one": latency_per_batch(student, graph.features[one], repeats=repeats),
            "teacher_one": latency_per_batch(hood, one, repeats=repeats),
        }


TASKS.add(
    "graph",
    GraphTask,
    summary="node classification: GNN teacher, MLP student on node features (GLNN, FF-G2M)",
)

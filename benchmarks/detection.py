"""CLoCKDistill (S27) on a small DETR: memory distillation with location-aware weights and logit distillation
on target-aware queries, against Hungarian-matched logit KD and the student alone.

"CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs" (Lan and Tian, 2025).
Everything is made and trained here, on one CPU thread:

- data: synthetic shapes (`distill.data.detection`: squares, discs, triangles, 1-4 per 64 x 64 canvas),
  train / validation / test drawn from seed 0;
- teacher: transformers' DETR (`distill.models.detr.SmallDetr`), d 128, 4 encoder / 4 decoder layers,
  trained once per run with DETR's set loss and DN-DETR's denoising task, cached under
  $DISTILL_CACHE/bench-detection/ (`distill.io.cache_root`) keyed by its settings;
- students (d 64, 2 / 2 layers), each from the same initialisation per seed, the same steps and batches:
  `alone` (DETR loss + denoising), `logit KD` (+ KL and box terms on Hungarian-matched student / teacher
  query pairs), `CLoCKDistill` (+ location-aware memory distillation + KD on target-aware queries).
  The teacher's outputs on the training set are computed once (no augmentation: they never change).
- loss weights chosen on the validation split (seed 0, `--sweep` lists the candidates), then 3 seeds,
  mean +- std of test mAP and mAP@50 (COCO mAP by pycocotools' COCOeval), parameters and CPU ms per image.

    python benchmarks/detection.py           # -> benchmarks/results/detection.md and detection.png
    python benchmarks/detection.py --quick   # tiny sets and a few steps, under a minute
                                             # -> benchmarks/results/detection_quick.md (not over the full)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from distill.data.detection import CLASSES, DetectionSet, detection_splits
from distill.errors import UserError
from distill.io import cache_root
from distill.losses.detection import location_weights, memory_distillation_loss, paired_query_kd
from distill.models.detr import (
    STUDENT_SIZE,
    TEACHER_SIZE,
    Decoded,
    DetrSize,
    SmallDetr,
    denoising_loss,
    hungarian_pairs,
    pad_targets,
    predictions,
)
from distill.tables import (
    BETTER,
    WITHIN_NOISE,
    WORSE,
    gain_and_spread,
    markdown_table,
    mean_std,
    noise_verdict,
    pm,
    rich_table,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

METHODS = ("alone", "logit KD", "CLoCKDistill")


@dataclass(frozen=True)
class Settings:
    """Everything that decides a run."""

    train: int = 2000
    validation: int = 300
    test: int = 500
    teacher: DetrSize = TEACHER_SIZE
    student: DetrSize = STUDENT_SIZE
    teacher_steps: int = 4000
    student_steps: int = 800
    batch: int = 16
    lr: float = 1e-3
    clip: float = 1.0
    # loss weights, chosen on validation mAP (seed 0) among SWEEP
    logit_weight: float = 1.0
    memory_weight: float = 1.0
    query_weight: float = 1.0
    alpha: float = 1.0  # foreground weight of the memory loss (location_weights)
    beta: float = 0.5  # background weight
    temperature: float = 1.0
    seeds: int = 3
    sweep: bool = True

    def key(self, *names: str) -> str:
        chosen = {n: getattr(self, n) for n in names}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:12]


QUICK = Settings(
    train=96,
    validation=32,
    test=48,
    teacher=DetrSize(d_model=32, layers=1, channels=(8, 16), queries=6),
    student=DetrSize(d_model=16, layers=1, channels=(8, 8), queries=6),
    teacher_steps=8,
    student_steps=4,
    batch=16,
    seeds=2,
)

# candidates tried on the validation split with seed 0 (the full run's sweep)
SWEEP = {
    "logit KD": [{"logit_weight": 1.0}, {"logit_weight": 3.0}],
    "CLoCKDistill": [
        {"memory_weight": 1.0, "query_weight": 1.0},
        {"memory_weight": 4.0, "query_weight": 1.0},
    ],
}
TEACHER_KEY = ("train", "teacher", "teacher_steps", "batch", "lr")


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TeacherTargets:
    """The teacher's outputs on every training image: memory + position, learned-query predictions and
    target-aware-query predictions (padded to the set's largest object count)."""

    memory: Tensor
    logits: Tensor
    boxes: Tensor
    query_logits: Tensor
    query_boxes: Tensor


def batches(count: int, batch: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """`steps` index batches over shuffled epochs (the same for every method of a seed)."""
    out: list[Tensor] = []
    while len(out) < steps:
        out += [b for b in torch.randperm(count, generator=generator).split(batch) if len(b) == batch]
    return out[:steps]


def train_detector(
    model: nn.Module,
    data: DetectionSet,
    settings: Settings,
    steps: int,
    seed: int,
    extra: Any = None,
) -> list[float]:
    """AdamW (lr warm-up 50 steps then cosine, weight decay 1e-4, gradient clip `settings.clip`); the loss is
    DETR's set loss + the denoising task + `extra(index, images, encoded, decoded, padded)` when given.
    Returns the total loss every 10% of training."""
    import math

    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=1e-4)
    warm = min(50, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    detector = model.detector if isinstance(model, Distilled) else model
    curve, running = [], []
    model.train()
    for step, index in enumerate(batches(len(data), settings.batch, steps, generator)):
        images, targets = data.images[index], data.targets(index)
        padded = pad_targets(targets)
        encoded, decoded = detector(images)
        loss = detector.detection_loss(decoded, targets) + denoising_loss(
            detector, encoded, padded, generator
        )
        if extra is not None:
            loss = loss + extra(index, images, encoded, decoded, padded)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, settings.clip)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            curve.append(sum(running) / len(running))
            running = []
    model.eval()
    return curve


class Distilled(nn.Module):
    """A student detector and the learned map of its memory to the teacher's width (dropped after
    training)."""

    def __init__(self, detector: SmallDetr, teacher_width: int) -> None:
        super().__init__()
        self.detector = detector
        self.memory_map = nn.Linear(detector.d_model, teacher_width)


@torch.no_grad()
def teacher_targets(teacher: SmallDetr, data: DetectionSet, chunk: int = 100) -> TeacherTargets:
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("memory", "logits", "boxes", "query_logits", "query_boxes")
    }
    padded_all = pad_targets(data.targets(range(len(data))))
    for start in range(0, len(data), chunk):
        index = torch.arange(start, min(start + chunk, len(data)))
        encoded, decoded = teacher(data.images[index])
        labels, boxes, mask = padded_all.labels[index], padded_all.boxes[index], padded_all.mask[index]
        aware = teacher.decode(encoded, *teacher.target_queries(labels, boxes), mask)
        parts["memory"].append(encoded.memory + encoded.position)
        parts["logits"].append(decoded.logits)
        parts["boxes"].append(decoded.boxes)
        parts["query_logits"].append(aware.logits)
        parts["query_boxes"].append(aware.boxes)
    return TeacherTargets(**{k: torch.cat(v) for k, v in parts.items()})


def logit_kd_term(settings: Settings, targets: TeacherTargets) -> Any:
    """Hungarian-matched logit KD: every student query paired with a teacher query (matching_cost), KL on
    classes, box L1 + GIoU weighted by the teacher's object probability."""

    def extra(index: Tensor, images: Tensor, encoded: Any, decoded: Decoded, padded: Any) -> Tensor:
        teacher = Decoded(
            targets.logits[index],
            targets.boxes[index],
            targets.logits[index][None],
            targets.boxes[index][None],
        )
        losses = []
        for i, (rows, cols) in enumerate(hungarian_pairs(decoded, teacher)):
            t_logits = teacher.logits[i, cols]
            objectness = 1 - t_logits.softmax(-1)[:, -1]
            losses.append(
                paired_query_kd(
                    decoded.logits[i, rows],
                    t_logits,
                    decoded.boxes[i, rows],
                    teacher.boxes[i, cols],
                    box_weights=objectness,
                    temperature=settings.temperature,
                )
            )
        return settings.logit_weight * torch.stack(losses).mean()

    return extra


def clock_term(settings: Settings, student: Distilled, targets: TeacherTargets) -> Any:
    """CLoCKDistill: location-aware memory loss on (memory + position), and KD on target-aware queries."""
    detector = student.detector

    def extra(index: Tensor, images: Tensor, encoded: Any, decoded: Decoded, padded: Any) -> Tensor:
        height, width = encoded.grid
        boxes = [padded.boxes[i][padded.mask[i]] for i in range(len(index))]
        weights = location_weights(boxes, height, width, settings.alpha, settings.beta)
        mapped = student.memory_map(encoded.memory + encoded.position)
        memory = memory_distillation_loss(mapped, targets.memory[index], weights)
        aware = detector.decode(encoded, *detector.target_queries(padded.labels, padded.boxes), padded.mask)
        k = padded.mask.shape[1]
        mask = padded.mask
        t_logits, t_boxes = targets.query_logits[index][:, :k], targets.query_boxes[index][:, :k]
        queries = paired_query_kd(
            aware.logits[mask],
            t_logits[mask],
            aware.boxes[mask],
            t_boxes[mask],
            temperature=settings.temperature,
        )
        return settings.memory_weight * memory + settings.query_weight * queries

    return extra


# ------------------------------------------------------------------------------------------------ evaluation
def coco_map(preds: list[dict[str, Tensor]], truths: list[dict[str, Tensor]], size: int) -> dict[str, float]:
    """COCO mAP (IoU 0.50:0.95) and mAP@50 by pycocotools' COCOeval, the reference implementation that
    torchmetrics' `MeanAveragePrecision` calls (torchmetrics' class needs torchvision, not installed here).
    Boxes (x0, y0, x1, y1) in [0, 1] are scaled to pixels of a `size` canvas."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: Tensor) -> list[float]:
        x0, y0, x1, y1 = (size * box).tolist()
        return [x0, y0, x1 - x0, y1 - y0]

    images, annotations, detections = [], [], []
    for image_id, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
        images.append({"id": image_id, "width": size, "height": size})
        for box, label in zip(truth["boxes"], truth["labels"], strict=True):
            x, y, w, h = xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"], strict=True):
            detections.append(
                {"image_id": image_id, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth_set = COCO()
        truth_set.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate(CLASSES)],
        }
        truth_set.createIndex()
        found = truth_set.loadRes(detections) if detections else COCO()
        evaluation = COCOeval(truth_set, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": max(0.0, float(evaluation.stats[0])), "map_50": max(0.0, float(evaluation.stats[1]))}


@torch.no_grad()
def evaluate(detector: SmallDetr, data: DetectionSet, chunk: int = 100) -> dict[str, float]:
    """COCO mAP (IoU 0.50:0.95) and mAP@50 of every query's box (`coco_map`), and CPU ms per image."""
    from distill.losses.detection import box_corners

    detector.eval()
    preds, truths = [], []
    cpu = 0.0
    for start in range(0, len(data), chunk):
        index = torch.arange(start, min(start + chunk, len(data)))
        started = time.process_time()
        _, decoded = detector(data.images[index])
        cpu += time.process_time() - started
        preds += predictions(decoded)
        truths += [
            {"boxes": box_corners(t["boxes"]), "labels": t["class_labels"]} for t in data.targets(index)
        ]
    return {**coco_map(preds, truths, data.images.shape[-1]), "ms": 1e3 * cpu / len(data)}


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Row:
    name: str
    params: int
    map: list[float] = field(default_factory=list)
    map_50: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)


def train_student(
    method: str, settings: Settings, seed: int, data: DetectionSet, targets: TeacherTargets | None
) -> tuple[SmallDetr, list[float]]:
    torch.manual_seed(100 + seed)  # the same initialisation for every method of a seed
    detector = SmallDetr(settings.student, len(CLASSES))
    if method == "alone":
        return detector, train_detector(detector, data, settings, settings.student_steps, seed)
    assert targets is not None
    if method == "logit KD":
        return detector, train_detector(
            detector, data, settings, settings.student_steps, seed, logit_kd_term(settings, targets)
        )
    student = Distilled(detector, settings.teacher.d_model)
    curve = train_detector(
        student, data, settings, settings.student_steps, seed, clock_term(settings, student, targets)
    )
    return detector, curve


def load_or_train_teacher(
    settings: Settings, data: DetectionSet, use_cache: bool, console: Console
) -> tuple[SmallDetr, str]:
    torch.manual_seed(0)
    teacher = SmallDetr(settings.teacher, len(CLASSES))
    path = cache_root() / "bench-detection" / f"teacher-{settings.key(*TEACHER_KEY)}.pt"
    if use_cache and path.is_file():
        payload = torch.load(path, weights_only=True)
        teacher.load_state_dict(payload["state"])
        note = f"reused from cache ({payload['cpu_seconds']:.0f} s CPU to train)"
        return teacher.eval().requires_grad_(False), note
    started = time.process_time()
    curve = train_detector(teacher, data, settings, settings.teacher_steps, seed=0)
    cpu = time.process_time() - started
    console.print(f"teacher trained: {cpu:.0f} s CPU, loss {curve[0]:.2f} -> {curve[-1]:.2f}")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": teacher.state_dict(), "cpu_seconds": cpu}, tmp)
        tmp.replace(path)
    return teacher.eval().requires_grad_(False), f"trained in this run ({cpu:.0f} s CPU)"


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.detr.parameters())


# Data and teacher targets for the student jobs; worker processes inherit them by fork.
SHARED: dict[str, Any] = {}


def student_job(job: tuple[str, dict[str, float], int]) -> dict[str, Any]:
    """Train one student (method, loss-weight overrides, seed) and measure it on validation and test."""
    torch.set_num_threads(1)
    method, overrides, seed = job
    settings = replace(SHARED["settings"], **overrides)
    data = SHARED["data"]
    detector, curve = train_student(method, settings, seed, data["train"], SHARED["targets"])
    return {
        "validation": evaluate(detector, data["validation"]),
        "test": evaluate(detector, data["test"]),
        "curve": curve,
        "params": count(detector),
    }


def run_jobs(jobs: list[tuple[str, dict[str, float], int]], processes: int) -> list[dict[str, Any]]:
    """`student_job` over `jobs`, in `processes` forked processes (one thread each) when above 1."""
    if processes <= 1 or len(jobs) <= 1:
        return [student_job(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(min(processes, len(jobs))) as pool:
        return pool.map(student_job, jobs, chunksize=1)


def candidate_text(candidate: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in candidate.items())


def run(
    settings: Settings, use_cache: bool, console: Console, processes: int = 1
) -> tuple[list[Row], dict[str, Any], Settings]:
    started = time.perf_counter()
    data = detection_splits(0, settings.train, settings.validation, settings.test)
    teacher, teacher_note = load_or_train_teacher(settings, data["train"], use_cache, console)
    teacher_row = Row("teacher", count(teacher))
    scores = evaluate(teacher, data["test"])
    teacher_row.map.append(scores["map"])
    teacher_row.map_50.append(scores["map_50"])
    teacher_row.ms.append(scores["ms"])
    teacher_val = evaluate(teacher, data["validation"])["map"]
    console.print(f"teacher: test mAP {100 * scores['map']:.2f}, mAP@50 {100 * scores['map_50']:.2f}")
    SHARED.update(settings=settings, data=data, targets=teacher_targets(teacher, data["train"]))

    # phase 1: the sweep's candidates (seed 0) and the students alone (every seed); phase 2: the chosen
    # weights for the other seeds. The chosen candidate's seed-0 student is its seed-0 row.
    sweep = SWEEP if settings.sweep else {m: [{}] for m in METHODS if m != "alone"}
    first = [(m, c, 0) for m, candidates in sweep.items() for c in candidates]
    first += [("alone", {}, seed) for seed in range(settings.seeds)]
    results = dict(zip(range(len(first)), run_jobs(first, processes), strict=True))
    chosen: dict[str, dict[str, float]] = {}
    sweep_lines = []
    for method, candidates in sweep.items():
        scored = [
            (results[first.index((method, c, 0))]["validation"]["map"], i) for i, c in enumerate(candidates)
        ]
        chosen[method] = candidates[max(scored, key=lambda pair: (pair[0], -pair[1]))[1]]  # ties: the first
        if settings.sweep:
            sweep_lines += [[method, candidate_text(candidates[i]), f"{100 * v:.2f}"] for v, i in scored]
    second = [(m, chosen[m], seed) for m in chosen for seed in range(1, settings.seeds)]
    later = dict(zip(range(len(second)), run_jobs(second, processes), strict=True))
    for overrides in chosen.values():
        settings = replace(settings, **overrides)

    rows = [Row(m, 0) for m in METHODS]
    for row in rows:
        for seed in range(settings.seeds):
            if row.name == "alone":
                result = results[first.index(("alone", {}, seed))]
            elif seed == 0:
                result = results[first.index((row.name, chosen[row.name], 0))]
            else:
                result = later[second.index((row.name, chosen[row.name], seed))]
            row.params = result["params"]
            row.map.append(result["test"]["map"])
            row.map_50.append(result["test"]["map_50"])
            row.ms.append(result["test"]["ms"])
            row.curves.append(result["curve"])
            console.print(
                f"seed {seed} {row.name}: test mAP {100 * result['test']['map']:.2f}, "
                f"mAP@50 {100 * result['test']['map_50']:.2f}"
            )
    extra = {
        "teacher_note": teacher_note,
        "teacher_validation_map": teacher_val,
        "sweep": sweep_lines,
        "wall_seconds": time.perf_counter() - started,
        "objects": sum(len(b) for b in data["test"].labels),
        "processes": processes,
    }
    return [teacher_row, *rows], extra, settings


# ------------------------------------------------------------------------------------------------ report
HEADERS = ["model", "params", "test mAP", "test mAP@50", "mAP - alone", "ms / image (CPU)"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    alone = next(r for r in rows if r.name == "alone")
    out = []
    for row in rows:
        gain = (
            "-"
            if row is alone or row.name == "teacher"
            else f"{100 * (mean_std(row.map)[0] - mean_std(alone.map)[0]):+.2f}"
        )
        out.append(
            [row.name, f"{row.params:,}", pm(row.map, 100), pm(row.map_50, 100), gain, pm(row.ms, digits=2)]
        )
    return out


CLAIMS = {BETTER: "reproduced", WORSE: "not reproduced (worse)", WITHIN_NOISE: "within noise"}


WEAK_TEACHER = 0.10  # test mAP@50 below which the teacher is not clearly better than chance here


def verdict_lines(rows: list[Row]) -> list[str]:
    by = {r.name: r for r in rows}
    lines = []
    if mean_std(by["teacher"].map_50)[0] < WEAK_TEACHER:
        lines.append(
            "- **The teacher is not clearly better than chance** (test mAP@50 below "
            f"{100 * WEAK_TEACHER:.0f}%): "
            "DETR had not converged in this CPU budget, so the rows below do not test the paper's claims; "
            "the verdicts are reported as measured."
        )
    for method, base in (("CLoCKDistill", "alone"), ("CLoCKDistill", "logit KD"), ("logit KD", "alone")):
        gain, spread = gain_and_spread(by[method].map, by[base].map, 100)
        lines.append(
            f"- {method} against {base}: mAP {gain:+.2f} points (seed spread {spread:.2f}): "
            f"**{noise_verdict(gain, spread)}**."
        )
    gain, spread = gain_and_spread(by["CLoCKDistill"].map, by["alone"].map, 100)
    verdict = noise_verdict(gain, spread)
    claim = CLAIMS.get(verdict, "-")
    gain_kd, spread_kd = gain_and_spread(by["CLoCKDistill"].map, by["logit KD"].map, 100)
    claim_kd = CLAIMS.get(noise_verdict(gain_kd, spread_kd), "-")
    lines += [
        f"- Paper's claim 1 (CLoCKDistill raises the student's mAP, by 2.2 to 6.4 points on KITTI / COCO): "
        f"**{claim}** here ({gain:+.2f} points).",
        f"- Paper's claim 2 (it beats logit-only DETR distillation): **{claim_kd}** here "
        f"({gain_kd:+.2f} points).",
    ]
    return lines


def document(
    settings: Settings, rows: list[Row], extra: dict[str, Any], argv: list[str] | None, figure: str
) -> str:
    t, s = settings.teacher, settings.student
    sweep_text = (
        markdown_table(["method", "candidate", "validation mAP (seed 0)"], extra["sweep"]).rstrip()
        if extra["sweep"]
        else "(no sweep in this run: the default weights)"
    )
    lines = [
        "# Detection: CLoCKDistill on a small DETR",
        "",
        f"Command: `{command_line('detection', argv)}`",
        "",
        f"Data: synthetic shapes (`distill.data.detection`, seed 0): {settings.train} train / "
        f"{settings.validation} validation / {settings.test} test canvases of 64 x 64, 1-4 objects of "
        f"{len(CLASSES)} classes ({', '.join(CLASSES)}); {extra['objects']} test objects.",
        "",
        f"- Teacher: transformers' DETR, d {t.d_model}, {t.layers} encoder / {t.layers} decoder layers, "
        "ResNet "
        f"stages {list(t.channels)}, {t.queries} queries; {settings.teacher_steps} steps of batch "
        f"{settings.batch}, {extra['teacher_note']}; validation mAP "
        f"{100 * extra['teacher_validation_map']:.2f}.",
        f"- Students: d {s.d_model}, {s.layers} / {s.layers} layers, ResNet stages {list(s.channels)}, "
        f"{settings.student_steps} steps of batch {settings.batch}, AdamW lr {settings.lr:g}; the same "
        "initialisation and batches for every method of a seed. Every model (teacher too) trains with DETR's "
        "set loss (auxiliary losses on every decoder layer) plus DN-DETR's denoising task.",
        "- logit KD: Hungarian-matched pairs of student / teacher queries, weight "
        f"{settings.logit_weight:g}, "
        f"temperature {settings.temperature:g}. CLoCKDistill: memory weight {settings.memory_weight:g} "
        f"(alpha {settings.alpha:g}, beta {settings.beta:g}), target-aware query KD weight "
        f"{settings.query_weight:g}. Weights chosen on validation mAP (the chosen candidate's seed-0 student "
        "is also its seed-0 row below):",
        "",
        sweep_text,
        "",
        f"Test set, {settings.seeds} seeds, mean ± std (teacher: one model). mAP is COCO mAP by "
        "pycocotools' COCOeval "
        "(IoU 0.50:0.95, all queries scored by their best class); ms / image is CPU time of the forward pass "
        "on one thread, batches of 100. Last epoch's model (no checkpoint selection).",
        "",
        markdown_table(HEADERS, table_rows(rows)).rstrip(),
        "",
        *verdict_lines(rows),
        "",
        f"Run wall time: {extra['wall_seconds'] / 60:.1f} min on the shared 2-core machine, "
        f"{extra['processes']} student(s) at a time. Plot: {figure}.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r.name for r in rows]
    for axis, key, title in ((axes[0], "map", "test mAP (%)"), (axes[1], "map_50", "test mAP@50 (%)")):
        means = [100 * mean_std(getattr(r, key))[0] for r in rows]
        stds = [100 * mean_std(getattr(r, key))[1] for r in rows]
        axis.bar(
            names, means, yerr=stds, capsize=4, color=["#777", "#4c72b0", "#dd8452", "#55a868"][: len(rows)]
        )
        axis.set_title(title)
        for i, value in enumerate(means):
            axis.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sets and models, a few steps (under a minute)"
    )
    parser.add_argument("--no-cache", action="store_true", help="train the teacher again, cache nothing")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default 3, quick 2)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the validation sweep (default weights)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="students trained at once, in forked processes of one thread each"
    )
    parser.add_argument("--out", type=Path, default=None, help=out_help("detection"))
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.seeds is not None:
        settings = replace(settings, seeds=args.seeds)
    if args.no_sweep:
        settings = replace(settings, sweep=False)
    default = QUICK if args.quick else Settings()
    partial = settings.seeds != default.seeds or settings.sweep != default.sweep
    out = output_file(parser, "detection", args.out, quick=args.quick, partial=partial)
    if settings.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    torch.set_num_threads(1)
    console = Console()
    try:
        rows, extra, settings = run(
            settings, use_cache=not (args.quick or args.no_cache), console=console, processes=args.jobs
        )
    except UserError as err:
        console.print(f"error: {err}", style="red")
        return 2
    console.print(rich_table("CLoCKDistill on a small DETR", HEADERS, table_rows(rows)))
    write_results(out, document(settings, rows, extra, argv, out.with_suffix(".png").name))
    plot(rows, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

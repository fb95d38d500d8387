"""BOOT (S15): a one-step generator distilled data-free from a class-conditional diffusion teacher, on MNIST.

"BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping" (Gu et al., 2023). Everything
is trained here, on the CPU, from the shared MNIST copy (../shared/data/images/mnist_t10k, the 10k test split
of MNIST, divided 70% train / 10% validation / 20% held-out test, stratified, seed 0):

1. an evaluation classifier (LeNet-like, conv 32-64, 64 hidden units) on the train split, its epoch chosen
   on the validation split; its 64 hidden features give the classifier-based Frechet distance (FD), its
   labels the per-class precision (the fraction of samples generated for class c that it labels c);
2. the teacher: diffusers' `UNet2DModel` (class-conditional, widths 16-32-32), v-prediction on a cosine
   schedule, trained on the train split with an EMA of its weights (`distill.models.diffusion`);
3. the student: the same network read as `g(eps, t, class)` (`SignalGenerator`), initialised with the
   teacher's weights and trained by BOOT's bootstrapping loss (`distill.losses.boot`) on noise alone: no
   image is read, the teacher is the only signal.

Rows: the teacher's deterministic DDIM sampler (diffusers) at 1, 10, 25 and 50 steps, the BOOT generator
(one network evaluation), and real validation images (the FD's floor at this sample size). Each row: FD
against the held-out test images, the mean per-class precision, and the generation time per image (CPU time
of the process, one thread); mean ± std over 3 sampling seeds (the same noise for every sampler of a seed)
and, for BOOT, over its training seeds. The teacher and the classifier are trained once and cached under
runs/bench_cache/generative/ (gitignored), keyed by their settings; the BOOT students and the teacher's
samples too.

    python benchmarks/generative.py           # -> benchmarks/results/generative.md and generative.png
    python benchmarks/generative.py --quick   # tiny models, a few steps, under a minute
                                              # -> benchmarks/results/generative_quick.md (not over the full)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from distill.data.image_io import read_idx_pair
from distill.data.paths import data_path
from distill.errors import UserError
from distill.losses.boot import boot_loss, noisy_from_signal, signal_step_size, terminal_signal
from distill.losses.frechet import frechet_distance, gaussian_statistics, per_class_precision
from distill.models.diffusion import (
    SignalGenerator,
    class_conditional_unet,
    ddim_sample,
    ddim_scheduler,
    denoising_loss,
    noise_scheduler,
    predict_x0,
    signal_grid,
)
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, pm, rich_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, write_results  # noqa: E402  (the results-file rule)

CACHE = ROOT / "runs" / "bench_cache" / "generative"
NUM_CLASSES = 10
TEACHER_STEPS = (1, 10, 25, 50)


@dataclass(frozen=True)
class Settings:
    """Everything that decides a run; the cached models are keyed by the parts they depend on."""

    classifier_epochs: int = 5
    classifier_channels: tuple[int, ...] = (32, 64)
    classifier_features: int = 64
    widths: tuple[int, ...] = (16, 32, 32)
    teacher_steps: int = 1500
    teacher_lr: float = 2e-3
    teacher_batch: int = 64
    ema: float = 0.995
    boot_grid: int = 10  # K: BOOT bootstraps along the K-step DDIM trajectory
    boot_steps: int = 600
    boot_lr: float = 3e-4  # of {3e-4, 1e-3}, by FD against the validation images (docs/boot.md)
    boot_batch: int = 64
    boot_seeds: int = 1
    per_class: int = 50  # generated images per class and sampling seed
    sampling_seeds: int = 3
    teacher_rows: tuple[int, ...] = TEACHER_STEPS

    def key(self, *names: str) -> str:
        chosen = {n: getattr(self, n) for n in names}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


QUICK = Settings(
    classifier_epochs=1,
    classifier_channels=(8, 16),
    classifier_features=16,
    widths=(8, 16, 16),
    teacher_steps=20,
    boot_grid=4,
    boot_steps=10,
    boot_lr=1e-3,
    per_class=6,
    sampling_seeds=2,
    teacher_rows=(1, 4),
    boot_batch=32,
    teacher_batch=32,
)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Splits:
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_mnist() -> Splits:
    """The shared MNIST 10k, in [-1, 1], split 70 / 10 / 20 (stratified, seed 0)."""
    arrays = read_idx_pair(data_path("images/mnist_t10k"), "t10k")
    pool, test = arrays.split(0.2, seed=0)
    train, val = pool.split(0.125, seed=0)

    def scaled(part: Any) -> tuple[Tensor, Tensor]:
        return part.images.float() / 127.5 - 1.0, part.labels

    return Splits(scaled(train), scaled(val), scaled(test))


def cached(name: str, key: str, build: Any, use_cache: bool) -> tuple[dict[str, Any], bool]:
    """`{"value": build(), "cpu_seconds": ..., "wall_seconds": ...}` (the cost of building it), saved under
    CACHE as `<name>-<key>.pt` and reused when there; and whether it was reused."""
    path = CACHE / f"{name}-{key}.pt"
    if use_cache and path.is_file():
        return torch.load(path, weights_only=True), True
    cpu, wall = time.process_time(), time.perf_counter()
    value = build()
    payload = {
        "value": value,
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
    return payload, False


def cost(payload: dict[str, Any]) -> str:
    """How long building a cached model took: CPU time (one thread), else wall time on the shared machine."""
    if payload.get("cpu_seconds") is not None:
        return f"{payload['cpu_seconds']:.0f} s CPU"
    return f"{payload['wall_seconds']:.0f} s wall on the shared machine"


# ------------------------------------------------------------------------------------------------ classifier
class DigitClassifier(nn.Module):
    """LeNet-like: two conv-ReLU-maxpool stages (32, 64 channels), a `features`-wide hidden layer, the
    classes. (The zoo's `small_cnn` ends in global average pooling; on this 7k-image split it stayed near
    93% test accuracy, too weak a judge of class precision.)"""

    def __init__(self, channels: tuple[int, ...], features: int) -> None:
        super().__init__()
        first, second = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(second * 49, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def make_classifier(settings: Settings) -> DigitClassifier:
    return DigitClassifier(settings.classifier_channels, settings.classifier_features)


def classifier_features(model: DigitClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of `images` in [-1, 1], in batches."""
    model.eval()
    features, logits = [], []
    with torch.no_grad():
        for batch in images.split(500):
            hidden = model.body(batch)
            features.append(hidden)
            logits.append(model.head(hidden))
    return torch.cat(features), torch.cat(logits)


def train_classifier(settings: Settings, data: Splits) -> dict[str, Tensor]:
    """Adam, batch 128, random shifts of up to 2 pixels; the epoch of best validation accuracy is kept."""
    torch.manual_seed(0)
    model = make_classifier(settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = data.train
    best, best_state = -1.0, None
    for _ in range(settings.classifier_epochs):
        model.train()
        for index in torch.randperm(len(images)).split(128):
            batch = torch.roll(images[index], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = (classifier_features(model, data.val[0])[1].argmax(1) == data.val[1]).float().mean().item()
        if accuracy > best:
            best, best_state = accuracy, copy.deepcopy(model.state_dict())
    assert best_state is not None
    return best_state


# ------------------------------------------------------------------------------------------------ teacher
def make_unet(settings: Settings) -> nn.Module:
    return class_conditional_unet(widths=settings.widths)


def train_teacher(settings: Settings, data: Splits) -> dict[str, Tensor]:
    """Adam (lr warm-up 100 steps, cosine decay), batch 64, uniform timesteps; returns the EMA weights."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    unet, scheduler = make_unet(settings), noise_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=settings.teacher_lr)
    total = settings.teacher_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    images, labels = data.train
    for step in range(total):
        index = torch.randint(0, len(images), (settings.teacher_batch,), generator=generator)
        loss = denoising_loss(unet, scheduler, images[index], labels[index], generator)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), unet.parameters(), strict=True):
                kept.lerp_(live, 1 - decay)
    return ema.state_dict()


# ------------------------------------------------------------------------------------------------ BOOT
def train_boot(settings: Settings, teacher: nn.Module, seed: int) -> tuple[dict[str, Tensor], list[float]]:
    """BOOT's bootstrapping on the K-step DDIM grid (K = settings.boot_grid): for a point k < K drawn
    uniformly, the student's signal at k + 1 (the exact terminal signal when k + 1 = K, the boundary), one
    teacher DDIM step from it, and the loss of `distill.losses.boot` on the student at k. Noise and classes
    only: no image is read. Returns the student's weights and the loss every 10% of training."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    scheduler, sampler = noise_scheduler(), ddim_scheduler(noise_scheduler())
    grid = signal_grid(sampler, settings.boot_grid)
    student = SignalGenerator(copy.deepcopy(teacher).requires_grad_(True), grid.alpha[-1], grid.sigma[-1])
    teacher.requires_grad_(False).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.boot_lr)
    times = grid.student_times
    losses: list[float] = []
    running: list[float] = []
    for step in range(settings.boot_steps):
        batch = settings.boot_batch
        noise = torch.randn((batch, 1, 28, 28), generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        k = torch.randint(0, grid.steps, (batch,), generator=generator)
        t = k + 1
        with torch.no_grad():
            signal_t = student(noise, times[t], labels)
            boundary = t == grid.steps
            signal_t[boundary] = terminal_signal(noise[boundary], grid.alpha[-1], grid.sigma[-1])
            noisy = noisy_from_signal(signal_t, noise, grid.alpha[t], grid.sigma[t])
            teacher_x0 = predict_x0(teacher, scheduler, noisy, grid.timesteps[t], labels)
        delta = signal_step_size(grid.alpha[k], grid.sigma[k], grid.alpha[t], grid.sigma[t])
        loss = boot_loss(student(noise, times[k], labels), signal_t, teacher_x0, delta)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % max(1, settings.boot_steps // 10) == 0:
            losses.append(sum(running) / len(running))
            running = []
    return student.net.state_dict(), losses


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Row:
    name: str
    evaluations: int  # network evaluations per image
    fd: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    ms_per_image: list[float] = field(default_factory=list)
    per_class: list[list[float]] = field(default_factory=list)


def sampling_noise(settings: Settings, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(10_000 + seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.per_class)
    return torch.randn((len(labels), 1, 28, 28), generator=generator), labels


def timed(generate: Any, noise: Tensor, labels: Tensor) -> tuple[Tensor, float]:
    """Images of `generate(noise, labels)` in batches of 250, and the milliseconds per image: CPU time of
    this process on one thread (the machine is shared, so wall time would measure the other jobs too)."""
    started = time.process_time()
    images = torch.cat([generate(n, c) for n, c in zip(noise.split(250), labels.split(250), strict=True)])
    return images.clamp(-1, 1), 1e3 * (time.process_time() - started) / len(noise)


TEACHER_KEY = ("widths", "teacher_steps", "teacher_lr", "teacher_batch", "ema")


def teacher_samples(
    settings: Settings, teacher: nn.Module, seed: int, steps: int, use_cache: bool
) -> tuple[Tensor, float]:
    """The `steps`-step teacher's images for sampling seed `seed` and their CPU ms per image, cached with the
    teacher (they depend on nothing else, so a rerun that changes only BOOT does not sample them again)."""
    noise, labels = sampling_noise(settings, seed)
    sampler = ddim_scheduler(noise_scheduler())

    def generate() -> tuple[Tensor, float]:
        return timed(lambda n, c: ddim_sample(teacher, sampler, n, c, steps), noise, labels)

    key = settings.key(*TEACHER_KEY, "per_class")
    payload, _ = cached(f"samples-teacher{steps}-seed{seed}", key, generate, use_cache)
    return payload["value"]


def score(
    row: Row, images: Tensor, labels: Tensor, classifier: DigitClassifier, reference: tuple[Any, Any]
) -> None:
    features, logits = classifier_features(classifier, images)
    row.fd.append(frechet_distance(*gaussian_statistics(features), *reference))
    precision = per_class_precision(logits.argmax(1), labels, NUM_CLASSES)
    row.per_class.append(precision.tolist())
    row.precision.append(float(precision.nanmean()))


# ------------------------------------------------------------------------------------------------ report
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table_rows(rows: list[Row], boot: Row, reference_25: Row | None) -> list[list[str]]:
    boot_ms = mean_std(boot.ms_per_image)[0]
    out = []
    for row in rows:
        ms = mean_std(row.ms_per_image)[0] if row.ms_per_image else float("nan")
        speedup = f"{ms / boot_ms:.1f}x" if row.ms_per_image and row is not boot else "-"
        fd_vs = ratio(mean_std(row.fd)[0], mean_std(reference_25.fd)[0]) if reference_25 else "-"
        out.append(
            [
                row.name,
                str(row.evaluations) if row.evaluations else "-",
                pm(row.fd, digits=2),
                fd_vs,
                pm(row.precision, 100, digits=1),
                pm(row.ms_per_image, digits=2) if row.ms_per_image else "-",
                speedup,
            ]
        )
    return out


HEADERS = [
    "sampler",
    "evals / image",
    "FD (test)",
    "FD / teacher-25",
    "precision %",
    "ms / image",
    "time / BOOT",
]


def goal_lines(rows: list[Row], boot: Row, grid: int) -> list[str]:
    """The issue's goal and the paper's claims, each answered from the table."""
    by_name = {r.name: r for r in rows}
    teacher_25, teacher_1 = by_name.get("teacher DDIM 25"), by_name.get("teacher DDIM 1")
    if teacher_25 is None or teacher_1 is None:
        return ["- (no 25-step or 1-step teacher row in this run: the goal is not evaluated)"]
    fd_ratio = mean_std(boot.fd)[0] / mean_std(teacher_25.fd)[0]
    speed = mean_std(teacher_25.ms_per_image)[0] / mean_std(boot.ms_per_image)[0]
    met = fd_ratio <= 2 and speed >= 20
    gain, spread = gain_and_spread(teacher_1.fd, boot.fd)
    lines = [
        f"- Goal (BOOT's FD within 2x of the 25-step teacher's, at >= 20x less generation time): "
        f"**{'met' if met else 'not met'}**: BOOT's FD is {fd_ratio:.2f}x the 25-step teacher's, its "
        f"generation {speed:.1f}x faster.",
        f"- Against the teacher's own one-step DDIM sample (same network, same cost): FD lower by "
        f"{gain:.2f} ({noise_verdict(gain, spread)}, spread {spread:.2f}).",
        f"- Paper's claim (one-step quality comparable to the multi-step teacher, data-free): "
        f"{'reproduced' if fd_ratio <= 2 else 'not reproduced'} at this scale, reading 'comparable' as "
        "FD within 2x of the 25-step teacher.",
    ]
    distilled = by_name.get(f"teacher DDIM {grid}")
    if distilled is not None:
        lines.append(
            f"- Against the trajectory it distils (the teacher's {grid}-step DDIM): FD "
            f"{mean_std(boot.fd)[0] / mean_std(distilled.fd)[0]:.2f}x."
        )
    return lines


def document(
    settings: Settings, rows: list[Row], extra: dict[str, Any], argv: list[str] | None, figure: str
) -> str:
    boot = next(r for r in rows if r.name.startswith("BOOT"))
    teacher_25 = next((r for r in rows if r.name == "teacher DDIM 25"), None)
    per_class = [
        [r.name] + [f"{100 * mean_std([p[c] for p in r.per_class])[0]:.0f}" for c in range(NUM_CLASSES)]
        for r in rows
        if r.per_class
    ]
    boot_curve = ", ".join(f"{v:.4f}" for v in extra["boot_losses"][0])
    lines = [
        "# Generative distillation: BOOT, a one-step generator distilled data-free from a diffusion teacher",
        "",
        f"Command: `{command_line('generative', argv)}`",
        "",
        f"Data: {extra['data']}. Everything below was trained in this run (or read from its cache, "
        f"runs/bench_cache/generative/: {extra['cache']}), on one CPU thread.",
        "",
        f"- Evaluation classifier: a LeNet-like CNN (conv {list(settings.classifier_channels)}, hidden "
        f"{settings.classifier_features}), {settings.classifier_epochs} epochs, epoch chosen on validation "
        f"accuracy; test accuracy {100 * extra['classifier_test_accuracy']:.2f}%. FD = Frechet distance "
        f"between "
        f"Gaussians fitted to its {settings.classifier_features} hidden features of the generated images "
        f"and of the {extra['test_images']} held-out test images.",
        f"- Teacher: diffusers UNet2DModel, widths {list(settings.widths)}, {extra['teacher_params']:,} "
        f"parameters, class-conditional, v-prediction, cosine schedule, {settings.teacher_steps} steps of "
        f"batch {settings.teacher_batch}, lr {settings.teacher_lr:g}, EMA {settings.ema} "
        f"(training {extra['teacher_cost']}). Sampled with diffusers' DDIMScheduler "
        "(eta 0, trailing spacing).",
        f"- BOOT: the same network as `g(eps, t, class)`, initialised from the teacher, "
        f"{settings.boot_steps} steps of batch {settings.boot_batch}, Adam lr {settings.boot_lr:g}, on the "
        f"{settings.boot_grid}-step DDIM grid (the learning rate chosen on validation FD, docs/boot.md); "
        f"{settings.boot_seeds} training seed(s) "
        f"(training: {', '.join(extra['boot_cost'])}). No image is read. Loss every 10% of "
        f"training (seed 0): {boot_curve}.",
        f"- {settings.per_class} images per class per sampling seed ({NUM_CLASSES * settings.per_class} per "
        f"row), {settings.sampling_seeds} sampling seeds; cells are mean ± std over sampling seeds "
        "(x BOOT training seeds for the BOOT row). 'real validation' is the FD of as many real validation "
        "images: the floor of the FD at this sample size. 'ms / image' is the CPU time of the generating "
        "process on one thread (wall time on this shared machine would count the other jobs too), batches "
        "of 250.",
        "",
        markdown_table(HEADERS, table_rows(rows, boot, teacher_25)).rstrip(),
        "",
        *goal_lines(rows, boot, settings.boot_grid),
        "",
        "Per-class precision (%, mean over seeds): the fraction of the images generated for a class that the "
        "classifier labels as that class.",
        "",
        markdown_table(["sampler", *[str(c) for c in range(NUM_CLASSES)]], per_class).rstrip(),
        "",
        f"Samples ({figure}): one row per class, the same noise in every panel (sampling seed 0).",
        "",
    ]
    return "\n".join(lines)


def sample_grid(images: dict[str, Tensor], per_class: int, columns: int, path: Path) -> None:
    """One panel per sampler: `columns` samples of each class (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(images), figsize=(2.1 * len(images), 5.2))
    for i, (axis, (name, batch)) in enumerate(zip(axes, images.items(), strict=True)):
        tiles = batch.reshape(NUM_CLASSES, per_class, 28, 28)[:, :columns]
        mosaic = tiles.permute(0, 2, 1, 3).reshape(NUM_CLASSES * 28, columns * 28)
        axis.imshow((mosaic + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axis.set_title(name, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([28 * c + 14 for c in range(NUM_CLASSES)] if i == 0 else [])
        if i == 0:
            axis.set_yticklabels([str(c) for c in range(NUM_CLASSES)], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ run
def run(
    settings: Settings, use_cache: bool, console: Console
) -> tuple[list[Row], dict[str, Any], dict[str, Tensor]]:
    data = load_mnist()
    extra: dict[str, Any] = {
        "data": f"MNIST 10k (shared copy): {len(data.train[0])} train / {len(data.val[0])} validation / "
        f"{len(data.test[0])} test",
        "test_images": len(data.test[0]),
    }
    hits = []
    classifier_payload, hit = cached(
        "classifier",
        settings.key("classifier_epochs", "classifier_channels", "classifier_features"),
        lambda: train_classifier(settings, data),
        use_cache,
    )
    hits.append(f"classifier {'reused' if hit else 'trained'}")
    classifier = make_classifier(settings)
    classifier.load_state_dict(classifier_payload["value"])
    test_features, test_logits = classifier_features(classifier, data.test[0])
    extra["classifier_test_accuracy"] = (test_logits.argmax(1) == data.test[1]).float().mean().item()
    reference = gaussian_statistics(test_features)
    console.print(f"classifier: test accuracy {100 * extra['classifier_test_accuracy']:.2f}%")

    teacher_payload, hit = cached(
        "teacher",
        settings.key(*TEACHER_KEY),
        lambda: train_teacher(settings, data),
        use_cache,
    )
    extra["teacher_cost"] = cost(teacher_payload)
    hits.append(f"teacher {'reused' if hit else 'trained'}")
    teacher = make_unet(settings)
    teacher.load_state_dict(teacher_payload["value"])
    teacher.eval().requires_grad_(False)
    extra["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    console.print(f"teacher: {extra['teacher_params']:,} parameters, {extra['teacher_cost']}")

    sampler = ddim_scheduler(noise_scheduler())
    grid = signal_grid(sampler, settings.boot_grid)
    students, extra["boot_losses"], extra["boot_cost"] = [], [], []
    boot_key = (
        *TEACHER_KEY,
        "boot_grid",
        "boot_steps",
        "boot_lr",
        "boot_batch",
    )
    for seed in range(settings.boot_seeds):
        payload, hit = cached(
            f"boot-seed{seed}",
            settings.key(*boot_key),
            lambda s=seed: train_boot(settings, teacher, s),
            use_cache,
        )
        state, losses = payload["value"]
        extra["boot_cost"].append(cost(payload))
        extra["boot_losses"].append(losses)
        hits.append(f"BOOT seed {seed} {'reused' if hit else 'trained'}")
        net = make_unet(settings)
        net.load_state_dict(state)
        students.append(SignalGenerator(net.eval().requires_grad_(False), grid.alpha[-1], grid.sigma[-1]))
        console.print(f"BOOT seed {seed}: {extra['boot_cost'][-1]}, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    extra["cache"] = ", ".join(hits)

    torch.set_num_threads(1)
    rows = [Row(f"teacher DDIM {s}", s) for s in settings.teacher_rows]
    boot = Row("BOOT one-step", 1)
    real = Row("real validation", 0)
    grid_images: dict[str, Tensor] = {}
    for seed in range(settings.sampling_seeds):
        noise, labels = sampling_noise(settings, seed)
        for row, steps in zip(rows, settings.teacher_rows, strict=True):
            images, ms = teacher_samples(settings, teacher, seed, steps, use_cache)
            row.ms_per_image.append(ms)
            score(row, images, labels, classifier, reference)
            if seed == 0:
                grid_images[f"teacher {steps} step" + ("s" if steps > 1 else "")] = images
        for student in students:
            images, ms = timed(student.sample, noise, labels)
            boot.ms_per_image.append(ms)
            score(boot, images, labels, classifier, reference)
            if seed == 0 and "BOOT 1 step" not in grid_images:
                grid_images["BOOT 1 step"] = images
        real_index = torch.randperm(len(data.val[0]), generator=torch.Generator().manual_seed(seed))
        real_index = real_index[: len(labels)]
        score(real, data.val[0][real_index], data.val[1][real_index], classifier, reference)
        console.print(
            f"sampling seed {seed}: " + ", ".join(f"{r.name} FD {r.fd[-1]:.2f}" for r in [*rows, boot])
        )
    return [*rows, boot, real], extra, grid_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (under a minute)")
    parser.add_argument("--no-cache", action="store_true", help="train everything again, cache nothing")
    parser.add_argument("--boot-seeds", type=int, default=None, help="BOOT training seeds (default 1)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("generative"))
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.boot_seeds is not None:
        settings = Settings(**{**asdict(settings), "boot_seeds": args.boot_seeds})
    partial = args.boot_seeds is not None and args.boot_seeds != Settings().boot_seeds
    out = output_file(parser, "generative", args.out, quick=args.quick, partial=partial)
    torch.set_num_threads(1)
    console = Console()
    try:
        rows, extra, grid_images = run(settings, use_cache=not (args.quick or args.no_cache), console=console)
    except UserError as err:
        console.print(f"error: {err}", style="red")
        return 2
    boot = next(r for r in rows if r.name.startswith("BOOT"))
    teacher_25 = next((r for r in rows if r.name == "teacher DDIM 25"), None)
    console.print(rich_table("BOOT on MNIST", HEADERS, table_rows(rows, boot, teacher_25)))
    write_results(out, document(settings, rows, extra, argv, out.with_suffix(".png").name))
    sample_grid(grid_images, settings.per_class, min(6, settings.per_class), out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

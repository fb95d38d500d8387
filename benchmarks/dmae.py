"""S38 DMAE benchmark on Fashion-MNIST: is distilling a pre-trained MAE on masked inputs, with the teacher
run only to the distilled block, as good as full-teacher feature KD for less teacher compute?

Set-up (every number below is a `Settings` field):
- Data: Fashion-MNIST (28x28, patch 4: 49 patches). A stratified validation split (200 per class) is carved
  from the 60k training images and used for every choice (student learning rate, probe weight decay); the
  official 10k test split is touched only for the reported numbers. The rest of the training images are
  the pre-training pool: the teacher and every student pre-train on a fixed subset of it (no labels), and a
  labelled subset of it (per class) trains the linear probes.
- Teacher: a larger ViT-MAE (`transformers` ViTMAEForPreTraining), pre-trained here with the MAE loss at
  mask ratio 0.75. Students: a smaller ViT-MAE of the same patch grid, each one trained by
  `distill.train.Trainer` for the same images and steps, three ways:
  (a) MAE alone: `mae_reconstruction` on masked inputs (mask 0.75);
  (b) DMAE: `mae_reconstruction` + 1.0 x `dmae` (L1 on L2-normalised, linearly projected block outputs at
      3/4 depth, the same visible patches; the teacher stops after its block);
  (c) full-teacher feature KD: the same `dmae` distance and layer pair, but student and teacher see the
      unmasked image (mask ratio 0) and the teacher runs its whole forward (encoder and decoder); no
      reconstruction (nothing is masked).
  Then DMAE again at mask ratios 0.5, 0.9 and 0.95 (0.75 is (b)). Every model is built from a config and
  given its sin-cos position tables (`restore_mae_positions`: transformers 5 leaves them at zero, and an
  MAE without positions does not learn: loss 0.90 after 300 steps instead of 0.52).
- Evaluation (the same for every encoder): a linear probe on frozen features, the mean of the last encoder
  layer's patch tokens (after its LayerNorm) on the unmasked image, standardised with the probe-train
  statistics (MAE's BatchNorm-without-affine probe), multinomial logistic regression by L-BFGS with its L2
  weight chosen on the validation split. Accuracy on the test split, mean ± std over seeds; the randomly
  initialised student, probed the same way, is the no-pre-training reference. (A short fine-tune was tried
  first and dropped: 3 epochs of 2,000 labelled images left every encoder at 31-51%, below its linear probe,
  and cost about as much as the pre-training.)
- Teacher cost per step (a training batch): FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`
  around the teacher's forward exactly as the trainer runs it (`FrozenTeacher.outputs`; an eager-attention
  twin of the teacher, because the counter does not count CPU scaled-dot-product attention), and the
  median wall time of that forward (one thread).

    python benchmarks/dmae.py            # the full run: 3 seeds, about 20 minutes on 2 busy cores
    python benchmarks/dmae.py --quick    # tiny models and data, 2 seeds, under a minute (CI smoke)

A full run writes benchmarks/results/dmae.md (and dmae_ratio.png); --quick writes dmae_quick.md and a subset
of --parts or another number of --seeds dmae_partial.md, never over the full run's file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from distill.data import build_data
from distill.data.image_dataset import per_class_subset
from distill.objectives.dmae import (
    OFFICIAL_MASK_RATIO,
    OFFICIAL_WEIGHT,
    MAEMasking,
    depth_layer,
    kept_count,
    patch_count,
    restore_mae_positions,
)
from distill.tables import markdown_table, mean_std, pm
from distill.teachers import FrozenTeacher, TeacherRequest
from distill.train import OptimizerConfig, ScheduleConfig, Term, Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, seeds_and_file, write_results  # noqa: E402  (the results-file rule)

PARTS = ("main", "ratios", "cost")
MAIN_RATIO = OFFICIAL_MASK_RATIO  # 0.75


@dataclass(frozen=True)
class ViTSize:
    hidden: int
    layers: int
    heads: int
    decoder_hidden: int
    decoder_layers: int

    def config(self, mask_ratio: float) -> ViTMAEConfig:
        return ViTMAEConfig(
            image_size=28,
            patch_size=4,
            num_channels=1,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=4 * self.hidden,
            decoder_hidden_size=self.decoder_hidden,
            decoder_num_hidden_layers=self.decoder_layers,
            decoder_num_attention_heads=self.heads,
            decoder_intermediate_size=4 * self.decoder_hidden,
            mask_ratio=mask_ratio,
            norm_pix_loss=False,  # DMAE's pretrain.sh leaves it off
        )


@dataclass(frozen=True)
class Settings:
    teacher: ViTSize
    student: ViTSize
    val_per_class: int  # validation split carved from the training images
    probe_per_class: int  # labelled probe-training images, from the pool
    test_images: int | None  # None: the whole official test split
    teacher_images: int
    teacher_epochs: int
    student_images: int
    student_epochs: int
    batch_size: int
    teacher_lr: float
    student_lrs: tuple[float, ...]  # chosen on validation with the MAE-alone student
    ratios: tuple[float, ...]
    probe_decays: tuple[float, ...]
    probe_iterations: int
    cost_reps: int


FULL = Settings(
    teacher=ViTSize(hidden=96, layers=8, heads=4, decoder_hidden=48, decoder_layers=1),
    student=ViTSize(hidden=32, layers=4, heads=2, decoder_hidden=32, decoder_layers=1),
    val_per_class=200,
    probe_per_class=300,
    test_images=None,
    teacher_images=25000,
    teacher_epochs=2,
    student_images=12000,
    student_epochs=1,
    batch_size=64,
    teacher_lr=1.5e-3,  # 3e-3 made the 8-block teacher unstable (worse MAE loss than the student's)
    student_lrs=(1e-3, 3e-3),
    ratios=(0.5, 0.75, 0.9, 0.95),
    probe_decays=(1e-4, 1e-3, 1e-2),
    probe_iterations=100,
    cost_reps=5,
)
QUICK = dataclasses.replace(
    FULL,
    teacher=ViTSize(hidden=32, layers=4, heads=2, decoder_hidden=16, decoder_layers=1),
    student=ViTSize(hidden=16, layers=2, heads=2, decoder_hidden=16, decoder_layers=1),
    val_per_class=20,
    probe_per_class=20,
    test_images=500,
    teacher_images=512,
    teacher_epochs=1,
    student_images=256,
    student_epochs=1,
    batch_size=64,
    student_lrs=(1e-3, 3e-3),
    probe_decays=(1e-3, 1e-2),
    probe_iterations=30,
    cost_reps=2,
)


# ------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    pretrain: Tensor  # images the students pre-train on
    teacher: Tensor  # images the teacher pre-trains on
    tune_x: Tensor
    tune_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    description: str


def load_data(cfg: Settings) -> Data:
    """Normalised Fashion-MNIST tensors: validation carved from train by class, the rest the pool."""
    splits = build_data("fashion_mnist")
    train, test = splits.train, splits.test
    labels = train.labels.numpy()
    val = per_class_subset(labels, cfg.val_per_class, seed=0, what="val_per_class")
    pool = np.setdiff1d(np.arange(len(labels)), val)
    tune = pool[per_class_subset(labels[pool], cfg.probe_per_class, seed=1, what="probe_per_class")]
    order = np.random.default_rng(2).permutation(pool)
    x_val, y_val = train.batch(val.tolist())
    x_tune, y_tune = train.batch(tune.tolist())
    x_pre, _ = train.batch(order[: cfg.student_images].tolist())
    x_teacher, _ = train.batch(order[: cfg.teacher_images].tolist())
    n_test = len(test) if cfg.test_images is None else cfg.test_images
    test_index = (
        np.random.default_rng(3).permutation(len(test))[:n_test] if cfg.test_images else range(n_test)
    )
    x_test, y_test = test.batch(list(test_index))
    description = (
        f"{splits.description}; validation {len(val)} (carved from train), pre-training pool {len(pool)}: "
        f"teacher {len(x_teacher)} images, students {len(x_pre)}, probe-train {len(tune)} labelled; "
        f"test {len(x_test)}"
    )
    return Data(x_pre, x_teacher, x_tune, y_tune, x_val, y_val, x_test, y_test, description)


def unlabelled(images: Tensor) -> TensorDataset:
    return TensorDataset(images, torch.zeros(len(images), dtype=torch.long))


# ------------------------------------------------------------------------------------------ training


def mae(size: ViTSize, mask_ratio: float, seed: int) -> ViTMAEForPreTraining:
    """A freshly initialised ViT-MAE, with the sin-cos position tables transformers 5 leaves at zero."""
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(size.config(mask_ratio))
    restore_mae_positions(model)
    return model


def train(
    student: ViTMAEForPreTraining,
    images: Tensor,
    *,
    cfg: Settings,
    lr: float,
    epochs: int,
    seed: int,
    objectives: list[Any],
    transform: MAEMasking,
    teacher: nn.Module | None,
    run_dir: Path,
) -> dict[str, float]:
    """One Trainer run; returns seconds, steps and the last epoch's loss."""
    steps = epochs * -(-len(images) // cfg.batch_size)
    trainer = Trainer(
        student,
        unlabelled(images),
        teacher=teacher,
        objectives=objectives,
        batch_transform=transform,
        # MAE / DMAE: AdamW (0.9, 0.95), weight decay 0.05, warm-up then cosine (5% warm-up: short runs).
        optimizer=OptimizerConfig(name="adamw", lr=lr, weight_decay=0.05, betas=(0.9, 0.95)),
        schedule=ScheduleConfig(name="cosine", warmup_steps=max(1, steps // 20)),
        config=TrainerConfig(
            epochs=epochs,
            batch_size=cfg.batch_size,
            device="cpu",
            seed=seed,
            progress=False,
            tensorboard=False,
            keep_checkpoints=1,
            log_every=20,
        ),
        run_dir=run_dir,
        fingerprint=run_dir.name,
        label=run_dir.name,
    )
    result = trainer.fit()
    return {
        "seconds": result.train_seconds,
        "steps": result.steps,
        "loss": float(result.history[-1]["train_loss"]) if result.history else float("nan"),
    }


def pair(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """DMAE's layer pair: the blocks at 3/4 of each depth (the official 9/12 and 18/24)."""
    return {"student_layer": depth_layer(student, 0.75), "teacher_layer": depth_layer(teacher, 0.75)}


def set_ratio(model: nn.Module, ratio: float) -> None:
    model.config.mask_ratio = ratio  # one config object, shared by the embeddings


# ------------------------------------------------------------------------------------------ linear probe


@torch.no_grad()
def encode(model: ViTMAEForPreTraining, images: Tensor, batch: int = 256) -> Tensor:
    """The mean patch token of the last encoder layer (after its LayerNorm) on the unmasked image."""
    saved, was_training = model.config.mask_ratio, model.training
    set_ratio(model, 0.0)
    model.eval()
    try:
        parts = [
            model.vit(pixel_values=images[i : i + batch]).last_hidden_state[:, 1:].mean(1)
            for i in range(0, len(images), batch)
        ]
    finally:
        set_ratio(model, saved)
        model.train(was_training)
    return torch.cat(parts)


def fit_probe(x: Tensor, y: Tensor, decay: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression with an L2 penalty, by L-BFGS (deterministic)."""
    weight = torch.zeros(x.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(x: Tensor, y: Tensor, probe: tuple[Tensor, Tensor]) -> float:
    return float(((x @ probe[0] + probe[1]).argmax(1) == y).float().mean())


def probe(model: ViTMAEForPreTraining, data: Data, cfg: Settings) -> dict[str, float]:
    """Validation and test accuracy of the linear probe whose L2 weight does best on validation; features
    standardised with the probe-training statistics (MAE's BatchNorm-without-affine probe)."""
    train_f = encode(model, data.tune_x)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6

    def norm(f: Tensor) -> Tensor:
        return (f - mean) / std

    train_f, val_f, test_f = norm(train_f), norm(encode(model, data.val_x)), norm(encode(model, data.test_x))
    fitted = {d: fit_probe(train_f, data.tune_y, d, cfg.probe_iterations) for d in cfg.probe_decays}
    val = {d: accuracy(val_f, data.val_y, p) for d, p in fitted.items()}
    best = max(val, key=lambda d: val[d])
    return {"val": val[best], "test": accuracy(test_f, data.test_y, fitted[best]), "decay": best}


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    method: str
    ratio: float
    seed: int
    val: float
    test: float
    seconds: float
    steps: int


class Bench:
    def __init__(self, cfg: Settings, data: Data, tmp: Path, console: Console) -> None:
        self.cfg, self.data, self.tmp, self.console = cfg, data, tmp, console
        self.runs: list[Run] = []
        self.teacher: ViTMAEForPreTraining | None = None
        self.lr = cfg.student_lrs[0]
        self.notes: dict[str, Any] = {}

    def log(self, text: str) -> None:
        self.console.print(text)

    def pretrain_teacher(self) -> None:
        cfg = self.cfg
        teacher = mae(cfg.teacher, MAIN_RATIO, seed=100)
        info = train(
            teacher, self.data.teacher, cfg=cfg, lr=cfg.teacher_lr, epochs=cfg.teacher_epochs, seed=100,
            objectives=[("mae_reconstruction", 1.0)], transform=MAEMasking(), teacher=None,
            run_dir=self.tmp / "teacher",
        )  # fmt: skip
        scores = probe(teacher, self.data, cfg)
        self.notes["teacher"] = info | scores
        self.log(f"teacher: {info} probe {scores}")
        self.teacher = teacher

    def student_run(self, method: str, ratio: float, seed: int, lr: float) -> Run:
        """One student: (a) "mae", (b) "dmae" at `ratio`, (c) "full_kd"."""
        cfg, teacher = self.cfg, self.teacher
        assert teacher is not None
        seen = 0.0 if method == "full_kd" else ratio
        student = mae(cfg.student, seen, seed)
        objectives: list[Any] = []
        if method != "full_kd":
            objectives.append(("mae_reconstruction", 1.0))
        if method != "mae":
            set_ratio(teacher, seen)
            params = pair(student, teacher) | {"partial_teacher": method == "dmae"}
            objectives.append(Term("dmae", OFFICIAL_WEIGHT, params))
        transform = MAEMasking(
            reconstruction=method != "full_kd", teacher=teacher if method != "mae" else None
        )
        name = f"{method}-{ratio}-{seed}-{lr}"
        info = train(
            student, self.data.pretrain, cfg=cfg, lr=lr, epochs=cfg.student_epochs, seed=seed,
            objectives=objectives, transform=transform, teacher=teacher if method != "mae" else None,
            run_dir=self.tmp / name,
        )  # fmt: skip
        scores = probe(student, self.data, cfg)
        run = Run(method, ratio, seed, scores["val"], scores["test"], info["seconds"], int(info["steps"]))
        self.log(f"{name}: val {run.val:.4f} test {run.test:.4f} ({run.seconds:.1f} s, {run.steps} steps)")
        self.runs.append(run)
        return run

    def choose_lr(self, seed: int) -> None:
        """The students' learning rate: the MAE-alone student's best validation accuracy (seed `seed`);
        the chosen run is kept as that seed's (a) row."""
        tried = [self.student_run("mae", MAIN_RATIO, seed, lr) for lr in self.cfg.student_lrs]
        best = max(tried, key=lambda r: r.val)
        self.lr = self.cfg.student_lrs[tried.index(best)]
        self.notes["lr_choice"] = {lr: r.val for lr, r in zip(self.cfg.student_lrs, tried, strict=True)}
        dropped = [r for r in tried if r is not best]
        self.runs = [r for r in self.runs if all(r is not d for d in dropped)]

    def random_init(self, seed: int) -> None:
        """The reference without pre-training: the randomly initialised student, probed the same way."""
        scores = probe(mae(self.cfg.student, MAIN_RATIO, seed), self.data, self.cfg)
        self.runs.append(Run("random", MAIN_RATIO, seed, scores["val"], scores["test"], 0.0, 0))
        self.log(f"random-{seed}: {scores}")

    def rows(self, method: str, ratio: float) -> list[Run]:
        return [r for r in self.runs if r.method == method and r.ratio == ratio]


# ------------------------------------------------------------------------------------------ cost


def eager_twin(model: ViTMAEForPreTraining) -> ViTMAEForPreTraining:
    """The same weights with eager attention: FlopCounterMode counts its matmuls (it has no formula for
    CPU scaled-dot-product attention)."""
    twin = ViTMAEForPreTraining._from_config(model.config, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def teacher_forward(teacher: nn.Module, layer: str, partial: bool) -> FrozenTeacher:
    frozen = FrozenTeacher(teacher)
    frozen.attach("cpu", nullcontext, [layer])
    if partial:
        frozen.skip_logits()
    return frozen


def teacher_cost(
    teacher: ViTMAEForPreTraining, layer: str, ratio: float, partial: bool, batch: Tensor, reps: int
) -> tuple[int, float, int]:
    """(FLOPs, median seconds, blocks run) of one teacher forward as the trainer runs it on `batch`."""
    twin = eager_twin(teacher)
    counted: list[str] = []
    hooks = [
        block.register_forward_hook(lambda *_a, i=i: counted.append(str(i)))
        for i, block in enumerate(teacher.vit.layers)
    ]
    for model in (teacher, twin):
        set_ratio(model, ratio)
    noise = torch.rand(len(batch), patch_count(teacher.config))
    request = TeacherRequest({"pixel_values": batch, "noise": noise})
    frozen, twin_frozen = teacher_forward(teacher, layer, partial), teacher_forward(twin, layer, partial)
    try:
        with FlopCounterMode(display=False) as counter:
            twin_frozen.outputs(request)
        times = []
        for _ in range(reps):
            counted.clear()
            started = time.perf_counter()
            frozen.outputs(request)
            times.append(time.perf_counter() - started)
    finally:
        frozen.detach()
        twin_frozen.detach()
        for hook in hooks:
            hook.remove()
    return int(counter.get_total_flops()), statistics.median(times), len(counted)


def cost_section(bench: Bench) -> str:
    cfg, teacher = bench.cfg, bench.teacher
    assert teacher is not None
    layer = depth_layer(teacher, 0.75)
    batch = bench.data.pretrain[: cfg.batch_size]
    cases = [(f"DMAE (mask {r}, to {layer})", r, True) for r in cfg.ratios]
    cases += [
        (f"mask {MAIN_RATIO}, whole teacher", MAIN_RATIO, False),
        (f"no mask, to {layer}", 0.0, True),
        ("full-teacher KD (no mask, whole teacher)", 0.0, False),
    ]
    measured = {label: teacher_cost(teacher, layer, r, p, batch, cfg.cost_reps) for label, r, p in cases}
    full_flops, full_time, _ = measured[cases[-1][0]]
    rows = [
        [
            label,
            f"{flops / 1e9:.3f}",
            f"{flops / full_flops:.3f}",
            f"{seconds * 1e3:.1f}",
            f"{seconds / full_time:.2f}",
            f"{blocks}/{len(teacher.vit.layers)}",
        ]
        for label, (flops, seconds, blocks) in measured.items()
    ]
    bench.notes["cost"] = measured
    bench.notes["cost_labels"] = (cases[1][0] if len(cfg.ratios) > 1 else cases[0][0], cases[-1][0])
    return (
        f"## Teacher compute per step (batch {cfg.batch_size})\n\n"
        "FLOPs of one teacher forward as the trainer runs it (`FrozenTeacher.outputs`, counted with "
        "`FlopCounterMode` on an eager-attention twin), its median wall time over "
        f"{cfg.cost_reps} repetitions (one thread, shared cores: noisy), and the encoder blocks that ran "
        "(forward hooks). The full-teacher row also runs the decoder.\n\n"
        + markdown_table(["teacher forward", "GFLOPs", "vs full", "ms", "time vs full", "blocks run"], rows)
    )


# ------------------------------------------------------------------------------------------ report

LABELS = {
    "random": "no pre-training (random initialisation)",
    "mae": "(a) student MAE alone",
    "dmae": "(b) DMAE",
    "full_kd": "(c) full-teacher feature KD",
}


def step_ms(runs: list[Run]) -> str:
    return pm([1e3 * r.seconds / max(1, r.steps) for r in runs], digits=0)


def main_section(bench: Bench) -> str:
    rows = []
    for method in ("random", "mae", "dmae", "full_kd"):
        runs = bench.rows(method, MAIN_RATIO)
        seen = {"random": "-", "full_kd": "unmasked"}.get(method, f"mask {MAIN_RATIO}")
        steps = step_ms(runs) if method != "random" else "-"
        rows.append([LABELS[method], seen, pm([r.test for r in runs], 100), pm([r.val for r in runs], 100),
                     steps, str(len(runs))])  # fmt: skip
    refs = []
    if "teacher" in bench.notes:
        t = bench.notes["teacher"]
        refs.append(
            f"the teacher (pre-trained here, final MAE loss {t['loss']:.3f}): test {100 * t['test']:.2f}, "
            f"validation {100 * t['val']:.2f}"
        )
    lr = bench.notes.get("lr_choice", {})
    chosen = ", ".join(f"{k:g}: {100 * v:.2f}" for k, v in lr.items())
    return (
        "## Students: linear-probe accuracy (%)\n\n"
        + markdown_table(["student", "input", "test", "validation", "step ms", "seeds"], rows)
        + "\nReference (linear probe, same protocol): "
        + "; ".join(refs)
        + f".\n\nStudent learning rate {bench.lr:g}, chosen on validation with the MAE-alone student "
        f"(seed 0; validation accuracy per rate: {chosen}); every student uses it. Step ms: the trainer's "
        "wall time per optimizer step (student and teacher together).\n"
    )


def ratio_section(bench: Bench, plot: Path | None) -> str:
    rows = []
    for ratio in bench.cfg.ratios:
        runs = bench.rows("dmae", ratio)
        if not runs:
            continue
        patches = patch_count(bench.cfg.student.config(ratio))
        visible = f"{kept_count(patches, ratio)}/{patches}"
        rows.append([f"{ratio}", visible, pm([r.test for r in runs], 100), pm([r.val for r in runs], 100),
                     step_ms(runs), str(len(runs))])  # fmt: skip
    if plot is not None:
        draw_ratios(bench, plot)
    shown = f"\n![DMAE accuracy against mask ratio]({plot.name})\n" if plot is not None else ""
    return (
        "## DMAE against the mask ratio\n\n"
        + markdown_table(["mask ratio", "visible patches", "test", "validation", "step ms", "seeds"], rows)
        + shown
    )


def draw_ratios(bench: Bench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ratios = [r for r in bench.cfg.ratios if bench.rows("dmae", r)]
    stats = [mean_std([100 * x.test for x in bench.rows("dmae", r)]) for r in ratios]
    ax.errorbar(
        ratios, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label="DMAE"
    )
    for method, style in (("mae", "--"), ("full_kd", ":")):
        runs = bench.rows(method, MAIN_RATIO)
        if runs:
            mean, std = mean_std([100 * x.test for x in runs])
            ax.axhline(
                mean, linestyle=style, color="gray" if method == "mae" else "black", label=LABELS[method]
            )
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    ax.set_xlabel("mask ratio (student and teacher)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired(runs: list[Run], base: list[Run]) -> tuple[float, float, int]:
    """Mean and std over seeds of the per-seed test-accuracy difference (points): runs of one seed share the
    student's initialisation, data order and probe, so the pairing removes most of the seed-to-seed spread."""
    by_seed = {r.seed: r.test for r in base}
    diffs = [100 * (r.test - by_seed[r.seed]) for r in runs if r.seed in by_seed]
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def comparison(label: str, runs: list[Run], base: list[Run]) -> str:
    (m, s), (bm, bs) = mean_std([100 * r.test for r in runs]), mean_std([100 * r.test for r in base])
    diff, spread, n = paired(runs, base)
    beyond = abs(diff) > spread and abs(m - bm) > bs
    return (
        f"- {label}: {m:.2f} ± {s:.2f} vs {bm:.2f} ± {bs:.2f}; paired difference {diff:+.2f} ± {spread:.2f} "
        f"points over {n} seeds: " + ("beyond" if beyond else "within") + " the noise."
    )


def verdict(bench: Bench) -> str:
    """What was and was not reproduced, computed from the numbers."""
    lines = []
    dmae, full, alone, scratch = (bench.rows(m, MAIN_RATIO) for m in ("dmae", "full_kd", "mae", "random"))
    if dmae and full:
        (d, _), (f, fs) = mean_std([100 * r.test for r in dmae]), mean_std([100 * r.test for r in full])
        within = abs(d - f) <= fs
        lines.append(
            f"- Accuracy at equal training (the issue's goal): DMAE {d - f:+.2f} points from full-teacher "
            f"feature KD, whose std is {fs:.2f}: {'within' if within else 'not within'} one standard "
            "deviation of it."
        )
    for label, runs, base in (
        ("DMAE vs full-teacher feature KD", dmae, full),
        ("DMAE vs the student MAE alone", dmae, alone),
        ("full-teacher feature KD vs the student MAE alone", full, alone),
        ("the student MAE alone vs no pre-training", alone, scratch),
    ):
        if runs and base:
            lines.append(comparison(label, runs, base))
    cost = bench.notes.get("cost")
    if cost:
        dmae_label, full_label = bench.notes["cost_labels"]
        (df, dt, _), (ff, ft, _) = cost[dmae_label], cost[full_label]
        lines.append(
            f"- Teacher compute per step: DMAE (mask {MAIN_RATIO}, partial) {df / 1e9:.3f} GFLOPs vs full "
            f"{ff / 1e9:.3f} GFLOPs ({ff / df:.1f}x fewer); wall time {1e3 * dt:.1f} ms vs {1e3 * ft:.1f} ms."
        )
    if dmae and full:
        lines.append(
            f"- Whole training step (student + teacher): DMAE {step_ms(dmae)} ms vs full-teacher KD "
            f"{step_ms(full)} ms."
        )
    ratio_means = {r: mean_std([100 * x.test for x in bench.rows("dmae", r)]) for r in bench.cfg.ratios}
    ratio_means = {r: v for r, v in ratio_means.items() if bench.rows("dmae", r)}
    if len(ratio_means) > 1:
        best = max(ratio_means, key=lambda r: ratio_means[r][0])
        worst = min(ratio_means, key=lambda r: ratio_means[r][0])
        lines.append(
            f"- Mask ratio: best {best} ({ratio_means[best][0]:.2f}), worst {worst} "
            f"({ratio_means[worst][0]:.2f}); spread "
            f"{ratio_means[best][0] - ratio_means[worst][0]:.2f} points."
        )
        top = bench.rows("dmae", max(bench.cfg.ratios))
        if top and dmae:
            lines.append(comparison(f"DMAE at mask {max(bench.cfg.ratios)} vs at {MAIN_RATIO}", top, dmae))
    return "## Verdict (computed from the tables above)\n\n" + "\n".join(lines) + "\n" if lines else ""


NOTES = """## Notes

- Scale: the paper distils an ImageNet MAE ViT-L (about 300M parameters) into a ViT-B for 100 epochs and
  fine-tunes it; the full run here distils a 0.9M teacher pre-trained for about 3 minutes into a 0.07M
  student for one epoch of 12,000 images, on 2 shared CPU cores. Accuracy differences of a few points are
  within the seed-to-seed spread of the linear probe (the randomly initialised encoder alone varies by ~7
  points):
  read the paired differences of the verdict, not single cells.
- Evaluation: a linear probe (mean patch token, last layer). A short fine-tune was tried first (3 epochs of
  2,000 labelled images, lr 1e-3): every encoder ended at 31-51%, below its own linear probe, for as much
  time as the pre-training, so it was dropped.
- transformers 5 builds ViT-MAE models from a config with all-zero position tables (encoder and decoder);
  an MAE without positions does not learn (loss 0.90 after 300 steps instead of 0.52), so every model here
  gets MAE's sin-cos tables (`distill.objectives.dmae.restore_mae_positions`).
- In (c) the distance reads the student's block at 3/4 depth and nothing else trains its last block (there
  is no reconstruction on an unmasked image): its probe reads a block that kept its initial weights on top
  of the distilled ones, as the official fine-tuning protocol would then train.
- The official DMAE code runs the teacher's whole encoder and decoder every step although only block 18 is
  used; the partial teacher here stops after the distilled block (`FrozenTeacher.skip_logits`), which the
  "blocks run" column checks.
- Every pre-training and distillation run goes through `distill.train.Trainer` (`MAEMasking` as its
  batch transform); only the probe's L-BFGS fit and the cost measurement run outside it (no training).
"""


# ------------------------------------------------------------------------------------------ main


def run(cfg: Settings, parts: list[str], seeds: list[int], tmp: Path, console: Console) -> Bench:
    data = load_data(cfg)
    bench = Bench(cfg, data, tmp, console)
    bench.notes["data"] = data.description
    bench.pretrain_teacher()
    if "main" in parts or "ratios" in parts:
        bench.choose_lr(seeds[0])
    for seed in seeds:
        if "main" in parts:
            bench.random_init(seed)
            if not bench.rows("mae", MAIN_RATIO) or seed != seeds[0]:
                bench.student_run("mae", MAIN_RATIO, seed, bench.lr)
            bench.student_run("full_kd", MAIN_RATIO, seed, bench.lr)
        if "main" in parts or "ratios" in parts:
            bench.student_run("dmae", MAIN_RATIO, seed, bench.lr)
        if "ratios" in parts:
            for ratio in cfg.ratios:
                if ratio != MAIN_RATIO:
                    bench.student_run("dmae", ratio, seed, bench.lr)
    return bench


def settings_text(cfg: Settings, bench: Bench) -> str:
    t, s = cfg.teacher, cfg.student
    teacher_params = sum(p.numel() for p in bench.teacher.parameters()) if bench.teacher else 0
    student_params = sum(p.numel() for p in mae(s, MAIN_RATIO, 0).parameters())
    return (
        f"Data: {bench.notes['data']}.\n\n"
        f"Teacher: ViT-MAE {t.layers} blocks x {t.hidden} wide ({t.heads} heads, MLP 4x), decoder "
        f"{t.decoder_layers} x {t.decoder_hidden}; {teacher_params / 1e6:.2f}M parameters; pre-trained here "
        f"by the MAE loss at mask {MAIN_RATIO} for {cfg.teacher_epochs} epochs of {cfg.teacher_images} "
        f"images, lr {cfg.teacher_lr:g}. Student: {s.layers} blocks x {s.hidden} ({s.heads} heads), decoder "
        f"{s.decoder_layers} x {s.decoder_hidden}; {student_params / 1e6:.2f}M parameters. Every student: "
        f"{cfg.student_epochs} epoch(s) of the same {cfg.student_images} images, batch {cfg.batch_size}, "
        "AdamW (0.9, 0.95), weight decay 0.05, 5% warm-up then cosine. DMAE layer pair: student "
        f"`{depth_layer(mae(s, MAIN_RATIO, 0), 0.75)}` -> teacher "
        f"`{depth_layer(mae(t, MAIN_RATIO, 0), 0.75)}` (3/4 depth, as the official 9/12 -> 18/24), linear "
        "projector, L1 on L2-normalised tokens (CLS included), weight 1.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--out", type=Path, default=None, help=out_help("dmae"))
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    seeds, out = seeds_and_file(parser, args, "dmae", args.parts, PARTS)
    torch.set_num_threads(1)  # 2 shared cores: one thread was ~7x faster than two fighting (measured)
    console = Console(stderr=True)
    cfg = QUICK if args.quick else FULL
    load_start, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-bench-dmae-") as tmp:
        bench = run(cfg, parts, seeds, Path(tmp), console)
        sections = []
        if "main" in parts:
            sections.append(main_section(bench))
        if "ratios" in parts:
            plot = out.with_name(out.stem + "_ratio.png") if not args.quick else None
            sections.append(ratio_section(bench, plot))
        if "cost" in parts:
            sections.append(cost_section(bench))
        sections.append(NOTES)
        sections.append(verdict(bench))
    total, load_end = time.perf_counter() - started, os.getloadavg()
    text = (
        "# S38 DMAE: masked feature distillation with a partially run teacher (Fashion-MNIST)\n\n"
        f"Command: `{command_line('dmae', argv)}` ({os.cpu_count()} CPU cores, torch threads 1); seeds "
        f"{seeds}; total wall time {total:.0f} s. Load average (1/5/15 min) {load_start[0]:.1f}/"
        f"{load_start[1]:.1f}/{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/"
        f"{load_end[2]:.1f} at the end (other work shared the cores: times are noisy, FLOPs are not).\n\n"
        + settings_text(cfg, bench)
        + "\nCells are mean ± std over seeds; accuracy is a linear probe on the frozen student encoder "
        "(module docstring of benchmarks/dmae.py).\n\n" + "\n".join(sections)
    )
    write_results(out, text)
    console.print(text)
    console.print(f"wrote {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

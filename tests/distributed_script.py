"""One training run of a tiny deterministic classifier (--lm: causal LM), for tests/test_distributed.py.

Run it plainly (one process) or under `python -m torch.distributed.run --nproc_per_node 2` (gloo on CPU):

    distributed_script.py RUN_DIR REPORT_PREFIX BATCH_SIZE [--resume] [--stop-after N] [--epochs N]
                          [--step-seconds S] [--lm auto|on|off] [--feature]

Every process writes REPORT_PREFIX.rank<R>.json: how the student and the teacher were wrapped, whether the
teacher holds gradients, and every file operation the process made inside RUN_DIR (recorded with an audit
hook: rank 0's list shows the hook sees the run's writes, rank 1's must be empty). A process stopped by a
signal writes its report too, with "stopped" set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}


def record_writes(run_dir: Path) -> list[str]:
    """Every file operation under `run_dir` that may change it, as 'event path'."""
    root = str(run_dir.resolve())
    seen: list[str] = []

    def inside(path: object) -> str | None:
        if isinstance(path, bytes):
            path = path.decode()
        if not isinstance(path, str | os.PathLike):
            return None
        full = os.path.abspath(os.fspath(path))
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writes and (full := inside(path)):
                seen.append(f"open {full}")
        elif event in PATH_EVENTS:
            for path in args[:2]:
                if full := inside(path):
                    seen.append(f"{event} {full}")
        elif event == "tempfile.mkstemp" and (full := inside(args[0])):
            seen.append(f"{event} {full}")

    sys.addaudithook(hook)
    return seen


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :4].argmax(-1) + (x[:, 4] > 1).long()) % 4
    return TensorDataset(x, y)


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)  # no dropout, no batch norm: the model is a deterministic function of its weights
    return nn.Sequential(nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def lm_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences with shifted labels; half of them count no token, so that some micro-batches of a
    process count none (the fused path's zero backward through empty logits)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 10), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((n, 1), -100)], dim=1)
    labels[n // 2 :] = -100
    return [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y, "mask": y != -100}
        for i, y in zip(ids, labels, strict=True)
    ]


def llama(seed: int, hidden: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def encoder(seed: int, hidden: int) -> nn.Module:
    """A fresh one-block BERT classifier over 60 token ids (`hf_encoder`), without dropout."""
    from distill.models import build_model

    torch.manual_seed(seed)
    config = {
        "num_hidden_layers": 1, "hidden_size": hidden, "num_attention_heads": 2,
        "intermediate_size": 2 * hidden, "vocab_size": 60, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }  # fmt: skip
    return build_model("hf_encoder", num_classes=4, input_shape=(12,), config=config, dropout=0.0)


def token_data(n: int, seed: int) -> TensorDataset:
    """Right-padded texts of 3 to 12 tokens (the sampler groups them by length), labelled by a token."""
    from distill.data.text_classification import TokenDataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, 12), generator=g)
    for row, length in enumerate(torch.randint(3, 13, (n,), generator=g).tolist()):
        ids[row, length:] = 0
    return TokenDataset(ids, ids[:, 1] % 4, pad_id=0)


def shard(model: nn.Module) -> None:
    """FSDP2: every process keeps 1/world of each weight and all-gathers it for the forward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)


def fsdp_checkpoint(run_dir: Path, report: Path) -> None:
    """Save a sharded (FSDP2) student and its AdamW state mid-training, load them into a fresh sharded copy:
    training on from there gives the losses of training on without the round trip."""
    from distill.train.checkpoint import full_states, latest_checkpoint, load_checkpoint, save_checkpoint

    dataset = data(32, seed=0)
    x, y = dataset.tensors
    rank = int(os.environ["RANK"])

    def student(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp(seed, 16)
        shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    def steps(model: nn.Module, optimizer: torch.optim.Optimizer, first: int, count: int) -> list[float]:
        losses = []
        for step in range(first, first + count):
            rows = slice(8 * (step % 4) + 4 * rank, 8 * (step % 4) + 4 * rank + 4)  # 2 x 4 of each 8
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        return losses

    model, optimizer = student(2)
    steps(model, optimizer, 0, 3)
    states = full_states(model, optimizer)  # every process: the shards are gathered onto rank 0
    if rank == 0:
        save_checkpoint(
            run_dir, step=3, model=model, optimizer=optimizer, objectives=nn.ModuleList(),
            state={"fingerprint": "fsdp"}, states=states,
        )  # fmt: skip
    torch.distributed.barrier()
    continued = steps(model, optimizer, 3, 3)

    fresh, fresh_optimizer = student(5)  # other weights, no optimizer state yet
    path = latest_checkpoint(run_dir)
    assert path is not None
    load_checkpoint(
        path, model=fresh, optimizer=fresh_optimizer, objectives=nn.ModuleList(), fingerprint="fsdp"
    )
    resumed = steps(fresh, fresh_optimizer, 3, 3)
    out = {"rank": rank, "continued": continued, "resumed": resumed, "saved": sorted(states[0])}
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="slow each step (signal tests)")
    parser.add_argument("--shard-teacher", action="store_true", help="FSDP2 (fully_shard) on the teacher")
    parser.add_argument("--fsdp-checkpoint", action="store_true", help="checkpoint a sharded student")
    parser.add_argument("--lm", choices=["auto", "on", "off"], help="tiny Llama models, this fused_loss")
    parser.add_argument(
        "--feature", action="store_true", help="CE + FitNets hint through a learned regressor"
    )
    parser.add_argument("--encoder", action="store_true", help="text encoders on length-grouped token ids")
    args = parser.parse_args()
    if args.fsdp_checkpoint:
        fsdp_checkpoint(args.run_dir, args.report)
        return
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    writes = record_writes(args.run_dir)

    from distill.train import OptimizerConfig, Trainer, TrainerConfig
    from distill.train.signals import TrainingInterrupted

    def slow(batch, _student, _progress):  # type: ignore[no-untyped-def]
        time.sleep(args.step_seconds)
        return batch

    make_model, make_data = (
        (llama, lm_data) if args.lm else (encoder, token_data) if args.encoder else (mlp, data)
    )
    teacher = make_model(1, 32)
    if args.shard_teacher:
        shard(teacher)
    trainer = Trainer(
        make_model(2, 16),
        make_data(64, seed=0),  # 64 = 8 steps of 8 per epoch, as 2 x 4
        teacher=teacher,
        eval_data=None if args.lm else make_data(40, seed=1),
        objectives=[("cross_entropy", 0.5), ("fitnet", 0.5, {"student_layer": "1", "teacher_layer": "1"})]
        if args.feature
        else [("cross_entropy", 0.5), ("hinton_kd", 0.5, {"temperature": 2.0})],
        batch_transform=slow if args.step_seconds else None,
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9),
        config=TrainerConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            eval_batch_size=16,
            log_every=1,
            checkpoint_every=5,
            device="cpu",
            progress=False,
            tensorboard=False,
            seed=3,
            stop_after_steps=args.stop_after,
            fused_loss=args.lm or "auto",
        ),
        run_dir=args.run_dir,
        fingerprint="distributed-test",
    )
    report: dict[str, object] = {}
    try:
        result = trainer.fit(resume=args.resume)
    except TrainingInterrupted as stop:
        report = {"stopped": str(stop), "exit_code": stop.exit_code}
    report |= {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "student_wrapper": type(trainer.student).__name__,
        "teacher_wrapper": type(trainer.teacher.module).__name__,
        "teacher_sharded": any(type(p).__name__ == "DTensor" for p in teacher.parameters()),
        "teacher_is_teacher": trainer.teacher.module is teacher,
        "teacher_grads": sum(p.grad is not None for p in teacher.parameters()),
        "teacher_trainable": sum(p.requires_grad for p in teacher.parameters()),
        "writes": writes,
        "loss_path": trainer.loss_path,
    }
    if "stopped" not in report:
        report |= {"steps": result.steps, "completed": result.completed, "final": result.final}
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(report, indent=1))
    # Left to interpreter shutdown, gloo's threads sometimes abort the process ("terminate called without an
    # active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Nor is the DDP reducer's teardown safe: it can join gloo's work thread while that thread waits for the
    # GIL to release a finished all-reduce's tensors (a deadlock seen once in the --lm run). The report is
    # written; leave without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(report.get("exit_code", 0)))  # type: ignore[call-overload]


if __name__ == "__main__":
    main()

"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

Layout: `<run>/checkpoints/step-00000042/{model,optimizer,objectives,rng}.safetensors + state.json`, and
`<run>/checkpoints/latest` naming the newest complete one. A checkpoint folder is written under a temporary
name and renamed when complete, and `latest` moves only after that, so a crash or a full disk while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.io import atomic_write_json, atomic_write_text, load_tensors, save_tensors

FORMAT_VERSION = 1


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and the JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _param_key(index: str) -> int | str:
    """An optimizer state key: a parameter's position, or its name in a gathered (FSDP) state dict."""
    return int(index) if index.isdigit() else index


def unflatten_optimizer_state(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(_param_key(index), {})[key] = tensor
    for index, values in rest["scalars"].items():
        state.setdefault(_param_key(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded across processes (FSDP2 `fully_shard`: DTensors)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer


def full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Model and optimizer state dicts with whole tensors. For a sharded model this gathers the shards: a
    collective that every process must call (rank 0 gets the tensors on the CPU, the others empty dicts);
    its optimizer state is keyed by parameter name."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, _raw(optimizer), options=options),  # type: ignore[return-value]
    )


def _load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor], optim: dict[str, Any]
) -> None:
    if not is_sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # Every process read the whole file; each keeps its own shard.
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, _raw(optimizer), optim, options=options)


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    rest = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(py_state), gauss_next],
    }
    return tensors, rest


def restore_rng(tensors: dict[str, Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = rest["python"]
    random.setstate((version, tuple(py_state), gauss_next))


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # trainer counters, history, scheduler state, fingerprint


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objectives: nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    states: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint. `states`: the model and optimizer state dicts gathered beforehand by every
    process (`full_states`, needed for a sharded model); None reads them from `model` and `optimizer`."""
    model_state, optimizer_state = states if states is not None else full_states(model, optimizer)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_tensors(staging / "model.safetensors", model_state)
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer_state)
        save_tensors(staging / "optimizer.safetensors", opt_tensors)
        save_tensors(staging / "objectives.safetensors", objectives.state_dict())
        rng_tensors, rng_rest = capture_rng()
        save_tensors(staging / "rng.safetensors", rng_tensors)
        atomic_write_json(
            staging / "state.json",
            {"format": FORMAT_VERSION, "step": step, "optimizer": opt_rest, "rng": rng_rest, **state},
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    # Only a sibling folder named like the ones we write: an edited pointer cannot lead out of the run.
    if not re.fullmatch(r"step-\d{8}", name):
        raise UserError(f"checkpoint pointer {pointer} names '{name[:60]}', not a checkpoint of this run")
    path = pointer.parent / name
    return path if (path / "state.json").exists() else None


def _tensors(path: Path) -> dict[str, Tensor]:
    """A checkpoint's safetensors file; anything else (a pickle, a truncated file) is refused unread."""
    try:
        return load_tensors(path)
    except Exception as err:  # safetensors raises several types for a file that is not its format
        raise UserError(f"checkpoint file {path} is not a readable safetensors file ({err})") from err


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objectives: nn.Module,
    fingerprint: str,
) -> Checkpoint:
    """Restore weights, optimizer, objective state and RNG in place; refuse a checkpoint of another run."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path}: unreadable state.json ({err})") from err
    if state.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path}: format {state.get('format')} is not {FORMAT_VERSION}")
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"checkpoint {path} belongs to another recipe or model (fingerprint differs)")
    # Every file is read before anything is restored: a bad one leaves the model as it was.
    tensors = {
        name: _tensors(path / f"{name}.safetensors") for name in ("model", "optimizer", "objectives", "rng")
    }
    optim = unflatten_optimizer_state(tensors["optimizer"], state["optimizer"])
    _load_full_states(model, optimizer, tensors["model"], optim)
    objectives.load_state_dict(tensors["objectives"])
    restore_rng(tensors["rng"], state["rng"])
    return Checkpoint(path, state)


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A LambdaLR's state without its functions (rebuilt from the recipe on resume)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})

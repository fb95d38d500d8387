"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else, and a checksum of every
file.

Layout: `<run>/checkpoints/step-00000042/{model,optimizer,objectives,rng}.safetensors + state.json +
checksums.json`, and `<run>/checkpoints/latest` naming the newest complete one. A checkpoint folder is
written under a temporary name, `checksums.json` (the sha256 of every other file, and the step) last, then
renamed when complete, and `latest` moves only after that, so a crash or a full disk while saving leaves the
previous checkpoint intact.

Resuming (`resume_checkpoint`) verifies a checkpoint whole before restoring anything: every checksum, the
step, the run's identity (fingerprint: recipe x method x seed; and the seed itself), the state's schema. One
that fails is passed over for the next older good one, with one warning line; none good is one line (never a
silent restart from step 0). A checkpoint of another run, or from an older distill without checksums, is
refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from distill.errors import UserError
from distill.io import atomic_write_json, atomic_write_text, load_tensors, save_tensors, sha256_file
from distill.train.logs import warn

# 2: checksums.json (format 1 had no checksums: such a checkpoint cannot be verified and is refused).
FORMAT_VERSION = 2
CHECKSUMS = "checksums.json"
TENSOR_FILES = ("model", "optimizer", "objectives", "rng")
FILES = (*(f"{name}.safetensors" for name in TENSOR_FILES), "state.json")
STEP_NAME = re.compile(r"step-(\d{8})")


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


class CheckpointDamaged(UserError):
    """A checkpoint that fails verification: a resume passes it over for an older good one."""


class CheckpointRefused(UserError):
    """A checkpoint of another run, or from an older distill: refused, never passed over."""


def _step_of(path: Path) -> int | None:
    match = STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


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
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.partial"):  # what a killed save left (its temporaries are inside)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".latest.*.tmp"):
        stale.unlink(missing_ok=True)
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
        # Last: the checksums of everything above. A folder without them is not a checkpoint.
        files = {name: sha256_file(staging / name) for name in FILES}
        atomic_write_json(staging / CHECKSUMS, {"format": FORMAT_VERSION, "step": step, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    saved = sorted((number, p) for p in root.iterdir() if p.is_dir() and (number := _step_of(p)) is not None)
    # Newer steps belong to a timeline this run left (it resumed from an older, good checkpoint).
    for _, newer in (entry for entry in saved if entry[0] > step):
        shutil.rmtree(newer, ignore_errors=True)
    kept = [p for number, p in saved if number <= step]
    for old in kept[:-keep] if keep > 0 else []:  # keep <= 0: every checkpoint is kept
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_pointer(root: Path) -> str | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = "(unreadable)"
    # Only a sibling folder named like the ones we write: an edited pointer cannot lead out of the run.
    if not STEP_NAME.fullmatch(name):
        raise UserError(f"checkpoint pointer {pointer} names '{name[:60]}', not a checkpoint of this run")
    return name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, when its folder is there (unverified: `resume_checkpoint` verifies)."""
    root = Path(run_dir) / "checkpoints"
    name = _read_pointer(root)
    if name is None:
        return None
    path = root / name
    return path if (path / "state.json").exists() else None


def _line(err: BaseException) -> str:
    """An error's first line, clipped: messages here stay one line."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(f"checkpoint {path.parent} has no {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamaged(f"checkpoint {path.parent}: unreadable {what} ({_line(err)})") from None


def _tensors(path: Path) -> dict[str, Tensor]:
    """A checkpoint's safetensors file; anything else (a pickle, a truncated file) is refused unread."""
    try:
        return load_tensors(path)
    except Exception as err:  # safetensors raises several types for a file that is not its format
        raise CheckpointDamaged(
            f"checkpoint file {path} is not a readable safetensors file ({_line(err)})"
        ) from None


def _refuse_unreadable(path: Path) -> None:
    """Name a file that is not safetensors at all (a pickle put in its place) as such; reads the header."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # safetensors raises several types for a file that is not its format
        raise CheckpointDamaged(
            f"checkpoint file {path} is not a readable safetensors file ({_line(err)})"
        ) from None


def _refuse_another_run(path: Path, state: Any, fingerprint: str, identity: dict[str, Any]) -> None:
    if not isinstance(state, dict):
        return
    if "fingerprint" in state and state["fingerprint"] != fingerprint:
        raise CheckpointRefused(f"checkpoint {path} belongs to another recipe or model (fingerprint differs)")
    for key, value in identity.items():
        if key in state and state[key] != value:
            raise CheckpointRefused(
                f"checkpoint {path} belongs to another run ({key} {state[key]!r}, this run's {key} {value!r})"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_state(path: Path, state: Any, step: int, required: dict[str, Callable[[Any], bool]]) -> None:
    """The state's schema: what every checkpoint holds, and what the caller needs (`required`)."""
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"checkpoint {path}: state.json is not a JSON object")
    checks: dict[str, Callable[[Any], bool]] = {
        "step": lambda v: v == step,
        "optimizer": lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("param_groups"), list)
            and isinstance(v.get("scalars"), dict)
        ),
        "rng": lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("numpy"), list)
            and len(v["numpy"]) == 5
            and isinstance(v.get("python"), list)
            and len(v["python"]) == 3
        ),
        **required,
    }
    for key, valid in checks.items():
        if key not in state:
            raise CheckpointDamaged(f"checkpoint {path}: state.json has no '{key}'")
        if not valid(state[key]):
            raise CheckpointDamaged(f"checkpoint {path}: state.json holds a malformed '{key}'")


def verify_checkpoint(
    path: Path,
    *,
    fingerprint: str,
    identity: dict[str, Any] | None = None,
    required: dict[str, Callable[[Any], bool]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Check a checkpoint folder whole and read it (nothing restored): every file against `checksums.json`,
    the step against the folder's name, the run's identity (`fingerprint`, and `identity`'s keys such as
    the seed), the state's schema (`required`: key -> validity check). Returns the state and the tensors.
    Raises `CheckpointDamaged` (a resume may fall back to an older one) or `CheckpointRefused`."""
    step = _step_of(path)
    if step is None or not path.is_dir():
        raise CheckpointDamaged(f"checkpoint {path} is missing")
    if not (path / CHECKSUMS).exists():
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            state = None
        _refuse_another_run(path, state, fingerprint, identity or {})
        version = state.get("format") if isinstance(state, dict) else None
        if _is_number(version) and version < FORMAT_VERSION:
            raise CheckpointRefused(
                f"checkpoint {path} is from an older version of distill (format {version}, without "
                "checksums) and cannot be verified; start the run again with --overwrite"
            )
        raise CheckpointDamaged(f"checkpoint {path} has no {CHECKSUMS} (an incomplete or damaged checkpoint)")
    sums = _read_json(path / CHECKSUMS, CHECKSUMS)
    files = sums.get("files") if isinstance(sums, dict) else None
    if not isinstance(files, dict) or set(files) != set(FILES) or sums.get("step") != step:
        raise CheckpointDamaged(f"checkpoint {path}: malformed {CHECKSUMS}")
    if sums.get("format") != FORMAT_VERSION:
        raise CheckpointRefused(
            f"checkpoint {path}: format {sums.get('format')!r}, this version of distill reads "
            f"{FORMAT_VERSION}"
        )
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {path}: {name} is missing")
        if sha256_file(file) != files[name]:
            if name.endswith(".safetensors"):
                _refuse_unreadable(file)
            raise CheckpointDamaged(f"checkpoint {path}: {name} fails its checksum (damaged or edited)")
    state = _read_json(path / "state.json", "state.json")
    _refuse_another_run(path, state, fingerprint, identity or {})
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointDamaged(f"checkpoint {path}: state.json holds another format")
    _check_state(path, state, step, required or {})
    tensors = {name: _tensors(path / f"{name}.safetensors") for name in TENSOR_FILES}
    if not isinstance(tensors["rng"].get("torch"), Tensor):
        raise CheckpointDamaged(f"checkpoint {path}: rng.safetensors holds no torch generator state")
    return state, tensors


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objectives: nn.Module,
    fingerprint: str,
    identity: dict[str, Any] | None = None,
    required: dict[str, Callable[[Any], bool]] | None = None,
    restore: Callable[[dict[str, Any]], None] | None = None,
) -> Checkpoint:
    """Verify the checkpoint (`verify_checkpoint`), then restore weights, optimizer, objective state and RNG
    in place, and `restore(state)` what the caller keeps (a scheduler). Every file is read and checked
    before anything is restored: a checkpoint that fails verification leaves the model as it was."""
    state, tensors = verify_checkpoint(path, fingerprint=fingerprint, identity=identity, required=required)
    try:
        optim = unflatten_optimizer_state(tensors["optimizer"], state["optimizer"])
        _load_full_states(model, optimizer, tensors["model"], optim)
        objectives.load_state_dict(tensors["objectives"])
        restore_rng(tensors["rng"], state["rng"])
        if restore is not None:
            restore(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointDamaged(
            f"checkpoint {path} does not fit this run's model or state ({_line(err)})"
        ) from None
    return Checkpoint(path, state)


def resume_checkpoint(
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objectives: nn.Module,
    fingerprint: str,
    identity: dict[str, Any] | None = None,
    required: dict[str, Callable[[Any], bool]] | None = None,
    restore: Callable[[dict[str, Any]], None] | None = None,
    quiet: bool = False,
) -> Checkpoint | None:
    """Restore the newest good checkpoint of the run: the one `latest` names, else (with one warning line
    naming why; `quiet`: none, for the processes but the first) the newest other step folder that passes
    `verify_checkpoint`. None when the run saved no checkpoint; one line (`UserError`) when none is good, or
    one belongs to another run."""
    root = Path(run_dir) / "checkpoints"
    named = _read_pointer(root)
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None) if root.is_dir() else [],
        key=_step_of,
        reverse=True,
    )
    if named is None and not steps:
        return None  # nothing was saved: a fresh start
    candidates = ([root / named] if named is not None else []) + [p for p in steps if p.name != named]
    problems: list[str] = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(
                path,
                model=model,
                optimizer=optimizer,
                objectives=objectives,
                fingerprint=fingerprint,
                identity=identity,
                required=required,
                restore=restore,
            )
        except CheckpointDamaged as err:
            problems.append(str(err))
            continue
        if problems and not quiet:
            warn(f"{problems[0]}; resuming from {path.name} instead")
        return checkpoint
    older = f" (and {len(problems) - 1} older: none is good)" if len(problems) > 1 else ""
    raise UserError(f"{problems[0]}{older}; no checkpoint to resume from, start again with --overwrite")


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A LambdaLR's state without its functions (rebuilt from the recipe on resume)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The trainer's counters in `state.json`, each with its check: a checkpoint whose state fails one is damaged.
TRAINER_STATE: dict[str, Any] = {
    "epoch": _count,
    "batch": _count,
    "history": lambda rows: isinstance(rows, list) and all(isinstance(row, dict) for row in rows),
    "train_seconds": _number,
    "epoch_loss_sum": _number,
    "epoch_batches": _count,
    "scheduler": lambda value: isinstance(value, dict),
}

"""`distill export`: a trained student as a folder its ecosystem loads without distill.

- `hf` (language models): `save_pretrained` with its config and tokenizer, for
  `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.
- `hf` (text classifiers): the encoder's `save_pretrained` (its `config.json` names the labels in
  `id2label`) with the tokenizer, for `AutoModel.from_pretrained(dir)`, beside `head.safetensors` (the
  linear head) and `head.json` (pooling, pad id, maximum length, label names). No transformers class pools
  as these students do (mean over real tokens, or the CLS state without BERT's tanh pooler), so the card
  holds the dozen lines of plain transformers + torch that give the student's logits.
- `safetensors` (zoo and text classifiers): `model.safetensors` (the state dict) and `model.json`
  (architecture, constructor arguments, classes, input shape, normalisation; a text classifier's encoder
  config and tokenizer too); the model card says how to rebuild it.
- `onnx`: `model.onnx` through `torch.onnx.export`, beside the spec or tokenizer (needs the onnx package); a
  text classifier's graph takes right-padded `input_ids` alone (its padding mask is `ids != pad_id`).

Every export has a model card (`README.md`), the run's recipe (`recipe.yaml`, which `distill run` reproduces)
and `distill_export.json` (where it came from, and the sha256 of every other file but the card, which
`distill predict` / `distill eval` verify). The folder is written under a temporary sibling name and renamed
into place when complete: an interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import distill
from distill.errors import UserError, first_line, shown
from distill.export_card import model_card
from distill.export_student import (
    CAUSAL_LM,
    TEXT,
    Choice,
    FinishedRun,
    Student,
    choose_student,
    load_run_student,
    open_finished_run,
    quiet_transformers,
)
from distill.io import atomic_write_json, atomic_write_text, save_tensors, sha256_file

FORMATS = ("hf", "safetensors", "onnx")
MARKER = "distill_export.json"
MARKER_FORMAT = 1
CARD = "README.md"  # a user may edit the card: it is the one file without a checksum
HF_TASKS = (CAUSAL_LM, TEXT)  # students that are Hugging Face models


def default_format(task: str) -> str:
    return "hf" if task in HF_TASKS else "safetensors"


def check_format(fmt: str | None, task: str | None = None) -> str | None:
    """The format asked for, refused in one line when unknown, not for this kind of model, or not installed.
    Returns None when `fmt` is None and the task is not known yet."""
    if fmt is None:
        return default_format(task) if task is not None else None
    if fmt not in FORMATS:
        raise UserError(f"--format {shown(fmt)} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:  # torch.onnx.export writes through onnx; onnxruntime checks the graph against the model
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError(
                "--format onnx needs the onnx package (pip install onnx onnxruntime); "
                "hf and safetensors need nothing more"
            ) from None
    if fmt == "hf" and task is not None and task not in HF_TASKS:
        raise UserError(
            "--format hf is for Hugging Face models; this student is a distill zoo classifier: "
            "use --format safetensors or onnx"
        )
    return fmt


def check_out(out: Path) -> None:
    """An export never lands in a folder that holds anything."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")


def staging_folder(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror})") from None


def publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place (over an empty folder, which POSIX rename allows)."""
    # mkdtemp (and some writers' temporary files) made them private; an export is meant to be shared.
    os.chmod(staging, 0o777 & ~_umask())
    for file in staging.rglob("*"):
        if file.is_file():
            os.chmod(file, 0o666 & ~_umask())
    try:
        os.rename(staging, out)
    except OSError as err:
        raise UserError(f"--out {out}: cannot move the export into place ({err.strerror})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def labelled_encoder(student: Student) -> nn.Module:
    """The text student's encoder, its config naming the labels (`id2label` / `label2id`)."""
    assert student.spec is not None
    encoder = student.model.encoder
    names = student.spec["label_names"]
    encoder.config.id2label = dict(enumerate(names))
    encoder.config.label2id = {name: i for i, name in enumerate(names)}
    return encoder


def write_text_hf(student: Student, folder: Path) -> None:
    assert student.spec is not None
    with quiet_transformers():
        labelled_encoder(student).save_pretrained(str(folder), safe_serialization=True)
        student.tokenizer.save_pretrained(str(folder))
    head = {k: v.detach().contiguous() for k, v in student.model.head.state_dict().items()}
    save_tensors(folder / "head.safetensors", head, metadata={"format": "pt"})
    atomic_write_json(folder / "head.json", {**student.spec, "weights": "head.safetensors"})


def text_files(student: Student, folder: Path, weights: str) -> None:
    """A text classifier's model.json (with its encoder's config) and tokenizer, beside `weights`."""
    assert student.spec is not None
    config = labelled_encoder(student).config.to_dict()
    config.pop("transformers_version", None)
    with quiet_transformers():
        student.tokenizer.save_pretrained(str(folder))
    atomic_write_json(folder / "model.json", {**student.spec, "encoder_config": config, "weights": weights})


def write_hf(student: Student, folder: Path) -> None:
    if student.task == TEXT:
        write_text_hf(student, folder)
        return
    with quiet_transformers():
        student.model.save_pretrained(str(folder), safe_serialization=True)
        student.tokenizer.save_pretrained(str(folder))


def write_safetensors(student: Student, folder: Path) -> None:
    if student.task == CAUSAL_LM:  # a Hugging Face model's own safetensors layout is save_pretrained's
        write_hf(student, folder)
        return
    assert student.spec is not None
    save_tensors(folder / "model.safetensors", student.model.state_dict(), metadata={"format": "pt"})
    if student.task == TEXT:
        text_files(student, folder, "model.safetensors")
        return
    atomic_write_json(folder / "model.json", student.spec)


class _LogitsOnly(nn.Module):
    """A Hugging Face causal LM as `(input_ids, attention_mask) -> logits` for the ONNX graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def write_onnx(student: Student, folder: Path) -> None:
    """model.onnx with a dynamic batch (and sequence) axis, beside the spec or config and tokenizer; checked
    with onnxruntime against the model on inputs of another shape than the traced one."""
    if student.task == CAUSAL_LM:
        model: nn.Module = _LogitsOnly(student.model)
        names = ["input_ids", "attention_mask"]
        axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]}
        ids = torch.ones(1, 8, dtype=torch.long)
        example: tuple[torch.Tensor, ...] = (ids, torch.ones_like(ids))
        probe_ids = torch.randint(0, len(student.tokenizer), (2, 5))
        mask = torch.ones_like(probe_ids)
        mask[1, :2] = 0  # a left-padded row, as generation pads
        probe: tuple[torch.Tensor, ...] = (probe_ids, mask)
        student.model.config.save_pretrained(str(folder))
        student.tokenizer.save_pretrained(str(folder))
    elif student.task == TEXT:
        assert student.spec is not None
        model, names = student.model, ["input_ids"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
        pad, vocabulary = student.spec["pad_id"], len(student.tokenizer)
        example = (torch.tensor([[101, 2023, 2003, 1037, 3231, 102, pad, pad]]).clamp_max(vocabulary - 1),)
        probe_ids = torch.randint(0, vocabulary, (3, 11), generator=torch.Generator().manual_seed(0))
        probe_ids[probe_ids == pad] = (pad + 1) % vocabulary
        probe_ids[1, 6:], probe_ids[2, 2:] = pad, pad  # right-padded rows of other lengths
        probe = (probe_ids,)
        text_files(student, folder, "model.onnx")
    else:
        assert student.spec is not None
        model, names = student.model, ["input"]
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
        example, probe = (
            (torch.zeros(1, *student.spec["input_shape"]),),
            (torch.randn(3, *student.spec["input_shape"]),),
        )
        atomic_write_json(folder / "model.json", {**student.spec, "weights": "model.onnx"})
    try:
        with warnings.catch_warnings():  # the tracer's warnings: the check below decides
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(folder / "model.onnx"),
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                dynamo=False,  # the TorchScript exporter needs only onnx (the dynamo one also onnxscript)
            )
    except Exception as err:  # torch raises many types for a graph it cannot trace
        raise UserError(f"this student cannot be exported to ONNX ({first_line(err)})") from None
    check_onnx(folder / "model.onnx", model, dict(zip(names, probe, strict=True)))


def check_onnx(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Refuse a graph that does not give the model's logits (a trace that froze a shape or a branch)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        got = torch.from_numpy(session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0])
    except Exception as err:  # onnxruntime raises its own types for a graph it cannot run
        raise UserError(f"the ONNX graph of this student does not run ({first_line(err)})") from None
    with torch.inference_mode():
        want = model(*inputs.values()).float()
    scale = max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not bool(((got - want).abs() <= 1e-4 * scale).all()):
        raise UserError("the ONNX graph of this student does not reproduce its logits; use another --format")


WRITERS = {"hf": write_hf, "safetensors": write_safetensors, "onnx": write_onnx}


def recipe_copy(run: FinishedRun) -> str:
    """The run's recipe without its output folder, so that `distill run recipe.yaml` makes a new run."""
    document = run.recipe.model_dump(mode="json")
    document["output"] = {**document.get("output", {}), "dir": None}
    return yaml.safe_dump(document, sort_keys=False)


def marker(run: FinishedRun, choice: Choice, student: Student, fmt: str, folder: Path) -> dict[str, Any]:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {
        "format": MARKER_FORMAT,
        "task": run.task,
        "weights": fmt,
        "run": str(run.path),
        "recipe": run.recipe.name,
        "method": choice.method.name,
        "seed": choice.seed,
        "step": student.step,
        "distill_version": distill.__version__,
        "sha256": {name: sha256_file(folder / name) for name in files if name != CARD},
    }


@dataclass
class Exported:
    path: Path
    method: str
    seed: int
    why: str  # how the seed was chosen
    fmt: str


def export_student(
    run_dir: Path, out: Path, *, method: str | None = None, seed: int | None = None, fmt: str | None = None
) -> Exported:
    """Export the chosen student of the finished run in `run_dir` to the new folder `out`."""
    check_format(fmt)  # an unknown or uninstalled format is refused before anything is read
    check_out(out)
    run = open_finished_run(run_dir)
    fmt = check_format(fmt, run.task)
    assert fmt is not None
    choice = choose_student(run, method, seed)
    student = load_run_student(run, choice)
    staging = staging_folder(out)
    try:
        WRITERS[fmt](student, staging)
        atomic_write_text(staging / "recipe.yaml", recipe_copy(run))
        atomic_write_json(staging / MARKER, marker(run, choice, student, fmt, staging))
        atomic_write_text(staging / CARD, model_card(run, choice, student, fmt, out))
        check_out(out)  # something may have appeared there while the export was written
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out, choice.method.name, choice.seed, choice.why, fmt)

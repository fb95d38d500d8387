"""The model card (`README.md`) of an exported student: what it is, its teacher, objectives and data, its
metrics (mean ± std over the run's seeds), how to load it without distill, and how to reproduce it.

The plain-torch code for the `mlp` and `small_cnn` zoo models is run by `tests/test_export.py` exactly as it
stands in the card, without distill, so the card cannot drift from the zoo's layout; the transformers + torch
code of text classifiers likewise by `tests/test_export_text.py`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import distill
from distill.export_student import CAUSAL_LM, TEXT, Choice, FinishedRun, Student
from distill.models import count_parameters
from distill.tables import markdown_table, objective_text, pm
from distill.tasks.report_common import TEACHER_SOURCES

# key, label, scale, digits: the rows of the metrics table, in this order, when the run recorded them
METRIC_ROWS = {
    "classification": [
        ("accuracy", "test accuracy %", 100.0, 2),
        ("agreement", "top-1 agreement with the teacher %", 100.0, 2),
        ("teacher_kl", "KL(teacher ‖ student), nats", 1.0, 3),
        ("ece", "expected calibration error %", 100.0, 2),
    ],
    TEXT: [
        ("f1", "test macro F1 %", 100.0, 2),
        ("accuracy", "test accuracy %", 100.0, 2),
        ("agreement", "top-1 agreement with the teacher %", 100.0, 2),
        ("teacher_kl", "KL(teacher ‖ student), nats", 1.0, 3),
        ("ece", "expected calibration error %", 100.0, 2),
    ],
    CAUSAL_LM: [
        ("perplexity", "held-out perplexity", 1.0, 2),
        ("loss", "held-out cross-entropy, nats per token", 1.0, 3),
        ("accuracy", "next-token accuracy %", 100.0, 2),
        ("teacher_kl", "KL(teacher ‖ student), nats per token", 1.0, 3),
        ("agreement", "top-1 agreement with the teacher %", 100.0, 2),
        ("exact_match", "exact match %", 100.0, 2),
    ],
}

_HEADER = """import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

folder = Path(".")  # this folder
spec = json.loads((folder / "model.json").read_text())
params = spec["params"]
"""
_FOOTER = """model.load_state_dict(load_file(folder / "model.safetensors"))
model.eval()
"""
# The zoo's module names, rebuilt with torch.nn alone (the state dict's keys must match).
PLAIN_TORCH = {
    "mlp": """layers, width = [nn.Flatten()], math.prod(spec["input_shape"])
for size in params["hidden"]:
    layers += [nn.Linear(width, size), nn.ReLU()]
    if params["dropout"]:
        layers.append(nn.Dropout(params["dropout"]))
    width = size
model = nn.Sequential(OrderedDict(body=nn.Sequential(*layers), head=nn.Linear(width, spec["num_classes"])))
""",
    "small_cnn": """stages, width, channels = [], spec["input_shape"][0], params["channels"]
for i, out in enumerate(channels):
    stage = [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
    if i < len(channels) - 1:
        stage.append(nn.MaxPool2d(2))
    stages.append(nn.Sequential(*stage))
    width = out
model = nn.Sequential(
    OrderedDict(
        features=nn.Sequential(*stages),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        dropout=nn.Dropout(params["dropout"]) if params["dropout"] else nn.Identity(),
        head=nn.Linear(width, spec["num_classes"]),
    )
)
""",
}
_EXTERNAL = {
    "torchvision": """import torchvision

extra = {k: v for k, v in params.items() if k not in ("arch", "weights")}
model = torchvision.models.get_model(params["arch"], weights=None, num_classes=spec["num_classes"], **extra)
""",
    "timm": """import timm

extra = {k: v for k, v in params.items() if k not in ("arch", "pretrained")}
model = timm.create_model(
    params["arch"], num_classes=spec["num_classes"], in_chans=spec["input_shape"][0], **extra
)
""",
}
_WITH_DISTILL = """from distill.models import build_model

model = build_model(
    spec["architecture"], num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]), **params
)
"""
_IMAGE = """import numpy as np
from PIL import Image

c, h, w = spec["input_shape"]
image = Image.open("image.png").convert("L" if c == 1 else "RGB").resize((w, h))
x = torch.tensor(np.asarray(image), dtype=torch.float32).reshape(h, w, c).permute(2, 0, 1) / 255
mean, std = (torch.tensor(spec["preprocessing"][k])[:, None, None] for k in ("mean", "std"))
with torch.inference_mode():
    probs = model(((x - mean) / std)[None]).softmax(-1)[0]
names = spec["class_names"] or [str(i) for i in range(spec["num_classes"])]
print([(names[i], round(float(probs[i]), 3)) for i in probs.argsort(descending=True)[:3]])
"""
_HF = """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
ids = tokenizer({prompt})["input_ids"]
if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
    ids = [tokenizer.bos_token_id, *ids]  # every training sequence began with it
out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
print(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
"""
_ONNX_LM = """import numpy as np
import onnxruntime
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
session = onnxruntime.InferenceSession("{folder}/model.onnx")
ids = tokenizer({prompt})["input_ids"]
if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
    ids = [tokenizer.bos_token_id, *ids]  # every training sequence began with it
ids = np.array([ids], dtype=np.int64)
logits = session.run(["logits"], {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})[0]
"""
_ONNX_CLASSIFIER = """import json

import onnxruntime

spec = json.load(open("{folder}/model.json"))
session = onnxruntime.InferenceSession("{folder}/model.onnx")
# x: float32 (batch, *spec["input_shape"]), normalised as spec["preprocessing"] says
logits = session.run(["logits"], {{"input": x}})[0]
"""

# A text classifier in transformers + torch: the encoder, the tokenizer and the linear head, then the pooling
# the student was trained with. `_TEXT_HF` / `_TEXT_SAFETENSORS` build them, `_TEXT_USE` classifies.
_TEXT_HF = """import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = Path({folder!r})
spec = json.loads((folder / "head.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(folder)
encoder = AutoModel.from_pretrained(folder).eval()
head = torch.nn.Linear(encoder.config.hidden_size, spec["num_classes"])
head.load_state_dict(load_file(folder / "head.safetensors"))
"""
_TEXT_SAFETENSORS = """import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

folder = Path({folder!r})
spec = json.loads((folder / "model.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(folder)
encoder = AutoModel.from_config(AutoConfig.for_model(**spec["encoder_config"])).eval()
head = torch.nn.Linear(encoder.config.hidden_size, spec["num_classes"])
weights = load_file(folder / "model.safetensors")
for part, module in (("encoder.", encoder), ("head.", head)):
    module.load_state_dict({{k[len(part):]: v for k, v in weights.items() if k.startswith(part)}})
"""
_TEXT_USE = """

def classify(texts: list[str]) -> torch.Tensor:
    \"\"\"The student's logits, (len(texts), classes); spec["label_names"] names the classes.\"\"\"
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=spec["max_length"], return_tensors="pt"
    )
    mask = batch["attention_mask"]
    with torch.inference_mode():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        if spec["pooling"] == "cls":
            pooled = hidden[:, 0]
        else:  # the mean over real tokens
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return head(pooled)


probs = classify([{text!r}]).softmax(-1)[0]
print([(spec["label_names"][i], round(float(probs[i]), 3)) for i in probs.argsort(descending=True)])
"""
_ONNX_TEXT = """import json

import onnxruntime
from transformers import AutoTokenizer

spec = json.load(open("{folder}/model.json"))
tokenizer = AutoTokenizer.from_pretrained("{folder}")
session = onnxruntime.InferenceSession("{folder}/model.onnx")
texts = [{text!r}]
# right-padded token ids (the graph's padding mask is input_ids != spec["pad_id"])
ids = tokenizer(texts, padding=True, truncation=True, max_length=spec["max_length"], return_tensors="np")
logits = session.run(["logits"], {{"input_ids": ids["input_ids"].astype("int64")}})[0]
print([spec["label_names"][i] for i in logits.argmax(-1)])
"""


def text_code(fmt: str, folder: str, text: str) -> str:
    """Python that loads an exported text classifier with transformers + torch (or onnxruntime) alone and
    classifies `text`."""
    if fmt == "onnx":
        return _ONNX_TEXT.format(folder=folder, text=text)
    build = _TEXT_HF if fmt == "hf" else _TEXT_SAFETENSORS
    return build.format(folder=folder) + _TEXT_USE.format(text=text)


def example_text(student: Student) -> str:
    """A short text of the held-out split, as the card's example input."""
    test = getattr(student.data, "test", None)
    tensors = getattr(test, "tensors", None)
    if student.tokenizer is None or not tensors or not len(tensors[0]):
        return "an example text"
    words = str(student.tokenizer.decode(tensors[0][0], skip_special_tokens=True)).split()[:10]
    return " ".join(words) or "an example text"


def rebuild_code(spec: dict[str, Any]) -> tuple[str, bool]:
    """Python that rebuilds a zoo classifier from model.json and model.safetensors; and whether it needs no
    distill (plain torch, torchvision or timm)."""
    name = spec["architecture"]
    external = name.partition(":")[0]
    if name in PLAIN_TORCH:
        return _HEADER + PLAIN_TORCH[name] + _FOOTER, True
    if external in _EXTERNAL and (external != "torchvision" or spec["input_shape"][0] == 3):
        return _HEADER + _EXTERNAL[external] + _FOOTER, True
    return _HEADER + _WITH_DISTILL + _FOOTER, False


def _block(code: str) -> str:
    return f"```python\n{code}```\n"


def usage(student: Student, fmt: str, out: Path) -> str:
    folder = str(out)
    if student.task == TEXT:
        code = text_code(fmt, folder, example_text(student))
        if fmt == "onnx":
            return "## Use (ONNX Runtime)\n\n" + _block(code)
        pooling = (student.spec or {}).get("pooling", "mean")
        how = "the mean of its last hidden states over real tokens" if pooling == "mean" else "its CLS state"
        return (
            "## Use (transformers)\n\nNeeds torch, transformers and safetensors only (no distill). The "
            f"student's linear head reads {how}; no `AutoModelForSequenceClassification` class pools so "
            "(BERT's adds a tanh pooler), hence these lines. They give the student's logits. Labels: "
            + ", ".join(f"{i} `{n}`" for i, n in enumerate((student.spec or {}).get("label_names", [])))
            + f" (`{'config.json' if fmt == 'hf' else 'model.json'}`).\n\n"
            + _block(code)
        )
    if fmt == "onnx" and student.task != CAUSAL_LM:
        return "## Use (ONNX Runtime)\n\n" + _block(_ONNX_CLASSIFIER.format(folder=folder))
    if student.task == CAUSAL_LM:
        prompt = ""
        examples = getattr(student.data.test, "examples", None) or []
        if examples:
            ids = examples[0].ids[: examples[0].prompt_len]
            prompt = student.tokenizer.decode(ids, skip_special_tokens=True)[:80]
        if fmt == "onnx":
            return "## Use (ONNX Runtime)\n\n" + _block(_ONNX_LM.format(folder=folder, prompt=repr(prompt)))
        code = "import torch\n" + _HF.format(folder=folder, prompt=repr(prompt))
        return "## Use (transformers)\n\n" + _block(code)
    assert student.spec is not None
    code, plain = rebuild_code(student.spec)
    how = (
        "### Without distill\n\nRun in this folder; it needs torch and safetensors only.\n\n"
        if plain
        else "### With distill\n\nThis architecture's code lives in distill's model zoo (for a graph that "
        "needs no Python code, export with `--format onnx`).\n\n"
    )
    text = "## Use (PyTorch)\n\n" + how + _block(code)
    if student.spec.get("preprocessing"):
        text += (
            "\n### An image file\n\nThe run resized the shorter side and centre-cropped; a plain resize "
            "matches it for images of the model's aspect ratio.\n\n" + _block(_IMAGE)
        )
    return text


def metrics_table(run: FinishedRun, choice: Choice) -> str:
    teacher = (run.metrics.get("teacher") or {}).get("metrics") or {}
    seeds = [choice.finals[s] for s in run.recipe.seeds if s in choice.finals]
    chosen = choice.finals.get(choice.seed, {})
    headers = ["metric", f"this model (seed {choice.seed})", f"mean ± std over {len(seeds)} seeds", "teacher"]
    rows = []
    for key, label, scale, digits in METRIC_ROWS[run.task]:
        values = [float(row[key]) for row in seeds if isinstance(row.get(key), int | float)]
        if not values:
            continue
        mine = chosen.get(key)
        rows.append(
            [
                label,
                f"{scale * mine:.{digits}f}" if isinstance(mine, int | float) else "-",
                pm(values, scale, digits),
                f"{scale * teacher[key]:.{digits}f}" if isinstance(teacher.get(key), int | float) else "-",
            ]
        )
    return markdown_table(headers, rows) if rows else "No metrics were recorded.\n"


def facts(run: FinishedRun, choice: Choice, student: Student, fmt: str) -> str:
    recipe, method = run.recipe, choice.method
    teacher_doc = run.metrics.get("teacher") or {}
    lines = [f"- Student: `{recipe.student.name}` {dict(recipe.student.params)}, "]
    lines[0] += f"{count_parameters(student.model):,} parameters; exported as `{fmt}`."
    if recipe.teacher is not None:
        what = f"`{recipe.teacher.name}` {dict(recipe.teacher.params)}" if recipe.teacher.name else "a cache"
        where = TEACHER_SOURCES.get(teacher_doc.get("source", ""), "")
        size = f", {teacher_doc['parameters']:,} parameters" if "parameters" in teacher_doc else ""
        lines.append(f"- Teacher: {what}{size}" + (f", {where}" if where else "") + ".")
    else:
        lines.append("- Teacher: none (the student learnt from the labels alone).")
    terms = ", ".join(objective_text(o.model_dump(mode="json")) for o in method.objectives)
    source = method.source or recipe.source
    lines.append(
        f"- Method: {method.name}: {terms}"
        + (f"; source `{source.name}`" if source.name != "dataset" else "")
        + "."
    )
    lines.append(
        f"- Data: {run.metrics.get('data') or recipe.data.name} "
        f"(`{recipe.data.name}` {dict(recipe.data.params)})."
    )
    lines.append(
        f"- Training: {recipe.trainer.epochs} epochs, batch size {recipe.data.batch_size}, "
        f"{recipe.optimizer.name} lr {recipe.optimizer.lr:g}; seeds {', '.join(map(str, recipe.seeds))}; "
        f"this is seed {choice.seed}, {choice.why} (step {student.step})."
    )
    return "\n".join(lines) + "\n"


def model_card(run: FinishedRun, choice: Choice, student: Student, fmt: str, out: Path) -> str:
    recipe = run.recipe
    command = ["distill", "export", "run", "--out", "export", "--method", choice.method.name]
    command += ["--seed", str(choice.seed), "--format", fmt]
    return (
        f"# {recipe.name}: {choice.method.name} student\n\n"
        + (f"{recipe.description}\n\n" if recipe.description else "")
        + facts(run, choice, student, fmt)
        + "\n## Metrics\n\nHeld-out split of the run, last epoch"
        + ("" if run.task == CAUSAL_LM else " (the weights here are the last epoch's)")
        + ".\n\n"
        + metrics_table(run, choice)
        + "\n"
        + usage(student, fmt, out)
        + "\n## Reproduce\n\n`recipe.yaml` here is the run's recipe (its output folder left out). With "
        f"distill {distill.__version__}:\n\n"
        f"```sh\ndistill run recipe.yaml --out run\n{shlex.join(command)}\n```\n"
        + "\nData files the recipe names by a relative path are read from the working folder.\n"
        + f"\nExported with distill {distill.__version__} from `{run.path}`.\n"
    )
